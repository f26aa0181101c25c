//! The hive daemon's start arguments: what `hive serve` takes, and how the queen writes them.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The node's rbee directory (pidfile, log, audit log)
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// TCP port to serve on, for nodes with `transport = "http"`; without it the hive serves on
    /// the Unix socket `hive.sock` in its directory only
    #[arg(long)]
    pub(crate) port: Option<u16>,
    /// Address the TCP port listens on
    #[arg(long, default_value = "0.0.0.0", requires = "port")]
    pub(crate) listen: std::net::IpAddr,
    /// TCP port that serves `GET /metrics` and nothing else, on all interfaces
    #[arg(long)]
    pub(crate) metrics_port: Option<u16>,
    /// Name of the node this hive serves
    #[arg(long, default_value = "local")]
    pub(crate) node: String,
    /// Idle time before a worker unloads its model
    #[arg(long, value_parser = crate::config::parse_duration, default_value = "5m")]
    pub(crate) keep_alive: std::time::Duration,
    /// How far a request's timestamp may be from this node's clock
    #[arg(long, value_parser = crate::config::parse_duration, default_value = "5m")]
    pub(crate) clock_skew: std::time::Duration,
    /// Refuse work that cannot be recorded in the audit log (`required`), or serve it with a
    /// warning to the client (`best-effort`)
    #[arg(long, value_enum, default_value = "required")]
    pub(crate) audit: crate::config::AuditPolicy,
    /// Missed health checks in a row before an idle worker is killed and replaced
    #[arg(long, default_value_t = crate::config::DEFAULT_HEALTH_MISSES, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) health_misses: u32,
    /// Restart policy: restarts in a row before giving up
    #[arg(long, default_value_t = 3)]
    pub(crate) max_attempts: u32,
    #[arg(long, value_parser = crate::config::parse_duration, default_value = "1s")]
    pub(crate) backoff_initial: std::time::Duration,
    #[arg(long, value_parser = crate::config::parse_duration, default_value = "60s")]
    pub(crate) backoff_max: std::time::Duration,
    #[arg(long, default_value_t = 5)]
    pub(crate) breaker_failures: u32,
    #[arg(long, value_parser = crate::config::parse_duration, default_value = "5m")]
    pub(crate) breaker_window: std::time::Duration,
}

impl ServeArgs {
    pub(crate) fn restart_policy(&self) -> crate::config::RestartPolicy {
        crate::config::RestartPolicy {
            max_attempts: self.max_attempts,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            breaker_failures: self.breaker_failures,
            breaker_window: self.breaker_window,
        }
    }

    /// The arguments after `hive serve --dir DIR` that carry a node's settings to its hive:
    /// the queen starts a hive with these.
    pub(crate) fn settings_for(node: &crate::config::Node) -> Vec<String> {
        let ms = |d: std::time::Duration| format!("{}ms", d.as_millis());
        let p = &node.restart;
        let mut args = Vec::new();
        if node.transport == crate::config::Transport::Http {
            args.extend([
                "--listen".to_string(),
                "0.0.0.0".to_string(),
                "--port".to_string(),
                node.hive_port.to_string(),
            ]);
        }
        if let Some(port) = node.metrics_port {
            args.extend(["--metrics-port".to_string(), port.to_string()]);
        }
        args.extend([
            "--node".to_string(),
            node.name.clone(),
            "--keep-alive".to_string(),
            ms(node.keep_alive),
            "--clock-skew".to_string(),
            ms(node.clock_skew),
            "--audit".to_string(),
            node.audit.name().to_string(),
            "--health-misses".to_string(),
            node.health_misses.to_string(),
            "--max-attempts".to_string(),
            p.max_attempts.to_string(),
            "--backoff-initial".to_string(),
            ms(p.backoff_initial),
            "--backoff-max".to_string(),
            ms(p.backoff_max),
            "--breaker-failures".to_string(),
            p.breaker_failures.to_string(),
            "--breaker-window".to_string(),
            ms(p.breaker_window),
        ]);
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn the_hive_starts_with_the_nodes_audit_policy() {
        use clap::Parser;
        let text = "[models.m]\npath = \"m.gguf\"\n\
                    sha256 = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"\n\
                    [nodes.a]\nhost = \"h\"\naudit = \"best-effort\"\n[nodes.b]\nhost = \"h\"\n";
        let config = crate::config::Config::parse(
            text,
            crate::config::Source::File(PathBuf::from("nodes.toml")),
        )
        .expect("valid config");
        for (node, policy) in [
            ("a", crate::config::AuditPolicy::BestEffort),
            ("b", crate::config::AuditPolicy::Required),
        ] {
            let mut argv = vec!["serve".to_string(), "--dir".into(), "/d".into()];
            argv.extend(ServeArgs::settings_for(&config.nodes[node]));
            let parsed = Serve::try_parse_from(argv).expect("the hive takes its settings");
            assert_eq!(parsed.args.audit, policy, "{node}");
        }
    }
}
