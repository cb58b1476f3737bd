//! Which files the VMs of a host still need, and the one place old files of a move are
//! deleted.
//!
//! After a shared-nothing or storage-only move the source's old layers go — unless a VM of
//! the host still has one in the backing chain of a disk, running or off (a golden base image
//! shared by VMs), unless another move in progress uses the name ([`super::reserve`]), and
//! unless another process has the file open (a lock probe that QEMU's locks answer too). The
//! storage layer cannot see the host's inventory: the caller says which files its VMs need
//! through [`DiskUsers`], asked right before the deletions; files are compared by device and
//! inode ([`FileId`]), so another name of the same file is the same file.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::beneath::{Entry, Folder};
use super::reserve::{Reservation, Use};
use crate::disk::{DiskSpec, FileId, LayerInfo, chain_files};

/// Who still needs which files: the host's inventory, asked before old files are deleted.
pub trait DiskUsers: Send + Sync + fmt::Debug {
    /// Every file in the backing chain of every disk of every VM the host knows now, running
    /// or off (each with the VM's name).
    fn needed_files(&self) -> NeededFiles;
}

/// Files and the VMs that need them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NeededFiles {
    files: HashMap<FileId, Vec<String>>,
}

impl NeededFiles {
    /// Nothing needed.
    pub fn new() -> NeededFiles {
        NeededFiles::default()
    }

    /// `vm` needs `file`.
    pub fn add(&mut self, file: FileId, vm: &str) {
        let users = self.files.entry(file).or_default();
        if !users.iter().any(|u| u == vm) {
            users.push(vm.to_owned());
        }
    }

    /// `vm` needs every layer of an open disk (a running VM's, from
    /// [`crate::disk::Disk::layers`]).
    pub fn add_layers(&mut self, vm: &str, layers: &[LayerInfo]) {
        for l in layers {
            self.add(l.id, vm);
        }
    }

    /// `vm` needs every file of the chain of `spec` (a VM that is off: its definition's
    /// disk), as far as the chain can be followed.
    pub fn add_chain(&mut self, vm: &str, spec: &DiskSpec) {
        for (_, id) in chain_files(spec) {
            self.add(id, vm);
        }
    }

    /// A VM other than `except` that needs `file`.
    pub fn user_other_than(&self, file: FileId, except: &str) -> Option<&str> {
        self.files
            .get(&file)
            .and_then(|users| users.iter().find(|u| *u != except))
            .map(String::as_str)
    }

    /// Whether nothing is needed.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl DiskUsers for NeededFiles {
    fn needed_files(&self) -> NeededFiles {
        self.clone()
    }
}

/// What happened to one old file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceFile {
    /// The file.
    pub path: PathBuf,
    /// Whether it was deleted.
    pub deleted: bool,
    /// Why it was kept, if it was.
    pub kept_because: Option<String>,
}

/// An old file of a move and what may not be deleted with it.
#[derive(Clone, Copy, Debug)]
pub struct OldFile<'a> {
    /// The file.
    pub path: &'a Path,
    /// The file the VM used (device and inode); a different file now at the path is kept.
    pub id: Option<FileId>,
    /// The moved VM itself still has it open (it is shut down after the handoff): its own
    /// locks are not another user's, and are not probed.
    pub open_by_moved_vm: bool,
}

