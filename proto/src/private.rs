//! Data and state files that only their owner may read: files 0600 in
//! directories 0700.
//!
//! The hub's database holds token hashes and the audit log; the agent's
//! holds the verified state and its model files. Both live here, not in the
//! hub or the agent, because this crate is the one both depend on.
//! [`tighten_tree`] runs at every start, so a data dir written by an older
//! release (0644 files in 0755 dirs) is tightened too.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// The mode of every data and state file.
pub const FILE_MODE: u32 = 0o600;
/// The mode of every data and state directory.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and any missing parents with [`DIR_MODE`], then gives `dir`
/// itself that mode (it may have existed with another).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    set_mode(dir, DIR_MODE)
}

/// Creates `path` empty with [`FILE_MODE`] unless it exists. For files that
/// a library would otherwise create with the umask's mode (SQLite creates
/// its `-wal` and `-shm` files with the database file's mode).
pub fn create_file(path: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Gives every regular file under `root` [`FILE_MODE`] and every directory,
/// `root` included, [`DIR_MODE`]. Symbolic links are not followed and other
/// kinds of file (sockets) are left alone. What disappears below `root`
/// while the walk runs (a worker's scratch directory, removed as an earlier
/// agent's worker exits) needs no tightening and is skipped; a missing `root`
/// is an error. Returns how many it changed.
pub fn tighten_tree(root: &Path) -> io::Result<usize> {
    let mut changed = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let tightened = tighten_dir(&dir, &mut pending);
        changed += if dir == root { tightened? } else { skip_gone(tightened)? };
    }
    Ok(changed)
}

/// Gives `dir` [`DIR_MODE`] and its regular files [`FILE_MODE`], and pushes
/// its subdirectories on `pending`. Returns how many it changed.
fn tighten_dir(dir: &Path, pending: &mut Vec<std::path::PathBuf>) -> io::Result<usize> {
    let mut changed = 0;
    if std::fs::symlink_metadata(dir)?.permissions().mode() & 0o7777 != DIR_MODE {
        set_mode(dir, DIR_MODE)?;
        changed += 1;
    }
    for entry in std::fs::read_dir(dir)? {
        changed += skip_gone(tighten_entry(&entry?, pending))?;
    }
    Ok(changed)
}

/// One entry of a directory: a regular file gets [`FILE_MODE`], a
/// subdirectory goes on `pending`.
fn tighten_entry(entry: &std::fs::DirEntry, pending: &mut Vec<std::path::PathBuf>) -> io::Result<usize> {
    let kind = entry.file_type()?;
    if kind.is_dir() {
        pending.push(entry.path());
    } else if kind.is_file() && entry.metadata()?.permissions().mode() & 0o7777 != FILE_MODE {
        set_mode(&entry.path(), FILE_MODE)?;
        return Ok(1);
    }
    Ok(0)
}

/// A count of 0 for what was removed while the walk ran.
fn skip_gone(r: io::Result<usize>) -> io::Result<usize> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flaky agent restart test: the walk met a worker directory that an
    /// exiting worker removed between listing and visiting it.
    #[test]
    fn what_vanishes_below_the_root_is_skipped_and_a_missing_root_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("worker-1-gone");
        assert_eq!(skip_gone(tighten_dir(&gone, &mut Vec::new())).expect("skipped"), 0);
        assert!(tighten_tree(&gone).is_err(), "the root itself must exist");
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777
    }

    #[test]
    fn an_old_tree_is_tightened_and_links_are_not_followed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("data");
        std::fs::create_dir_all(root.join("blobs")).expect("mkdir");
        std::fs::write(root.join("hub.db"), b"x").expect("write");
        std::fs::write(root.join("blobs/abc"), b"x").expect("write");
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"x").expect("write");
        set_mode(&outside, 0o644).expect("chmod");
        std::os::unix::fs::symlink(&outside, root.join("link")).expect("symlink");
        for p in [&root, &root.join("blobs")] {
            set_mode(p, 0o755).expect("chmod");
        }
        for p in [root.join("hub.db"), root.join("blobs/abc")] {
            set_mode(&p, 0o644).expect("chmod");
        }
        assert_eq!(tighten_tree(&root).expect("tighten"), 4);
        assert_eq!((mode(&root), mode(&root.join("blobs"))), (DIR_MODE, DIR_MODE));
        assert_eq!((mode(&root.join("hub.db")), mode(&root.join("blobs/abc"))), (FILE_MODE, FILE_MODE));
        assert_eq!(mode(&outside), 0o644, "a link's target is not touched");
        assert_eq!(tighten_tree(&root).expect("again"), 0);
    }

    #[test]
    fn new_dirs_and_files_are_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/b");
        create_dir(&dir).expect("create");
        create_file(&dir.join("f")).expect("create");
        create_file(&dir.join("f")).expect("exists: fine");
        assert_eq!((mode(&tmp.path().join("a")), mode(&dir), mode(&dir.join("f"))), (DIR_MODE, DIR_MODE, FILE_MODE));
    }
}
