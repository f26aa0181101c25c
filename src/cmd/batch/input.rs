//! The input of `rbee batch` (JSON lines of prompts, checked whole before any work starts) and
//! the ids an earlier run already put in the output file.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::protocol::{MAX_PROMPT_BYTES, ResponseFormat, SamplingParams};

/// One prompt of the batch, checked.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    /// As given (a string or a number), echoed in the output line.
    pub(crate) id: Value,
    pub(crate) prompt: String,
    pub(crate) system: Option<String>,
    /// The prompt goes to the model without the chat template.
    pub(crate) raw: bool,
    pub(crate) params: SamplingParams,
}

/// A line as written; other keys are allowed, so that a file can carry its own metadata.
#[derive(Deserialize)]
struct RawItem {
    id: Option<Value>,
    prompt: Option<String>,
    system: Option<String>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u32>,
    /// A string or a list of strings.
    stop: Option<Value>,
    /// A JSON Schema object.
    json_schema: Option<Value>,
    /// `"json"`: any JSON object.
    format: Option<Value>,
    raw: Option<Value>,
}

/// The key an id is compared by: its JSON text, so `1` and `"1"` are different ids.
pub(crate) fn key(id: &Value) -> String {
    id.to_string()
}

/// Reads `path` (`-`: stdin) and returns its items, or every bad line with its number (exit 8).
pub(crate) fn read(path: &Path) -> Result<Vec<Item>> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Error::invalid(format!("cannot read the batch from stdin: {e}")))?;
    } else {
        text = std::fs::read_to_string(path).map_err(|e| {
            Error::usage(format!("cannot read the batch `{}`: {e}", path.display()))
        })?;
    }
    parse(&text)
}

pub(crate) fn parse(text: &str) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match item(line) {
            Ok(item) if !seen.insert(key(&item.id)) => {
                bad.push(format!("  line {}: duplicate id {}", n + 1, item.id));
            }
            Ok(item) => items.push(item),
            Err(why) => bad.push(format!("  line {}: {why}", n + 1)),
        }
    }
    if !bad.is_empty() {
        return Err(Error::invalid(format!(
            "the batch has {} bad line(s); nothing was run:\n{}",
            bad.len(),
            bad.join("\n")
        )));
    }
    Ok(items)
}

fn item(line: &str) -> Result<Item, String> {
    let raw: RawItem = serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let id = match raw.id {
        Some(id @ (Value::String(_) | Value::Number(_))) => id,
        Some(_) => return Err("`id` must be a string or a number".into()),
        None => return Err("no `id`".into()),
    };
    let prompt = raw.prompt.ok_or("no `prompt`")?;
    if prompt.trim().is_empty() {
        return Err("the prompt is empty".into());
    }
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(format!("the prompt is over {MAX_PROMPT_BYTES} bytes"));
    }
    // The same defaults as `rbee infer`.
    let params = SamplingParams {
        max_tokens: raw.max_tokens.unwrap_or(512),
        temperature: raw.temperature.unwrap_or(0.8),
        top_p: raw.top_p.unwrap_or(0.95),
        seed: raw.seed,
        stop: stop_strings(raw.stop)?,
        format: response_format(raw.json_schema, raw.format)?,
    };
    params.validate().map_err(|e| e.to_string())?;
    let raw_prompt = match raw.raw {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err("`raw` must be true or false".into()),
    };
    if raw_prompt && raw.system.is_some() {
        return Err("a `raw` prompt has no `system`: it goes to the model as it is".into());
    }
    Ok(Item {
        id,
        prompt,
        system: raw.system,
        raw: raw_prompt,
        params,
    })
}

