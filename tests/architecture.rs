//! The rooms of `src/` and what each may import, as `architecture.md` states them: a test, so a
//! dependency that must never exist fails the build's tests the day it is written.

use std::path::{Path, PathBuf};

/// Rooms (top-level modules) and the rooms each must never import.
const FORBIDDEN: &[(&str, &[&str])] = &[
    // The worker runs llama.cpp on a node: it knows nothing of hives, SSH or the CLI.
    (
        "worker",
        &[
            "serve", "hive", "ssh", "queen", "cli", "cmd", "audit", "output", "progress",
        ],
    ),
    // The hive is a daemon on a node: no CLI faces, no queen machinery, no SSH client.
    (
        "hive",
        &[
            "serve", "cli", "cmd", "queen", "ssh", "worker", "output", "progress",
        ],
    ),
    // What only the CLI does never reaches into the faces or the worker.
    ("queen", &["cli", "cmd", "worker", "serve"]),
    // The API server is a queen: it reaches nodes through `queen`, never hive internals.
    ("serve", &["cli", "cmd", "hive", "worker", "output"]),
    // The libraries every actor shares depend on no actor.
    (
        "audit",
        &[
            "serve", "hive", "worker", "queen", "cli", "cmd", "ssh", "output", "progress",
        ],
    ),
    (
        "auth",
        &[
            "serve", "hive", "worker", "queen", "cli", "cmd", "ssh", "output", "progress",
        ],
    ),
    (
        "config",
        &[
            "serve", "hive", "worker", "queen", "cli", "cmd", "ssh", "audit", "auth", "server",
            "output", "progress",
        ],
    ),
    (
        "protocol",
        &[
            "serve", "hive", "worker", "queen", "cli", "cmd", "ssh", "output", "progress",
        ],
    ),
    (
        "ssh",
        &[
            "serve", "hive", "worker", "queen", "cli", "cmd", "audit", "auth", "output", "progress",
        ],
    ),
    (
        "deadline",
        &[
            "serve", "hive", "worker", "queen", "cli", "cmd", "ssh", "audit", "output", "progress",
        ],
    ),
    (
        "server",
        &[
            "serve", "hive", "worker", "queen", "cli", "cmd", "ssh", "output", "progress",
        ],
    ),
];

/// Crates that reach the network: configuration loading has no side effects and opens nothing.
const NETWORK: &[&str] = &[
    "reqwest::",
    "russh::",
    "tokio::net::",
    "std::net::TcpStream",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The room a file belongs to: its first path component under `src/`, without `.rs`.
fn room(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// The rooms a line of code names through `crate::`, including grouped imports.
fn rooms_named(line: &str) -> Vec<String> {
    let mut named = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                named.push(name);
            }
        } else {
            named.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    named
}

#[test]
fn no_room_imports_what_architecture_md_forbids() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "found only {} source files", files.len());
    let mut broken = Vec::new();
    for file in &files {
        let room = room(&src, file);
        let text = std::fs::read_to_string(file).expect("read source");
        let forbidden = FORBIDDEN
            .iter()
            .find(|(r, _)| *r == room)
            .map_or(&[][..], |(_, f)| *f);
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for named in rooms_named(code) {
                if forbidden.contains(&named.as_str()) {
                    broken.push(format!(
                        "{}:{}: `{room}` imports `{named}`",
                        file.display(),
                        n + 1
                    ));
                }
            }
            if room == "config" && NETWORK.iter().any(|net| code.contains(net)) {
                broken.push(format!(
                    "{}:{}: `config` reaches the network",
                    file.display(),
                    n + 1
                ));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_plain_imports() {
    assert_eq!(rooms_named("use crate::hive::Registry;"), ["hive"]);
    assert_eq!(
        rooms_named("use crate::{queen::node, ssh};  let x = crate::cli::Cli;"),
        ["queen", "ssh", "cli"]
    );
    assert!(rooms_named("use std::path::Path;").is_empty());
}
