//! A VM definition's files, resolved beneath the host's storage roots.
//!
//! A path is accepted when the kernel, resolving it from a storage root's directory with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, finds the file without leaving that
//! root: no symbolic link, `..` or magic link can lead outside. (Absolute symbolic links are
//! refused even when they point inside the root: under `RESOLVE_BENEATH` they are never
//! followed.) QEMU is then given the path the kernel resolved (read back from
//! `/proc/self/fd`), not the one that was written, so what was checked is what QEMU opens.
//!
//! Paths written by the user must also be free of `..` (refused as written, before any file
//! system access, as for move destinations); backing files named inside images may use `..`
//! as long as the result stays beneath the root.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, SFlag, fstat, fstatat};

use crate::storage::paths::{RootList, StorageRoots};

/// Why a path of a VM definition is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathProblem {
    /// A character QEMU's option syntax or the logs cannot carry safely.
    #[error("{path:?} contains a control character or is not valid UTF-8")]
    Unprintable {
        /// The path.
        path: PathBuf,
    },
    /// A `..` component in a path the user wrote.
    #[error("{} contains \"..\"; give a path inside {roots} without \"..\"", .path.display())]
    DotDot {
        /// The path.
        path: PathBuf,
        /// The roots.
        roots: RootList,
    },
    /// Not beneath any storage root, as written.
    #[error("{} is outside this host's storage roots ({roots})", .path.display())]
    OutsideRoots {
        /// The path.
        path: PathBuf,
        /// The roots.
        roots: RootList,
    },
    /// Beneath a root as written, but resolving it leaves the root.
    #[error(
        "{} leads outside the storage root {} (through a symbolic link, an absolute symbolic link or \"..\")",
        .path.display(), .root.display()
    )]
    Escapes {
        /// The path.
        path: PathBuf,
        /// The root it was resolved from.
        root: PathBuf,
    },
    /// The file does not exist.
    #[error("{} does not exist", .path.display())]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// The folder a new file would go into does not exist.
    #[error("the folder of {} does not exist", .path.display())]
    NoFolder {
        /// The path.
        path: PathBuf,
    },
    /// Something other than a regular file (a folder, a device, a symbolic link).
    #[error("{} is not a regular file", .path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file system refused to say what is there.
    #[error("cannot inspect {}", .path.display())]
    Inspect {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Whether the file must exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    /// An existing regular file.
    Existing,
    /// A regular file that may not exist yet (its folder must).
    MayCreate,
}

/// Whether `..` may appear in the path as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DotDot {
    /// Refused as written (paths the user gives).
    Refuse,
    /// Resolved by the kernel beneath the root (backing references inside images).
    Resolve,
}

/// Resolves `path` (absolute) beneath the root it is written under. Returns the path as the
/// kernel resolved it.
pub(crate) fn resolve(
    roots: &StorageRoots,
    path: &Path,
    want: Want,
    dotdot: DotDot,
) -> Result<PathBuf, PathProblem> {
    let all = roots.roots();
    let list = || RootList(all.clone());
    if path
        .to_str()
        .is_none_or(|s| s.chars().any(char::is_control))
    {
        return Err(PathProblem::Unprintable {
            path: path.to_path_buf(),
        });
    }
    if dotdot == DotDot::Refuse && path.components().any(|c| c == Component::ParentDir) {
        return Err(PathProblem::DotDot {
            path: path.to_path_buf(),
            roots: list(),
        });
    }
    let Some((root, rel)) = all
        .iter()
        .find_map(|r| path.strip_prefix(r).ok().map(|rel| (r, rel)))
    else {
        return Err(PathProblem::OutsideRoots {
            path: path.to_path_buf(),
            roots: list(),
        });
    };
    if rel.as_os_str().is_empty() {
        return Err(PathProblem::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let inspect = |source: io::Error| PathProblem::Inspect {
        path: path.to_path_buf(),
        source,
    };
    let root_dir = File::open(root).map_err(inspect)?;
    let beneath = |at: &dyn AsFd, rel: &Path, flags: OFlag| {
        openat2(
            at,
            rel,
            OpenHow::new()
                .flags(flags | OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS),
        )
    };
    let refused = |e: Errno, missing: PathProblem| match e {
        Errno::EXDEV | Errno::ELOOP => PathProblem::Escapes {
            path: path.to_path_buf(),
            root: root.clone(),
        },
        Errno::ENOENT | Errno::ENOTDIR => missing,
        e => inspect(io::Error::from(e)),
    };

    match want {
        Want::Existing => {
            let fd = beneath(&root_dir, rel, OFlag::empty()).map_err(|e| {
                refused(
                    e,
                    PathProblem::Missing {
                        path: path.to_path_buf(),
                    },
                )
            })?;
            let st = fstat(&fd).map_err(|e| inspect(e.into()))?;
            if !is_regular(&st) {
                return Err(PathProblem::NotAFile {
                    path: path.to_path_buf(),
                });
            }
            fd_path(&fd).map_err(inspect)
        }
        Want::MayCreate => {
            let name = rel.file_name().ok_or_else(|| PathProblem::NotAFile {
                path: path.to_path_buf(),
            })?;
            let folder = match rel.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let dir = beneath(&root_dir, folder, OFlag::O_DIRECTORY).map_err(|e| {
                refused(
                    e,
                    PathProblem::NoFolder {
                        path: path.to_path_buf(),
                    },
                )
            })?;
            match fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if !is_regular(&st) => {
                    return Err(PathProblem::NotAFile {
                        path: path.to_path_buf(),
                    });
                }
                Ok(_) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(inspect(e.into())),
            }
            Ok(fd_path(&dir).map_err(inspect)?.join(name))
        }
    }
}

fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

/// The path the kernel resolved for an open file descriptor.
fn fd_path(fd: &OwnedFd) -> io::Result<PathBuf> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    // A deleted file reads back as "PATH (deleted)": not something to hand to QEMU.
    if link.as_os_str().as_bytes().ends_with(b" (deleted)") {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the file was deleted while it was checked",
        ));
    }
    Ok(link)
}