/// Deletes the old files of the VM `moved` (by name; its own use of them is over) unless
/// `keep`, or another VM in `needed` has one in its chain, or it is one of `new_files` (the
/// move's own destination, reused in place), or another move uses the name, or another
/// process has it open. Reports what happened to each.
pub fn delete_old_files(
    files: &[OldFile<'_>],
    keep: bool,
    moved: &str,
    needed: &NeededFiles,
    new_files: &[FileId],
) -> Vec<SourceFile> {
    files
        .iter()
        .map(|f| delete_one(f, keep, moved, needed, new_files))
        .collect()
}

fn delete_one(
    f: &OldFile<'_>,
    keep: bool,
    moved: &str,
    needed: &NeededFiles,
    new_files: &[FileId],
) -> SourceFile {
    let path = f.path.to_path_buf();
    let kept = |why: String| SourceFile {
        path: path.clone(),
        deleted: false,
        kept_because: Some(why),
    };
    if keep {
        return kept("the source files were to be kept".into());
    }
    let (Some(folder), Some(name)) = (f.path.parent(), f.path.file_name()) else {
        return kept("it is not a file path".into());
    };
    let Ok(folder) = Folder::open_trusted(folder) else {
        return kept("it is no longer there".into());
    };
    let id = match folder.entry(name) {
        Ok(Entry::File(id)) => id,
        Ok(Entry::Missing) => return kept("it is no longer there".into()),
        Ok(_) => return kept("it is no longer a regular file".into()),
        Err(e) => return kept(format!("it cannot be inspected: {e}")),
    };
    if f.id.is_some_and(|expected| expected != id) {
        return kept("another file has taken its name since the VM used it".into());
    }
    if new_files.contains(&id) {
        return kept("it is also the destination's copy (reused in place)".into());
    }
    if let Some(vm) = needed.user_other_than(id, moved) {
        return kept(format!(
            "VM {vm} still needs it (it is in the backing chain of one of its disks)"
        ));
    }
    let mut reservation = Reservation::new();
    if reservation.take(&folder, name, Use::Write).is_err() {
        return kept("a move in progress on this host uses it".into());
    }
    if !f.open_by_moved_vm {
        match in_use(&folder, name) {
            Ok(false) => {}
            Ok(true) => return kept("another process (a VM or QEMU) still has it open".into()),
            Err(e) => return kept(format!("its locks cannot be read: {e}")),
        }
    }
    match folder.remove_file(name) {
        Ok(()) => SourceFile {
            path,
            deleted: true,
            kept_because: None,
        },
        Err(e) => kept(format!("it cannot be deleted: {e}")),
    }
}

/// Whether any open file holds one of QEMU's image lock bytes (100..300) on `name`.
fn in_use(folder: &Folder, name: &OsStr) -> std::io::Result<bool> {
    use nix::fcntl::{FcntlArg, fcntl};
    let file: File = folder.open_file(name, false)?;
    let mut probe = libc::flock {
        l_type: libc::c_short::try_from(libc::F_WRLCK).unwrap_or(1),
        l_whence: libc::c_short::try_from(libc::SEEK_SET).unwrap_or(0),
        l_start: 100,
        l_len: 200,
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(std::io::Error::from)?;
    Ok(probe.l_type != libc::c_short::try_from(libc::F_UNLCK).unwrap_or(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskFormat;

    #[test]
    fn needed_files_are_kept_by_inode_and_the_rest_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let other = dir.path().join("other.raw");
        let top = dir.path().join("top.raw");
        for p in [&base, &other, &top] {
            std::fs::write(p, b"x").unwrap();
        }
        // A second name of base: the same file.
        let alias = dir.path().join("alias.raw");
        std::fs::hard_link(&base, &alias).unwrap();
        let mut needed = NeededFiles::new();
        needed.add_chain(
            "off-vm",
            &DiskSpec {
                path: alias.clone(),
                format: DiskFormat::Raw,
            },
        );
        needed.add(FileId::of(&top).unwrap(), "moved");
        fn old(p: &Path) -> OldFile<'_> {
            OldFile {
                path: p,
                id: Some(FileId::of(p).unwrap()),
                open_by_moved_vm: false,
            }
        }
        let r = delete_old_files(
            &[old(&base), old(&other), old(&top)],
            false,
            "moved",
            &needed,
            &[],
        );
        assert!(!r[0].deleted);
        assert_eq!(
            r[0].kept_because.as_deref(),
            Some("VM off-vm still needs it (it is in the backing chain of one of its disks)")
        );
        assert!(base.exists());
        assert!(r[1].deleted && !other.exists());
        // Only the moved VM itself needed it: it goes.
        assert!(r[2].deleted && !top.exists());
        // A file replaced since: kept.
        let id = FileId::of(&alias).unwrap();
        std::fs::remove_file(&alias).unwrap();
        std::fs::write(&alias, b"y").unwrap();
        let r = delete_old_files(
            &[OldFile {
                path: &alias,
                id: Some(id),
                open_by_moved_vm: false,
            }],
            false,
            "moved",
            &NeededFiles::new(),
            &[],
        );
        assert!(!r[0].deleted, "{r:?}");
        assert!(alias.exists());
    }
}
