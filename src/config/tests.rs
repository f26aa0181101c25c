use super::*;

fn parse(text: &str) -> Result<Config> {
    Config::parse(text, Source::File(PathBuf::from("nodes.toml")))
}

const MODEL: &str = r#"
[models.m]
path = "~/m.gguf"
sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"#;

#[test]
fn the_example_file_parses_and_documents_every_key() {
    let text = include_str!("../../nodes.toml.example");
    let config = parse(text).expect("nodes.toml.example must parse");
    assert!(
        text.contains("\n[groups]"),
        "nodes.toml.example does not document `[groups]`"
    );
    assert!(config.nodes.contains_key("gpu1"));
    // Every key of the contract appears in the example, commented or not.
    for key in [
        "user",
        "port",
        "identity_file",
        "jump",
        "known_hosts",
        "remote_dir",
        "hive_port",
        "metrics_port",
        "transport",
        "timeout",
        "keep_alive",
        "clock_skew",
        "audit",
        "health_misses",
        "persist",
        "max_attempts",
        "backoff_initial",
        "backoff_max",
        "breaker_failures",
        "breaker_window",
        "path",
        "sha256",
        "source",
        "context",
        "slots",
        "gpu_layers",
        "threads",
        "load_timeout",
        "kv_unified",
        "host",
        "models",
        "binary",
        "target",
        "variant",
        "url",
    ] {
        assert!(
            text.lines().any(|l| l
                .trim_start_matches(['#', ' '])
                .starts_with(&format!("{key} ="))),
            "nodes.toml.example does not document `{key}`"
        );
    }
}

#[test]
fn nodes_inherit_defaults_and_may_override_them() {
    let text = format!(
        "{MODEL}\n[defaults]\nuser = \"ops\"\nhive_port = 9000\ntimeout = \"90s\"\n\
         [nodes.a]\nhost = \"h1\"\nmodels = [\"m\"]\n\
         [nodes.b]\nhost = \"h2\"\nhive_port = 9001\nmodels = [\"m\"]\n"
    );
    let config = parse(&text).expect("valid config");
    let a = &config.nodes["a"];
    let b = &config.nodes["b"];
    assert_eq!(a.user.as_deref(), Some("ops"));
    assert_eq!(a.hive_port, 9000);
    assert_eq!(b.hive_port, 9001);
    assert_eq!(b.timeout, Duration::from_secs(90));
    assert_eq!(a.transport, Transport::Ssh);
    assert_eq!(a.remote_dir, "~/.rbee");
    // File order decides the default node.
    assert_eq!(config.node(None).expect("a node").name, "a");
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = format!("{MODEL}\n[nodes.a]\nhost = \"h\"\nhots = \"typo\"\n");
    let err = parse(&text).expect_err("unknown key");
    assert_eq!(err.code(), 3);
    assert!(
        err.to_string().starts_with("nodes.toml:8:1:"),
        "{}",
        err.to_string()
    );
    assert!(err.to_string().contains("hots"), "{}", err.to_string());
}

#[test]
fn bad_duration_is_located() {
    let text = format!("{MODEL}\n[nodes.a]\nhost = \"h\"\ntimeout = \"30\"\n");
    let err = parse(&text).expect_err("bad duration");
    assert!(
        err.to_string().contains("nodes.toml:8:"),
        "{}",
        err.to_string()
    );
    assert!(
        err.to_string().contains("add a unit"),
        "{}",
        err.to_string()
    );
}

#[test]
fn node_serving_unknown_model_is_located() {
    let text = format!("{MODEL}\n[nodes.a]\nhost = \"h\"\nmodels = [\"m\", \"nope\"]\n");
    let err = parse(&text).expect_err("unknown model");
    assert!(
        err.to_string().contains("nodes.toml:8:"),
        "{}",
        err.to_string()
    );
    assert!(err.to_string().contains("`nope`"), "{}", err.to_string());
}

