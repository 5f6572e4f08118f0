//! Writing a directory whole or not at all (artifacts, checkpoints): it is filled under a
//! private temporary name beside its destination, then renamed into place; an old directory
//! there is moved aside first and removed only once the new one is in. Only a directory of
//! the same kind (as the caller's `ours` tells) or an empty one is replaced: any other is
//! the user's, and writing over it is an error that leaves it as it is.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Fills a temporary sibling of `dir` with `fill`, then makes it `dir`. `io` turns a file
/// system failure (path, error) into the caller's error type. On any failure `dir` is left
/// as it was and the temporary directory is removed. A file that is not a directory at
/// `dir`, or a directory that is neither empty nor `ours` (of the kind `fill` writes: for an
/// artifact, one holding `manifest.json`), is an error, not replaced; `what` names that
/// kind in the error.
pub fn write_dir_atomic<E>(
    dir: &Path,
    (what, ours): (&str, &dyn Fn(&Path) -> bool),
    fill: impl FnOnce(&Path) -> Result<(), E>,
    io: impl Fn(&Path, std::io::Error) -> E,
) -> Result<(), E> {
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    // Unique per process and call: two threads may write the same directory at once.
    let tag = format!(
        "{}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    );
    // A file (not a directory) in the way is something else the user has: kept, an error.
    if std::fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
        let e = std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "it exists and is not a directory (left as it is)",
        );
        return Err(io(dir, e));
    }
    // A directory with other things in it is the user's too.
    let foreign =
        std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some() && !ours(dir));
    if foreign {
        let e = std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "it is a directory with other things in it, not {what}: left as it is; give \
                 a new or empty directory"
            ),
        );
        return Err(io(dir, e));
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    if let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).map_err(|e| io(p, e))?;
    }
    let tmp = dir.with_file_name(format!(".{name}.tmp-{tag}"));
    let old = dir.with_file_name(format!(".{name}.old-{tag}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let had_old = dir.exists();
    if had_old {
        if let Err(e) = std::fs::rename(dir, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io(dir, e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io(dir, e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}
