//! A scanner of the JSON array a `required` tool choice generates,
//! `[{"name": .., "parameters": ..}, ..]`, as far as it has come, so that
//! [`crate::openai_tools_stream`] can send each call's name as soon as it is
//! whole and its arguments as they grow. The grammar guarantees the shape;
//! the scanner only tracks strings (with escapes) and nesting depth.

/// One item of a `required` answer's array as far as it has come: its
/// name once its string is complete, and where its `parameters` value starts
/// and (once complete) ends in the text.
#[derive(Debug, Default, PartialEq)]
pub struct RequiredItem {
    /// The function's name, once its string is complete.
    pub name: Option<String>,
    /// Where the `parameters` value starts (a byte offset).
    pub start: Option<usize>,
    /// Where it ends (exclusive), once complete.
    pub end: Option<usize>,
}

/// Scans a (possibly unfinished) `[{"name": .., "parameters": ..}, ..]`.
pub fn scan_required(text: &str) -> Vec<RequiredItem> {
    let mut items: Vec<RequiredItem> = Vec::new();
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    let mut str_start = 0;
    // At depth 2 (inside an item): expecting a key, or the value of `key`.
    let (mut expect_key, mut key) = (false, String::new());
    for (i, c) in text.char_indices() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
                if depth == 2 {
                    let s: Option<String> = serde_json::from_str(&text[str_start..=i]).ok();
                    if expect_key {
                        key = s.unwrap_or_default();
                        expect_key = false;
                    } else if key == "name"
                        && let Some(item) = items.last_mut()
                    {
                        item.name = s;
                    } else if key == "parameters"
                        && let Some(item) = items.last_mut()
                        && item.end.is_none()
                    {
                        item.end = Some(i + 1);
                    }
                }
            }
            continue;
        }
        let value_of_parameters = depth == 2 && !expect_key && key == "parameters";
        if value_of_parameters
            && !c.is_whitespace()
            && !matches!(c, ':' | ',' | '}')
            && let Some(item) = items.last_mut()
            && item.start.is_none()
        {
            item.start = Some(i);
        }
        match c {
            '"' => {
                in_str = true;
                str_start = i;
            }
            '{' | '[' => {
                depth += 1;
                if depth == 2 {
                    items.push(RequiredItem::default());
                    expect_key = true;
                    key.clear();
                }
            }
            '}' | ']' => {
                if depth == 2 {
                    // The item closes: a scalar `parameters` ends here.
                    if let Some(item) = items.last_mut()
                        && item.start.is_some()
                        && item.end.is_none()
                    {
                        item.end = Some(text[..i].trim_end().len());
                    }
                }
                depth = depth.saturating_sub(1);
                if depth == 2
                    && key == "parameters"
                    && let Some(item) = items.last_mut()
                    && item.end.is_none()
                {
                    item.end = Some(i + 1);
                }
            }
            ',' if depth == 2 => {
                if key == "parameters"
                    && let Some(item) = items.last_mut()
                    && item.start.is_some()
                    && item.end.is_none()
                {
                    item.end = Some(text[..i].trim_end().len());
                }
                expect_key = true;
            }
            _ => {}
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_and_their_parameters_are_found_as_they_grow() {
        let text =
            r#"[ {"name": "a", "parameters": {"x": "}]"}} , {"parameters" : 7, "name":"b"}]"#;
        let items = scan_required(text);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].name.as_deref(), Some("a"));
        let (s, e) = (items[0].start.unwrap(), items[0].end.unwrap());
        assert_eq!(&text[s..e], r#"{"x": "}]"}"#);
        assert_eq!(items[1].name.as_deref(), Some("b"));
        let (s, e) = (items[1].start.unwrap(), items[1].end.unwrap());
        assert_eq!(&text[s..e], "7");
        // Unfinished: the value has a start and no end yet.
        let items = scan_required(r#"[{"name": "a", "parameters": {"x": 1"#);
        assert_eq!(items[0].start, Some(29));
        assert_eq!(items[0].end, None);
        let items = scan_required(r#"[{"name": "a"#);
        assert_eq!(items[0].name, None);
    }
}
