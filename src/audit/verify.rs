//! Checking an audit log: every record's hash covers its content and links to the one before,
//! sequence numbers follow each other, across rotated files; the first break is named.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{GENESIS, Head, Record};

#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub(crate) records: u64,
    pub(crate) head: Option<Head>,
    #[serde(skip)]
    pub(crate) hashes: HashMap<u64, String>,
    #[serde(skip)]
    pub(crate) records_list: Vec<Record>,
    /// Where each record is: file and line.
    #[serde(skip)]
    pub(crate) places: HashMap<u64, (PathBuf, usize)>,
    /// The line after the last one, where a record missing from the end would be.
    #[serde(skip)]
    pub(crate) end: Option<(PathBuf, usize)>,
    /// The last seq of the rotated files dropped by the retention bound (their `audit_pruned`
    /// record says so): the chain is verified from the record after it.
    pub(crate) pruned_through: Option<u64>,
}

impl Verified {
    /// Where the record `seq` is, or where it would be if it is missing: the line after the
    /// last of the newest file (the first line of `path` when there are no files).
    pub(crate) fn place_of(&self, seq: u64, path: &Path) -> (PathBuf, usize) {
        self.places
            .get(&seq)
            .or(self.end.as_ref())
            .cloned()
            .unwrap_or_else(|| (path.to_path_buf(), 1))
    }
}

/// Where and why a chain breaks.
#[derive(Debug, Clone, Serialize)]
pub struct Break {
    pub(crate) file: PathBuf,
    pub(crate) line: usize,
    pub(crate) seq: Option<u64>,
    pub(crate) why: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.why)
    }
}

/// Verifies the log at `path` (and its rotated files) as stored on this machine.
pub fn verify(path: &Path) -> Result<Verified, Break> {
    let mut files = super::writer::rotated(path);
    files.push(path.to_path_buf());
    let mut contents = Vec::new();
    for file in files {
        match std::fs::read(&file) {
            Ok(bytes) => contents.push((file, bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Break {
                    file,
                    line: 0,
                    seq: None,
                    why: format!("unreadable: {e}"),
                });
            }
        }
    }
    verify_contents(&contents)
}

/// Where the kept records start when the retention bound dropped older files: the last record
/// of the newest file dropped, as the `audit_pruned` records name it. The records themselves
/// are checked with the rest of the chain.
const PRUNED: &[u8] = b"\"event\":\"audit_pruned\"";

fn pruned_through(files: &[(PathBuf, Vec<u8>)]) -> Option<Head> {
    files
        .iter()
        .flat_map(|(_, bytes)| bytes.split(|b| *b == b'\n'))
        .filter(|line| line.windows(PRUNED.len()).any(|w| w == PRUNED))
        .filter_map(|line| serde_json::from_slice::<Record>(line).ok())
        .filter(|r| r.event == "audit_pruned")
        .filter_map(|r| {
            Some(Head {
                seq: r.fields.get("through_seq")?.as_u64()?,
                hash: r.fields.get("through_hash")?.as_str()?.to_string(),
            })
        })
        .max_by_key(|h| h.seq)
}

/// Verifies logs given as (name, bytes), oldest first.
pub(crate) fn verify_contents(files: &[(PathBuf, Vec<u8>)]) -> Result<Verified, Break> {
    let pruned = pruned_through(files);
    let mut prev = pruned
        .as_ref()
        .map_or_else(|| GENESIS.to_string(), |h| h.hash.clone());
    let mut last_seq = pruned.as_ref().map_or(0, |h| h.seq);
    let mut out = Verified {
        records: 0,
        head: None,
        hashes: HashMap::new(),
        records_list: Vec::new(),
        places: HashMap::new(),
        end: None,
        pruned_through: pruned.map(|h| h.seq),
    };
    for (file, bytes) in files {
        let broken = |line: usize, seq: Option<u64>, why: String| Break {
            file: file.clone(),
            line,
            seq,
            why,
        };
        if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
            let lines = bytes.split(|b| *b == b'\n').count();
            return Err(broken(
                lines,
                None,
                "the last line is cut short (a torn write); the next append records the cut".into(),
            ));
        }
        let mut lines = 0;
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let n = i + 1;
            lines = n;
            let record: Record = serde_json::from_slice(line)
                .map_err(|e| broken(n, None, format!("not an audit record: {e}")))?;
            let seq = Some(record.seq);
            if record.hash != record.compute_hash() {
                return Err(broken(
                    n,
                    seq,
                    "its hash does not match its content (changed after it was written)".into(),
                ));
            }
            if record.prev != prev {
                return Err(broken(
                    n,
                    seq,
                    format!(
                        "it does not link to the record before it (seq {last_seq}): a record was removed, inserted or moved"
                    ),
                ));
            }
            if record.seq != last_seq + 1 {
                return Err(broken(
                    n,
                    seq,
                    format!("its sequence number follows {last_seq}"),
                ));
            }
            prev = record.hash.clone();
            last_seq = record.seq;
            out.records += 1;
            out.hashes.insert(record.seq, record.hash.clone());
            out.head = Some(record.head());
            out.places.insert(record.seq, (file.clone(), n));
            out.records_list.push(record);
        }
        out.end = Some((file.clone(), lines + 1));
    }
    Ok(out)
}
