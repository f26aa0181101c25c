//! nodes.toml as written: serde types that mirror the file, every key optional where the
//! contract allows it, unknown keys refused.

use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) defaults: RawNode,
    #[serde(default)]
    pub(crate) restart: RawRestart,
    #[serde(default)]
    pub(crate) models: IndexMap<String, Spanned<RawModel>>,
    #[serde(default)]
    pub(crate) nodes: IndexMap<String, Spanned<RawNode>>,
    /// Names for sets of nodes, usable wherever `--node` takes a name.
    #[serde(default)]
    pub(crate) groups: IndexMap<String, Spanned<Vec<String>>>,
    /// Node binaries for other platforms or builds.
    #[serde(default)]
    pub(crate) binaries: Vec<Spanned<RawBinary>>,
}

/// One `[[binaries]]` entry: a build of rbee for `target` and `variant`, at `path` on this
/// machine or at `url` for the node to download.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBinary {
    pub(crate) target: String,
    pub(crate) variant: String,
    pub(crate) sha256: Sha256Hex,
    pub(crate) path: Option<String>,
    pub(crate) url: Option<String>,
}

/// The keys a node may set; `[defaults]` uses the same set (`host` and `models` included, so a
/// fleet serving the same models can say so once).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    pub(crate) host: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) identity_file: Option<String>,
    pub(crate) jump: Option<String>,
    pub(crate) known_hosts: Option<String>,
    pub(crate) remote_dir: Option<String>,
    pub(crate) hive_port: Option<u16>,
    pub(crate) metrics_port: Option<u16>,
    pub(crate) transport: Option<Transport>,
    pub(crate) timeout: Option<NonZeroDuration>,
    pub(crate) keep_alive: Option<HumanDuration>,
    pub(crate) clock_skew: Option<NonZeroDuration>,
    pub(crate) audit: Option<AuditPolicy>,
    pub(crate) health_misses: Option<u32>,
    /// `"0"` (no unit) turns the persistent connection off.
    pub(crate) persist: Option<Persist>,
    pub(crate) models: Option<Vec<Spanned<String>>>,
    pub(crate) binary: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRestart {
    pub(crate) max_attempts: Option<u32>,
    pub(crate) backoff_initial: Option<HumanDuration>,
    pub(crate) backoff_max: Option<HumanDuration>,
    pub(crate) breaker_failures: Option<u32>,
    pub(crate) breaker_window: Option<NonZeroDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub(crate) path: String,
    pub(crate) sha256: Sha256Hex,
    pub(crate) source: Option<String>,
    pub(crate) context: Option<u32>,
    pub(crate) slots: Option<crate::config::SlotsSetting>,
    pub(crate) gpu_layers: Option<crate::config::GpuLayers>,
    pub(crate) threads: Option<u32>,
    pub(crate) load_timeout: Option<NonZeroDuration>,
    pub(crate) kv_unified: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    Ssh,
    Http,
    Local,
}

/// What a node does with work it cannot record in its audit trail.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum AuditPolicy {
    /// Refuse it (exit 10): each record is durable before the work it records is done.
    #[default]
    Required,
    /// Do it anyway, and warn on stderr of every invocation whose records were lost.
    BestEffort,
}

impl AuditPolicy {
    pub(crate) fn name(self) -> &'static str {
        match self {
            AuditPolicy::Required => "required",
            AuditPolicy::BestEffort => "best-effort",
        }
    }
}

/// A duration written as `"1500ms"`, `"30s"`, `"5m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// A duration that must not be zero: a budget, a load's bound, a skew or breaker window of
/// nothing would refuse every request or never trip.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NonZeroDuration(pub Duration);

impl<'de> Deserialize<'de> for NonZeroDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_nonzero_duration(&text)
            .map(NonZeroDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// `parse_duration`, refusing zero.
pub(crate) fn parse_nonzero_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("invalid duration `{text}`: must be more than zero")),
        d => Ok(d),
    }
}

/// How long a node's SSH connection is kept after its last use: a duration, or `"0"` for never.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Persist(pub Duration);

impl<'de> Deserialize<'de> for Persist {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim() == "0" {
            return Ok(Persist(Duration::ZERO));
        }
        parse_duration(&text)
            .map(Persist)
            .map_err(serde::de::Error::custom)
    }
}

/// The longest duration any setting, flag or header may carry: far beyond any real budget or
/// idle time, and far enough from the limits of the monotonic clock that adding it to "now"
/// cannot overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses a duration such as `1500ms`, `30s`, `5m`, `1h`; a bare number is refused because its
/// unit would be a guess, and one longer than `MAX_DURATION` because no clock can hold it.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "invalid duration `{text}`: add a unit, for example `{trimmed}s` or `{trimmed}ms`"
        ));
    }
    let duration = humantime::parse_duration(trimmed).map_err(|e| {
        format!("invalid duration `{text}` ({e}); expected a value like `1500ms`, `30s` or `5m`")
    })?;
    if duration > MAX_DURATION {
        return Err(format!(
            "invalid duration `{text}`: at most 366 days (`366d`)"
        ));
    }
    Ok(duration)
}

/// A SHA-256 digest as 64 hex digits, kept in lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sha256Hex(pub String);

impl<'de> Deserialize<'de> for Sha256Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(Sha256Hex(text.to_ascii_lowercase()))
        } else {
            Err(serde::de::Error::custom(format!(
                "invalid sha256 `{text}`: expected 64 hex digits (as printed by `sha256sum FILE`)"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("30").unwrap_err().contains("add a unit"));
        assert!(parse_duration("soon").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_a_bounded_duration_or_an_error(text in "\\PC{0,24}") {
            if let Ok(d) = parse_duration(&text) {
                proptest::prop_assert!(d <= MAX_DURATION);
            }
        }

        #[test]
        fn any_number_with_any_unit_is_a_bounded_duration_or_an_error(
            n in proptest::prelude::any::<u64>(),
            unit in proptest::sample::select(vec!["ns", "us", "ms", "s", "m", "h", "d", "w", "M", "y"]),
        ) {
            let text = format!("{n}{unit}");
            match parse_duration(&text) {
                Ok(d) => {
                    proptest::prop_assert!(d <= MAX_DURATION);
                    // What the parser lets through, the budget and the clock can hold.
                    let _ = crate::deadline::Budget::new(d).deadline();
                }
                Err(e) => proptest::prop_assert!(e.contains(&text), "{}", e),
            }
        }
    }
}
