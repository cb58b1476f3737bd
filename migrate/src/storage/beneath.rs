//! Files beneath an open folder, reached without trusting a path.
//!
//! A [`Folder`] is a folder opened once (`O_PATH`). Everything below it is reached from that
//! descriptor: files and sub-folders with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`,
//! so that neither a `..` nor a symbolic link (absolute, or relative and climbing out) can lead
//! outside it, whatever changes on disk between a check and the use; names in it are created,
//! renamed and removed with the `*at` calls on the same descriptor. This is how
//! [`super::paths::StorageRoots`] confines every disk path to the storage roots.
//!
//! The kernel refuses every absolute symbolic link under `RESOLVE_BENEATH`, also one that
//! names a place inside the folder (`/srv/vms/gold -> /srv/vms/templates/gold`). Such a link
//! is followed by rewriting the path to the place it names, relative to the folder, and
//! resolving again beneath it: the rewrite only chooses what to ask for, and whatever is
//! opened is still opened by the kernel beneath the folder.
//!
//! What vmgate creates here is owner-only whatever the umask: files 0600, folders 0700 (the
//! mode is set explicitly after creation).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, RenameFlags, ResolveFlag, openat2, renameat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::disk::FileId;

/// Mode of every file a move creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every folder a move creates.
pub const FOLDER_MODE: u32 = 0o700;

/// How often a resolution that the kernel reports as raced (`EAGAIN`: a rename or mount
/// happened during a `..` step) is retried.
const RACE_RETRIES: u32 = 16;

/// How many absolute links inside the folder one resolution follows (as the kernel's 40).
const MAX_LINKS: u32 = 40;

/// A folder held open; the base of every operation below it.
#[derive(Debug)]
pub struct Folder {
    fd: OwnedFd,
    path: PathBuf,
    /// The absolute paths this folder is known by (an absolute link naming a place under one
    /// of them stays inside the folder).
    anchors: Vec<PathBuf>,
}

/// What is at a name in a folder (without following a link there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Nothing.
    Missing,
    /// A regular file.
    File(FileId),
    /// A folder.
    Folder,
    /// A symbolic link.
    Link,
    /// Anything else (device, socket, FIFO).
    Other,
}

/// `openat2` beneath `dir`, retried when the kernel saw a race.
fn open_beneath(dir: &impl AsFd, rel: &Path, flags: OFlag, mode: u32) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let rel: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let mut tries = 0;
    loop {
        match openat2(dir.as_fd(), rel, how) {
            Err(Errno::EAGAIN) if tries < RACE_RETRIES => tries += 1,
            other => return other,
        }
    }
}

/// Refuses a name that is not one plain component.
fn plain(name: &OsStr) -> io::Result<&OsStr> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(n)), None) if n.as_bytes() == name.as_bytes() => Ok(name),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a file name inside a folder must be one plain name",
        )),
    }
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Whether openat2 exists and knows RESOLVE_BENEATH on this kernel (Linux 5.6 or later).
pub(crate) fn supported(dir: &Folder) -> Result<(), Errno> {
    open_beneath(
        &dir.fd,
        Path::new("."),
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        0,
    )
    .map(drop)
}

