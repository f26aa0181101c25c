//! nodes.toml as written -> the validated `Config`: each node's settings over `[defaults]` over
//! the built-in defaults, names and limits checked, errors pointing at the key.

use std::ops::Range;
use std::path::PathBuf;

use indexmap::IndexMap;

use crate::config::{
    Config, DEFAULT_CLOCK_SKEW, DEFAULT_HEALTH_MISSES, DEFAULT_HIVE_PORT, DEFAULT_KEEP_ALIVE,
    DEFAULT_PERSIST, DEFAULT_TIMEOUT, MAX_CONTEXT, MAX_GPU_LAYERS, MAX_SLOTS, MAX_THREADS, Model,
    Node, RestartPolicy, Source, Transport, list, raw,
};
use crate::error::{Error, Result};
use crate::paths;

pub(super) fn resolve(
    raw: raw::RawConfig,
    source: Source,
    located: &dyn Fn(Option<Range<usize>>, &str) -> Error,
) -> Result<Config> {
    let defaults = raw.defaults;
    let restart = resolve_restart(&raw.restart);

    let mut models = IndexMap::new();
    for (name, spanned) in raw.models {
        let span = spanned.span();
        let m = spanned.into_inner();
        if !valid_name(&name) {
            return Err(located(Some(span), &bad_name("model", &name)));
        }
        if m.slots.is_some_and(|s| !(1..=MAX_SLOTS).contains(&s)) {
            return Err(located(
                Some(span),
                &format!("`slots` must be between 1 and {MAX_SLOTS}"),
            ));
        }
        if m.context.is_some_and(|c| !(1..=MAX_CONTEXT).contains(&c)) {
            return Err(located(
                Some(span),
                &format!("`context` must be between 1 and {MAX_CONTEXT} tokens"),
            ));
        }
        if m.threads.is_some_and(|t| !(1..=MAX_THREADS).contains(&t)) {
            return Err(located(
                Some(span),
                &format!("`threads` must be between 1 and {MAX_THREADS}"),
            ));
        }
        if m.gpu_layers.is_some_and(|l| l > MAX_GPU_LAYERS) {
            return Err(located(
                Some(span),
                &format!("`gpu_layers` must be at most {MAX_GPU_LAYERS}"),
            ));
        }
        models.insert(
            name.clone(),
            Model {
                name,
                path: m.path,
                sha256: m.sha256.0,
                source: m.source,
                context: m.context,
                slots: m.slots.unwrap_or(4),
                gpu_layers: m.gpu_layers.unwrap_or(0),
                threads: m.threads,
            },
        );
    }

    let keys_dir = match &source {
        Source::File(path) => path
            .parent()
            .map_or_else(|| PathBuf::from("keys"), |p| p.join("keys")),
        Source::Embedded => paths::user_config_file()
            .and_then(|f| f.parent().map(|p| p.join("keys")))
            .unwrap_or_else(|| paths::state_dir().join("keys")),
    };
    let mut nodes = IndexMap::new();
    for (name, spanned) in raw.nodes {
        let span = spanned.span();
        let n = spanned.into_inner();
        if !valid_name(&name) {
            return Err(located(Some(span), &bad_name("node", &name)));
        }
        let transport = n.transport.or(defaults.transport).unwrap_or(Transport::Ssh);
        let host = n.host.or_else(|| defaults.host.clone());
        if host.is_none() && transport != Transport::Local {
            return Err(located(
                Some(span),
                &format!(
                    "node `{name}` has no `host`; set `host = \"...\"` or `transport = \"local\"`"
                ),
            ));
        }
        let remote_dir = n
            .remote_dir
            .clone()
            .or_else(|| defaults.remote_dir.clone())
            .unwrap_or_else(|| "~/.rbee".to_string());
        let model_refs = n
            .models
            .or_else(|| defaults.models.clone())
            .unwrap_or_default();
        let mut served = Vec::new();
        for m in model_refs {
            if !models.contains_key(m.get_ref()) {
                let message = format!(
                    "node `{name}` serves unknown model `{}`; known models: {}",
                    m.get_ref(),
                    list(models.keys())
                );
                return Err(located(Some(m.span()), &message));
            }
            served.push(m.into_inner());
        }
        let health_misses = n
            .health_misses
            .or(defaults.health_misses)
            .unwrap_or(DEFAULT_HEALTH_MISSES);
        if health_misses == 0 {
            return Err(located(
                Some(span),
                &format!("node `{name}`: `health_misses` must be at least 1"),
            ));
        }
        let key_name = format!("{name}.key");
        nodes.insert(
            name.clone(),
            Node {
                name,
                host,
                user: n.user.or_else(|| defaults.user.clone()),
                port: n.port.or(defaults.port).unwrap_or(22),
                identity_file: n.identity_file.or_else(|| defaults.identity_file.clone()),
                known_hosts: n
                    .known_hosts
                    .or_else(|| defaults.known_hosts.clone())
                    .unwrap_or_else(|| "~/.ssh/known_hosts".to_string()),
                hive_port: n
                    .hive_port
                    .or(defaults.hive_port)
                    .unwrap_or(DEFAULT_HIVE_PORT),
                metrics_port: n.metrics_port.or(defaults.metrics_port),
                transport,
                timeout: n
                    .timeout
                    .or(defaults.timeout)
                    .map_or(DEFAULT_TIMEOUT, |d| d.0),
                keep_alive: n
                    .keep_alive
                    .or(defaults.keep_alive)
                    .map_or(DEFAULT_KEEP_ALIVE, |d| d.0),
                clock_skew: n
                    .clock_skew
                    .or(defaults.clock_skew)
                    .map_or(DEFAULT_CLOCK_SKEW, |d| d.0),
                audit: n.audit.or(defaults.audit).unwrap_or_default(),
                health_misses,
                persist: n
                    .persist
                    .or(defaults.persist)
                    .map_or(DEFAULT_PERSIST, |d| d.0),
                key_file: if transport == Transport::Local {
                    paths::expand_tilde(remote_dir.trim_end_matches('/')).join("hive.key")
                } else {
                    keys_dir.join(key_name)
                },
                remote_dir,
                models: served,
                restart,
            },
        );
    }
    if nodes.is_empty() {
        return Err(Error::config(format!(
            "{source}: no nodes defined; add a `[nodes.NAME]` table (see nodes.toml.example)"
        )));
    }
    let mut groups = IndexMap::new();
    for (name, spanned) in raw.groups {
        let span = spanned.span();
        let members = spanned.into_inner();
        if !valid_name(&name) {
            return Err(located(Some(span), &bad_name("group", &name)));
        }
        if nodes.contains_key(&name) {
            return Err(located(
                Some(span),
                &format!("group `{name}` has the name of a node; `--node {name}` would mean both"),
            ));
        }
        if members.is_empty() {
            return Err(located(
                Some(span),
                &format!("group `{name}` names no nodes"),
            ));
        }
        if let Some(unknown) = members.iter().find(|m| !nodes.contains_key(*m)) {
            return Err(located(
                Some(span),
                &format!(
                    "group `{name}` names `{unknown}`, which is not a node; known nodes: {}",
                    list(nodes.keys())
                ),
            ));
        }
        groups.insert(name, members);
    }
    Ok(Config {
        source,
        models,
        nodes,
        groups,
    })
}

fn resolve_restart(r: &raw::RawRestart) -> RestartPolicy {
    let d = RestartPolicy::default();
    RestartPolicy {
        max_attempts: r.max_attempts.unwrap_or(d.max_attempts),
        backoff_initial: r.backoff_initial.map_or(d.backoff_initial, |x| x.0),
        backoff_max: r.backoff_max.map_or(d.backoff_max, |x| x.0),
        breaker_failures: r.breaker_failures.unwrap_or(d.breaker_failures),
        breaker_window: r.breaker_window.map_or(d.breaker_window, |x| x.0),
    }
}

/// Names travel into paths, URLs and remote commands, so they stay plain.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

fn bad_name(what: &str, name: &str) -> String {
    format!(
        "invalid {what} name `{name}`: use letters, digits, `-`, `_` and `.` (at most 64, not starting with `.`)"
    )
}
