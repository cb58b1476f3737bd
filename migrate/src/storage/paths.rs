//! Where VM storage may be: the host's storage roots, every disk path confined to them, and
//! Move-VM's storage options.
//!
//! A host lists the folders VM storage may live in (its *storage roots*). [`StorageRoots`]
//! holds each root open and is the one way vmgate reaches a disk file: every disk path and
//! every backing reference — of a VM created here, of a disk received or handed over in a
//! move, of a file a move creates or reuses — is opened *beneath* the root it names
//! (`openat2` with `RESOLVE_BENEATH`, see [`super::beneath`]): no `..` and no symbolic link
//! can lead out of the root, and what was checked is what is opened, whatever changes on disk
//! meanwhile. A kernel without `openat2` (before Linux 5.6) is refused with a clear error
//! rather than checked by strings.
//!
//! - [`StorageRoots::open_beneath`]: an existing regular file (links inside the root are
//!   followed, a link or `..` out of it is refused).
//! - [`StorageRoots::create_beneath`]: a new file, owner-only (0600), never over anything.
//! - [`StorageRoots::create_folders`]: the folders a destination needs, owner-only (0700).
//! - [`StorageRoots::folder`]: an existing folder, held open, for what a move does in it
//!   (create, rename into place, remove: [`super::beneath::Folder`]).
//!
//! A move names either one folder for everything ([`StorageDestination::Folder`], Move-VM's
//! `-DestinationStoragePath`) or a file per disk ([`StorageDestination::PerDisk`], Move-VM's
//! `-VHDs` table). Every destination file is checked before anything is written
//! ([`StorageRoots::check_file`]):
//!
//! - the path must be absolute and free of `..` components (refused as written, before any
//!   file system access), and lie inside a root as written;
//! - the deepest folder of it that exists is opened beneath that root (a link out of it is
//!   refused); the folders that do not exist yet will be created by the move, beneath it;
//! - the file itself must not exist, unless it is a regular file the caller accepts (an
//!   identical read-only parent that is reused); a symbolic link in its place is refused.
//!
//! Files being written carry the suffix [`PARTIAL_SUFFIX`] until they are complete, so what a
//! crashed move leaves behind is recognizable, and is replaced by the next attempt.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;

use super::beneath::{self, Entry, Folder};

/// Suffix of files a move is still writing.
pub const PARTIAL_SUFFIX: &str = ".vmgate-partial";

