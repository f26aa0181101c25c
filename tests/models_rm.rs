//! `rbee models rm`: a model's file removed from the node, unless it is in use.

use crate::support::{Env, MODEL_SHA256, model};

#[test]
fn models_rm_is_refused_while_loaded_then_removes_the_file_and_its_part_and_is_audited() {
    let Some(source) = model() else { return };
    let dir = crate::support::tempdir();
    let copy = dir.path().join("copy.gguf");
    std::fs::copy(&source, &copy).expect("copy the model");
    let env = Env::with_model(&copy, MODEL_SHA256, "");
    env.infer(&["--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    let part = dir.path().join("copy.gguf.part");
    std::fs::write(&part, b"partial").expect("part");

    let refused = env.run(&["models", "rm", "--node", "n1", "smollm2"]);
    refused.expect(8);
    assert!(refused.stderr.contains("worker stop"), "{}", refused.stderr);
    assert!(copy.is_file());

    env.run(&["worker", "stop", "--node", "n1", "--model", "smollm2"])
        .expect(0);
    // A transfer holds the file's lock: the removal waits for it to end.
    let lock = std::fs::File::create(dir.path().join("copy.gguf.part.lock")).expect("lock file");
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("flock");
    let busy = env.run(&["models", "rm", "--node", "n1", "smollm2"]);
    busy.expect(8);
    assert!(busy.stderr.contains("transfer"), "{}", busy.stderr);
    assert!(copy.is_file() && part.is_file());
    drop(held);

    let removed = env.run(&["--json", "models", "rm", "--node", "n1", "smollm2"]);
    removed.expect(0);
    let value: serde_json::Value = serde_json::from_str(removed.stdout.trim()).expect("JSON");
    assert_eq!(
        value["removed"]["removed"].as_array().map(Vec::len),
        Some(2),
        "{value}"
    );
    assert!(!copy.exists() && !part.exists());
    let records = crate::support::records(&env.node_dir().join("audit.jsonl"));
    assert!(
        records.iter().any(|r| r["event"] == "model_removed"),
        "{records:?}"
    );
}
