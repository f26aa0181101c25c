//! Generation controls on the real model: output constrained to a JSON Schema (checked with the
//! real Python `jsonschema`) or to any JSON object, stop strings (inside a token, across two
//! tokens, two batched requests with stops of their own), raw prompts against the chat template,
//! a conversation of messages, and the same controls on `rbee batch` lines.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{Env, Run, fresh_nonce, http, sign_with, unix_now, worker_health};

/// Bounded by construction (an enum, a small integer range, a short string, no other keys), so a
/// generation that follows it ends well inside `max_tokens`.
const SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "color": {"type": "string", "enum": ["red", "green", "blue"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 9},
    "name": {"type": "string", "maxLength": 12}
  },
  "required": ["color", "count", "name"],
  "additionalProperties": false
}"#;

const SCHEMA_PROMPT: &str = "Describe a toy box: its color, how many toys and the toy's name.";

/// SmolLM2's chat template (ChatML) around one user message, as llama.cpp renders it.
fn chatml(user: &str) -> String {
    format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
}

/// Whether Python's `jsonschema` is there; under CI its absence fails the test.
fn jsonschema_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import jsonschema"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with the `jsonschema` package is missing (run scripts/setup.sh)"
        );
        eprintln!("skipped: python3 -m pip install jsonschema (run scripts/setup.sh)");
    }
    ok
}

/// Validates `text` against the schema in `schema` with Python's `jsonschema`.
#[track_caller]
fn assert_validates(schema: &Path, text: &str) {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, jsonschema\n\
             jsonschema.validate(json.loads(sys.argv[2]), json.load(open(sys.argv[1])))",
        ])
        .arg(schema)
        .arg(text)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{text:?} does not validate against {}: {}",
        schema.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(env: &Env, name: &str, text: &str) -> String {
    let path = env.path().join(name);
    std::fs::write(&path, text).expect("write");
    path.to_str().expect("path").to_string()
}

/// A seeded, sampled answer long enough to cut in several places.
const FRUITS: [&str; 8] = [
    "--prompt",
    "Name three fruits and say why you like each.",
    "--seed",
    "5",
    "--temperature",
    "0.8",
    "--max-tokens",
    "24",
];

const COLORS: [&str; 8] = [
    "--prompt",
    "Name three colors and what they remind you of.",
    "--seed",
    "9",
    "--temperature",
    "0.8",
    "--max-tokens",
    "24",
];

fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = base.to_vec();
    args.extend_from_slice(extra);
    args
}

/// A word from the middle of `text`, and the text before its first occurrence: what a run with
/// that word as its stop string must print.
fn cut_at_middle_word(text: &str) -> (String, String) {
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 4, "too short to cut: {text:?}");
    let word = words[words.len() / 2].to_string();
    let at = text.find(&word).expect("the word is in the text");
    (word, text[..at].to_string())
}

#[track_caller]
fn assert_cut(run: &Run, expected: &str, stop: &str) {
    run.expect(0);
    assert_eq!(run.text(), expected, "stop {stop:?}");
    assert_eq!(run.done()["stop_reason"], "stop", "stop {stop:?}");
}

#[test]
fn json_schema_output_validates_on_every_seed() {
    let Some(env) = Env::new("") else { return };
    if !jsonschema_available() {
        return;
    }
    let schema = write(&env, "schema.json", SCHEMA);
    for seed in ["1", "2", "3", "4"] {
        let run = env.infer(&[
            "--prompt",
            SCHEMA_PROMPT,
            "--json-schema",
            &schema,
            "--seed",
            seed,
            "--temperature",
            "0.9",
            "--max-tokens",
            "64",
        ]);
        run.expect(0);
        assert_eq!(
            run.done()["stop_reason"],
            "eos",
            "seed {seed}: {}",
            run.text()
        );
        assert_validates(Path::new(&schema), &run.text());
    }

    // Without --json, what is printed is the JSON (and a newline).
    let plain = env.run(&[
        "infer",
        "--prompt",
        SCHEMA_PROMPT,
        "--json-schema",
        &schema,
        "--seed",
        "5",
    ]);
    plain.expect(0);
    assert_validates(Path::new(&schema), plain.stdout.trim_end());

    let object = env.infer(&[
        "--prompt",
        "Give a JSON object with the name and age of a person.",
        "--format",
        "json",
        "--temperature",
        "0",
        "--max-tokens",
        "48",
    ]);
    object.expect(0);
    assert_eq!(object.done()["stop_reason"], "eos");
    let value: serde_json::Value = serde_json::from_str(&object.text())
        .unwrap_or_else(|e| panic!("not JSON: {:?}: {e}", object.text()));
    assert!(value.is_object(), "{value}");
}

