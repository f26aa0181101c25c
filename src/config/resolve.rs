//! nodes.toml as written -> the validated `Config`: each node's settings over `[defaults]` over
//! the built-in defaults, names and limits checked, errors pointing at the key.

use std::ops::Range;
use std::path::PathBuf;

use indexmap::IndexMap;

use crate::config::{
    Binary, BinaryLocation, Config, DEFAULT_CLOCK_SKEW, DEFAULT_HEALTH_MISSES, DEFAULT_HIVE_PORT,
    DEFAULT_KEEP_ALIVE, DEFAULT_PERSIST, DEFAULT_TIMEOUT, MAX_CONTEXT, MAX_SLOTS, MAX_THREADS,
    Model, Node, Origin, RestartPolicy, Source, Transport, list, raw,
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
        let slots = m.slots.and_then(|s| s.0);
        if slots.is_some_and(|s| !(1..=MAX_SLOTS).contains(&s)) {
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
        if m.load_timeout.as_ref().is_some_and(|d| d.0.is_zero()) {
            return Err(located(Some(span), "`load_timeout` must be more than 0"));
        }
        if let Some(source) = &m.source {
            Origin::parse(source).map_err(|why| located(Some(span.clone()), &why))?;
        }
        models.insert(
            name.clone(),
            Model {
                name,
                path: m.path,
                sha256: m.sha256.0,
                source: m.source,
                context: m.context,
                slots,
                gpu_layers: m.gpu_layers.unwrap_or_default(),
                threads: m.threads,
                load_timeout: m
                    .load_timeout
                    .map_or(crate::config::DEFAULT_LOAD_TIMEOUT, |d| d.0),
                kv_unified: m.kv_unified.unwrap_or(false),
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
    let binaries = resolve_binaries(raw.binaries, &source, located)?;
    let mut nodes = IndexMap::new();
    let mut jumps = Vec::new();
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
        let binary = n
            .binary
            .clone()
            .or_else(|| defaults.binary.clone())
            .unwrap_or_else(|| "auto".to_string());
        if binary != "auto" && !crate::platform::VARIANTS.contains(&binary.as_str()) {
            return Err(located(
                Some(span),
                &bad_variant(&format!("node `{name}`: `binary`"), &binary),
            ));
        }
        if let Some(jump) = n.jump.or_else(|| defaults.jump.clone()) {
            jumps.push((name.clone(), span.clone(), jump));
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
                jump: None,
                known_hosts: n.known_hosts.or_else(|| defaults.known_hosts.clone()),
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
                binary,
                binaries: binaries.clone(),
            },
        );
    }
    for (name, span, jump) in jumps {
        let resolved = resolve_jump(&name, &jump, &nodes).map_err(|m| located(Some(span), &m))?;
        if let Some(node) = nodes.get_mut(&name) {
            node.jump = Some(resolved);
        }
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

fn bad_variant(key: &str, value: &str) -> String {
    let mut known = vec!["auto"];
    known.extend(crate::platform::VARIANTS);
    format!(
        "{key} is `{value}`, which is not a variant; use one of `{}`",
        known.join("`, `")
    )
}

/// `[[binaries]]`: each a known variant with exactly one of `path` (relative to nodes.toml's
/// folder) and `url`, and one entry per target and variant.
fn resolve_binaries(
    raw: Vec<toml::Spanned<raw::RawBinary>>,
    source: &Source,
    located: &dyn Fn(Option<Range<usize>>, &str) -> Error,
) -> Result<Vec<Binary>> {
    let base = match source {
        Source::File(path) => path.parent().map(PathBuf::from).unwrap_or_default(),
        Source::Embedded => PathBuf::new(),
    };
    let mut out: Vec<Binary> = Vec::new();
    for spanned in raw {
        let span = spanned.span();
        let b = spanned.into_inner();
        if !crate::platform::VARIANTS.contains(&b.variant.as_str()) {
            return Err(located(
                Some(span),
                &bad_variant("[[binaries]] `variant`", &b.variant),
            ));
        }
        if b.target.is_empty()
            || !b
                .target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(located(
                Some(span),
                &format!(
                    "[[binaries]] `target` is `{}`; use a Rust target triple as `rbee version --json` reports it, for example `x86_64-unknown-linux-gnu`",
                    b.target
                ),
            ));
        }
        let location = match (b.path, b.url) {
            (Some(p), None) => {
                let p = paths::expand_tilde(&p);
                BinaryLocation::Path(if p.is_absolute() { p } else { base.join(p) })
            }
            (None, Some(u)) if u.starts_with("https://") || u.starts_with("http://") => {
                BinaryLocation::Url(u)
            }
            (None, Some(u)) => {
                return Err(located(
                    Some(span),
                    &format!(
                        "[[binaries]] `url` is `{u}`; it must start with `https://` or `http://`"
                    ),
                ));
            }
            _ => {
                return Err(located(
                    Some(span),
                    "a [[binaries]] entry needs exactly one of `path` (a file here, uploaded) and `url` (downloaded by the node)",
                ));
            }
        };
        if out
            .iter()
            .any(|o| o.target == b.target && o.variant == b.variant)
        {
            return Err(located(
                Some(span),
                &format!(
                    "[[binaries]] lists target `{}` variant `{}` twice",
                    b.target, b.variant
                ),
            ));
        }
        out.push(Binary {
            target: b.target,
            variant: b.variant,
            sha256: b.sha256.0,
            location,
        });
    }
    Ok(out)
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

/// A node's `jump` as ProxyJump hops: each a node of nodes.toml (replaced by its `host`, with
/// its `user` and `port`) or `[user@]host[:port]`; `none` means none (not even ssh_config's).
fn resolve_jump(
    name: &str,
    jump: &str,
    nodes: &IndexMap<String, Node>,
) -> std::result::Result<String, String> {
    if jump.trim().eq_ignore_ascii_case("none") {
        return Ok("none".to_string());
    }
    let mut hops = Vec::new();
    for hop in jump.split(',').map(str::trim) {
        if hop == name {
            return Err(format!("node `{name}`: `jump` names the node itself"));
        }
        if let Some(node) = nodes.get(hop) {
            let Some(host) = node
                .host
                .as_deref()
                .filter(|_| node.transport != Transport::Local)
            else {
                return Err(format!(
                    "node `{name}`: `jump` names node `{hop}`, which is not reached over SSH"
                ));
            };
            let user = node
                .user
                .as_ref()
                .map(|u| format!("{u}@"))
                .unwrap_or_default();
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            hops.push(format!("{user}{host}:{}", node.port));
            continue;
        }
        let (_, rest) = hop.rsplit_once('@').unwrap_or(("", hop));
        let host = match rest.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                if port.parse::<u16>().is_err() {
                    return Err(format!(
                        "node `{name}`: `jump` hop `{hop}` has a port that is not a number"
                    ));
                }
                host
            }
            _ => rest,
        };
        if host.is_empty() || hop.contains(char::is_whitespace) {
            return Err(format!(
                "node `{name}`: `jump` hop `{hop}` is neither a node of this file nor \
                 `[user@]host[:port]`; known nodes: {}",
                list(nodes.keys())
            ));
        }
        hops.push(hop.to_string());
    }
    Ok(hops.join(","))
}
