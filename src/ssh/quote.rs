//! Shell quoting for remote commands: every path and argument travels single-quoted, so node
//! names, paths and model names cannot inject shell syntax.

/// `'text'`, with embedded single quotes closed, escaped and reopened.
pub(crate) fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// A node-side path as a shell word: a leading `~` becomes `"$HOME"`, the rest is quoted.
pub(crate) fn remote_path(path: &str) -> String {
    if path == "~" {
        "\"$HOME\"".to_string()
    } else if let Some(rest) = path.strip_prefix("~/") {
        format!("\"$HOME\"/{}", quote(rest))
    } else {
        quote(path)
    }
}

/// `dir/name` for a node-side directory given as written in nodes.toml.
pub(crate) fn remote_join(dir: &str, name: &str) -> String {
    let dir = dir.trim_end_matches('/');
    remote_path(&format!("{dir}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_the_shell() {
        let nasty = "a b'c\"$(touch x);`id`\\n*";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", quote(nasty)))
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), nasty);
    }

    #[test]
    fn home_is_expanded_and_the_rest_is_not() {
        assert_eq!(remote_path("~/.rbee"), "\"$HOME\"/'.rbee'");
        assert_eq!(remote_path("/opt/r bee"), "'/opt/r bee'");
        assert_eq!(
            remote_join("~/x $y/", "bin/rbee"),
            "\"$HOME\"/'x $y/bin/rbee'"
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", remote_path("~/a $b")))
            .env("HOME", "/h")
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/h/a $b");
    }
}
