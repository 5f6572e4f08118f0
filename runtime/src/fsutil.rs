//! Writing a directory whole or not at all (artifacts, checkpoints): it is filled under a
//! private temporary name beside its destination, then renamed into place; an old directory
//! there is moved aside first and removed only once the new one is in.
//!
//! What is already there is the user's unless the caller's `Replace` policy says otherwise:
//! a directory is written over only if it is empty or of the kind being written (`ours`),
//! and with `keep_others` every entry of the old directory that the new one does not have
//! is moved into the new one (a checkpoint folder's intermediate checkpoints, a log, notes);
//! if such a move fails, the old directory is kept, under the name the error gives, and
//! nothing in it is removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// What `write_dir_atomic` may write over.
#[derive(Clone, Copy)]
pub struct Replace<'a> {
    /// The kind written, for errors (`an egret artifact`).
    pub what: &'a str,
    /// Whether an existing, non-empty directory is one of that kind, to be written over.
    pub ours: &'a dyn Fn(&Path) -> bool,
    /// Whether entries of the old directory that the new one lacks move into it.
    pub keep_others: bool,
}

/// Whether `dir` is a readable directory whose entries all have names among `names` (the
/// files one kind of output is made of; an empty directory qualifies).
pub fn holds_only(dir: &Path, names: &[&str]) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .all(|e| names.iter().any(|f| e.file_name() == *f))
    })
}

/// Whether `dir` may be written by `write_dir_atomic` under `replace`: absent, an empty
/// directory, or one that `replace.ours` accepts. Callers check a destination with this
/// before long work whose result goes there; `write_dir_atomic` checks again.
pub fn check_dir_target(dir: &Path, replace: Replace) -> Result<(), std::io::Error> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it exists and is not a directory (left as it is)",
            ))
        }
        Ok(_) => {}
    }
    let empty = std::fs::read_dir(dir)?.next().is_none();
    if empty || (replace.ours)(dir) {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!(
            "it is a directory with other things in it, not {}: left as it is; give a new or \
             empty directory",
            replace.what
        ),
    ))
}

/// Fills a temporary sibling of `dir` with `fill`, then makes it `dir` (see the module doc
/// for what it may write over: `check_dir_target`). `io` turns a file system failure (path,
/// error) into the caller's error type. On a failure before the new directory is in place,
/// `dir` is left as it was and the temporary directory is removed.
pub fn write_dir_atomic<E>(
    dir: &Path,
    replace: Replace,
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
    // (`.` or `..` have no name to put a sibling beside: their full path has)
    let dir: PathBuf = match dir.file_name() {
        Some(_) => dir.to_path_buf(),
        None => std::fs::canonicalize(dir).map_err(|e| io(dir, e))?,
    };
    let dir = dir.as_path();
    check_dir_target(dir, replace).map_err(|e| io(dir, e))?;
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
    if !had_old {
        return Ok(());
    }
    if replace.keep_others {
        // (the user's entries move from the old directory into the new; a failure keeps
        // the old directory, and what is still in it, where the error says)
        let entries = std::fs::read_dir(&old).map_err(|e| io(&old, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io(&old, e))?;
            let to = dir.join(entry.file_name());
            if to.exists() {
                continue;
            }
            if let Err(e) = std::fs::rename(entry.path(), &to) {
                let kept = std::io::Error::new(
                    e.kind(),
                    format!(
                        "{e}; the new directory is in place, and the earlier one is kept at \
                         {} with what could not be moved",
                        old.display()
                    ),
                );
                return Err(io(&entry.path(), kept));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}