#[test]
fn remote_node_needs_a_host() {
    let err = parse(&format!("{MODEL}\n[nodes.a]\nmodels = [\"m\"]\n")).expect_err("no host");
    assert!(
        err.to_string().contains("has no `host`"),
        "{}",
        err.to_string()
    );
    let ok = parse(&format!("{MODEL}\n[nodes.a]\ntransport = \"local\"\n")).expect("local");
    assert_eq!(ok.nodes["a"].transport, Transport::Local);
}

#[test]
fn unknown_node_and_model_list_the_known_ones() {
    let config = Config::embedded();
    let err = config.node(Some("gpu9")).expect_err("unknown node");
    assert!(err.to_string().contains("`local`"), "{}", err.to_string());
    let node = config.node(None).expect("local");
    let err = config
        .model(node, Some("llama"))
        .expect_err("unknown model");
    assert!(err.to_string().contains("`smollm2`"), "{}", err.to_string());
    assert_eq!(config.model(node, None).expect("default").name, "smollm2");
}

#[test]
fn names_that_could_escape_a_path_are_refused() {
    assert!(valid_name("gpu-1.lab_a"));
    for bad in ["", "../x", "a b", ".hidden", "a;rm", "a/b"] {
        assert!(!valid_name(bad), "{bad:?} accepted");
    }
}

#[test]
fn slots_must_fit_llama_cpp() {
    let node = "\n[nodes.a]\ntransport = \"local\"\n";
    let ok = parse(&format!("{MODEL}slots = 8\n{node}")).expect("8 slots");
    assert_eq!(ok.models["m"].slots, Some(8));
    // Left out or "auto": the hive derives the count on the node.
    let auto = parse(&format!("{MODEL}{node}")).expect("default");
    assert_eq!(auto.models["m"].slots, None);
    assert_eq!(auto.models["m"].slots_before_report(), 4);
    let spelled = parse(&format!("{MODEL}slots = \"auto\"\n{node}")).expect("auto");
    assert_eq!(spelled.models["m"], auto.models["m"]);
    let err = parse(&format!("{MODEL}slots = \"many\"\n{node}")).expect_err("a word");
    assert_eq!(err.code(), 3);
    assert!(err.to_string().contains("\"auto\""), "{err}");
    assert!(err.to_string().contains("nodes.toml:"), "{err}");
    for bad in [-1, 0, i64::from(MAX_SLOTS) + 1, 1 << 40] {
        let err = parse(&format!("{MODEL}slots = {bad}\n{node}")).expect_err("out of range");
        assert_eq!(err.code(), 3);
        assert!(
            err.to_string()
                .contains("`slots` must be between 1 and 256"),
            "{}",
            err.to_string()
        );
        assert!(
            err.to_string().contains("nodes.toml:"),
            "{}",
            err.to_string()
        );
    }
}

#[test]
fn kv_unified_is_off_unless_a_model_turns_it_on_and_a_change_is_another_spec() {
    let node = "\n[nodes.a]\ntransport = \"local\"\n";
    let off = parse(&format!("{MODEL}{node}")).expect("default");
    assert!(!off.models["m"].kv_unified);
    let on = parse(&format!("{MODEL}kv_unified = true\n{node}")).expect("kv_unified");
    assert!(on.models["m"].kv_unified);
    // The hive restarts a worker whose spec changed: the digest must see the key.
    assert_ne!(
        crate::protocol::model_digest(&off.models["m"]),
        crate::protocol::model_digest(&on.models["m"])
    );
    // Off is left out of the spec, so every spec without the key keeps its digest.
    let explicit_off = parse(&format!("{MODEL}kv_unified = false\n{node}")).expect("off");
    assert_eq!(
        crate::protocol::model_digest(&off.models["m"]),
        crate::protocol::model_digest(&explicit_off.models["m"])
    );
    let json = serde_json::to_string(&crate::protocol::node_spec(&off.models["m"])).expect("json");
    assert!(!json.contains("kv_unified"), "{json}");
    let err = parse(&format!("{MODEL}kv_unified = \"yes\"\n{node}")).expect_err("not a bool");
    assert_eq!(err.code(), 3);
    assert!(
        err.to_string().contains("nodes.toml:"),
        "{}",
        err.to_string()
    );
}