fn stop_strings(stop: Option<Value>) -> Result<Vec<String>, String> {
    let bad = || "`stop` must be a string or a list of strings".to_string();
    match stop {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(list)) => list
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

fn response_format(schema: Option<Value>, format: Option<Value>) -> Result<ResponseFormat, String> {
    match (schema, format) {
        (Some(_), Some(_)) => Err("`json_schema` and `format` exclude each other".into()),
        (Some(schema @ Value::Object(_)), None) => Ok(ResponseFormat::JsonSchema { schema }),
        (Some(_), None) => Err("`json_schema` must be a JSON Schema object".into()),
        (None, Some(Value::String(f))) if f == "json" => Ok(ResponseFormat::JsonObject),
        (None, Some(_)) => Err("`format` must be \"json\"".into()),
        (None, None) => Ok(ResponseFormat::Text),
    }
}

/// The ids already in the output file of an earlier run. A last line cut short (the earlier run
/// died while writing it) is cut off, so that its item runs again and the file stays JSON lines.
pub(crate) fn done_ids(path: &Path) -> Result<HashSet<String>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(crate::error::IoError::at("read", path, e).into()),
    };
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < bytes.len() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .at("open", path)?;
        file.set_len(whole as u64).at("truncate", path)?;
    }
    let text = String::from_utf8_lossy(&bytes[..whole]);
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|v| v.get("id").map(key))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_line_is_named_by_its_number() {
        let text = "{\"id\":1,\"prompt\":\"a\"}\nnot json\n\n{\"prompt\":\"b\"}\n\
                    {\"id\":2}\n{\"id\":1,\"prompt\":\"c\"}\n{\"id\":\"1\",\"prompt\":\"d\"}\n";
        let err = parse(text).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("4 bad line(s)"), "{err}");
        assert!(err.contains("line 2: not a JSON object"), "{err}");
        assert!(err.contains("line 4: no `id`"), "{err}");
        assert!(err.contains("line 5: no `prompt`"), "{err}");
        assert!(err.contains("line 6: duplicate id 1"), "{err}");
        assert!(
            !err.contains("line 7"),
            "a string id differs from a number: {err}"
        );
    }

    #[test]
    fn generation_controls_are_read_and_bad_ones_named() {
        let text = concat!(
            r#"{"id":1,"prompt":"a","stop":"x","format":"json"}"#,
            "\n",
            r#"{"id":2,"prompt":"a","stop":["x","y"],"json_schema":{"type":"object"},"raw":true}"#,
            "\n"
        );
        let items = parse(text).expect("good lines");
        assert_eq!(items[0].params.stop, ["x"]);
        assert_eq!(items[0].params.format, ResponseFormat::JsonObject);
        assert!(!items[0].raw);
        assert_eq!(items[1].params.stop, ["x", "y"]);
        assert!(matches!(
            items[1].params.format,
            ResponseFormat::JsonSchema { .. }
        ));
        assert!(items[1].raw);

        let bad = [
            r#"{"id":1,"prompt":"a","stop":3}"#,
            r#"{"id":2,"prompt":"a","stop":["x",1]}"#,
            r#"{"id":3,"prompt":"a","stop":""}"#,
            r#"{"id":4,"prompt":"a","json_schema":"object"}"#,
            r#"{"id":5,"prompt":"a","format":"yaml"}"#,
            r#"{"id":6,"prompt":"a","format":"json","json_schema":{}}"#,
            r#"{"id":7,"prompt":"a","raw":"yes"}"#,
            r#"{"id":8,"prompt":"a","raw":true,"system":"s"}"#,
        ];
        let err = parse(&bad.join("\n"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("8 bad line(s)"), "{err}");
        for n in 1..=8 {
            assert!(err.contains(&format!("line {n}: ")), "line {n}: {err}");
        }
    }

    #[test]
    fn a_cut_last_line_is_dropped_and_runs_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"id\":1,\"text\":\"x\"}\n{\"id\":2,\"te").expect("write");
        let ids = done_ids(&path).expect("ids");
        assert_eq!(ids, HashSet::from(["1".to_string()]));
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "{\"id\":1,\"text\":\"x\"}\n"
        );
    }
}
