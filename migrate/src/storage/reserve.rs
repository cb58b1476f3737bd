//! Which destination files the moves of this host are working on, so that two of them — two
//! shared-nothing moves arriving, a move and a storage-only move, a move and the deletion of
//! a host's old files — never write, rename or delete each other's files.
//!
//! A name is reserved in a folder, identified by the folder's device and inode (the same
//! folder reached by two paths is one folder), before any file of that name (or its
//! `.vmgate-partial` twin) is created, renamed or removed, and released when the move ends,
//! however it ends (the [`Reservation`] is dropped). Writing a file — creating it, renaming
//! into it, deleting it — needs it exclusively ([`Use::Write`]); reusing an existing parent
//! in place needs it shared ([`Use::Reuse`]): other moves may reuse it too, none may write or
//! delete it meanwhile. A refused reservation is an error before anything was written.
//!
//! The registry is the process's: every move of a host runs in its vmgated.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::beneath::Folder;
use super::paths::PARTIAL_SUFFIX;
use crate::disk::FileId;

/// What a move does with a reserved name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Creates, writes, renames or deletes the file: nobody else may use the name.
    Write,
    /// Reads an existing file in place (a reused parent): others may reuse it too.
    Reuse,
}

/// Why a name could not be reserved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReserveError {
    /// Another move holds the name.
    #[error(
        "{} is {} by another move in progress on this host; wait until that move ends, or choose another destination",
        .path.display(),
        match .held { Use::Write => "being written", Use::Reuse => "being reused as a parent" }
    )]
    Busy {
        /// The file.
        path: PathBuf,
        /// What the other move does with it.
        held: Use,
    },
    /// The same move would write one file twice (two disks sharing a parent name, say).
    #[error("{} would be written twice by this move; give the disks different destinations", .path.display())]
    Twice {
        /// The file.
        path: PathBuf,
    },
    /// The folder could not be identified.
    #[error("cannot identify the folder of {}", .path.display())]
    Folder {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    folder: FileId,
    name: OsString,
}

#[derive(Debug, Default)]
struct Holders {
    writers: usize,
    readers: usize,
}

static RESERVED: Mutex<Option<HashMap<Key, Holders>>> = Mutex::new(None);

fn registry() -> MutexGuard<'static, Option<HashMap<Key, Holders>>> {
    // Every change is complete under the lock: a panicking holder leaves it consistent.
    RESERVED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Names a move holds; released when dropped.
#[derive(Debug, Default)]
pub struct Reservation {
    held: Vec<(Key, Use)>,
}

impl Reservation {
    /// Holds nothing yet.
    pub fn new() -> Reservation {
        Reservation::default()
    }

    /// Reserves `name` in `folder` (and, for [`Use::Write`], its `.vmgate-partial` twin),
    /// or says who has it. Taking what this reservation already holds for reuse again is a
    /// no-op.
    pub fn take(&mut self, folder: &Folder, name: &OsStr, how: Use) -> Result<(), ReserveError> {
        let path = folder.path().join(name);
        let id = folder.id().map_err(|source| ReserveError::Folder {
            path: path.clone(),
            source,
        })?;
        let mut names = vec![(name.to_os_string(), how)];
        if how == Use::Write {
            let mut partial = name.to_os_string();
            partial.push(PARTIAL_SUFFIX);
            names.push((partial, Use::Write));
        }
        let keys: Vec<(Key, Use)> = names
            .into_iter()
            .map(|(name, how)| (Key { folder: id, name }, how))
            .collect();
        let mut reg = registry();
        let map = reg.get_or_insert_with(HashMap::new);
        // All or nothing: check every key first.
        let mut fresh = Vec::new();
        for (key, how) in &keys {
            let mine = self.held.iter().find(|(k, _)| k == key).map(|(_, u)| *u);
            match (mine, how) {
                (Some(Use::Reuse), Use::Reuse) => continue,
                (Some(_), _) => return Err(ReserveError::Twice { path }),
                (None, _) => {}
            }
            if let Some(h) = map.get(key) {
                let held = if h.writers > 0 {
                    Use::Write
                } else {
                    Use::Reuse
                };
                if h.writers > 0 || (*how == Use::Write && h.readers > 0) {
                    return Err(ReserveError::Busy { path, held });
                }
            }
            fresh.push((key.clone(), *how));
        }
        for (key, how) in fresh {
            let h = map.entry(key.clone()).or_default();
            match how {
                Use::Write => h.writers += 1,
                Use::Reuse => h.readers += 1,
            }
            self.held.push((key, how));
        }
        Ok(())
    }

    /// Gives up everything held (also done on drop).
    pub fn release(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut reg = registry();
        let Some(map) = reg.as_mut() else {
            self.held.clear();
            return;
        };
        for (key, how) in self.held.drain(..) {
            if let Some(h) = map.get_mut(&key) {
                match how {
                    Use::Write => h.writers = h.writers.saturating_sub(1),
                    Use::Reuse => h.readers = h.readers.saturating_sub(1),
                }
                if h.writers == 0 && h.readers == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether any name in the folder `folder` is reserved now (a folder a move works in is not
/// removed under it).
pub fn folder_in_use(folder: FileId) -> bool {
    registry()
        .as_ref()
        .is_some_and(|m| m.keys().any(|k| k.folder == folder))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_everyone_and_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let f = Folder::open_trusted(dir.path()).unwrap();
        let same = Folder::open_trusted(&dir.path().join(".")).unwrap();
        let mut a = Reservation::new();
        let mut b = Reservation::new();
        a.take(&f, OsStr::new("d.raw"), Use::Write).unwrap();
        // The same folder by another path, the same name: refused; its partial twin too.
        let e = b.take(&same, OsStr::new("d.raw"), Use::Write).unwrap_err();
        assert!(
            matches!(
                e,
                ReserveError::Busy {
                    held: Use::Write,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("being written by another move"),
            "{e}"
        );
        let e = b
            .take(&f, OsStr::new("d.raw.vmgate-partial"), Use::Reuse)
            .unwrap_err();
        assert!(matches!(e, ReserveError::Busy { .. }), "{e}");
        let e = a.take(&f, OsStr::new("d.raw"), Use::Write).unwrap_err();
        assert!(matches!(e, ReserveError::Twice { .. }), "{e}");
        // Another name is free.
        b.take(&f, OsStr::new("e.raw"), Use::Write).unwrap();
        // Reuse is shared, and keeps writers out.
        a.take(&f, OsStr::new("base.raw"), Use::Reuse).unwrap();
        b.take(&f, OsStr::new("base.raw"), Use::Reuse).unwrap();
        a.take(&f, OsStr::new("base.raw"), Use::Reuse).unwrap();
        let mut c = Reservation::new();
        let e = c.take(&f, OsStr::new("base.raw"), Use::Write).unwrap_err();
        assert!(
            matches!(
                e,
                ReserveError::Busy {
                    held: Use::Reuse,
                    ..
                }
            ),
            "{e}"
        );
        assert!(folder_in_use(f.id().unwrap()));
        drop(a);
        assert!(c.take(&f, OsStr::new("d.raw"), Use::Write).is_ok());
        assert!(c.take(&f, OsStr::new("base.raw"), Use::Write).is_err());
        drop(b);
        c.take(&f, OsStr::new("base.raw"), Use::Write).unwrap();
        drop(c);
        assert!(!folder_in_use(f.id().unwrap()));
    }
}
