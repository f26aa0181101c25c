//! Where a model's file comes from (its `source`): a file on this machine, which `models push`
//! copies over SSH, or a URL the node downloads itself: `http://`, `https://`, or
//! `hf://OWNER/REPO/FILE.gguf[@REVISION]`, a file of a Hugging Face repository.

/// Hugging Face's host, unless `HF_ENDPOINT` names another (a mirror, a test server).
const HF_DEFAULT_ENDPOINT: &str = "https://huggingface.co";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A file on this machine (`~` is this machine's home).
    File(String),
    /// An `http://` or `https://` URL.
    Url(String),
    /// A file in a Hugging Face repository, at a revision (default `main`).
    HuggingFace {
        repo: String,
        file: String,
        revision: String,
    },
}

impl Origin {
    /// Reads a `source` value; the error says what is wrong with it.
    pub(crate) fn parse(source: &str) -> Result<Origin, String> {
        if source.trim().is_empty() {
            return Err("`source` is empty".to_string());
        }
        if let Some(rest) = source.strip_prefix("hf://") {
            return hugging_face(rest);
        }
        let lower = source.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let host = source
                .split_once("://")
                .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or_default())
                .unwrap_or_default();
            if host.is_empty() || source.chars().any(char::is_whitespace) {
                return Err(format!("`source` `{source}` is not a valid URL"));
            }
            return Ok(Origin::Url(source.to_string()));
        }
        if lower.contains("://") {
            return Err(format!(
                "`source` `{source}`: only http://, https:// and hf:// URLs are supported (or a \
                 file on this machine)"
            ));
        }
        Ok(Origin::File(source.to_string()))
    }

    /// The URL the node downloads, `None` for a file pushed from this machine. `hf_endpoint`
    /// (`HF_ENDPOINT`) replaces Hugging Face's host.
    pub(crate) fn url(&self, hf_endpoint: Option<&str>) -> Option<String> {
        match self {
            Origin::File(_) => None,
            Origin::Url(url) => Some(url.clone()),
            Origin::HuggingFace {
                repo,
                file,
                revision,
            } => {
                let host = hf_endpoint
                    .filter(|h| !h.trim().is_empty())
                    .unwrap_or(HF_DEFAULT_ENDPOINT)
                    .trim_end_matches('/');
                Some(format!("{host}/{repo}/resolve/{revision}/{file}"))
            }
        }
    }

    /// Whether the download may carry the node's Hugging Face token.
    pub(crate) fn is_hugging_face(&self) -> bool {
        matches!(self, Origin::HuggingFace { .. })
    }
}

fn hugging_face(rest: &str) -> Result<Origin, String> {
    let usage =
        "`source` must be `hf://OWNER/REPO/FILE.gguf` or `hf://OWNER/REPO/FILE.gguf@REVISION`";
    let (path, revision) = match rest.rsplit_once('@') {
        Some((path, revision)) => (path, revision),
        None => (rest, "main"),
    };
    let mut parts = path.splitn(3, '/');
    let (Some(owner), Some(repo), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{usage}; got `hf://{rest}`"));
    };
    let plain = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !plain(owner) || !plain(repo) || !plain(revision) || !file.split('/').all(plain) {
        return Err(format!("{usage}; got `hf://{rest}`"));
    }
    if !file.to_ascii_lowercase().ends_with(".gguf") {
        return Err(format!("{usage} (a GGUF file); got `hf://{rest}`"));
    }
    Ok(Origin::HuggingFace {
        repo: format!("{owner}/{repo}"),
        file: file.to_string(),
        revision: revision.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_sources_resolve_to_their_resolve_url() {
        let o = Origin::parse("hf://bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2.Q4_1.gguf")
            .expect("valid");
        assert!(o.is_hugging_face());
        assert_eq!(
            o.url(None).as_deref(),
            Some(
                "https://huggingface.co/bartowski/SmolLM2-135M-Instruct-GGUF/resolve/main/SmolLM2.Q4_1.gguf"
            )
        );
        let o = Origin::parse("hf://o/r/sub/m.gguf@v1.2").expect("valid");
        assert_eq!(
            o.url(Some("http://127.0.0.1:9/")).as_deref(),
            Some("http://127.0.0.1:9/o/r/resolve/v1.2/sub/m.gguf")
        );
    }

    #[test]
    fn bad_sources_are_refused() {
        for bad in [
            "hf://o/m.gguf",
            "hf://o/r/m.bin",
            "hf://o/../m.gguf",
            "hf://o/r/m.gguf@",
            "hf://o/r/a b.gguf",
            "ftp://host/m.gguf",
            "http://",
            "https:///x",
            "",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn urls_and_files_are_kept_as_written() {
        assert_eq!(
            Origin::parse("https://example.com/m.gguf?x=1"),
            Ok(Origin::Url("https://example.com/m.gguf?x=1".into()))
        );
        assert_eq!(
            Origin::parse("~/m.gguf"),
            Ok(Origin::File("~/m.gguf".into()))
        );
        assert_eq!(Origin::parse("~/m.gguf").expect("file").url(None), None);
    }
}
