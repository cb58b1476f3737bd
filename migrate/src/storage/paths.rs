//! Where a moved disk may go: the destination's storage roots, and Move-VM's storage options.
//!
//! A host lists the folders VM storage may live in (its *storage roots*). A move names either
//! one folder for everything ([`StorageDestination::Folder`], Move-VM's
//! `-DestinationStoragePath`) or a file per disk ([`StorageDestination::PerDisk`], Move-VM's
//! `-VHDs` table). Every destination file is checked before anything is written:
//!
//! - the path must be absolute and free of `..` components (refused as written, before any
//!   file system access);
//! - the deepest folder of it that exists is resolved with `canonicalize` (following every
//!   symbolic link) and must lie inside a root, itself canonical; the folders that do not
//!   exist yet will be created by the move, so no link can hide in them;
//! - the file itself must not exist, unless it is a regular file the caller accepts (an
//!   identical read-only parent that is reused); a symbolic link in its place is refused.
//!
//! Files being written carry the suffix [`PARTIAL_SUFFIX`] until they are complete, so what a
//! crashed move leaves behind is recognizable, and is replaced by the next attempt.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Suffix of files a move is still writing.
pub const PARTIAL_SUFFIX: &str = ".vmgate-partial";

/// Errors of the destination path policy. Every message names the path, and the roots where
/// they matter.
#[derive(Debug, thiserror::Error)]
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
    /// Inside a root as written, outside once symbolic links are followed.
    #[error(
        "destination {} leads to {} through a symbolic link, which is outside this host's storage roots ({roots})",
        .path.display(), .resolved.display()
    )]
    SymlinkEscape {
        /// The path as given.
        path: PathBuf,
        /// Where it really leads.
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
    /// The file system refused to say what is there.
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

/// A host's storage roots, canonical (every symbolic link resolved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRoots {
    roots: Vec<PathBuf>,
    /// The roots as configured, to tell a link escape from a path that was outside anyway.
    configured: Vec<PathBuf>,
}

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

impl StorageRoots {
    /// Checks and canonicalizes the configured roots (each must be an existing folder).
    pub fn new<I, P>(roots: I) -> Result<StorageRoots, StoragePathError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        let mut out = Vec::new();
        let mut configured = Vec::new();
        for r in roots {
            let r = r.as_ref();
            configured.push(r.to_path_buf());
            let canon = std::fs::canonicalize(r).map_err(|source| StoragePathError::BadRoot {
                root: r.to_path_buf(),
                source,
            })?;
            if !canon.is_dir() {
                return Err(StoragePathError::RootNotAFolder {
                    root: r.to_path_buf(),
                });
            }
            out.push(canon);
        }
        if out.is_empty() {
            return Err(StoragePathError::NoRoots);
        }
        Ok(StorageRoots {
            roots: out,
            configured,
        })
    }

    /// The canonical roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    fn list(&self) -> RootList {
        RootList(self.roots.clone())
    }

    fn inside(&self, p: &Path) -> bool {
        self.roots.iter().any(|r| p.starts_with(r))
    }

    /// Checks the written form of `path`: absolute, no `..`, inside a root as written.
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
        let (canon_folder, missing) = self.resolve_folder(path, folder)?;
        let resolved = canon_folder.join(name);
        let exists = if missing.is_empty() {
            match std::fs::symlink_metadata(&resolved) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(StoragePathError::FileIsSymlink {
                        path: path.to_path_buf(),
                    });
                }
                Ok(m) if m.is_file() => {
                    if !allow_existing {
                        return Err(StoragePathError::Exists {
                            path: path.to_path_buf(),
                        });
                    }
                    true
                }
                Ok(_) => {
                    return Err(StoragePathError::NotAFile {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(source) => {
                    return Err(StoragePathError::Inspect {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        } else {
            false
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

    /// Checks a destination folder (it may not exist yet); returns it in canonical form.
    pub fn check_folder(&self, path: &Path) -> Result<PathBuf, StoragePathError> {
        self.check_lexical(path)?;
        let (canon, missing) = self.resolve_folder(path, path)?;
        let mut out = canon;
        out.extend(missing);
        Ok(out)
    }

    /// Resolves `folder` (part of the destination `path`): the deepest existing ancestor,
    /// canonical and inside a root, and the names below it that do not exist yet.
    fn resolve_folder(
        &self,
        path: &Path,
        folder: &Path,
    ) -> Result<(PathBuf, Vec<OsString>), StoragePathError> {
        let mut missing: Vec<OsString> = Vec::new();
        let mut existing = folder.to_path_buf();
        loop {
            match std::fs::symlink_metadata(&existing) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let Some(name) = existing.file_name() else {
                        break;
                    };
                    missing.push(name.to_os_string());
                    if !existing.pop() {
                        break;
                    }
                }
                Err(source) => {
                    return Err(StoragePathError::Inspect {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
        missing.reverse();
        let canon =
            std::fs::canonicalize(&existing).map_err(|source| StoragePathError::Inspect {
                path: path.to_path_buf(),
                source,
            })?;
        if !canon.is_dir() {
            return Err(StoragePathError::NotAFolder {
                path: path.to_path_buf(),
                blocker: existing,
            });
        }
        if !self.inside(&canon) {
            // Lexically inside a root (or a root's own link) but not once resolved: a link.
            let as_written_inside = self
                .roots
                .iter()
                .chain(&self.configured)
                .any(|r| path.starts_with(r));
            return Err(if as_written_inside {
                StoragePathError::SymlinkEscape {
                    path: path.to_path_buf(),
                    resolved: canon,
                    roots: self.list(),
                }
            } else {
                StoragePathError::OutsideRoots {
                    path: path.to_path_buf(),
                    roots: self.list(),
                }
            });
        }
        Ok((canon, missing))
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
