//! Commands over many nodes run more than 8 at a time, yet pace their logins to one sshd below
//! its `MaxStartups`: 24 nodes behind one sshd with OpenSSH's default `MaxStartups 10:30:100`
//! (which drops unauthenticated connections beyond 10) all answer.

use crate::support::sshd::{self, ClientKey, Sshd};
use crate::support::{Env, MODEL_SHA256, free_port, model_table, tempdir};

#[test]
fn many_nodes_behind_one_sshd_stay_under_its_max_startups() {
    let Some(model) = crate::support::model() else {
        return;
    };
    if !sshd::available() {
        return;
    }
    let dir = tempdir();
    let key = ClientKey::new(dir.path(), "client", "ed25519");
    let server = Sshd::start_with(
        &dir.path().join("sshd"),
        &[&key],
        &sshd::Options {
            extra: "MaxStartups 10:30:100\n",
            ..sshd::Options::default()
        },
    );
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, server.known_hosts_line()).expect("known_hosts");
    let mut text = format!(
        "{}[defaults]\nuser = {:?}\nidentity_file = {:?}\nknown_hosts = {:?}\npersist = \"0\"\n",
        model_table(&model, MODEL_SHA256),
        sshd::user(),
        key.private.display().to_string(),
        known_hosts.display().to_string(),
    );
    const NODES: usize = 24;
    for i in 0..NODES {
        text.push_str(&format!(
            "\n[nodes.n{i}]\nhost = \"127.0.0.1\"\nport = {}\nremote_dir = {:?}\n\
             models = [\"smollm2\"]\n",
            server.port,
            dir.path().join(format!("node-{i}")).display().to_string(),
        ));
    }
    let env = Env::from_dir(dir, free_port(), &text);
    for _ in 0..2 {
        let run = env.run(&["--json", "hive", "status", "--all"]);
        let lines = run.json_lines();
        assert_eq!(lines.len(), NODES, "{}", run.stderr);
        for line in &lines {
            assert_eq!(line["state"], "stopped", "{line}");
        }
        run.expect(6);
    }
}