/// Errors of the storage-root policy. Every message names the path, and the roots where
/// they matter; none shows what a file holds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoragePathError {
    /// No storage root is configured.
    #[error("this host has no storage roots configured, so it accepts no VM storage")]
    NoRoots,
    /// A configured root cannot be used.
    #[error("storage root {} cannot be used", .root.display())]
    BadRoot {
        /// The root as configured.
        root: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A configured root is not a folder.
    #[error("storage root {} is not a folder", .root.display())]
    RootNotAFolder {
        /// The root.
        root: PathBuf,
    },
    /// The kernel cannot open files beneath a folder (no `openat2`, before Linux 5.6).
    #[error(
        "this kernel cannot confine disk paths to the storage roots (openat2 with RESOLVE_BENEATH needs Linux 5.6 or later), so this host accepts no VM storage"
    )]
    Unsupported {
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A relative destination.
    #[error("destination {} is a relative path; give an absolute path inside {roots}", .path.display())]
    Relative {
        /// The path.
        path: PathBuf,
        /// The roots.
        roots: RootList,
    },
    /// A `..` component.
    #[error("destination {} contains \"..\"; give a path inside {roots} without \"..\"", .path.display())]
    DotDot {
        /// The path.
        path: PathBuf,
        /// The roots.
        roots: RootList,
    },
    /// A destination file path without a file name.
    #[error("destination {} does not name a file", .path.display())]
    NoFileName {
        /// The path.
        path: PathBuf,
    },
    /// Lexically outside every root.
    #[error("destination {} is outside this host's storage roots ({roots})", .path.display())]
    OutsideRoots {
        /// The path.
        path: PathBuf,
        /// The roots.
        roots: RootList,
    },
    /// Inside a root as written, outside once symbolic links (or `..`) are followed.
    #[error(
        "destination {} leads to {} through a symbolic link, which is outside this host's storage roots ({roots})",
        .path.display(), .resolved.display()
    )]
    SymlinkEscape {
        /// The path as given.
        path: PathBuf,
        /// Where it leads, as far as it could be told (for the message only: the refusal
        /// comes from the kernel's resolution beneath the root).
        resolved: PathBuf,
        /// The roots.
        roots: RootList,
    },
    /// The destination file is a symbolic link.
    #[error("destination {} is a symbolic link; vmgate writes only regular files it creates", .path.display())]
    FileIsSymlink {
        /// The path.
        path: PathBuf,
    },
    /// The destination file exists (and is not an accepted reuse).
    #[error("destination {} already exists; remove it or choose another destination", .path.display())]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// Something other than a regular file or folder is in the way.
    #[error("destination {} exists and is not a regular file", .path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// A folder on the way is a file.
    #[error("destination {} cannot be created: {} is not a folder", .path.display(), .blocker.display())]
    NotAFolder {
        /// The path.
        path: PathBuf,
        /// The component that is not a folder.
        blocker: PathBuf,
    },
    /// The file to open does not exist.
    #[error("{} does not exist", .path.display())]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// The file system refused to say what is there, or to open, create or remove it.
    #[error("cannot inspect destination {}", .path.display())]
    Inspect {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A per-disk table without an entry for a disk.
    #[error("the per-disk destinations give no file for disk {index}")]
    MissingDisk {
        /// Disk index.
        index: usize,
    },
    /// A per-disk entry for a disk the VM does not have.
    #[error("the per-disk destinations name disk {index}, but the VM has {disks} disks")]
    UnknownDisk {
        /// Disk index.
        index: usize,
        /// Disks of the VM.
        disks: usize,
    },
    /// Two disks (or layers) would land in one file.
    #[error("disks {first} and {second} would both be written to {}", .path.display())]
    SameFile {
        /// The file.
        path: PathBuf,
        /// One disk.
        first: usize,
        /// The other.
        second: usize,
    },
}

impl StoragePathError {
    /// Whether the path is refused as outside the storage roots (as written, or through a
    /// link or `..`), as opposed to missing or unreadable.
    pub fn is_outside(&self) -> bool {
        matches!(
            self,
            StoragePathError::OutsideRoots { .. }
                | StoragePathError::SymlinkEscape { .. }
                | StoragePathError::DotDot { .. }
                | StoragePathError::Relative { .. }
        )
    }
}

/// The roots, printed for messages as `"/a", "/b"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootList(pub Vec<PathBuf>);

impl fmt::Display for RootList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", r.display())?;
        }
        Ok(())
    }
}

/// A folder a move created: the folder it was created in, and its name there.
pub type CreatedFolder = (Arc<Folder>, OsString);

/// One root: where it really is, as configured, and held open.
#[derive(Debug)]
struct Root {
    /// Canonical (where the open folder really is).
    path: PathBuf,
    /// As configured (paths may name the root this way too).
    configured: PathBuf,
    /// The open folder everything beneath is reached from.
    dir: Folder,
}

/// A host's storage roots, each held open. Cheap to clone (the roots are shared).
#[derive(Clone, Debug)]
pub struct StorageRoots {
    roots: Arc<[Root]>,
}

impl PartialEq for StorageRoots {
    fn eq(&self, other: &StorageRoots) -> bool {
        self.roots() == other.roots()
    }
}

impl Eq for StorageRoots {}

/// Move-VM's storage options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageDestination {
    /// Every disk (and its parents) into this folder, keeping the file names.
    Folder(PathBuf),
    /// A destination file per disk, by disk index; each disk's parents go next to it.
    PerDisk(Vec<(usize, PathBuf)>),
}

/// A checked destination file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedPath {
    /// The path as it will be written: the canonical existing folder, then the folders still
    /// to create, then the file name.
    pub path: PathBuf,
    /// The regular file that is already there (only when the caller allowed it).
    pub exists: bool,
    /// Folders between the deepest existing one and the file, to create, outermost first.
    pub missing_folders: Vec<PathBuf>,
}