#[test]
fn bad_schemas_and_conflicting_flags_are_refused() {
    let Some(env) = Env::new("") else { return };
    // llama.cpp's converter refuses a reference to nothing: the request is invalid.
    let dangling = write(&env, "dangling.json", r##"{"$ref": "#/definitions/none"}"##);
    let run = env.infer(&["--prompt", "hi", "--json-schema", &dangling]);
    run.expect(8);
    assert_eq!(run.json_lines()[0]["event"], "error", "{}", run.stdout);
    // A schema that is JSON but no object is refused before it leaves this machine.
    let string = write(&env, "string.json", r#""object""#);
    env.infer(&["--prompt", "hi", "--json-schema", &string])
        .expect(8);

    let not_json = write(&env, "not-json.json", "{type: object");
    let run = env.run(&["infer", "--prompt", "hi", "--json-schema", &not_json]);
    run.expect(2);
    assert!(run.stderr.contains("not-json.json"), "{}", run.stderr);
    let missing = env.path().join("missing.json");
    let missing = missing.to_str().expect("path");
    let run = env.run(&["infer", "--prompt", "hi", "--json-schema", missing]);
    run.expect(2);
    assert!(run.stderr.contains("missing.json"), "{}", run.stderr);

    env.run(&["infer", "--prompt", "hi", "--raw", "--system", "s"])
        .expect(2);
    env.run(&[
        "infer",
        "--prompt",
        "hi",
        "--format",
        "json",
        "--json-schema",
        &dangling,
    ])
    .expect(2);
    env.run(&["infer", "--prompt", "hi", "--stop", ""])
        .expect(8);
}

#[test]
fn stop_strings_cut_the_text_before_them_alone_across_tokens_and_batched() {
    let Some(env) = Env::new("") else { return };
    let fruits = env.infer(&FRUITS);
    fruits.expect(0);
    let colors = env.infer(&COLORS);
    colors.expect(0);

    // A whole word from the middle, beside a stop string that never comes.
    let (word, before) = cut_at_middle_word(&fruits.text());
    let run = env.infer(&with(&FRUITS, &["--stop", "zebra", "--stop", &word]));
    assert_cut(&run, &before, &word);
    // Generation ended there: fewer tokens than the run without it.
    assert!(
        run.done()["tokens_out"].as_u64() < fruits.done()["tokens_out"].as_u64(),
        "{}",
        run.stdout
    );

    // The end of one token and the start of the next: the first place where those characters
    // appear is that boundary, so only a match across the two tokens can cut there.
    let tokens: Vec<String> = fruits
        .json_lines()
        .iter()
        .filter(|l| l["event"] == "token")
        .map(|l| l["text"].as_str().expect("text").to_string())
        .collect();
    let text = fruits.text();
    let mut spanning = None;
    let mut offset = 0;
    for pair in tokens.windows(2) {
        offset += pair[0].len();
        let tail: String = pair[0]
            .chars()
            .rev()
            .take(2)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let head: String = pair[1].chars().take(2).collect();
        if tail.trim().is_empty() || head.trim().is_empty() {
            continue;
        }
        let stop = format!("{tail}{head}");
        if text.find(&stop) == Some(offset - tail.len()) {
            spanning = Some((stop, text[..offset - tail.len()].to_string()));
            break;
        }
    }
    let (stop, before) = spanning.expect("two tokens to cut across");
    let run = env.infer(&with(&FRUITS, &["--stop", &stop]));
    assert_cut(&run, &before, &stop);

    // Two requests decoded in one batch, each cut at its own stop string.
    let (fruit_word, fruit_before) = cut_at_middle_word(&fruits.text());
    let (color_word, color_before) = cut_at_middle_word(&colors.text());
    let fruit_args = with(
        &with(&["--json", "infer"], &FRUITS),
        &["--stop", &fruit_word],
    );
    let color_args = with(
        &with(&["--json", "infer"], &COLORS),
        &["--stop", &color_word],
    );
    // The worker is held until the hive has handed it both, so that they are decoded together
    // however fast it decodes; the worker's high-water mark of generations under way says so.
    let health = worker_health(&env);
    assert_eq!(health["peak_active"], 1, "{health}");
    let held = crate::support::HeldWorker::stop(health["pid"].as_i64().expect("the worker's pid"));
    let children = [env.spawn(&fruit_args), env.spawn(&color_args)];
    // Within the hive's 10 s for a worker to start a request it was handed.
    let handed = held.handed(&env, 2, Duration::from_secs(8));
    drop(held);
    assert!(
        handed,
        "the hive never handed the two requests to the worker"
    );
    let [fruit, color] = children.map(|c| Run::from(c.wait_with_output().expect("wait")));
    let health = worker_health(&env);
    assert_eq!(
        health["peak_active"], 2,
        "the two requests were not decoded together: {health}"
    );
    assert_cut(&fruit, &fruit_before, &fruit_word);
    assert_cut(&color, &color_before, &color_word);
}

#[test]
fn a_raw_prompt_skips_the_chat_template() {
    let Some(env) = Env::new("") else { return };
    let question = "The capital of France is";
    let greedy = ["--temperature", "0", "--max-tokens", "10"];
    let templated = env.infer(&with(&["--prompt", question], &greedy));
    templated.expect(0);
    let raw = env.infer(&with(&["--prompt", question, "--raw"], &greedy));
    raw.expect(0);
    assert_ne!(
        raw.text(),
        templated.text(),
        "the template made no difference"
    );
    assert!(
        raw.done()["tokens_in"].as_u64() < templated.done()["tokens_in"].as_u64(),
        "{} / {}",
        raw.stdout,
        templated.stdout
    );

    // The template's text sent raw is the templated request, token for token.
    let rendered = chatml(question);
    let by_hand = env.infer(&with(&["--prompt", &rendered, "--raw"], &greedy));
    by_hand.expect(0);
    assert_eq!(by_hand.text(), templated.text());
    assert_eq!(by_hand.done()["tokens_in"], templated.done()["tokens_in"]);

    // From stdin too: a raw prompt keeps its last newline, which the template's text ends with.
    let piped = env.run_with_stdin(
        &with(&["--json", "infer", "--prompt", "-", "--raw"], &greedy),
        rendered.as_bytes(),
    );
    piped.expect(0);
    assert_eq!(piped.text(), templated.text());
    assert_eq!(piped.done()["tokens_in"], templated.done()["tokens_in"]);
}

/// Streams one signed `POST /v1/generate` to the worker and returns its text and `done` event.
fn generate_on_worker(env: &Env, body: &serde_json::Value) -> (String, serde_json::Value) {
    let key = std::fs::read_to_string(env.node_dir().join("worker.key")).expect("worker key");
    let body = serde_json::to_vec(body).expect("JSON");
    let sig = sign_with(
        &key,
        "POST",
        "/v1/generate",
        &body,
        unix_now(),
        &fresh_nonce(),
    );
    let (status, stream) = http(
        env.worker_socket(),
        "POST",
        "/v1/generate",
        &[
            ("x-rbee-signature", &sig),
            ("content-type", "application/json"),
        ],
        &body,
    );
    assert_eq!(status, 200, "{stream}");
    let mut text = String::new();
    let mut done = serde_json::Value::Null;
    let mut event = "";
    for line in stream.lines() {
        if let Some(name) = line.strip_prefix("event:") {
            event = name.trim();
        } else if let Some(data) = line.strip_prefix("data:") {
            let data: serde_json::Value = serde_json::from_str(data.trim()).expect("event JSON");
            match event {
                "token" => text.push_str(data["text"].as_str().expect("text")),
                "done" => done = data,
                "error" => panic!("the worker failed: {data}"),
                _ => {}
            }
        }
    }
    assert!(done.is_object(), "no done event: {stream}");
    (text, done)
}

#[test]
fn messages_are_rendered_with_the_models_chat_template() {
    let Some(env) = Env::new("") else { return };
    let greedy = ["--temperature", "0", "--max-tokens", "12"];
    // A conversation of three turns, written out in ChatML by hand, as the reference.
    let turns = [
        ("system", "You are terse."),
        ("user", "My name is Ada."),
        ("assistant", "Hello Ada."),
        ("user", "What is my name?"),
    ];
    let rendered: String = turns
        .iter()
        .map(|(role, content)| format!("<|im_start|>{role}\n{content}<|im_end|>\n"))
        .collect::<String>()
        + "<|im_start|>assistant\n";
    let reference = env.infer(&with(&["--prompt", &rendered, "--raw"], &greedy));
    reference.expect(0);

    let messages: Vec<serde_json::Value> = turns
        .iter()
        .map(|(role, content)| serde_json::json!({ "role": role, "content": content }))
        .collect();
    let (text, done) = generate_on_worker(
        &env,
        &serde_json::json!({
            "request_id": "messages-1",
            "system": null,
            "prompt": "",
            "messages": messages,
            "params": {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "seed": null},
        }),
    );
    assert_eq!(text, reference.text());
    assert_eq!(done["tokens_in"], reference.done()["tokens_in"]);

    // Messages beside a prompt contradict each other: refused before any work.
    let key = std::fs::read_to_string(env.node_dir().join("worker.key")).expect("worker key");
    let body = serde_json::to_vec(&serde_json::json!({
        "request_id": "messages-2",
        "system": null,
        "prompt": "hi",
        "messages": messages,
        "params": {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "seed": null},
    }))
    .expect("JSON");
    let sig = sign_with(
        &key,
        "POST",
        "/v1/generate",
        &body,
        unix_now(),
        &fresh_nonce(),
    );
    let (status, _) = http(
        env.worker_socket(),
        "POST",
        "/v1/generate",
        &[
            ("x-rbee-signature", &sig),
            ("content-type", "application/json"),
        ],
        &body,
    );
    assert_eq!(status, 400);
}

#[test]
fn batch_lines_carry_the_generation_controls() {
    let Some(env) = Env::new("") else { return };
    if !jsonschema_available() {
        return;
    }
    // A bad value is named by its line before anything runs.
    let bad = write(
        &env,
        "bad.jsonl",
        "{\"id\":1,\"prompt\":\"a\",\"stop\":5}\n{\"id\":2,\"prompt\":\"a\",\"format\":\"xml\"}\n",
    );
    let run = env.run(&["batch", &bad]);
    run.expect(8);
    assert!(
        run.stderr.contains("line 1") && run.stderr.contains("line 2"),
        "{}",
        run.stderr
    );
    assert!(
        !env.node_dir().join("hive.pid").exists(),
        "a hive started for a bad batch"
    );

    let fruits = env.infer(&FRUITS);
    fruits.expect(0);
    let (word, before) = cut_at_middle_word(&fruits.text());
    let question = "The capital of France is";
    let templated = env.infer(&[
        "--prompt",
        question,
        "--temperature",
        "0",
        "--max-tokens",
        "10",
    ]);
    templated.expect(0);

    let schema: serde_json::Value = serde_json::from_str(SCHEMA).expect("schema");
    let schema_path = write(&env, "schema.json", SCHEMA);
    let lines = [
        serde_json::json!({"id": "stop", "prompt": FRUITS[1], "seed": 5, "temperature": 0.8,
                           "max_tokens": 24, "stop": [word, "zebra"]}),
        serde_json::json!({"id": "schema", "prompt": SCHEMA_PROMPT, "seed": 3,
                           "temperature": 0.9, "max_tokens": 64, "json_schema": schema}),
        serde_json::json!({"id": "raw", "prompt": chatml(question), "raw": true,
                           "temperature": 0.0, "max_tokens": 10}),
        serde_json::json!({"id": "json", "prompt": "Give a JSON object with the name and age of a person.",
                           "format": "json", "temperature": 0.0, "max_tokens": 48}),
    ];
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let input = write(&env, "in.jsonl", &input);
    let run = env.run(&["batch", &input]);
    run.expect(0);
    let out: std::collections::HashMap<String, serde_json::Value> = run
        .json_lines()
        .into_iter()
        .map(|l| (l["id"].as_str().expect("id").to_string(), l))
        .collect();
    assert_eq!(out["stop"]["text"], before.as_str());
    assert_eq!(out["stop"]["stop_reason"], "stop");
    assert_eq!(out["schema"]["stop_reason"], "eos");
    assert_validates(
        Path::new(&schema_path),
        out["schema"]["text"].as_str().expect("text"),
    );
    assert_eq!(out["raw"]["text"], templated.text().as_str());
    let object: serde_json::Value =
        serde_json::from_str(out["json"]["text"].as_str().expect("text")).expect("JSON");
    assert!(object.is_object(), "{object}");
}