proptest::proptest! {
    /// Whatever a nodes.toml says for a node's durations and a model's counts, loading gives a
    /// config whose budget fits the clock, or a configuration error: never a panic.
    #[test]
    fn any_duration_or_count_in_nodes_toml_loads_or_is_a_config_error(
        timeout in "[0-9]{1,22}(ns|ms|s|m|h|d|y)",
        keep_alive in "[0-9]{1,22}(ms|s|m|d|y)",
        context in proptest::prelude::any::<u32>(),
        threads in proptest::prelude::any::<u32>(),
        slots in proptest::prelude::any::<u32>(),
    ) {
        let text = format!(
            "[models.m]\npath = \"/m.gguf\"\nsha256 = \"{}\"\ncontext = {context}\nthreads = {threads}\n\
             slots = {slots}\n[nodes.a]\nhost = \"h\"\nmodels = [\"m\"]\ntimeout = \"{timeout}\"\n\
             keep_alive = \"{keep_alive}\"\n",
            "ab".repeat(32)
        );
        match parse(&text) {
            Ok(config) => {
                let node = config.node(Some("a")).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
                proptest::prop_assert!(node.timeout <= crate::config::MAX_DURATION);
                let _ = crate::deadline::Budget::new(node.timeout).deadline();
            }
            Err(e) => proptest::prop_assert_eq!(e.code(), 3),
        }
    }
}

#[test]
fn audit_fails_closed_unless_a_node_opts_out() {
    let text = format!(
        "{MODEL}\n[defaults]\naudit = \"best-effort\"\n\
         [nodes.a]\nhost = \"h1\"\n[nodes.b]\nhost = \"h2\"\naudit = \"required\"\n"
    );
    let config = parse(&text).expect("valid config");
    assert_eq!(config.nodes["a"].audit, AuditPolicy::BestEffort);
    assert_eq!(config.nodes["b"].audit, AuditPolicy::Required);
    let plain = parse(&format!("{MODEL}\n[nodes.a]\nhost = \"h\"\n")).expect("valid");
    assert_eq!(plain.nodes["a"].audit, AuditPolicy::Required);
    assert_eq!(
        Config::embedded().nodes["local"].audit,
        AuditPolicy::Required
    );
    let err = parse(&format!(
        "{MODEL}\n[nodes.a]\nhost = \"h\"\naudit = \"off\"\n"
    ))
    .expect_err("an unknown policy");
    assert_eq!(err.code(), 3);
    assert!(err.to_string().contains("best-effort"), "{err}");
}

#[test]
fn routes_follow_the_model_and_the_selector() {
    let sha = "ab".repeat(32);
    let config = parse(&format!(
        "[models.m]\npath = \"/m\"\nsha256 = \"{sha}\"\n[models.o]\npath = \"/o\"\nsha256 = \"{sha}\"\n\
         [groups]\ngpus = [\"c\", \"a\"]\n\
         [nodes.a]\nhost = \"a\"\nmodels = [\"m\"]\n[nodes.b]\nhost = \"b\"\nmodels = [\"o\"]\n\
         [nodes.c]\nhost = \"c\"\nmodels = [\"o\", \"m\"]\n"
    ))
    .expect("config");
    let names = |r: &crate::config::Route<'_>| -> Vec<String> {
        r.nodes.iter().map(|n| n.name.clone()).collect()
    };
    let any = config.route(None, Some("m")).expect("route");
    assert_eq!(
        (names(&any), any.pinned),
        (vec!["a".into(), "c".into()], false)
    );
    // No model: the first node's default, on every node serving it.
    let default = config.route(None, None).expect("route");
    assert_eq!(
        (default.model.name.as_str(), names(&default)),
        ("m", vec!["a".into(), "c".into()])
    );
    let group = config.route(Some("gpus"), Some("m")).expect("route");
    assert_eq!(names(&group), vec!["c".to_string(), "a".to_string()]);
    let listed = config.route(Some("b,c"), Some("o")).expect("route");
    assert_eq!(names(&listed), vec!["b".to_string(), "c".to_string()]);
    let pinned = config.route(Some("c"), None).expect("route");
    assert_eq!((pinned.model.name.as_str(), pinned.pinned), ("o", true));
    let err = config
        .route(Some("b"), Some("m"))
        .expect_err("b does not serve m");
    assert!(err.to_string().contains("it serves: `o`"), "{err}");
    let err = config.route(Some("a,b"), Some("o")).map(|r| names(&r));
    assert_eq!(err.expect("b serves o"), vec!["b".to_string()]);
    assert_eq!(
        config
            .route(Some("a"), Some("o"))
            .map(|_| ())
            .expect_err("no")
            .code(),
        3
    );
}

