//! Model identity from a model file's content, so that KV keys cannot collide across models.
//!
//! Keys are namespaced by a model id. An id from the file name would let two different files
//! of one name share KV (and produce wrong text); an id from the bytes cannot. The id is the
//! SHA-256 of the whole file (GGUF metadata, tensor table and tensor data alike): a renamed or
//! copied file keeps its id, any change of content gives another. Engines append the settings
//! that change the KV they compute (cache type, attention kernel, backend).
//!
//! Hashing a large model takes seconds, so the result is remembered in a small cache file per
//! model path (`$XDG_CACHE_HOME/kvfetcher/model-ids/`), valid while the file's device, inode,
//! size and modification time are unchanged. A cache that cannot be read or written is ignored.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The prefix of every id this module makes (names the scheme, so a later one cannot collide).
pub const MODEL_ID_PREFIX: &str = "sha256:";

/// Version tag of a cache file's line: a line of another version is ignored.
const CACHE_VERSION: &str = "kvf-model-id-v1";

/// The id of the model in `path`: `sha256:` and the hex SHA-256 of the file's bytes, taken
/// from the per-user cache when the file is unchanged since it was last hashed.
pub fn model_id_from_file(path: &Path) -> io::Result<String> {
    model_id_cached(path, default_cache_dir().as_deref())
}

/// [`model_id_from_file`] with the cache in `cache_dir` (`None`: no cache).
pub fn model_id_cached(path: &Path, cache_dir: Option<&Path>) -> io::Result<String> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let stamp = format!(
        "{} {} {} {} {}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    let entry = cache_dir.and_then(|d| cache_entry(d, path));
    if let Some(id) = entry.as_deref().and_then(|e| read_cached(e, &stamp)) {
        return Ok(id);
    }
    let id = hash_file(file)?;
    if let Some(entry) = entry {
        // Best effort: a read-only or full cache only costs a re-hash next time.
        let _ = write_cached(&entry, &stamp, &id);
    }
    Ok(id)
}

fn hash_file(mut file: File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    let mut id = String::with_capacity(MODEL_ID_PREFIX.len() + 64);
    id.push_str(MODEL_ID_PREFIX);
    for b in digest {
        id.push_str(&format!("{b:02x}"));
    }
    Ok(id)
}

fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("kvfetcher").join("model-ids"))
}

/// The cache file of one model path (named by a hash of its canonical path).
fn cache_entry(dir: &Path, path: &Path) -> Option<PathBuf> {
    let canonical = fs::canonicalize(path).ok()?;
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Some(dir.join(name))
}

fn read_cached(entry: &Path, stamp: &str) -> Option<String> {
    let text = fs::read_to_string(entry).ok()?;
    let rest = text
        .trim_end()
        .strip_prefix(CACHE_VERSION)?
        .strip_prefix(' ')?;
    let id = rest.strip_prefix(stamp)?.strip_prefix(' ')?;
    let hex = id.strip_prefix(MODEL_ID_PREFIX)?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

fn write_cached(entry: &Path, stamp: &str, id: &str) -> io::Result<()> {
    let dir = entry.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = tempfile_in(dir)?;
    fs::write(&tmp, format!("{CACHE_VERSION} {stamp} {id}\n"))?;
    fs::rename(&tmp, entry)
}

/// A fresh name beside the entry, so that concurrent writers never mix lines.
fn tempfile_in(dir: &Path) -> io::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    Ok(dir.join(format!(".tmp-{}-{nanos}", std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: &[u8]) {
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_renamed_copy_shares_the_id_and_other_content_of_the_same_name_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("model.gguf");
        write(&a, b"GGUF weights of model one");
        let copy = dir.path().join("renamed.gguf");
        fs::copy(&a, &copy).unwrap();
        let other_dir = dir.path().join("other");
        fs::create_dir(&other_dir).unwrap();
        let same_name = other_dir.join("model.gguf");
        write(&same_name, b"GGUF weights of model two");

        let id = model_id_cached(&a, None).unwrap();
        assert!(id.starts_with(MODEL_ID_PREFIX) && id.len() == MODEL_ID_PREFIX.len() + 64);
        assert_eq!(model_id_cached(&copy, None).unwrap(), id);
        assert_ne!(model_id_cached(&same_name, None).unwrap(), id);
    }

    #[test]
    fn the_cache_answers_for_an_unchanged_file_and_is_renewed_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let model = dir.path().join("m.gguf");
        write(&model, b"first content");
        let first = model_id_cached(&model, Some(&cache)).unwrap();
        let entry = cache_entry(&cache, &model).unwrap();
        assert!(fs::read_to_string(&entry)
            .unwrap()
            .ends_with(&format!("{first}\n")));

        // A planted entry for the same stamp is believed: the file is not hashed again.
        let planted = format!("{MODEL_ID_PREFIX}{}", "ab".repeat(32));
        let text = fs::read_to_string(&entry)
            .unwrap()
            .replace(&first, &planted);
        fs::write(&entry, text).unwrap();
        assert_eq!(model_id_cached(&model, Some(&cache)).unwrap(), planted);

        // New content (new size and mtime) makes the entry stale.
        write(&model, b"second, longer content");
        let second = model_id_cached(&model, Some(&cache)).unwrap();
        assert_eq!(second, model_id_cached(&model, None).unwrap());
        assert_ne!(second, first);
        assert_ne!(second, planted);
    }

    #[test]
    fn a_garbled_cache_entry_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let model = dir.path().join("m.gguf");
        write(&model, b"content");
        let id = model_id_cached(&model, None).unwrap();
        let entry = cache_entry(&cache, &model).unwrap();
        fs::create_dir_all(&cache).unwrap();
        fs::write(&entry, "kvf-model-id-v1 garbage").unwrap();
        assert_eq!(model_id_cached(&model, Some(&cache)).unwrap(), id);
    }

    #[test]
    fn missing_files_and_folders_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(model_id_cached(&dir.path().join("absent.gguf"), None).is_err());
        let err = model_id_cached(dir.path(), None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
