//! The API keys of `rbee serve`: a key is shown once, when it is made; the state dir keeps only
//! its SHA-256 with its name and creation time, in a file only its owner can read. A request's
//! key is checked by comparing hashes in constant time against every key on file, and the
//! server sees a key made or revoked while it runs at the next request.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, IoContext, IoError, Result};

const FILE: &str = "serve-keys.json";
/// What a key starts with, so that one pasted in the wrong place is recognisable.
const PREFIX: &str = "rbee-";
const MAX_NAME: usize = 64;
/// A key file larger than this is not one `rbee serve key` wrote.
const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KeyRecord {
    pub(crate) name: String,
    /// SHA-256 of the key, hex.
    sha256: String,
    pub(crate) created: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyRecord>,
}

pub(crate) fn path() -> PathBuf {
    crate::paths::state_dir().join(FILE)
}

fn read(path: &Path) -> Result<KeyFile> {
    let text = match std::fs::metadata(path) {
        Ok(meta) if meta.len() > MAX_FILE_BYTES => {
            return Err(Error::config(format!(
                "`{}` is over {MAX_FILE_BYTES} bytes: not a key file of `rbee serve`",
                path.display()
            )));
        }
        Ok(_) => std::fs::read_to_string(path).at("read", path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(KeyFile::default()),
        Err(e) => return Err(IoError::at("read", path, e).into()),
    };
    serde_json::from_str(&text)
        .map_err(|e| Error::config(format!("`{}` is not a key file: {e}", path.display())))
}

/// Writes the file whole under a temporary name, 0600 from its creation, then renames it.
fn write(path: &Path, file: &KeyFile) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at("create", dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(file)
        .map_err(|e| Error::internal(format!("cannot encode the key file: {e}")))?;
    let _ = std::fs::remove_file(&tmp);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .at("create", &tmp)?;
    out.write_all(&text).at("write", &tmp)?;
    out.sync_all().at("sync", &tmp)?;
    std::fs::rename(&tmp, path).at("replace", path)?;
    Ok(())
}

fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "a key name is 1 to {MAX_NAME} letters, digits, `-`, `_` or `.`, got `{name}`"
        )))
    }
}

/// Makes a key named `name` and returns it: the only time it exists outside its user's hands.
pub(crate) fn create(path: &Path, name: &str) -> Result<(String, KeyRecord)> {
    check_name(name)?;
    let mut file = read(path)?;
    if file.keys.iter().any(|k| k.name == name) {
        return Err(Error::invalid(format!(
            "a key named `{name}` exists already; revoke it first (`rbee serve key revoke {name}`)"
        )));
    }
    let key = format!("{PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
    let record = KeyRecord {
        name: name.to_string(),
        sha256: hex::encode(hash(&key)),
        created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    };
    file.keys.push(record.clone());
    write(path, &file)?;
    Ok((key, record))
}

pub(crate) fn list(path: &Path) -> Result<Vec<KeyRecord>> {
    Ok(read(path)?.keys)
}

pub(crate) fn revoke(path: &Path, name: &str) -> Result<()> {
    let mut file = read(path)?;
    let before = file.keys.len();
    file.keys.retain(|k| k.name != name);
    if file.keys.len() == before {
        return Err(Error::invalid(format!("there is no key named `{name}`")));
    }
    write(path, &file)
}

/// The keys as the server checks them, re-read whenever the file changes.
pub(crate) struct Keys {
    path: PathBuf,
    cache: Mutex<Option<Cached>>,
}

/// The key file as last read: its mtime and length when read, and each key's hash and name.
struct Cached {
    stamp: Option<(SystemTime, u64)>,
    keys: Vec<([u8; 32], String)>,
}

impl Keys {
    pub(crate) fn new(path: PathBuf) -> Keys {
        Keys {
            path,
            cache: Mutex::new(None),
        }
    }

    /// How many keys are on file now.
    pub(crate) fn count(&self) -> Result<usize> {
        Ok(list(&self.path)?.len())
    }

    /// The name of the key `presented`, when it is one on file.
    pub(crate) fn check(&self, presented: &str) -> Result<Option<String>> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .ok();
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stale = cache.as_ref().is_none_or(|c| c.stamp != modified);
        if stale {
            let keys = list(&self.path)?
                .into_iter()
                .filter_map(|k| {
                    let bytes: [u8; 32] = hex::decode(&k.sha256).ok()?.try_into().ok()?;
                    Some((bytes, k.name))
                })
                .collect();
            *cache = Some(Cached {
                stamp: modified,
                keys,
            });
        }
        let presented = hash(presented);
        let mut found = None;
        // Every key is compared, each in constant time: neither the time taken nor where the
        // loop stopped tells how close a guess came.
        for (hash, name) in cache.iter().flat_map(|c| &c.keys) {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(name.clone());
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_found_by_its_hash_until_revoked_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE);
        let (key, record) = create(&path, "ci").expect("create");
        assert!(key.starts_with(PREFIX));
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains(&key), "the key itself is on file");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let keys = Keys::new(path.clone());
        assert_eq!(keys.check(&key).expect("check"), Some(record.name));
        assert_eq!(keys.check("rbee-wrong").expect("check"), None);
        assert!(
            create(&path, "ci").is_err(),
            "a second key of the same name"
        );
        assert!(create(&path, "no spaces").is_err());
        revoke(&path, "ci").expect("revoke");
        // The cache goes by the file's mtime, which a quick rewrite may leave unchanged.
        let keys = Keys::new(path.clone());
        assert_eq!(keys.check(&key).expect("check"), None);
        assert!(revoke(&path, "ci").is_err());
    }
}