/// What stands in the way of a path beneath a root, told from the kernel's error.
fn beneath_error(
    roots: &StorageRoots,
    path: &Path,
    folder_part: &Path,
    e: Errno,
) -> StoragePathError {
    match e {
        Errno::EXDEV | Errno::ELOOP => StoragePathError::SymlinkEscape {
            path: path.to_path_buf(),
            resolved: std::fs::canonicalize(folder_part).unwrap_or_else(|_| path.to_path_buf()),
            roots: roots.list(),
        },
        Errno::ENOENT => StoragePathError::Missing {
            path: path.to_path_buf(),
        },
        Errno::ENOTDIR => StoragePathError::NotAFolder {
            path: path.to_path_buf(),
            blocker: folder_part.to_path_buf(),
        },
        Errno::EINVAL => StoragePathError::NotAFile {
            path: path.to_path_buf(),
        },
        Errno::ENOSYS | Errno::E2BIG => StoragePathError::Unsupported { source: e.into() },
        e => StoragePathError::Inspect {
            path: path.to_path_buf(),
            source: e.into(),
        },
    }
}

impl StorageRoots {
    /// Opens the configured roots (each must be an existing folder) and checks that this
    /// kernel can open files beneath them.
    pub fn new<I, P>(roots: I) -> Result<StorageRoots, StoragePathError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        let mut out = Vec::new();
        for r in roots {
            let r = r.as_ref();
            let bad = |source| StoragePathError::BadRoot {
                root: r.to_path_buf(),
                source,
            };
            let meta = std::fs::metadata(r).map_err(bad)?;
            if !meta.is_dir() {
                return Err(StoragePathError::RootNotAFolder {
                    root: r.to_path_buf(),
                });
            }
            let mut dir = Folder::open_trusted(r).map_err(bad)?;
            let canon = dir.real_path().map_err(bad)?;
            beneath::supported(&dir)
                .map_err(|e| StoragePathError::Unsupported { source: e.into() })?;
            dir = Folder::open_trusted(&canon).map_err(bad)?.with_anchor(r);
            out.push(Root {
                path: canon,
                configured: r.to_path_buf(),
                dir,
            });
        }
        if out.is_empty() {
            return Err(StoragePathError::NoRoots);
        }
        Ok(StorageRoots { roots: out.into() })
    }

    /// The canonical roots.
    pub fn roots(&self) -> Vec<PathBuf> {
        self.roots.iter().map(|r| r.path.clone()).collect()
    }

    /// The roots, for messages.
    pub fn list(&self) -> RootList {
        RootList(self.roots())
    }

    /// The root `path` lies in as written (the deepest, if roots nest) and the rest of the
    /// path below it. `..` components are left for the kernel to resolve beneath the root.
    fn locate<'a>(&'a self, path: &Path) -> Result<(&'a Root, PathBuf), StoragePathError> {
        if !path.is_absolute() {
            return Err(StoragePathError::Relative {
                path: path.to_path_buf(),
                roots: self.list(),
            });
        }
        let mut best: Option<(&Root, PathBuf)> = None;
        for root in self.roots.iter() {
            for base in [&root.path, &root.configured] {
                if let Ok(rest) = path.strip_prefix(base) {
                    let better = best
                        .as_ref()
                        .is_none_or(|(_, r)| rest.components().count() < r.components().count());
                    if better {
                        best = Some((root, rest.to_path_buf()));
                    }
                }
            }
        }
        best.ok_or_else(|| StoragePathError::OutsideRoots {
            path: path.to_path_buf(),
            roots: self.list(),
        })
    }

    /// Whether `path` lies inside a root as written (nothing on disk is looked at).
    pub fn contains(&self, path: &Path) -> bool {
        self.locate(path).is_ok()
    }

    /// Opens the existing regular file at `path` beneath its root, for writing if `write`.
    /// Links inside the root are followed, and `..` steps that stay inside it; a path outside
    /// every root, or one a link or `..` leads out of, is refused.
    pub fn open_beneath(&self, path: &Path, write: bool) -> Result<File, StoragePathError> {
        let (root, rest) = self.locate(path)?;
        root.dir
            .open_file_beneath(&rest, write)
            .map_err(|e| beneath_error(self, path, path.parent().unwrap_or(path), e))
    }

    /// The existing folder at `path`, opened beneath its root and held open (for creating,
    /// renaming and removing files in it).
    pub fn folder(&self, path: &Path) -> Result<Folder, StoragePathError> {
        self.check_lexical(path)?;
        let (root, rest) = self.locate(path)?;
        root.dir
            .descend(&rest, path.to_path_buf())
            .map_err(|e| beneath_error(self, path, path, e))
    }

    /// Creates the new file at `path` (its folder must exist) beneath its root, owner-only
    /// (0600), never over an existing file or link.
    pub fn create_beneath(&self, path: &Path) -> Result<File, StoragePathError> {
        let (folder, name) = self.split(path)?;
        let folder = self.folder(folder)?;
        folder
            .create_file(name)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EEXIST) => StoragePathError::Exists {
                    path: path.to_path_buf(),
                },
                _ => StoragePathError::Inspect {
                    path: path.to_path_buf(),
                    source,
                },
            })
    }

    /// Creates the folders of `folder` that do not exist, beneath its root, owner-only (0700);
    /// returns the folder, open, and the folders created (outermost first, each with the
    /// folder it was created in, to remove them again).
    pub fn create_folders(
        &self,
        folder: &Path,
    ) -> Result<(Folder, Vec<CreatedFolder>), StoragePathError> {
        self.check_lexical(folder)?;
        let (root, rest) = self.locate(folder)?;
        let mut here = root
            .dir
            .descend(Path::new(""), root.path.clone())
            .map_err(|e| beneath_error(self, folder, &root.path, e))?;
        let mut created = Vec::new();
        for c in rest.components() {
            let Component::Normal(name) = c else {
                continue;
            };
            let shown = here.path().join(name);
            let next = match here.entry(name) {
                Ok(Entry::Missing) => match here.create_folder(name) {
                    Ok(f) => {
                        let parent = Arc::new(here);
                        created.push((Arc::clone(&parent), name.to_os_string()));
                        Ok(f)
                    }
                    // Made meanwhile by someone else: open it (beneath, no link).
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => here.folder(name),
                    Err(e) => Err(e),
                },
                Ok(Entry::Folder) => here.folder(name),
                Ok(Entry::Link) => {
                    // A link inside the root: follow it only beneath the root.
                    let rel = shown
                        .strip_prefix(&root.path)
                        .unwrap_or(&shown)
                        .to_path_buf();
                    root.dir
                        .descend(&rel, shown.clone())
                        .map_err(|e| io::Error::from_raw_os_error(e as i32))
                }
                Ok(_) => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                Err(e) => Err(e),
            };
            here = next.map_err(|e| match e.raw_os_error().map(Errno::from_raw) {
                Some(errno) => beneath_error(self, folder, &shown, errno),
                None => StoragePathError::Inspect {
                    path: folder.to_path_buf(),
                    source: e,
                },
            })?;
        }
        Ok((here, created))
    }

    /// Splits a file path into its folder and its name.
    fn split<'p>(&self, path: &'p Path) -> Result<(&'p Path, &'p OsStr), StoragePathError> {
        let name = path
            .file_name()
            .ok_or_else(|| StoragePathError::NoFileName {
                path: path.to_path_buf(),
            })?;
        Ok((path.parent().unwrap_or(Path::new("/")), name))
    }

    /// Checks the written form of `path`: absolute, no `..`.
    fn check_lexical(&self, path: &Path) -> Result<(), StoragePathError> {
        if !path.is_absolute() {
            return Err(StoragePathError::Relative {
                path: path.to_path_buf(),
                roots: self.list(),
            });
        }
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(StoragePathError::DotDot {
                path: path.to_path_buf(),
                roots: self.list(),
            });
        }
        Ok(())
    }

    /// Checks a destination file path. With `allow_existing`, a regular file already at the
    /// path is accepted (reported in [`CheckedPath::exists`]); otherwise it is refused.
    /// Nothing is created or written.
    pub fn check_file(
        &self,
        path: &Path,
        allow_existing: bool,
    ) -> Result<CheckedPath, StoragePathError> {
        self.check_lexical(path)?;
        let Some(name) = path.file_name() else {
            return Err(StoragePathError::NoFileName {
                path: path.to_path_buf(),
            });
        };
        let folder = path.parent().unwrap_or(Path::new("/"));
        let (existing, missing) = self.resolve_folder(path, folder)?;
        let exists = match &existing {
            Some(dir) if missing.is_empty() => match dir.entry(name) {
                Ok(Entry::Link) => {
                    return Err(StoragePathError::FileIsSymlink {
                        path: path.to_path_buf(),
                    });
                }
                Ok(Entry::File(_)) => {
                    if !allow_existing {
                        return Err(StoragePathError::Exists {
                            path: path.to_path_buf(),
                        });
                    }
                    true
                }
                Ok(Entry::Missing) => false,
                Ok(_) => {
                    return Err(StoragePathError::NotAFile {
                        path: path.to_path_buf(),
                    });
                }
                Err(source) => {
                    return Err(StoragePathError::Inspect {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            },
            _ => false,
        };
        let canon_folder = match &existing {
            Some(dir) => dir
                .real_path()
                .map_err(|source| StoragePathError::Inspect {
                    path: path.to_path_buf(),
                    source,
                })?,
            None => PathBuf::from("/"),
        };
        let mut full = canon_folder.clone();
        let missing_folders = missing
            .iter()
            .map(|m| {
                full.push(m);
                full.clone()
            })
            .collect::<Vec<_>>();
        let path = missing_folders.last().unwrap_or(&canon_folder).join(name);
        Ok(CheckedPath {
            path,
            exists,
            missing_folders,
        })
    }

    /// Checks a destination folder (it may not exist yet); returns it as it will be reached
    /// (the existing part as it really is, then the folders to create).
    pub fn check_folder(&self, path: &Path) -> Result<PathBuf, StoragePathError> {
        self.check_lexical(path)?;
        let (existing, missing) = self.resolve_folder(path, path)?;
        let mut out = match existing {
            Some(dir) => dir
                .real_path()
                .map_err(|source| StoragePathError::Inspect {
                    path: path.to_path_buf(),
                    source,
                })?,
            None => PathBuf::from("/"),
        };
        out.extend(missing);
        Ok(out)
    }

    /// Resolves `folder` (part of the destination `path`) beneath its root: the deepest
    /// existing folder, open, and the names below it that do not exist yet.
    fn resolve_folder(
        &self,
        path: &Path,
        folder: &Path,
    ) -> Result<(Option<Folder>, Vec<OsString>), StoragePathError> {
        let (root, rest) = self.locate(folder).map_err(|e| match e {
            StoragePathError::OutsideRoots { roots, .. } => StoragePathError::OutsideRoots {
                path: path.to_path_buf(),
                roots,
            },
            e => e,
        })?;
        let mut missing: Vec<OsString> = Vec::new();
        let mut rel = rest;
        loop {
            let shown = root.path.join(&rel);
            match root.dir.descend(&rel, shown.clone()) {
                Ok(dir) => {
                    missing.reverse();
                    return Ok((Some(dir), missing));
                }
                Err(Errno::ENOENT) => {
                    let Some(name) = rel.file_name() else {
                        return Err(beneath_error(self, path, &shown, Errno::ENOENT));
                    };
                    missing.push(name.to_os_string());
                    rel.pop();
                }
                Err(Errno::ENOTDIR) => {
                    return Err(StoragePathError::NotAFolder {
                        path: path.to_path_buf(),
                        blocker: folder_as_written(folder, &missing),
                    });
                }
                Err(e) => {
                    return Err(beneath_error(
                        self,
                        path,
                        &folder_as_written(folder, &missing),
                        e,
                    ));
                }
            }
        }
    }

    /// Resolves the destination file of each disk. `sources[i]` is disk `i`'s current top
    /// layer (its file name is kept for [`StorageDestination::Folder`]). Existing files are
    /// refused; two disks may not land in one file.
    pub fn resolve(
        &self,
        destination: &StorageDestination,
        sources: &[PathBuf],
    ) -> Result<Vec<CheckedPath>, StoragePathError> {
        let wanted: Vec<PathBuf> = match destination {
            StorageDestination::Folder(folder) => {
                self.check_lexical(folder)?;
                sources
                    .iter()
                    .map(|s| match s.file_name() {
                        Some(n) => Ok(folder.join(n)),
                        None => Err(StoragePathError::NoFileName { path: s.clone() }),
                    })
                    .collect::<Result<_, _>>()?
            }
            StorageDestination::PerDisk(table) => {
                let mut out: Vec<Option<PathBuf>> = vec![None; sources.len()];
                for (index, path) in table {
                    let slot = out.get_mut(*index).ok_or(StoragePathError::UnknownDisk {
                        index: *index,
                        disks: sources.len(),
                    })?;
                    *slot = Some(path.clone());
                }
                out.into_iter()
                    .enumerate()
                    .map(|(index, p)| p.ok_or(StoragePathError::MissingDisk { index }))
                    .collect::<Result<_, _>>()?
            }
        };
        let mut out: Vec<CheckedPath> = Vec::new();
        for (i, w) in wanted.iter().enumerate() {
            let checked = self.check_file(w, false)?;
            if let Some(first) = out.iter().position(|c| c.path == checked.path) {
                return Err(StoragePathError::SameFile {
                    path: checked.path,
                    first,
                    second: i,
                });
            }
            out.push(checked);
        }
        Ok(out)
    }
}

/// `folder` without the `missing` names below it (the deepest part that was looked up).
fn folder_as_written(folder: &Path, missing: &[OsString]) -> PathBuf {
    let mut p = folder.to_path_buf();
    for _ in missing {
        p.pop();
    }
    p
}

/// The name a file has while a move writes it.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(PARTIAL_SUFFIX);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, StorageRoots) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        std::fs::create_dir(dir.path().join("other")).unwrap();
        let roots = StorageRoots::new([dir.path().join("root")]).unwrap();
        (dir, roots)
    }

    #[test]
    fn accepts_new_files_inside_a_root_and_lists_folders_to_create() {
        let (dir, roots) = setup();
        let root = std::fs::canonicalize(dir.path().join("root")).unwrap();
        let c = roots
            .check_file(&dir.path().join("root/vm1/disks/d.qcow2"), false)
            .unwrap();
        assert_eq!(c.path, root.join("vm1/disks/d.qcow2"));
        assert!(!c.exists);
        assert_eq!(
            c.missing_folders,
            vec![root.join("vm1"), root.join("vm1/disks")]
        );
        // Nothing was created.
        assert!(!root.join("vm1").exists());
        // A link inside the root that stays inside is fine.
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("alias")).unwrap();
        let c = roots.check_file(&root.join("alias/x.raw"), false).unwrap();
        assert_eq!(c.path, root.join("real/x.raw"));
    }

    #[test]
    fn refuses_relative_dotdot_outside_and_symlink_escapes() {
        let (dir, roots) = setup();
        let root = dir.path().join("root");
        let shown = std::fs::canonicalize(&root).unwrap().display().to_string();

        let e = roots.check_file(Path::new("vm/d.raw"), false).unwrap_err();
        assert!(matches!(e, StoragePathError::Relative { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "destination vm/d.raw is a relative path; give an absolute path inside {shown}"
            )
        );

        let dotdot = root.join("../other/d.raw");
        let e = roots.check_file(&dotdot, false).unwrap_err();
        assert!(matches!(e, StoragePathError::DotDot { .. }), "{e}");
        assert!(e.to_string().contains("contains \"..\""), "{e}");
        assert!(e.to_string().contains(&shown), "{e}");

        let outside = dir.path().join("other/d.raw");
        let e = roots.check_file(&outside, false).unwrap_err();
        assert!(matches!(e, StoragePathError::OutsideRoots { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "destination {} is outside this host's storage roots ({shown})",
                outside.display()
            )
        );

        // A folder link inside the root that points outside it.
        std::os::unix::fs::symlink(dir.path().join("other"), root.join("escape")).unwrap();
        let e = roots
            .check_file(&root.join("escape/new/d.raw"), false)
            .unwrap_err();
        assert!(matches!(e, StoragePathError::SymlinkEscape { .. }), "{e}");
        assert!(e.to_string().contains("through a symbolic link"), "{e}");

        // A file link in place of the destination.
        std::os::unix::fs::symlink(dir.path().join("other/t"), root.join("link.raw")).unwrap();
        let e = roots.check_file(&root.join("link.raw"), true).unwrap_err();
        assert!(matches!(e, StoragePathError::FileIsSymlink { .. }), "{e}");

        // An existing file: refused unless allowed.
        std::fs::write(root.join("have.raw"), b"x").unwrap();
        let e = roots.check_file(&root.join("have.raw"), false).unwrap_err();
        assert!(matches!(e, StoragePathError::Exists { .. }), "{e}");
        assert!(
            roots
                .check_file(&root.join("have.raw"), true)
                .unwrap()
                .exists
        );

        // A file where a folder should be.
        let e = roots
            .check_file(&root.join("have.raw/d.raw"), false)
            .unwrap_err();
        assert!(matches!(e, StoragePathError::NotAFolder { .. }), "{e}");

        // Nothing was written anywhere by the checks.
        assert_eq!(
            std::fs::read_dir(dir.path().join("other")).unwrap().count(),
            0
        );
    }

    #[test]
    fn resolves_folder_and_per_disk_destinations() {
        let (dir, roots) = setup();
        let root = std::fs::canonicalize(dir.path().join("root")).unwrap();
        let sources = vec![
            PathBuf::from("/src/a/sys.qcow2"),
            PathBuf::from("/src/b/data.raw"),
        ];
        let r = roots
            .resolve(&StorageDestination::Folder(root.join("vm1")), &sources)
            .unwrap();
        assert_eq!(r[0].path, root.join("vm1/sys.qcow2"));
        assert_eq!(r[1].path, root.join("vm1/data.raw"));

        let per = StorageDestination::PerDisk(vec![
            (1, root.join("d/data.raw")),
            (0, root.join("s/sys.qcow2")),
        ]);
        let r = roots.resolve(&per, &sources).unwrap();
        assert_eq!(r[0].path, root.join("s/sys.qcow2"));
        assert_eq!(r[1].path, root.join("d/data.raw"));

        let e = roots
            .resolve(
                &StorageDestination::PerDisk(vec![(0, root.join("x"))]),
                &sources,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the per-disk destinations give no file for disk 1"
        );
        let e = roots
            .resolve(
                &StorageDestination::PerDisk(vec![
                    (0, root.join("x")),
                    (1, root.join("y")),
                    (2, root.join("z")),
                ]),
                &sources,
            )
            .unwrap_err();
        assert!(
            matches!(e, StoragePathError::UnknownDisk { index: 2, .. }),
            "{e}"
        );
        let same = vec![PathBuf::from("/a/d.raw"), PathBuf::from("/b/d.raw")];
        let e = roots
            .resolve(&StorageDestination::Folder(root.clone()), &same)
            .unwrap_err();
        assert!(
            matches!(
                e,
                StoragePathError::SameFile {
                    first: 0,
                    second: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = roots
            .resolve(&StorageDestination::Folder(root.join("../other")), &sources)
            .unwrap_err();
        assert!(matches!(e, StoragePathError::DotDot { .. }), "{e}");
    }

    #[test]
    fn roots_must_exist_and_be_folders() {
        let (dir, _) = setup();
        assert!(matches!(
            StorageRoots::new(Vec::<PathBuf>::new()),
            Err(StoragePathError::NoRoots)
        ));
        let e = StorageRoots::new([dir.path().join("nope")]).unwrap_err();
        assert!(e.to_string().starts_with("storage root "), "{e}");
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let e = StorageRoots::new([dir.path().join("f")]).unwrap_err();
        assert!(matches!(e, StoragePathError::RootNotAFolder { .. }), "{e}");
        assert_eq!(
            partial_path(Path::new("/r/d.qcow2")),
            Path::new("/r/d.qcow2.vmgate-partial")
        );
    }
}
