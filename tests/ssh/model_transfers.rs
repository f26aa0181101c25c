//! Pushes that must not half-happen: a model larger than the node's free space is refused
//! before a byte is sent, naming both sizes; two pushes of one model at once: one transfers,
//! the other waits for it, and the file verifies; a push whose connection dies is told as
//! such and the next one resumes its partial file.

use crate::support::MODEL_SHA256;
use crate::support::mount::Mount;

#[test]
fn a_push_larger_than_the_free_space_is_refused_before_sending() {
    let Some((fleet, _bin, remote_model)) = super::fleet_with_a_model_to_push() else {
        return;
    };
    let models_dir = remote_model.parent().expect("models dir").to_path_buf();
    let Some(_tmpfs) = Mount::tmpfs(&models_dir, 40) else {
        return;
    };
    let run = fleet.env.run(&["models", "push", "--node", "a", "smollm2"]);
    run.expect(7);
    assert!(
        run.stderr.contains("needs 9") && run.stderr.contains("MB free"),
        "both sizes are not named: {}",
        run.stderr
    );
    let part = format!("{}.part", remote_model.display());
    assert!(
        std::fs::metadata(&part).map_or(0, |m| m.len()) == 0,
        "bytes were sent"
    );
    assert!(!remote_model.exists());
}

#[test]
fn two_pushes_of_one_model_at_once_transfer_it_once() {
    let Some((fleet, _bin, remote_model)) = super::fleet_with_a_model_to_push() else {
        return;
    };
    let env = &fleet.env;
    let pushes: Vec<_> = (0..2)
        .map(|_| env.spawn(&["--json", "models", "push", "--node", "a", "smollm2"]))
        .collect();
    let mut actions = Vec::new();
    for push in pushes {
        let out = push.wait_with_output().expect("wait");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: serde_json::Value = serde_json::from_str(stdout.trim()).expect("a JSON result");
        actions.push(result["action"].as_str().expect("action").to_string());
    }
    actions.sort();
    assert_eq!(actions, ["present", "uploaded"], "{actions:?}");
    assert_eq!(crate::support::sha256(&remote_model), MODEL_SHA256);
}

#[test]
fn a_push_whose_connection_dies_says_so_and_the_next_push_resumes_it() {
    let Some((fleet, _bin, remote_model)) = super::fleet_with_a_model_to_push() else {
        return;
    };
    let part = std::path::PathBuf::from(format!("{}.part", remote_model.display()));
    let size = std::fs::metadata(crate::support::model().expect("model"))
        .expect("model size")
        .len();
    let push = fleet
        .env
        .spawn(&["models", "push", "--node", "a", "smollm2"]);
    assert!(
        crate::support::eventually(std::time::Duration::from_secs(60), || {
            std::fs::metadata(&part).is_ok_and(|m| m.len() > 0)
        }),
        "the push did not start"
    );
    // The connection dies as a dropped link would end it: every session sshd serves.
    assert!(fleet.servers[0].kill_sessions() > 0, "no session to kill");
    let out = push.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("connection was lost during the push of `smollm2`")
            && stderr.contains("push again to resume it"),
        "{stderr}"
    );
    let kept = std::fs::metadata(&part)
        .expect("the partial file is kept")
        .len();
    assert!(kept > 0 && kept < size, "kept {kept} of {size}");
    assert!(!remote_model.exists(), "an unverified file is in place");

    let run = fleet
        .env
        .run(&["--json", "models", "push", "--node", "a", "smollm2"]);
    run.expect(0);
    let result: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("JSON");
    assert_eq!(result["action"], "resumed", "{}", run.stdout);
    assert_eq!(result["resumed_from"], kept, "{}", run.stdout);
    assert_eq!(result["bytes_sent"], size - kept, "{}", run.stdout);
    assert_eq!(crate::support::sha256(&remote_model), MODEL_SHA256);
    assert!(!part.exists());
}
