//! The prompt of a chat with tools. The tools reach the model through its
//! chat template's `tools` variable (as transformers'
//! `apply_chat_template(tools=...)`), earlier calls' arguments given as
//! objects (as vLLM passes them). A template that does not read `tools`
//! (SmolLM2's) gets the Hermes convention instead (Qwen2.5's wording): a
//! system prompt listing the tools in `<tools></tools>`, earlier calls as
//! `<tool_call>` blocks in the assistant turn, and tool results as user
//! turns in `<tool_response></tool_response>`.

use serde_json::{Value, json};
use tandem_engine::{ChatMessage, ChatOptions, Tokenizer};

use crate::openai_tools::{ChatTurn, ToolPlan};

/// A call's arguments as an object (they come as JSON text), for templates
/// that write `arguments | tojson`, as vLLM passes them.
fn arguments_value(call: &Value) -> Value {
    match call.pointer("/function/arguments") {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_else(|_| json!(s)),
        Some(v) => v.clone(),
        None => json!({}),
    }
}

/// The prompt text for `turns` with `plan`'s tools offered (none offered
/// when `plan` is `None`), rendered as `options` say.
pub fn render(
    tokenizer: &Tokenizer,
    turns: &[ChatTurn],
    plan: Option<&ToolPlan>,
    options: &ChatOptions<'_>,
) -> tandem_engine::Result<String> {
    let tool_turns = turns
        .iter()
        .any(|m| m.role == "tool" || m.tool_calls.is_some());
    if tokenizer.chat_template_takes_tools() && (plan.is_some() || tool_turns) {
        let messages: Vec<Value> = turns
            .iter()
            .map(|m| {
                let mut v = json!({"role": m.role, "content": m.content});
                if let Some(calls) = &m.tool_calls {
                    let calls: Vec<Value> = calls
                        .iter()
                        .map(|c| {
                            let mut c = c.clone();
                            c["function"]["arguments"] = arguments_value(&c);
                            c
                        })
                        .collect();
                    v["tool_calls"] = json!(calls);
                }
                if let Some(id) = &m.tool_call_id {
                    v["tool_call_id"] = json!(id);
                }
                v
            })
            .collect();
        let tools = plan.map(|p| json!(p.tools.iter().map(|t| &t.definition).collect::<Vec<_>>()));
        return tokenizer.apply_chat_template_json(&json!(messages), tools.as_ref(), options);
    }
    tokenizer.apply_chat_template_json(&json!(hermes_messages(turns, plan)), None, options)
}

/// The Hermes tool prompt, as Qwen2.5's and Hermes-2-Pro's templates write it.
pub fn hermes_system_prompt(plan: &ToolPlan) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in &plan.tools {
        s.push('\n');
        s.push_str(&t.definition.to_string());
    }
    s.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// `turns` as plain messages in the Hermes convention, for a template that
/// does not read `tools`.
fn hermes_messages(turns: &[ChatTurn], plan: Option<&ToolPlan>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(turns.len() + 1);
    for m in turns {
        let mut content = m.content.clone().unwrap_or_default();
        let role = match m.role.as_str() {
            "tool" => {
                content = format!("<tool_response>\n{content}\n</tool_response>");
                "user"
            }
            other => other,
        };
        for c in m.tool_calls.iter().flatten() {
            // The name first, as the convention writes it.
            let name = c.pointer("/function/name").cloned().unwrap_or(Value::Null);
            let call = format!(
                "{{\"name\": {name}, \"arguments\": {}}}",
                arguments_value(c)
            );
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
        }
        out.push(ChatMessage {
            role: role.to_string(),
            content,
        });
    }
    if let Some(plan) = plan {
        let prompt = hermes_system_prompt(plan);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{prompt}", first.content);
            }
            _ => out.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: prompt,
                },
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai_tools::plan;
    use crate::openai_tools::tests::{fields, model, turns, weather};

    const GENERATE: ChatOptions<'static> = ChatOptions {
        add_generation_prompt: true,
        continue_final_message: false,
        documents: None,
        template_kwargs: None,
    };

    #[test]
    fn hermes_fallback_offers_tools_and_renders_calls_and_results() {
        let model = model();
        let tok = &model.tokenizer;
        assert!(!tok.chat_template_takes_tools());
        let p = plan(&fields(json!({"tools": [weather()]})), tok)
            .unwrap()
            .unwrap();
        let history = turns(json!([
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
        ]));
        let text = render(tok, &history, Some(&p), &GENERATE).unwrap();
        assert!(text.contains("<tools>\n{"), "{text}");
        assert!(text.contains("\"get_weather\""), "{text}");
        assert!(
            text.contains(
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Oslo\"}}\n</tool_call>"
            ),
            "{text}"
        );
        assert!(
            text.contains("<tool_response>\ncold\n</tool_response>"),
            "{text}"
        );
        // No tools and no tool turns: the prompt is what the template alone makes.
        let plain = turns(json!([{"role": "user", "content": "hi"}]));
        let expected = tok
            .apply_chat_template(
                &[ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                }],
                true,
            )
            .unwrap();
        assert_eq!(render(tok, &plain, None, &GENERATE).unwrap(), expected);
    }
}
