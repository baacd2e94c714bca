//! Small file helpers shared by every writer of results.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// Writes the directory `dir` whole or not at all: `write` fills `dir.tmp/`, which then
/// replaces `dir` by renames (the old one kept as `dir.old/` until the new one is in place).
/// A crash leaves under `dir` the old directory, the new one or (between the two renames)
/// nothing, with the old one in `dir.old/`: never new files beside old ones. A failed write
/// (a full disk) removes what it wrote and says why once.
pub fn write_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.with_file_name(format!("{name}.tmp"));
    let old = dir.with_file_name(format!("{name}.old"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old)
            .with_context(|| format!("cannot move {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Writes `bytes` to `path` through a temporary sibling and a rename, so a crash never leaves
/// a partial file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", path.display());
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_replaced_whole_or_not_at_all() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("adapter");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("old.json"), "old").unwrap();
        // A failed write (a full disk) leaves the old directory as it was, and no temporary.
        let err = write_dir_atomic(&dir, |d| {
            std::fs::write(d.join("new.json"), "half")?;
            bail!("No space left on device")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "No space left on device");
        assert_eq!(
            std::fs::read_to_string(dir.join("old.json")).unwrap(),
            "old"
        );
        assert!(!tmp.path().join("adapter.tmp").exists());
        // A finished write replaces every file: nothing old survives beside the new.
        write_dir_atomic(&dir, |d| Ok(std::fs::write(d.join("new.json"), "new")?)).unwrap();
        assert!(!dir.join("old.json").exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("new.json")).unwrap(),
            "new"
        );
        assert!(!tmp.path().join("adapter.old").exists());
    }
}