#[test]
fn a_group_naming_an_unknown_node_is_located() {
    let sha = "ab".repeat(32);
    let err = parse(&format!(
        "[models.m]\npath = \"/m\"\nsha256 = \"{sha}\"\n[groups]\ng = [\"a\", \"zz\"]\n\
         [nodes.a]\nhost = \"a\"\nmodels = [\"m\"]\n"
    ))
    .expect_err("unknown member");
    assert!(err.to_string().contains("nodes.toml:5:"), "{err}");
    assert!(err.to_string().contains("`zz`"), "{err}");
}

#[test]
fn gpu_layers_is_a_number_all_or_auto_and_binaries_are_checked() {
    let with = |layers: &str, rest: &str| {
        parse(&format!(
            "[models.m]\npath = \"~/m.gguf\"\nsha256 = \"{}\"\n{layers}\n\
             [nodes.a]\nhost = \"h\"\nmodels = [\"m\"]\n{rest}",
            "ab".repeat(32)
        ))
    };
    let layers = |text: &str| with(text, "").map(|c| c.models["m"].gpu_layers);
    assert_eq!(layers("").expect("default"), GpuLayers::Auto);
    assert_eq!(layers("gpu_layers = \"all\"").expect("all"), GpuLayers::All);
    assert_eq!(
        layers("gpu_layers = 12").expect("12"),
        GpuLayers::Layers(12)
    );
    for bad in [
        "gpu_layers = \"most\"",
        "gpu_layers = -1",
        "gpu_layers = 100001",
    ] {
        assert_eq!(layers(bad).expect_err(bad).code(), 3, "{bad}");
    }
    // On the wire the number stays a number and the words are words.
    assert_eq!(
        serde_json::to_string(&[GpuLayers::Layers(0), GpuLayers::All]).expect("json"),
        "[0,\"all\"]"
    );

    let entry = |body: &str| {
        format!(
            "binary = \"cuda\"\n[[binaries]]\ntarget = \"x86_64-unknown-linux-gnu\"\n{body}\
             sha256 = \"{}\"\n",
            "cd".repeat(32)
        )
    };
    let config = with("", &entry("variant = \"cuda\"\npath = \"dist/rbee\"\n")).expect("valid");
    let node = &config.nodes["a"];
    assert_eq!(node.binary, "cuda");
    assert_eq!(
        node.binaries[0].location,
        BinaryLocation::Path(PathBuf::from("dist/rbee"))
    );
    for bad in [
        "variant = \"tpu\"\npath = \"x\"\n",
        "variant = \"cuda\"\n",
        "variant = \"cuda\"\npath = \"x\"\nurl = \"https://h/x\"\n",
        "variant = \"cuda\"\nurl = \"ftp://h/x\"\n",
    ] {
        assert_eq!(with("", &entry(bad)).expect_err(bad).code(), 3, "{bad}");
    }
    let err = with("", "binary = \"gpu\"\n").expect_err("unknown variant");
    assert!(err.to_string().contains("`auto`, `cpu`, `cuda`"), "{err}");
}
