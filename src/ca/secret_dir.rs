//! Writes files into a directory the way kubelet updates a mounted Secret.
//!
//! Each generation goes into a fresh hidden timestamped directory; the
//! `..data` symlink is then swapped to it with one atomic rename, and the
//! visible names (`tls.crt`, ...) are symlinks through `..data`. A reader
//! therefore sees either the old set or the new set, never a mix, and the
//! proxy's reload path is exercised exactly as in a cluster.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::identity::{BUNDLE_FILE, CERT_FILE, DATA_LINK, KEY_FILE};

const DATA_TMP: &str = "..data_tmp";

/// One file of a generation.
pub struct SecretFile<'a> {
    pub name: &'a str,
    pub contents: &'a [u8],
    pub mode: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot update {dir}: {step}: {source}")]
pub struct WriteError {
    pub dir: String,
    pub step: &'static str,
    pub source: std::io::Error,
}

/// Publishes `files` as the new generation of `dir`.
pub fn publish(dir: &Path, files: &[SecretFile<'_>]) -> Result<(), WriteError> {
    let fail = |step| {
        move |source| WriteError {
            dir: dir.display().to_string(),
            step,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(fail("create directory"))?;

    let generation = new_generation_name(dir);
    let generation_dir = dir.join(&generation);
    std::fs::create_dir(&generation_dir).map_err(fail("create generation directory"))?;
    for file in files {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(file.mode)
            .open(generation_dir.join(file.name))
            .map_err(fail("create file"))?;
        out.write_all(file.contents).map_err(fail("write file"))?;
        out.sync_all().map_err(fail("sync file"))?;
    }

    // The swap: a relative symlink renamed over `..data` in one step.
    let tmp = dir.join(DATA_TMP);
    let _ = std::fs::remove_file(&tmp);
    symlink(&generation, &tmp).map_err(fail("create ..data_tmp"))?;
    std::fs::rename(&tmp, dir.join(DATA_LINK)).map_err(fail("swap ..data"))?;

    for file in files {
        let visible = dir.join(file.name);
        let target = Path::new(DATA_LINK).join(file.name);
        if std::fs::read_link(&visible).is_ok_and(|t| t == target) {
            continue;
        }
        let tmp = dir.join(format!("..{}_tmp", file.name));
        let _ = std::fs::remove_file(&tmp);
        symlink(&target, &tmp).map_err(fail("create file symlink"))?;
        std::fs::rename(&tmp, &visible).map_err(fail("install file symlink"))?;
    }

    // Old generations are unreachable now; remove them.
    for entry in std::fs::read_dir(dir)
        .map_err(fail("list directory"))?
        .flatten()
    {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_generation = name.starts_with("..") && name != DATA_LINK && !name.ends_with("_tmp");
        if is_generation && name != generation && entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// Publishes a workload identity as the proxy reads it: `tls.crt` (leaf
/// then intermediates), `tls.key` (owner-only) and `ca.crt` (the bundle).
pub fn publish_identity(
    dir: &Path,
    chain_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> Result<(), WriteError> {
    publish(
        dir,
        &[
            SecretFile {
                name: CERT_FILE,
                contents: chain_pem.as_bytes(),
                mode: 0o644,
            },
            SecretFile {
                name: KEY_FILE,
                contents: key_pem.as_bytes(),
                mode: 0o600,
            },
            SecretFile {
                name: BUNDLE_FILE,
                contents: bundle_pem.as_bytes(),
                mode: 0o644,
            },
        ],
    )
}

/// `..2026_11_29_02_19_31.123456789`, like kubelet, with a counter suffix
/// if two generations land in the same nanosecond.
fn new_generation_name(dir: &Path) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = time::OffsetDateTime::from_unix_timestamp(now.as_secs() as i64)
        .map(|t| {
            format!(
                "{:04}_{:02}_{:02}_{:02}_{:02}_{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| now.as_secs().to_string());
    let base = format!("..{stamp}.{:09}", now.subsec_nanos());
    let mut name = base.clone();
    let mut n = 1;
    while dir.join(&name).exists() {
        name = format!("{base}_{n}");
        n += 1;
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files<'a>(crt: &'a [u8], key: &'a [u8]) -> [SecretFile<'a>; 2] {
        [
            SecretFile {
                name: "tls.crt",
                contents: crt,
                mode: 0o644,
            },
            SecretFile {
                name: "tls.key",
                contents: key,
                mode: 0o600,
            },
        ]
    }

    #[test]
    fn publishes_files_as_symlinks_through_data() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), &files(b"cert-1", b"key-1")).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("tls.crt")).unwrap(),
            b"cert-1"
        );
        assert_eq!(
            std::fs::read_link(dir.path().join("tls.crt")).unwrap(),
            Path::new("..data/tls.crt")
        );
        let data = std::fs::read_link(dir.path().join(DATA_LINK)).unwrap();
        assert!(data.to_string_lossy().starts_with(".."), "{data:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_second_publish_swaps_generations_and_removes_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), &files(b"cert-1", b"key-1")).unwrap();
        let first = std::fs::read_link(dir.path().join(DATA_LINK)).unwrap();
        publish(dir.path(), &files(b"cert-2", b"key-2")).unwrap();
        let second = std::fs::read_link(dir.path().join(DATA_LINK)).unwrap();
        assert_ne!(first, second);
        assert!(
            !dir.path().join(&first).exists(),
            "old generation left behind"
        );
        assert_eq!(std::fs::read(dir.path().join("tls.key")).unwrap(), b"key-2");
        let generations = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .count();
        assert_eq!(generations, 1);
    }
}
