//! The OpenAI-compatible HTTP API, driven by the official `openai` Python client
//! (installed by scripts/test.sh) against a real cluster on loopback.

use tandem_proto::v1 as pb;
use tandem_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_client_library_works_against_the_router() {
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let cluster = Cluster::start(model.clone(), spec).await;
    let base = format!(
        "http://{}/v1",
        cluster.http.expect("the router serves HTTP")
    );
    // A token greedy decoding generates, not generated before it: stop_token_ids
    // over HTTP must end the completion there.
    let prompt = model.tokenizer.encode("Once upon a time", true).unwrap();
    let greedy = reference(&model, &prompt, 8);
    let stop_at = (1..greedy.len())
        .find(|&i| !greedy[..i].contains(&greedy[i]))
        .expect("greedy decoding generates two distinct tokens");
    let stop_token = greedy[stop_at].to_string();
    // The first token's ranking under the engine's own logits, for logit_bias.
    let first_logits = reference_logits(&model, &prompt, 1).remove(0);
    let mut ranked: Vec<u32> = (0..first_logits.len() as u32).collect();
    ranked.sort_by(|&a, &b| {
        first_logits[b as usize]
            .total_cmp(&first_logits[a as usize])
            .then(a.cmp(&b))
    });
    // A token from the middle of the ranking whose text stands alone.
    let promoted = *ranked[ranked.len() / 2..]
        .iter()
        .find(|&&t| {
            let s = model.tokenizer.decode(&[t]).unwrap();
            !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric())
        })
        .expect("a plain-text token");
    let (greedy_first, runner_up) = (ranked[0], ranked[1]);
    assert_eq!(greedy_first, greedy[0]);
    // A special token: no text unless skip_special_tokens is false.
    let special = (0..model.config.vocab_size as u32)
        .find(|&t| {
            model.tokenizer.decode(&[t]).unwrap().is_empty()
                && !model.tokenizer.decode_with(&[t], false).unwrap().is_empty()
                && !model.config.eos_token_ids.contains(&t)
        })
        .expect("a special token that is not EOS");
    let args = [
        stop_token,
        greedy_first.to_string(),
        runner_up.to_string(),
        promoted.to_string(),
        model.config.vocab_size.to_string(),
        special.to_string(),
        // The greedy text's first token, as a word to ban (vLLM's bad_words).
        model
            .tokenizer
            .decode(&greedy[..1])
            .unwrap()
            .trim()
            .to_string(),
    ];
    let mut script_args = vec![base];
    script_args.extend(args);
    let seen = run_client_script("openai_client.py", script_args).await;

    assert_eq!(seen["models"][0], model.name());
    // OpenAI's retrieve: the model object, or 404 naming the model asked for.
    assert_eq!(seen["retrieved"], model.name());
    let unknown = &seen["retrieve_unknown"];
    assert_eq!(unknown["status"], 404, "{unknown}");
    assert!(
        unknown["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-model"),
        "{unknown}"
    );
    // vLLM's skip_special_tokens: a special token forced three times (logit
    // bias) makes no text by default, and its text with false, streamed too.
    let sp = &seen["special"];
    let kept = model.tokenizer.decode_with(&[special; 3], false).unwrap();
    assert_eq!(sp["default"], "", "{sp}");
    assert_eq!(sp["kept"], kept.as_str(), "{sp}");
    assert_eq!(sp["kept_stream"], kept.as_str(), "{sp}");
    assert_eq!(sp["kept_bare_stream"], kept.as_str(), "{sp}");
    // Greedy completion equals the engine's own, in one piece and streamed.
    let expected = generated_text(&model, &greedy);
    assert_eq!(seen["completion"]["text"], expected.as_str());
    assert_eq!(seen["completion"]["finish_reason"], "length");
    assert_eq!(seen["completion"]["prompt_tokens"], prompt.len());
    assert_eq!(seen["completion"]["completion_tokens"], 8);
    assert_eq!(seen["completion"]["stop_reason"], serde_json::Value::Null);
    assert_eq!(seen["completion_stream"]["text"], expected.as_str());
    assert_eq!(seen["completion_stream"]["finish_reason"], "length");
    assert!(
        seen["completion_stream"]["chunks"].as_u64().unwrap() >= 2,
        "streamed in pieces"
    );
    // vLLM's /tokenize and /detokenize: the cluster's own tokens.
    let tok = &seen["tokenize"];
    let ok = |case: &str| {
        assert_eq!(tok[case]["status"], 200, "{case}: {}", tok[case]);
        &tok[case]["body"]
    };
    assert_eq!(tok["version"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ok("prompt")["tokens"], serde_json::json!(prompt));
    assert_eq!(ok("prompt")["count"], prompt.len());
    assert_eq!(
        ok("prompt")["max_model_len"],
        model.config.max_position_embeddings
    );
    assert_eq!(ok("prompt")["token_strs"], serde_json::Value::Null);
    let bare = model.tokenizer.encode("Once upon a time", false).unwrap();
    let strs: Vec<String> = bare
        .iter()
        .map(|&t| model.tokenizer.id_to_token(t).unwrap())
        .collect();
    assert_eq!(ok("strs")["tokens"], serde_json::json!(bare));
    assert_eq!(ok("strs")["token_strs"], serde_json::json!(strs));
    assert_eq!(
        ok("detokenize")["prompt"],
        model.tokenizer.decode(&prompt).unwrap().as_str()
    );
    for (case, status, word) in [
        ("bad_model", 404, "no-such-model"),
        ("unknown_field", 400, "tools"),
        ("both", 400, "not both"),
        ("bad_token", 400, "outside the vocabulary"),
    ] {
        let e = &tok[case];
        assert_eq!(e["status"], status, "{case}: {e}");
        let message = e["body"]["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(word),
            "{case}: {message:?} should mention {word}"
        );
    }
    // A batch of prompts: each prompt's n choices in turn (vLLM's numbering),
    // the usage counting each prompt once.
    let second = model
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    let first_text = generated_text(&model, &greedy[..4]);
    let second_text = generated_text(&model, &reference(&model, &second, 4));
    let batch_texts = serde_json::json!([first_text, first_text, second_text, second_text]);
    for case in ["batch", "batch_stream"] {
        let b = &seen[case];
        assert_eq!(b["indices"], serde_json::json!([0, 1, 2, 3]), "{case}: {b}");
        assert_eq!(b["texts"], batch_texts, "{case}: {b}");
        assert_eq!(
            b["prompt_tokens"],
            prompt.len() + second.len(),
            "{case}: {b}"
        );
        assert_eq!(b["completion_tokens"], 16, "{case}: {b}");
    }
    // Continuous usage (vLLM's `continuous_usage_stats`): each choice's chunks
    // count its prompt and its tokens so far, one more a token; the finishing
    // chunk repeats the count; the last chunk is the whole batch's usage.
    // Without continuous_usage_stats only the last chunk has a usage.
    assert_eq!(
        seen["batch_stream"]["choice_chunks_with_usage"], 0,
        "{}",
        seen["batch_stream"]
    );
    let cu = &seen["continuous_usage"];
    for (index, prompt_len) in [
        (0, prompt.len()),
        (1, prompt.len()),
        (2, second.len()),
        (3, second.len()),
    ] {
        let p = prompt_len as u32;
        let want: Vec<[u32; 3]> = [1, 2, 3, 4, 4].map(|c| [p, c, p + c]).to_vec();
        assert_eq!(
            cu["running"][index.to_string()],
            serde_json::json!(want),
            "choice {index}: {cu}"
        );
    }
    assert_eq!(
        cu["last"],
        serde_json::json!([prompt.len() + second.len(), 16]),
        "{cu}"
    );
    let chat = cu["chat"].as_array().cloned().unwrap_or_default();
    let chat_prompt = chat.first().map(|u| u[0].clone()).unwrap_or_default();
    let counts: Vec<_> = chat.iter().map(|u| u[1].clone()).collect();
    assert_eq!(
        counts,
        serde_json::json!([1, 2, 3, 3])
            .as_array()
            .cloned()
            .unwrap_or_default(),
        "{cu}"
    );
    assert!(chat_prompt.as_u64().is_some_and(|p| p > 0), "{cu}");
    assert!(
        chat.iter().all(|u| u[0] == chat_prompt
            && u[2] == u[0].as_u64().unwrap_or(0) + u[1].as_u64().unwrap_or(0)),
        "{cu}"
    );
    // Chat: the template is applied, the answer is the assistant's, streamed or not.
    let messages = [
        tandem_engine::ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        tandem_engine::ChatMessage {
            role: "user".into(),
            content: "Tell me a story.".into(),
        },
    ];
    let chat_prompt = model
        .tokenizer
        .encode(
            &model
                .tokenizer
                .apply_chat_template(&messages, true)
                .unwrap(),
            false,
        )
        .unwrap();
    let chat_expected = generated_text(&model, &reference(&model, &chat_prompt, 6));
    assert_eq!(seen["chat"]["content"], chat_expected.as_str());
    assert_eq!(seen["chat"]["role"], "assistant");
    // The Responses API renders the same prompt (instructions as the system
    // message), so its text is the chat's; cut at max_output_tokens it is
    // "incomplete", as OpenAI says.
    let rs = &seen["responses"];
    assert_eq!(rs["text"], chat_expected.as_str(), "{rs}");
    assert_eq!(rs["messages_text"], chat_expected.as_str(), "{rs}");
    assert_eq!(rs["stream_text"], chat_expected.as_str(), "{rs}");
    assert_eq!(rs["stream_final"], chat_expected.as_str(), "{rs}");
    assert_eq!(rs["status"], "incomplete", "{rs}");
    assert_eq!(rs["incomplete"], "max_output_tokens", "{rs}");
    assert_eq!(rs["role"], "assistant", "{rs}");
    assert_eq!(rs["usage"]["input"], chat_prompt.len(), "{rs}");
    assert_eq!(rs["usage"]["output"], 6, "{rs}");
    assert_eq!(rs["usage"]["total"], chat_prompt.len() + 6, "{rs}");
    assert!(rs["id"].as_str().unwrap().starts_with("resp_"), "{rs}");
    let types: Vec<&str> = rs["stream_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        types[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        types[types.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete"
        ]
    );
    assert!(types.contains(&"response.output_text.delta"), "{rs}");
    let sequence: Vec<u64> = rs["stream_sequence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(sequence, (0..sequence.len() as u64).collect::<Vec<_>>());
    assert!(
        ["\"yes\"", "\"no\""].contains(&rs["schema_text"].as_str().unwrap()),
        "{rs}"
    );
    // The output tokens' log probabilities (include + top_logprobs), as the
    // chat API's entries: greedy, so each token is its top alternative.
    let lps = rs["logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), 6, "{rs}");
    for e in lps {
        assert!(e["logprob"].as_f64().unwrap() <= 0.0, "{e}");
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{e}");
        assert_eq!(top[0]["token"], e["token"], "{e}");
    }
    assert_eq!(
        rs["logprobs_stream"], rs["logprobs"],
        "streamed, the deltas carry the same entries"
    );
    // vLLM's cache_salt: honoured (the same text), an empty one refused.
    assert_eq!(rs["salted_text"], rs["text"], "{rs}");
    assert_eq!(rs["cache_salt"]["param"], "cache_salt", "{rs}");
    for field in ["previous_response_id", "tools", "foo", "cache_salt"] {
        let e = &rs[field];
        assert_eq!(e["status"], 400, "{field}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(field),
            "{field}: {e}"
        );
    }
    assert_eq!(rs["tools"]["param"], "tools[0].type", "{rs}");
    assert_eq!(rs["foo"]["param"], "foo", "{rs}");
    // vLLM's return_token_ids: the prompt's ids as the service encodes them,
    // each choice's the greedy reference's; streamed, the prompt's come with
    // the first chunk only and each chunk brings its own ids.
    let ti = &seen["token_ids"];
    let chat_greedy = reference(&model, &chat_prompt, 6);
    assert_eq!(
        ti["completion"]["prompt_token_ids"],
        serde_json::json!(prompt),
        "{ti}"
    );
    assert_eq!(
        ti["completion"]["token_ids"],
        serde_json::json!(greedy[..4]),
        "{ti}"
    );
    let mut firsts = vec![serde_json::json!(prompt)];
    firsts.extend(std::iter::repeat_n(serde_json::Value::Null, 4));
    assert_eq!(
        ti["completion_stream"]["prompt_token_ids"],
        serde_json::json!(firsts),
        "{ti}"
    );
    assert_eq!(
        ti["completion_stream"]["token_ids"],
        serde_json::json!(greedy[..4]),
        "{ti}"
    );
    assert_eq!(
        ti["chat"]["prompt_token_ids"],
        serde_json::json!(chat_prompt),
        "{ti}"
    );
    assert_eq!(
        ti["chat"]["token_ids"],
        serde_json::json!(chat_greedy),
        "{ti}"
    );
    let mut firsts = vec![serde_json::json!(chat_prompt)];
    firsts.extend(std::iter::repeat_n(serde_json::Value::Null, 6));
    assert_eq!(
        ti["chat_stream"]["prompt_token_ids"],
        serde_json::json!(firsts),
        "{ti}"
    );
    assert_eq!(
        ti["chat_stream"]["token_ids"],
        serde_json::json!(chat_greedy),
        "{ti}"
    );
    // vLLM's truncate_prompt_tokens: the prompt's last tokens only, run as
    // the engine runs them; 0 is refused naming the field.
    let tr = &seen["truncate"];
    let last3 = &prompt[prompt.len() - 3..];
    assert_eq!(tr["prompt_token_ids"], serde_json::json!(last3), "{tr}");
    assert_eq!(tr["prompt_tokens"], 3, "{tr}");
    assert_eq!(
        tr["token_ids"],
        serde_json::json!(reference(&model, last3, 4)),
        "{tr}"
    );
    assert_eq!(tr["chat_prompt_tokens"], 5, "{tr}");
    // vLLM's allowed_token_ids: every token drawn is one of them (sampled,
    // the greedy token not among them); refused with another constraint or
    // outside the vocabulary.
    let al = &seen["allowed_token_ids"];
    let drawn = al["token_ids"].as_array().cloned().unwrap_or_default();
    assert_eq!(drawn.len(), 8, "{al}");
    assert!(
        drawn
            .iter()
            .all(|t| t.as_u64() == Some(runner_up as u64) || t.as_u64() == Some(promoted as u64)),
        "{al}"
    );
    for case in ["with_regex", "outside"] {
        assert_eq!(al[case]["status"], 400, "{case}: {al}");
        let message = al[case]["message"].as_str().unwrap_or_default();
        assert!(message.contains("allowed_token_ids"), "{case}: {al}");
    }
    // vLLM's bad_words: none of the word's token sequences (the word, and
    // with a leading space where vLLM keeps that) is written, so greedy
    // decoding leaves its path at once.
    let bw = &seen["bad_words"];
    let word = model
        .tokenizer
        .decode(&greedy[..1])
        .unwrap()
        .trim()
        .to_string();
    let bare = model.tokenizer.encode(&word, false).unwrap();
    let spaced = model.tokenizer.encode(&format!(" {word}"), false).unwrap();
    let mut banned = vec![bare.clone()];
    if spaced.len() == bare.len() && spaced[0] != bare[0] {
        banned.push(spaced);
    }
    let ids: Vec<u32> = bw["token_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ids.len(), 8, "{bw}");
    for b in &banned {
        assert!(
            ids.windows(b.len()).all(|w| w != b.as_slice()),
            "{b:?} in {bw}"
        );
    }
    assert!(
        banned
            .iter()
            .any(|b| b[..] == greedy[..b.len().min(greedy.len())]),
        "{banned:?}"
    );
    assert_ne!(ids[..], greedy[..8], "{bw}");
    assert_eq!(tr["zero"]["status"], 400, "{tr}");
    assert_eq!(tr["zero"]["param"], "truncate_prompt_tokens", "{tr}");
    assert_eq!(ti["echo"]["status"], 400, "{ti}");
    assert_eq!(ti["echo"]["param"], "return_token_ids", "{ti}");
    assert_eq!(seen["chat"]["prompt_tokens"], chat_prompt.len());
    assert_eq!(seen["chat_stream"]["content"], chat_expected.as_str());
    assert_eq!(seen["chat_parts"]["content"], chat_expected.as_str());
    assert_eq!(seen["chat_parts"]["prompt_tokens"], chat_prompt.len());
    // /tokenize renders messages as the chat endpoint does.
    assert_eq!(
        seen["tokenize"]["chat"]["body"]["tokens"],
        serde_json::json!(chat_prompt)
    );
    assert_eq!(seen["chat_image"]["status"], 400, "{}", seen["chat_image"]);
    assert!(
        seen["chat_image"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"image_url\"") && m.contains("text only")),
        "{}",
        seen["chat_image"]
    );
    assert_eq!(
        seen["chat_stream"]["roles"],
        serde_json::json!(["assistant"])
    );
    // Log probabilities over HTTP are the gRPC stream's, in OpenAI's shapes.
    let grpc = cluster.client().await;
    let grpc_logprobs = |prompt: Vec<u32>| {
        let mut client = grpc.clone();
        async move {
            let mut request = greedy_request(&prompt, 6);
            request.logprobs = Some(3);
            complete_with_logprobs(&mut client, request)
                .await
                .expect("gRPC logprobs")
                .1
        }
    };
    let completion_lp = grpc_logprobs(prompt.clone()).await;
    let chat_lp = grpc_logprobs(chat_prompt.clone()).await;
    assert_eq!((completion_lp.len(), chat_lp.len()), (6, 6));
    let lp = &seen["logprobs"];
    check_completion_logprobs(&model, &lp["completion"], &completion_lp);
    check_completion_logprobs(&model, &lp["completion_stream"], &completion_lp);
    assert!(
        lp["completion_stream"]["chunks"].as_u64().unwrap() >= 2,
        "streamed with each delta"
    );
    check_chat_logprobs(&model, &lp["chat"], &chat_lp, 3);
    check_chat_logprobs(&model, &lp["chat_stream"]["content"], &chat_lp, 3);
    assert!(
        lp["chat_stream"]["chunks"].as_u64().unwrap() >= 2,
        "streamed with each delta"
    );
    check_chat_logprobs(&model, &lp["chat_no_top"], &chat_lp, 0);
    assert_eq!(lp["not_asked"]["completion"], true);
    // vLLM's return_tokens_as_token_ids: the same tokens, named `token_id:N`,
    // their offsets counting those names, streamed or not, chat too.
    let name = |id: u32| format!("token_id:{id}");
    let names: Vec<String> = completion_lp.iter().map(|e| name(e.id)).collect();
    let offsets: Vec<usize> = names
        .iter()
        .scan(0, |at, n| {
            let o = *at;
            *at += n.len();
            Some(o)
        })
        .collect();
    for case in ["as_ids", "as_ids_stream"] {
        assert_eq!(lp[case]["tokens"], serde_json::json!(names), "{case}");
        assert_eq!(
            lp[case]["text_offset"],
            serde_json::json!(offsets),
            "{case}"
        );
    }
    for (i, want) in completion_lp.iter().enumerate() {
        let mut keys: Vec<String> = want.top.iter().map(|t| name(t.id)).collect();
        keys.push(name(want.id));
        keys.sort();
        keys.dedup();
        let mut seen_keys: Vec<String> = lp["as_ids"]["top_logprobs"][i]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        seen_keys.sort();
        assert_eq!(seen_keys, keys, "token {i}");
    }
    let chat_names: Vec<String> = chat_lp.iter().map(|e| name(e.id)).collect();
    let seen_chat: Vec<String> = lp["as_ids_chat_stream"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|e| e["token"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(seen_chat, chat_names);
    for (e, want) in lp["as_ids_chat_stream"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(&chat_lp)
    {
        let top: Vec<String> = want.top.iter().map(|t| name(t.id)).collect();
        let seen_top: Vec<String> = e["top_logprobs"]
            .as_array()
            .map(|t| {
                t.iter()
                    .map(|x| x["token"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(seen_top, top, "{e}");
        assert_eq!(
            e["bytes"],
            serde_json::json!(name(want.id).into_bytes()),
            "{e}"
        );
    }
    for (case, param) in [
        ("completions.logprobs", "logprobs"),
        ("chat.top_logprobs", "top_logprobs"),
        ("chat.top_logprobs_without_logprobs", "top_logprobs"),
    ] {
        let e = &lp["errors"][case];
        assert_eq!(e["status"], 400, "{case}: {e}");
        assert_eq!(e["param"], param, "{case}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(param),
            "{case}: {e}"
        );
    }
    drop(grpc);

    // A repeated prompt reports its cached tokens, streamed or not; the first, none.
    let cached = &seen["cached_tokens"];
    assert!(cached["prompt_tokens"].as_u64().unwrap() > 32, "{cached}");
    for case in ["completion", "chat"] {
        assert_eq!(cached[format!("{case}_first")], 0, "{case}: {cached}");
        for again in ["second", "stream"] {
            let n = cached[format!("{case}_{again}")].as_u64().unwrap_or(0);
            assert!(n > 0, "{case}_{again}: {cached}");
        }
    }
    // vLLM's cache_salt: the salted prompt found nothing the unsalted runs
    // cached, then its own blocks, and another salt none; the text is the same.
    let salted = &seen["cache_salt"];
    assert_eq!(salted["a_first"], 0, "{salted}");
    assert!(salted["a_second"].as_u64().unwrap_or(0) > 0, "{salted}");
    assert_eq!(salted["b_first"], 0, "{salted}");
    for case in ["a_first_text", "a_second_text", "b_first_text"] {
        assert_eq!(salted[case], salted["plain_text"], "{case}: {salted}");
    }
    let empty = &salted["empty"];
    assert_eq!(empty["status"], 400, "{empty}");
    assert_eq!(empty["param"], "cache_salt", "{empty}");
    // Errors: OpenAI's shape, the right status, a message naming the problem.
    let errors = &seen["errors"];
    // A sampling parameter out of range: a 400 whose `param` names it.
    for (case, field) in [
        ("negative_temperature", "temperature"),
        ("top_p_zero_point", "top_p"),
        ("repetition_penalty_zero", "repetition_penalty"),
        ("presence_penalty_three", "presence_penalty"),
        ("frequency_penalty_minus_three", "frequency_penalty"),
        ("min_p_two", "min_p"),
        ("top_k_minus_five", "top_k"),
    ] {
        let e = &errors[case];
        assert_eq!(e["status"], 400, "{case}: {e}");
        assert_eq!(e["param"], field, "{case}: {e}");
        let message = e["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(field), "{case}: {message:?}");
    }
    for (case, status, word) in [
        ("unknown_model", 404, "no-such-model"),
        ("too_many_tokens", 400, "max_tokens"),
        ("prompt_batch_empty", 400, "prompt is empty"),
        ("prompt_shape", 400, "a string, a list of token ids"),
        ("invalid_utf8", 400, "invalid request body"),
        ("invalid_json", 400, "invalid request body"),
    ] {
        let e = &errors[case];
        assert_eq!(e["status"], status, "{case}: {e}");
        let message = e["message"]
            .as_str()
            .or(e["body"]["error"]["message"].as_str())
            .unwrap_or_default();
        assert!(
            message.contains(word),
            "{case}: {message:?} should mention {word}"
        );
    }

    // Past the context: vLLM's message, with the numbers.
    let e = &errors["past_the_context"];
    assert_eq!(e["status"], 400, "{e}");
    let message = e["message"].as_str().unwrap_or_default();
    let context = model.config.max_position_embeddings;
    assert!(
        message.starts_with(&format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the messages, 1024 in the completion).",
            chat_prompt.len() + 1024,
            chat_prompt.len()
        )),
        "{message}"
    );

    // Each field Tandem cannot honour: 400 naming it, and the next request is served.
    let refused = seen["refused"].as_object().unwrap();
    // `n`, `best_of`, `use_beam_search` (tests/e2e/nbest.rs) and `tools`,
    // `tool_choice` (tests/e2e/tools.rs) are honoured now.
    assert_eq!(refused.len(), 7, "{refused:?}");
    for (case, got) in refused {
        let field = case.split_once('.').unwrap().1;
        let e = &got["error"];
        assert_eq!(e["status"], 400, "{case}: {got}");
        assert_eq!(e["param"], field, "{case}: {got}");
        let message = e["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("`{field}`"))
                && (message.contains("not supported") || message.contains("unknown field")),
            "{case}: {message:?}"
        );
        assert_eq!(got["next_tokens"], 2, "{case}: the next request: {got}");
    }
    assert!(
        refused["completions.max_token"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field")
    );
    // Their neutral values pass.
    assert_eq!(seen["neutral"]["completion_tokens"], 2);
    assert_eq!(seen["neutral"]["chat_tokens"], 2);

    // stop_token_ids ends the completion at that token, its text left out.
    let stopped = &seen["stop_token_ids"];
    let before = model.tokenizer.decode(&greedy[..stop_at]).unwrap();
    assert_eq!(stopped["text"], before.as_str(), "{stopped}");
    assert_eq!(stopped["finish_reason"], "stop", "{stopped}");
    assert_eq!(stopped["completion_tokens"], stop_at + 1, "{stopped}");
    // vLLM's stop_reason names what stopped it: the token id, or the string.
    assert_eq!(stopped["stop_reason"], greedy[stop_at], "{stopped}");
    // With vLLM's include_stop_str_in_output the stop token's text stays, and
    // a stop string stays at the end of the text, streamed or not.
    let inc = &seen["include_stop"];
    let through = model.tokenizer.decode(&greedy[..=stop_at]).unwrap();
    assert_eq!(inc["stop_id"], through.as_str(), "{inc}");
    let stop = inc["stop_string"].as_str().unwrap_or_default();
    assert_eq!(stop.chars().count(), 3, "{inc}");
    let cut = expected.find(stop).map(|at| &expected[..at + stop.len()]);
    assert_eq!(inc["text"].as_str(), cut, "{inc}");
    assert_eq!(inc["stream"], inc["text"], "{inc}");
    assert_eq!(inc["finish_reason"], "stop", "{inc}");
    assert_eq!(inc["stop_reason"], stop, "{inc}");
    assert_eq!(
        inc["stream_stop_reason"],
        serde_json::json!([stop]),
        "{inc}"
    );
    let chat = &inc["chat"];
    assert_eq!(
        chat["stop"].as_str().unwrap_or_default().chars().count(),
        3,
        "{chat}"
    );
    assert_eq!(chat["free_stop_reason"], serde_json::Value::Null, "{chat}");
    assert_eq!(chat["finish_reason"], "stop", "{chat}");
    assert_eq!(chat["stop_reason"], chat["stop"], "{chat}");

    // A seed makes sampling reproducible; other seeds sample otherwise.
    let seeded = &seen["seeded"];
    assert_eq!(seeded["first"], seeded["again"], "{seeded}");
    assert!(
        seeded["others"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| *o != seeded["first"]),
        "{seeded}"
    );

    // logit_bias: -100 on the greedy token gives the runner-up, +100 on a token
    // from the middle of the ranking makes greedy pick it.
    let bias = &seen["logit_bias"];
    let text_of = |t: u32| model.tokenizer.decode(&[t]).unwrap();
    assert_eq!(
        bias["none"]["text"],
        text_of(greedy_first).as_str(),
        "{bias}"
    );
    assert_eq!(bias["ban"]["text"], text_of(runner_up).as_str(), "{bias}");
    assert_eq!(
        bias["promote"]["text"],
        text_of(promoted).as_str(),
        "{bias}"
    );
    for case in ["id_past_vocab", "value_200"] {
        let e = &bias["errors"][case];
        assert_eq!(e["status"], 400, "{case}: {e}");
        assert_eq!(e["param"], "logit_bias", "{case}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains("logit_bias"),
            "{case}: {e}"
        );
    }

    // min_tokens: a stop id that would end the output at once is held back.
    let mt = &seen["min_tokens"];
    assert_eq!(mt["without"]["completion_tokens"], 1, "{mt}");
    assert!(
        mt["with"]["completion_tokens"].as_u64().unwrap() >= 5,
        "{mt}"
    );

    // echo: the prompt's text first, in one piece and streamed (in the first chunk).
    let echo = &seen["echo"];
    let echoed = format!("Once upon a time{expected}");
    assert_eq!(echo["text"], echoed.as_str(), "{echo}");
    assert_eq!(echo["stream"], echoed.as_str(), "{echo}");
    assert!(
        echo["stream_first"]
            .as_str()
            .unwrap()
            .starts_with("Once upon a time"),
        "{echo}"
    );
    // With logprobs: the prompt's tokens lead, the first with null numbers,
    // then each one's log probability under the engine's own logits.
    let want = reference_prompt_logprobs(&model, &prompt);
    let e = &echo["with_logprobs"];
    let lps = e["token_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), prompt.len() + 2, "{e}");
    assert!(lps[0].is_null() && e["top_logprobs"][0].is_null(), "{e}");
    for (i, w) in want.iter().enumerate() {
        let got = lps[i + 1].as_f64().unwrap();
        assert!(
            (got - w[prompt[i + 1] as usize]).abs() < 1e-4,
            "position {i}: {e}"
        );
    }
    assert_eq!(e["text_offset"][0], 0, "{e}");
    assert!(
        e["text"].as_str().unwrap().starts_with("Once upon a time"),
        "{e}"
    );
    let only = &echo["only"];
    assert_eq!(only["text"], "Once upon a time", "{only}");
    assert_eq!(only["finish_reason"], "length", "{only}");
    let only_lps = only["token_logprobs"].as_array().unwrap();
    assert_eq!(
        only_lps.len(),
        prompt.len(),
        "the prompt's tokens alone: {only}"
    );
    assert_eq!(only_lps[..], lps[..prompt.len()], "{only}");
    assert_eq!(echo["only_stream"], "Once upon a time", "{echo}");
    // A batch scored as lm-eval does: each choice covers its own prompt and token.
    for (i, prompt) in [&[1u32, 5, 9, 14][..], &[1, 7, 3]].iter().enumerate() {
        let got = &echo["batch"][i];
        assert_eq!(got["index"], i, "{got}");
        let lps = got["token_logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), prompt.len() + 1, "{got}");
        assert!(lps[0].is_null(), "{got}");
        let want = reference_prompt_logprobs(&model, prompt);
        for (k, w) in want.iter().enumerate() {
            let v = lps[k + 1].as_f64().unwrap();
            assert!(
                (v - w[prompt[k + 1] as usize]).abs() < 1e-4,
                "prompt {i} position {k}: {got}"
            );
        }
    }
    let s = &echo["with_logprobs_stream"];
    assert_eq!(s["token_logprobs"], e["token_logprobs"], "streamed: {s}");
    assert_eq!(s["tokens"], e["tokens"], "streamed: {s}");
    assert_eq!(s["text"], e["text"], "streamed: {s}");

    // prompt_logprobs: null, then per position the prompt token's entry (with
    // its rank) and the top tokens, keyed by id.
    let pl = &seen["prompt_logprobs"];
    let c = pl["completions"].as_array().unwrap();
    assert_eq!(c.len(), prompt.len(), "{pl}");
    assert!(c[0].is_null());
    for (i, w) in want.iter().enumerate() {
        let entry = c[i + 1].as_object().unwrap();
        let own = &entry[&prompt[i + 1].to_string()];
        assert!((own["logprob"].as_f64().unwrap() - w[prompt[i + 1] as usize]).abs() < 1e-4);
        assert!(own["rank"].as_u64().unwrap() >= 1, "{own}");
        assert!(entry.len() == 2 || entry.len() == 3, "{entry:?}");
        assert!(entry.values().any(|v| v["rank"] == 1), "{entry:?}");
    }
    let chat = pl["chat"].as_array().unwrap();
    assert_eq!(
        chat.len() as u64,
        pl["chat_prompt_tokens"].as_u64().unwrap()
    );
    assert!(
        chat[0].is_null() && chat[1].as_object().unwrap().len() == 1,
        "{pl}"
    );
    for case in ["stream", "minus_one", "too_many"] {
        let e = &pl[case];
        assert_eq!(e["status"], 400, "{case}: {e}");
        assert_eq!(e["param"], "prompt_logprobs", "{case}: {e}");
    }
    assert!(
        pl["stream"]["message"]
            .as_str()
            .unwrap()
            .contains("not available when `stream=True`"),
        "{pl}"
    );

    // vLLM's chat extensions. continue_final_message: the prompt stops inside
    // the final message (a prefix of the closed chat's ids), and the reply
    // continues it as the engine continues those ids.
    let cx = &seen["chat_ext"];
    let ids = |v: &serde_json::Value| -> Vec<u32> { serde_json::from_value(v.clone()).unwrap() };
    let (open, closed) = (ids(&cx["open_ids"]), ids(&cx["closed_ids"]));
    assert!(
        open.len() < closed.len() && closed.starts_with(&open),
        "{cx}"
    );
    let open_text = model.tokenizer.decode(&open).unwrap();
    assert!(open_text.ends_with("Once upon a time"), "{open_text:?}");
    let continued = generated_text(&model, &reference(&model, &open, 6));
    assert_eq!(cx["content"], continued.as_str(), "{cx}");
    assert_eq!(cx["same_ids"], continued.as_str(), "{cx}");
    // Chat echo: the final assistant message, then its continuation; nothing
    // echoed when the final message is the user's.
    let echoed = format!("Once upon a time{continued}");
    assert_eq!(cx["echo"], echoed.as_str(), "{cx}");
    assert_eq!(cx["echo_stream"], echoed.as_str(), "{cx}");
    assert_eq!(cx["echo_other_role"], cx["plain"], "{cx}");
    // add_special_tokens: the prompt ids that ran are the tokenizer's with and
    // without its special tokens, as asked.
    let sp = &cx["special"];
    assert_eq!(sp["completion_default"], serde_json::json!(prompt), "{sp}");
    let without = model.tokenizer.encode("Once upon a time", false).unwrap();
    assert_ne!(without, prompt, "the tokenizer adds a special token");
    assert_eq!(sp["completion_without"], serde_json::json!(without), "{sp}");
    assert_eq!(sp["completion_without"], sp["tokenize_without"], "{sp}");
    assert_eq!(sp["chat_with"], sp["tokenize_chat_with"], "{sp}");
    // What cannot be honoured is refused, saying why.
    for (case, word) in [
        ("both", "not compatible"),
        ("kwargs", "does not read `enable_thinking`"),
        ("documents", "does not read documents"),
    ] {
        let r = &cx["refused"][case];
        assert_eq!(r["status"], 400, "{case}: {r}");
        assert!(
            r["message"].as_str().unwrap_or_default().contains(word),
            "{case}: {r}"
        );
    }

    // As vLLM's server: CORS for every origin, `null` for its optional
    // fields, top_k -1 and signed seeds, stream_options only with stream
    // (include_usage true unless said).
    let vc = &seen["vllm_compat"];
    let pre = &vc["preflight"];
    assert_eq!(pre["status"], 200, "{pre}");
    assert_eq!(pre["headers"]["access-control-allow-origin"], "*", "{pre}");
    assert!(
        pre["headers"]["access-control-allow-methods"]
            .as_str()
            .is_some_and(|m| m.contains("POST")),
        "{pre}"
    );
    assert_eq!(
        pre["headers"]["access-control-allow-headers"], "authorization,content-type",
        "{pre}"
    );
    let get = &vc["cors_get"];
    assert_eq!(get["status"], 200, "{get}");
    assert_eq!(get["headers"]["access-control-allow-origin"], "*", "{get}");
    assert_eq!(vc["nulls"]["status"], 200, "{}", vc["nulls"]);
    let alone = &vc["stream_options_alone"];
    assert_eq!(alone["status"], 400, "{alone}");
    assert!(
        alone["body"]
            .as_str()
            .is_some_and(|b| b.contains("\"param\":\"stream_options\"")),
        "{alone}"
    );
    assert_eq!(vc["stream_options_empty"]["status"], 200, "{vc}");
    assert_eq!(vc["stream_options_default_usage"], 2, "{vc}");
    assert_eq!(vc["top_k_minus_one"], expected.as_str(), "{vc}");
    let seeded = vc["negative_seed_twice"].as_array().unwrap();
    assert_eq!(seeded[0], seeded[1], "a negative seed reproduces: {vc}");
    assert_eq!(vc["seed_minus_one"], 200, "{vc}");
    // A completion without max_tokens: vLLM's (and OpenAI's) 16.
    assert_eq!(vc["completions_default_len"], 16, "{vc}");
    // A chat without max_tokens: the rest of the context, as vLLM's.
    let chat = vc["chat_default_len"].as_array().expect("chat_default_len");
    let context = model.config.max_position_embeddings as u64;
    let prompt_tokens = chat[0].as_u64().expect("prompt tokens");
    assert_eq!(chat[1].as_u64(), Some(context - prompt_tokens), "{vc}");
    assert_eq!(chat[2], "length", "{vc}");
    for case in ["seed_too_big", "top_k_minus_two"] {
        assert_eq!(vc[case]["status"], 400, "{case}: {vc}");
    }

    // Unknown routes and methods answer in OpenAI's error shape too.
    let routes = &seen["routes"];
    for (case, status, word) in [
        ("not_found", 404, "/v1/no-such-route"),
        ("wrong_method", 405, "GET"),
    ] {
        let r = &routes[case];
        assert_eq!(r["status"], status, "{case}: {r}");
        let message = r["body"]["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(word), "{case}: {r}");
        assert!(r["body"]["error"]["type"].is_string(), "{case}: {r}");
    }
}

fn close(a: &serde_json::Value, b: f32) -> bool {
    a.as_f64().is_some_and(|a| (a - f64::from(b)).abs() < 1e-6)
}

/// The completions shape (`tokens`, `token_logprobs`, `top_logprobs`,
/// `text_offset`) holds exactly the gRPC stream's log probabilities.
fn check_completion_logprobs(
    model: &tandem_engine::ModelDir,
    seen: &serde_json::Value,
    grpc: &[pb::TokenLogprobs],
) {
    let text = |id| model.tokenizer.token_text(id).unwrap();
    let mut offset = 0;
    assert_eq!(
        seen["tokens"].as_array().unwrap().len(),
        grpc.len(),
        "{seen}"
    );
    for (i, want) in grpc.iter().enumerate() {
        let token = text(want.id);
        assert_eq!(seen["tokens"][i], token.as_str(), "token {i}: {seen}");
        assert!(
            close(&seen["token_logprobs"][i], want.logprob),
            "token {i}: {seen}"
        );
        assert_eq!(seen["text_offset"][i], offset, "token {i}: {seen}");
        offset += token.chars().count();
        // A dict of the top 3 and the chosen token (greedy: one of them), keyed
        // by text: tokens with the same text (parts of a character all read
        // U+FFFD) share the entry of the most likely one.
        let top = seen["top_logprobs"][i].as_object().unwrap();
        let mut expected: Vec<(String, f32)> = Vec::new();
        for (id, l) in want
            .top
            .iter()
            .map(|t| (t.id, t.logprob))
            .chain([(want.id, want.logprob)])
        {
            if !expected.iter().any(|(t, _)| *t == text(id)) {
                expected.push((text(id), l));
            }
        }
        assert_eq!(top.len(), expected.len(), "token {i}: {seen}");
        assert_eq!(
            expected.len(),
            want.top
                .iter()
                .map(|t| text(t.id))
                .collect::<std::collections::HashSet<_>>()
                .len(),
            "greedy: the chosen token is in the top 3"
        );
        for (t, l) in &expected {
            assert!(close(&top[t], *l), "token {i}, {t:?}: {seen}");
        }
        assert!(close(&top[&token], want.logprob), "token {i}: {seen}");
        assert!(
            want.top.windows(2).all(|w| w[0].logprob >= w[1].logprob),
            "sorted"
        );
    }
}

/// The chat shape (`[{token, logprob, bytes, top_logprobs}]`) holds exactly
/// the gRPC stream's log probabilities, `top` of them per token, most likely first.
fn check_chat_logprobs(
    model: &tandem_engine::ModelDir,
    seen: &serde_json::Value,
    grpc: &[pb::TokenLogprobs],
    top: usize,
) {
    let text = |id| model.tokenizer.token_text(id).unwrap();
    let entries = seen.as_array().unwrap();
    assert_eq!(entries.len(), grpc.len(), "{seen}");
    for (i, (e, want)) in entries.iter().zip(grpc).enumerate() {
        let token = text(want.id);
        assert_eq!(e["token"], token.as_str(), "token {i}: {e}");
        assert!(close(&e["logprob"], want.logprob), "token {i}: {e}");
        assert_eq!(
            e["bytes"],
            serde_json::json!(token.as_bytes()),
            "token {i}: {e}"
        );
        let listed = e["top_logprobs"].as_array().unwrap();
        assert_eq!(listed.len(), top, "token {i}: {e}");
        for (l, t) in listed.iter().zip(&want.top) {
            assert_eq!(l["token"], text(t.id).as_str(), "token {i}: {e}");
            assert!(close(&l["logprob"], t.logprob), "token {i}: {e}");
        }
        let values: Vec<f64> = listed
            .iter()
            .map(|l| l["logprob"].as_f64().unwrap())
            .collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "sorted: {e}");
        if top > 0 {
            // Greedy: the chosen token is in the top list, first.
            assert_eq!(listed[0]["token"], token.as_str(), "token {i}: {e}");
        }
    }
}

/// A batch of more prompts than the router runs at once, each generating more
/// tokens than a request's response buffer holds, is answered whole: the later
/// prompts are admitted while the earlier ones' tokens are read (awaiting all
/// admissions first would wait on the running limit for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_larger_than_the_running_limit_is_answered_whole() {
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    spec.router.max_running = 2;
    let cluster = Cluster::start(model.clone(), spec).await;
    let http = cluster.http.expect("the router serves HTTP");
    let prompts = ["One", "Two", "Three", "Four", "Five", "Six"];
    let max_tokens = 300; // past the router's 64-response buffer per request (several tokens may share a response)
    let body = serde_json::json!({
        "prompt": prompts, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true,
    });
    for stream in [false, true] {
        let mut body = body.clone();
        body["stream"] = serde_json::json!(stream);
        let (status, text) = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            post_completions(http, body.to_string().as_bytes()),
        )
        .await
        .expect("the batch was answered in time");
        assert_eq!(status, 200, "stream {stream}: {text}");
        let mut texts = vec![String::new(); prompts.len()];
        let events: Vec<serde_json::Value> = if stream {
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str(d).expect("an event"))
                .collect()
        } else {
            vec![serde_json::from_str(&text).expect("the answer")]
        };
        for e in &events {
            for c in e["choices"].as_array().expect("choices") {
                let i = c["index"].as_u64().expect("index") as usize;
                texts[i].push_str(c["text"].as_str().expect("text"));
            }
        }
        for (i, p) in prompts.iter().enumerate() {
            let ids = model.tokenizer.encode(p, true).unwrap();
            let expected = generated_text(&model, &reference(&model, &ids, max_tokens));
            assert_eq!(texts[i], expected, "stream {stream}: prompt {i}");
        }
    }
}