impl Folder {
    /// Opens the folder at `path` (following links: this is a configured root, or a folder
    /// the caller trusts as written).
    pub(crate) fn open_trusted(path: &Path) -> io::Result<Folder> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Folder {
            fd,
            path: path.to_path_buf(),
            anchors: vec![path.to_path_buf()],
        })
    }

    /// Also known as `anchor` (a configured root reached through a link, say).
    pub(crate) fn with_anchor(mut self, anchor: &Path) -> Folder {
        if !self.anchors.iter().any(|a| a == anchor) {
            self.anchors.push(anchor.to_path_buf());
        }
        self
    }

    /// `openat2` beneath this folder, following absolute links that name a place inside it
    /// (see the module documentation).
    fn open_here(&self, rel: &Path, flags: OFlag, mode: u32) -> Result<OwnedFd, Errno> {
        let mut rel = rel.to_path_buf();
        for _ in 0..MAX_LINKS {
            match open_beneath(&self.fd, &rel, flags, mode) {
                Err(Errno::EXDEV) => match self.inside_link(&rel) {
                    Some(next) => rel = next,
                    None => return Err(Errno::EXDEV),
                },
                other => return other,
            }
        }
        Err(Errno::ELOOP)
    }

    /// `rel` with its first absolute link replaced by the place it names, when that place
    /// is inside this folder; `None` when the refusal has another cause (a link or `..`
    /// leading out).
    fn inside_link(&self, rel: &Path) -> Option<PathBuf> {
        let parts: Vec<Component<'_>> = rel.components().collect();
        let mut prefix = PathBuf::new();
        for (i, c) in parts.iter().enumerate() {
            prefix.push(c);
            let fd = open_beneath(&self.fd, &prefix, OFlag::O_PATH | OFlag::O_NOFOLLOW, 0).ok()?;
            if kind(&fstat(&fd).ok()?) != SFlag::S_IFLNK {
                continue;
            }
            let target = PathBuf::from(nix::fcntl::readlinkat(&fd, "").ok()?);
            if !target.is_absolute() {
                continue;
            }
            let inside = self
                .anchors
                .iter()
                .find_map(|a| target.strip_prefix(a).ok())?;
            let mut next = inside.to_path_buf();
            next.extend(parts.get(i + 1..).unwrap_or(&[]));
            return Some(next);
        }
        None
    }

    /// The folder's path (as it was reached; for messages and plans).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the folder really is now (the kernel's name for the open descriptor).
    pub(crate) fn real_path(&self) -> io::Result<PathBuf> {
        use std::os::fd::AsRawFd;
        std::fs::read_link(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The folder's device and inode.
    pub fn id(&self) -> io::Result<FileId> {
        let st = fstat(&self.fd)?;
        Ok(FileId::from_stat(&st))
    }

    /// A sub-folder (or a deeper one, `rel` relative), beneath this one; `path` is how it is
    /// named in messages.
    pub(crate) fn descend(&self, rel: &Path, path: PathBuf) -> Result<Folder, Errno> {
        let fd = self.open_here(rel, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
        Ok(Folder {
            fd,
            anchors: vec![path.clone()],
            path,
        })
    }

    /// Opens the regular file `rel` beneath this folder (links inside it are followed, links
    /// out of it refused), for writing if `write`. Anything but a regular file is refused
    /// (`EINVAL`); a FIFO does not block the open.
    pub(crate) fn open_file_beneath(&self, rel: &Path, write: bool) -> Result<File, Errno> {
        let access = if write {
            OFlag::O_RDWR
        } else {
            OFlag::O_RDONLY
        };
        let fd = self.open_here(rel, access | OFlag::O_NONBLOCK | OFlag::O_NOCTTY, 0)?;
        let st = fstat(&fd)?;
        if kind(&st) != SFlag::S_IFREG {
            return Err(Errno::EINVAL);
        }
        // Regular files ignore O_NONBLOCK; clear it anyway so the file behaves as usual.
        let flags = OFlag::from_bits_truncate(nix::fcntl::fcntl(&fd, nix::fcntl::F_GETFL)?);
        nix::fcntl::fcntl(&fd, nix::fcntl::F_SETFL(flags - OFlag::O_NONBLOCK))?;
        Ok(File::from(fd))
    }

    /// Creates the new file `name` here (never over anything, not through a link), 0600,
    /// open for reading and writing.
    pub fn create_file(&self, name: &OsStr) -> io::Result<File> {
        let name = plain(name)?;
        let fd = open_beneath(
            &self.fd,
            Path::new(name),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
            FILE_MODE,
        )?;
        fchmod(&fd, Mode::from_bits_truncate(FILE_MODE))?;
        Ok(File::from(fd))
    }

    /// Opens the existing regular file `name` here, not through a link.
    pub fn open_file(&self, name: &OsStr, write: bool) -> io::Result<File> {
        let name = plain(name)?;
        let access = if write {
            OFlag::O_RDWR
        } else {
            OFlag::O_RDONLY
        };
        let fd = open_beneath(
            &self.fd,
            Path::new(name),
            access | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            0,
        )?;
        let st = fstat(&fd)?;
        if kind(&st) != SFlag::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let flags = OFlag::from_bits_truncate(nix::fcntl::fcntl(&fd, nix::fcntl::F_GETFL)?);
        nix::fcntl::fcntl(&fd, nix::fcntl::F_SETFL(flags - OFlag::O_NONBLOCK))?;
        Ok(File::from(fd))
    }

    /// Creates the folder `name` here, 0700, and opens it.
    pub fn create_folder(&self, name: &OsStr) -> io::Result<Folder> {
        let name = plain(name)?;
        mkdirat(&self.fd, name, Mode::from_bits_truncate(FOLDER_MODE))?;
        let dir = open_beneath(
            &self.fd,
            Path::new(name),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            0,
        )?;
        fchmod(&dir, Mode::from_bits_truncate(FOLDER_MODE))?;
        let fd = open_beneath(
            &self.fd,
            Path::new(name),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            0,
        )?;
        let path = self.path.join(name);
        Ok(Folder {
            fd,
            anchors: vec![path.clone()],
            path,
        })
    }

    /// Opens the existing folder `name` here, not through a link.
    pub fn folder(&self, name: &OsStr) -> io::Result<Folder> {
        let name = plain(name)?;
        let fd = open_beneath(
            &self.fd,
            Path::new(name),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            0,
        )?;
        let path = self.path.join(name);
        Ok(Folder {
            fd,
            anchors: vec![path.clone()],
            path,
        })
    }

    /// What is at `name` here (a link is reported, not followed).
    pub fn entry(&self, name: &OsStr) -> io::Result<Entry> {
        let name = plain(name)?;
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => Ok(Entry::Missing),
            Err(e) => Err(e.into()),
            Ok(st) => Ok(match kind(&st) {
                SFlag::S_IFREG => Entry::File(FileId::from_stat(&st)),
                SFlag::S_IFDIR => Entry::Folder,
                SFlag::S_IFLNK => Entry::Link,
                _ => Entry::Other,
            }),
        }
    }

    /// Renames `from` to `to` here; `to` must not exist (`EEXIST` otherwise).
    pub fn rename_new(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        let (from, to) = (plain(from)?, plain(to)?);
        match renameat2(&self.fd, from, &self.fd, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(()),
            // A file system without RENAME_NOREPLACE: check, then rename. The names are
            // reserved by the move (see super::reserve), so no other move races here.
            Err(Errno::EINVAL | Errno::ENOSYS) => {
                if self.entry(to)? != Entry::Missing {
                    return Err(Errno::EEXIST.into());
                }
                nix::fcntl::renameat(&self.fd, from, &self.fd, to).map_err(io::Error::from)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the file `name` here (a link is removed, not followed).
    pub fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        let name = plain(name)?;
        unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir).map_err(io::Error::from)
    }

    /// Removes the empty folder `name` here.
    pub fn remove_folder(&self, name: &OsStr) -> io::Result<()> {
        let name = plain(name)?;
        unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir).map_err(io::Error::from)
    }

    /// Makes the folder's entries (creations, renames) durable.
    pub fn sync(&self) -> io::Result<()> {
        let fd = open_beneath(
            &self.fd,
            Path::new("."),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            0,
        )?;
        File::from(fd).sync_all()
    }
}

impl AsFd for Folder {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn nothing_leaves_the_folder_and_creations_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("rel")).unwrap();
        std::fs::create_dir(root.join("in")).unwrap();
        std::fs::write(root.join("in/f"), b"f").unwrap();
        std::os::unix::fs::symlink("in/f", root.join("inner")).unwrap();
        let f = Folder::open_trusted(&root).unwrap();
        supported(&f).unwrap();

        for escape in [
            "abs/secret",
            "rel/secret",
            "../outside/secret",
            "in/../../outside/secret",
        ] {
            let e = f.open_file_beneath(Path::new(escape), false).unwrap_err();
            assert_eq!(e, Errno::EXDEV, "{escape}");
        }
        // Links and ".." that stay inside are fine, an absolute link to inside too.
        assert!(f.open_file_beneath(Path::new("inner"), false).is_ok());
        std::os::unix::fs::symlink(root.join("in"), root.join("absin")).unwrap();
        assert!(f.open_file_beneath(Path::new("absin/f"), false).is_ok());
        std::os::unix::fs::symlink(root.join("in/../../outside"), root.join("sneaky")).unwrap();
        assert_eq!(
            f.open_file_beneath(Path::new("sneaky/secret"), false)
                .unwrap_err(),
            Errno::EXDEV
        );
        assert!(f.open_file_beneath(Path::new("in/../in/f"), false).is_ok());
        // A folder is not a file.
        assert_eq!(
            f.open_file_beneath(Path::new("in"), false).unwrap_err(),
            Errno::EINVAL
        );
        // Plain names only, no link followed at the name.
        assert!(f.create_file(OsStr::new("a/b")).is_err());
        assert!(f.create_file(OsStr::new("..")).is_err());
        assert!(f.open_file(OsStr::new("inner"), false).is_err());
        assert_eq!(f.entry(OsStr::new("inner")).unwrap(), Entry::Link);
        assert_eq!(f.entry(OsStr::new("none")).unwrap(), Entry::Missing);
        assert!(
            f.create_file(OsStr::new("abs")).is_err(),
            "never over a link"
        );

        // Owner-only whatever the umask (the umask itself is tested in its own process:
        // tests/storage_modes.rs).
        f.create_file(OsStr::new("f1")).unwrap();
        let sub = f.create_folder(OsStr::new("d1")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&root.join("f1")), 0o600);
        assert_eq!(mode(sub.path()), 0o700);
        f.create_file(OsStr::new("f2")).unwrap();
        f.rename_new(OsStr::new("f1"), OsStr::new("g")).unwrap();
        let e = f.rename_new(OsStr::new("f2"), OsStr::new("g")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        f.remove_file(OsStr::new("g")).unwrap();
        f.remove_folder(OsStr::new("d1")).unwrap();
        f.sync().unwrap();
        assert!(f.id().unwrap() == FileId::of(&root).unwrap());
        assert_eq!(
            f.real_path().unwrap(),
            std::fs::canonicalize(&root).unwrap()
        );
    }
}
