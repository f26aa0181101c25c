//! `rbee completions`: the scripts are generated from the real command tree, and the bash one
//! completes when a shell sources it.

use crate::support::{Env, Run};

/// An environment whose nodes.toml does not parse: completions must not need it.
fn broken_config() -> Env {
    Env::custom(|_, _| "this is [not toml\n".to_string())
}

fn script(env: &Env, shell: &str) -> String {
    let run = env.run(&["completions", shell]);
    run.expect(0);
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    run.stdout
}

/// What bash offers for `words` (the last one being completed), with rbee's script sourced.
fn bash_offers(script_path: &std::path::Path, words: &[&str]) -> Vec<String> {
    // The function is the one the script registers with `complete -F`, called the way bash
    // calls it: the command, the word being completed, the word before it.
    let program = r#"
        source "$1"; shift
        spec=$(complete -p rbee) || exit 3
        fn=${spec#*-F }; fn=${fn%% *}
        COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))
        COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
        "$fn" rbee "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
        printf '%s\n' "${COMPREPLY[@]}"
    "#;
    let output = std::process::Command::new("bash")
        .args(["--norc", "--noprofile", "-c", program, "bash"])
        .arg(script_path)
        .args(words)
        .output()
        .expect("bash");
    let run = Run::from(output);
    run.expect(0);
    run.stdout.lines().map(str::to_string).collect()
}

#[test]
fn the_bash_script_completes_subcommands_and_their_commands() {
    let env = broken_config();
    let path = env.path().join("rbee.bash");
    std::fs::write(&path, script(&env, "bash")).expect("write script");
    assert_eq!(bash_offers(&path, &["rbee", "hi"]), ["hive"]);
    let offered = bash_offers(&path, &["rbee", "hive", "st"]);
    for command in ["start", "stop", "status"] {
        assert!(offered.iter().any(|o| o == command), "{offered:?}");
    }
    let offered = bash_offers(&path, &["rbee", "infer", "--max-t"]);
    assert_eq!(offered, ["--max-tokens"]);
}

#[test]
fn zsh_and_fish_scripts_name_the_commands() {
    let env = broken_config();
    for shell in ["zsh", "fish"] {
        let text = script(&env, shell);
        assert!(text.contains("infer"), "{shell}: {text}");
        assert!(text.contains("rotate-key"), "{shell}: {text}");
    }
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let env = broken_config();
    let run = env.run(&["completions", "tcsh"]);
    run.expect(2);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(run.stderr.contains("bash, zsh, fish"), "{}", run.stderr);
}