/// True when `name` is one plain path component (no `/`, not `.` or `..`).
pub(crate) fn is_plain_name(name: &OsStr) -> bool {
    let mut c = Path::new(name).components();
    matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Setup {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        roots: StorageRoots,
    }

    fn setup() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("vm")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("vm/disk.img"), b"x").unwrap();
        std::fs::write(outside.join("secret"), b"x").unwrap();
        let roots = StorageRoots::new([&root]).unwrap();
        Setup {
            _tmp: tmp,
            root,
            outside,
            roots,
        }
    }

    #[test]
    fn a_file_inside_a_root_resolves_to_itself() {
        let s = setup();
        let p = s.root.join("vm/disk.img");
        assert_eq!(
            resolve(&s.roots, &p, Want::Existing, DotDot::Refuse).unwrap(),
            p
        );
    }

    #[test]
    fn paths_outside_the_roots_are_refused() {
        let s = setup();
        let e = resolve(
            &s.roots,
            &s.outside.join("secret"),
            Want::Existing,
            DotDot::Refuse,
        )
        .unwrap_err();
        assert!(matches!(e, PathProblem::OutsideRoots { .. }), "{e}");
        assert!(
            e.to_string().contains("outside this host's storage roots"),
            "{e}"
        );
    }

    #[test]
    fn dotdot_is_refused_as_written_or_resolved_beneath_the_root() {
        let s = setup();
        let p = s.root.join("vm/../../outside/secret");
        let e = resolve(&s.roots, &p, Want::Existing, DotDot::Refuse).unwrap_err();
        assert!(matches!(e, PathProblem::DotDot { .. }), "{e}");
        let e = resolve(&s.roots, &p, Want::Existing, DotDot::Resolve).unwrap_err();
        assert!(matches!(e, PathProblem::Escapes { .. }), "{e}");
        // `..` that stays inside is fine for backing references.
        let inside = s.root.join("vm/../vm/disk.img");
        assert_eq!(
            resolve(&s.roots, &inside, Want::Existing, DotDot::Resolve).unwrap(),
            s.root.join("vm/disk.img")
        );
    }

    #[test]
    fn symbolic_links_out_of_the_root_are_refused() {
        let s = setup();
        symlink(s.outside.join("secret"), s.root.join("vm/abs")).unwrap();
        symlink("../../outside/secret", s.root.join("vm/rel")).unwrap();
        symlink(&s.outside, s.root.join("dir")).unwrap();
        for p in ["vm/abs", "vm/rel", "dir/secret"] {
            let e = resolve(&s.roots, &s.root.join(p), Want::Existing, DotDot::Refuse).unwrap_err();
            assert!(matches!(e, PathProblem::Escapes { .. }), "{p}: {e}");
        }
        // A new file in a linked-away folder too.
        let e = resolve(
            &s.roots,
            &s.root.join("dir/new.log"),
            Want::MayCreate,
            DotDot::Refuse,
        )
        .unwrap_err();
        assert!(matches!(e, PathProblem::Escapes { .. }), "{e}");
    }

    #[test]
    fn a_relative_link_inside_the_root_resolves_to_its_target() {
        let s = setup();
        symlink("disk.img", s.root.join("vm/link.img")).unwrap();
        assert_eq!(
            resolve(
                &s.roots,
                &s.root.join("vm/link.img"),
                Want::Existing,
                DotDot::Refuse
            )
            .unwrap(),
            s.root.join("vm/disk.img")
        );
    }

    #[test]
    fn missing_files_folders_and_non_files_are_named() {
        let s = setup();
        let e = resolve(
            &s.roots,
            &s.root.join("vm/none"),
            Want::Existing,
            DotDot::Refuse,
        )
        .unwrap_err();
        assert!(matches!(e, PathProblem::Missing { .. }), "{e}");
        let e = resolve(&s.roots, &s.root.join("vm"), Want::Existing, DotDot::Refuse).unwrap_err();
        assert!(matches!(e, PathProblem::NotAFile { .. }), "{e}");
        let e = resolve(
            &s.roots,
            &s.root.join("nope/x.log"),
            Want::MayCreate,
            DotDot::Refuse,
        )
        .unwrap_err();
        assert!(matches!(e, PathProblem::NoFolder { .. }), "{e}");
        symlink("disk.img", s.root.join("vm/console.log")).unwrap();
        let e = resolve(
            &s.roots,
            &s.root.join("vm/console.log"),
            Want::MayCreate,
            DotDot::Refuse,
        )
        .unwrap_err();
        assert!(matches!(e, PathProblem::NotAFile { .. }), "{e}");
        assert_eq!(
            resolve(
                &s.roots,
                &s.root.join("vm/new.log"),
                Want::MayCreate,
                DotDot::Refuse
            )
            .unwrap(),
            s.root.join("vm/new.log")
        );
    }

    #[test]
    fn control_characters_are_refused() {
        let s = setup();
        let e = resolve(
            &s.roots,
            &s.root.join("vm/a\nb"),
            Want::MayCreate,
            DotDot::Refuse,
        )
        .unwrap_err();
        assert!(matches!(e, PathProblem::Unprintable { .. }), "{e}");
    }

    #[test]
    fn plain_names() {
        assert!(is_plain_name(OsStr::new("vm1")));
        for bad in ["", ".", "..", "a/b", "/a"] {
            assert!(!is_plain_name(OsStr::new(bad)), "{bad}");
        }
    }
}
