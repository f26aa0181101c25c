//! The hive serves the models its queen gave it (`PUT /v1/models`, at start and when nodes.toml
//! changed); a request names a model and the digest of the spec it means, never its file.

use crate::support::{Env, records};

const HI: [&str; 4] = ["--prompt", "Hi", "--max-tokens", "2"];

fn node_records(env: &Env, event: &str) -> Vec<serde_json::Value> {
    records(&env.node_dir().join("audit.jsonl"))
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

/// The digest the hive's last `models_updated` record holds for `model`.
fn digest_of(env: &Env, model: &str) -> String {
    let updates = node_records(env, "models_updated");
    let last = updates.last().expect("a models_updated record");
    last["fields"]["models"]
        .as_array()
        .expect("models")
        .iter()
        .find(|m| m["model"] == model)
        .and_then(|m| m["digest"].as_str())
        .unwrap_or_else(|| panic!("no `{model}` in {last}"))
        .to_string()
}

fn body(model: serde_json::Value, digest: &str, extra: serde_json::Value) -> Vec<u8> {
    let mut body = serde_json::json!({
        "request_id": format!("{:032x}", rand::random::<u128>()),
        "model": model,
        "model_digest": digest,
        "system": null,
        "prompt": "Hi",
        "params": {"max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "seed": null}
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body.to_string().into_bytes()
}

#[test]
fn a_signed_request_cannot_point_the_hive_at_another_file() {
    let Some(env) = Env::new("") else { return };
    let model = crate::support::model().expect("model");
    env.run(&["hive", "start", "n1"]).expect(0);
    // The queen gave the hive its table at start: names and digests on the node's record.
    let updates = node_records(&env, "models_updated");
    assert_eq!(updates.len(), 1, "{updates:?}");
    let digest = digest_of(&env, "smollm2");
    assert_eq!(digest.len(), 64);
    assert!(!updates[0].to_string().contains("gguf"), "{}", updates[0]);

    // A file of someone else's choosing, as the old request shape carried it.
    let decoy = env.path().join("decoy.gguf");
    std::fs::copy(&model, &decoy).expect("copy the model");
    let spec = serde_json::json!({
        "name": "smollm2", "path": decoy, "sha256": crate::support::MODEL_SHA256,
        "source": null, "context": null, "slots": 1, "gpu_layers": 0, "threads": 1
    });
    let (status, reply) = env.signed(
        "POST",
        "/v1/infer",
        &[],
        &body(spec, &digest, serde_json::json!({})),
    );
    assert!((400..500).contains(&status), "{status} {reply}");
    assert!(
        env.workers().is_empty(),
        "a worker started for the old shape"
    );

    // A name with a path beside it: the path is not part of the request and is not used.
    let (status, reply) = env.signed(
        "POST",
        "/v1/infer",
        &[],
        &body(
            serde_json::json!("smollm2"),
            &digest,
            serde_json::json!({"path": decoy, "sha256": "0".repeat(64)}),
        ),
    );
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("event: done"), "{reply}");
    let verified = node_records(&env, "model_verified");
    assert_eq!(verified.len(), 1, "{verified:?}");
    assert_eq!(
        verified[0]["fields"]["path"],
        model.display().to_string(),
        "{}",
        verified[0]
    );
    let text = std::fs::read_to_string(env.node_dir().join("audit.jsonl")).expect("audit");
    assert!(
        !text.contains("decoy"),
        "the decoy reached the node's record"
    );

    // A digest of another spec is refused by its own code, and spawns nothing new.
    let (status, reply) = env.signed(
        "POST",
        "/v1/infer",
        &[],
        &body(
            serde_json::json!("smollm2"),
            &"0".repeat(64),
            serde_json::json!({}),
        ),
    );
    assert_eq!(status, 404, "{reply}");
    assert!(
        reply.contains("\"code\":\"model_spec_mismatch\""),
        "{reply}"
    );
    assert_eq!(node_records(&env, "worker_spawned").len(), 1);
}

#[test]
fn a_changed_model_setting_reaches_the_running_hive_at_the_next_infer() {
    let Some(env) = Env::new("") else { return };
    env.infer(&HI).expect(0);
    let before = env.workers();
    assert_eq!(before.len(), 1);
    let first_pid = before[0]["pid"].clone();
    let first_digest = digest_of(&env, "smollm2");

    env.edit_config("threads = 1\n", "threads = 1\nslots = 2\ncontext = 512\n");
    let run = env.infer(&HI);
    run.expect(0);
    assert_eq!(run.done()["tokens_out"], 2);
    let after = env.workers();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["slots"], 2, "{after:?}");
    assert_ne!(after[0]["pid"], first_pid, "the old worker still serves");
    let health = crate::support::worker_health(&env);
    assert_eq!(health["n_ctx"], 512, "{health}");
    assert_eq!(health["slots"], 2, "{health}");

    let updates = node_records(&env, "models_updated");
    assert_eq!(updates.len(), 2, "{updates:?}");
    assert_ne!(digest_of(&env, "smollm2"), first_digest);
    // One refusal, then the update, then the request ran: nothing failed on the queen's side.
    let queen = records(&env.path().join("state").join("audit.jsonl"));
    let completed: Vec<_> = queen
        .iter()
        .filter(|r| r["event"] == "infer_completed")
        .collect();
    assert!(completed.iter().all(|r| r["fields"]["exit_code"] == 0));
}

#[test]
fn a_model_the_node_does_not_serve_is_refused_by_name() {
    let Some(env) = Env::new("") else { return };
    // A second model the node serves: same file, another name.
    env.add_model("second");
    env.run(&["hive", "start", "n1"]).expect(0);
    // The hive has never run it, and restarts it on its table's word.
    let run = env.run(&[
        "--json", "worker", "restart", "--node", "n1", "--model", "second",
    ]);
    run.expect(0);
    let second_digest = digest_of(&env, "second");
    let listed: Vec<_> = env.workers().iter().map(|w| w["model"].clone()).collect();
    assert_eq!(listed, ["second"], "{listed:?}");

    // Removed from nodes.toml: `hive start` on the running hive hands it the new table; the
    // idle worker stops and the model is refused.
    env.edit_config(
        "models = [\"smollm2\", \"second\"]",
        "models = [\"smollm2\"]",
    );
    env.run(&["hive", "start", "n1"]).expect(0);
    let updates = node_records(&env, "models_updated");
    assert_eq!(updates.len(), 2, "{updates:?}");
    assert_eq!(
        updates[1]["fields"]["removed"],
        serde_json::json!(["second"])
    );
    assert!(
        crate::support::eventually(std::time::Duration::from_secs(10), || env
            .workers()
            .is_empty()),
        "the removed model's worker still runs"
    );
    let (status, reply) = env.signed(
        "POST",
        "/v1/infer",
        &[],
        &body(
            serde_json::json!("second"),
            &second_digest,
            serde_json::json!({}),
        ),
    );
    assert_eq!(status, 404, "{reply}");
    assert!(
        reply.contains("\"code\":\"model_spec_mismatch\""),
        "{reply}"
    );
    assert!(reply.contains("`second`"), "{reply}");

    // The CLI refuses it before sending: not a model of this node (exit 3, named).
    let run = env.infer(&["--node", "n1", "--model", "second", "--prompt", "Hi"]);
    run.expect(3);
    assert!(run.stdout.contains("second"), "{}", run.stdout);
}
