//! Keep-alives on every SSH connection: a link that dies in the middle of a generation ends
//! the invocation as the SSH failure it is (exit 4) once the keep-alives go unanswered, long
//! before the budget, with the text already printed kept.

use std::time::Instant;

use crate::support::netns::Netns;
use crate::support::sshd::{self, ClientKey, Options, Sshd};
use crate::support::{Env, MODEL_SHA256, free_port, model_table, tempdir};

#[test]
fn a_link_that_dies_mid_stream_ends_infer_with_exit_4_and_the_text_kept() {
    let Some((ns, _server, env)) = far_node(7, "", "0") else {
        return;
    };
    env.infer(&["--node", "far", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);

    cut_under_an_endless_infer(&env, &ns, "infer");
    // The hive on the far side rode it out.
    env.run(&["hive", "status", "far"]).expect(0);
}

/// Node `far`: an sshd (with `sshd_extra` in its config) in network namespace `index`, whose
/// link can be cut, with the model and `persist` as given; `None` where a prerequisite is
/// missing outside CI.
pub(super) fn far_node(index: u8, sshd_extra: &str, persist: &str) -> Option<(Netns, Sshd, Env)> {
    let model = crate::support::model()?;
    if !sshd::available() {
        return None;
    }
    let ns = Netns::create(index)?;
    let dir = tempdir();
    let key = ClientKey::new(dir.path(), "client", "ed25519");
    let server = Sshd::start_with(
        &dir.path().join("sshd"),
        &[&key],
        &Options {
            netns: Some((&ns.name, &ns.node_ip)),
            extra: sshd_extra,
            ..Options::default()
        },
    );
    std::fs::write(
        dir.path().join("known_hosts"),
        server.known_hosts_line_at(&ns.node_ip),
    )
    .expect("known_hosts");
    let config = format!(
        "{}[nodes.far]\nhost = {:?}\nport = {}\nuser = {:?}\nidentity_file = {:?}\n\
         known_hosts = {:?}\nremote_dir = {:?}\nhive_port = {}\nmodels = [\"smollm2\"]\n\
         persist = {persist:?}\n",
        model_table(&model, MODEL_SHA256),
        ns.node_ip,
        server.port,
        sshd::user(),
        key.private.display().to_string(),
        dir.path().join("known_hosts").display().to_string(),
        dir.path().join("node-far").display().to_string(),
        free_port(),
    );
    let env = Env::from_dir(dir, free_port(), &config);
    Some((ns, server, env))
}

/// Cuts the link under an endless `infer` on node `far`: it ends with exit 4 once the
/// keep-alives go unanswered, its last event the error and every earlier one a token (what was
/// printed stays printed); the link is back when this returns. `what` names it in the log.
pub(super) fn cut_under_an_endless_infer(env: &Env, ns: &Netns, what: &str) {
    // The budget (60s) is far longer than the keep-alives' 3 x 5 s.
    let (mut child, lines) = env.spawn_endless(&["--node", "far", "--timeout", "60s"], 3);
    ns.link(false);
    let cut = Instant::now();
    let rest: Vec<serde_json::Value> = lines
        .map(|l| serde_json::from_str(&l.expect("read")).expect("JSON"))
        .collect();
    let status = child.wait().expect("wait");
    let took = cut.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    ns.link(true);
    eprintln!("the lost link ended {what} {took:?} after the cut");
    assert_eq!(status.code(), Some(4), "{stderr}");
    let error = rest.last().expect("an error event");
    assert_eq!(error["event"], "error", "{rest:?}");
    assert_eq!(error["exit_code"], 4, "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("keep-alives"), "{error}");
    assert!(
        rest[..rest.len() - 1].iter().all(|l| l["event"] == "token"),
        "{rest:?}"
    );
}
