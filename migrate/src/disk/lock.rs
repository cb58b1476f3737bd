//! Image locks that QEMU understands, and that understand QEMU.
//!
//! QEMU (`block/file-posix.c`) locks images with open-file-description (OFD) byte-range locks:
//! for each block permission `i` it holds it takes a shared lock on byte `100 + i`, and for
//! each permission it does not allow others to hold, a shared lock on byte `200 + i`. Before
//! relying on its locks it tests, with a write-lock probe (`F_OFD_GETLK`), that nobody else
//! locks `200 + i` for a permission it holds and nobody else locks `100 + i` for a permission
//! it refuses to share. Permission bits: 0 consistent read, 1 write, 2 write-unchanged,
//! 3 resize. Observed with QEMU 10 (`/proc/locks`): a writable image holds bytes 100, 101, 103,
//! 201, 203; a read-only backing file holds 100, 201, 203.
//!
//! vmgate takes the same bytes, so a vmgate VM and a QEMU process (or `qemu-img`, `qemu-nbd`)
//! refuse each other's conflicting opens, and two vmgate opens of one image for writing refuse
//! each other too, within one process as well (OFD locks belong to the open file, not to the
//! process). The locks go away when the file is closed, also when the process dies, which is
//! what the shared-storage handoff needs: the destination can open the image for writing only
//! after the source has closed it.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::fcntl::{FcntlArg, fcntl};

use super::DiskError;

/// First byte of the "holds permission" locks.
const PERM_BASE: i64 = 100;
/// First byte of the "does not share permission" locks.
const SHARED_BASE: i64 = 200;

/// QEMU's block permission numbers that vmgate uses.
const CONSISTENT_READ: i64 = 0;
/// Permission to write.
const WRITE: i64 = 1;
/// Permission to resize.
const RESIZE: i64 = 3;

/// How an image file is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// The writable top layer: read, write and resize, sharing neither write nor resize.
    Writer,
    /// A read-only layer (a backing file, or a top opened read-only): read, and let nobody
    /// write or resize it meanwhile.
    Reader,
}

impl LockMode {
    /// The permissions this mode holds.
    fn perms(self) -> &'static [i64] {
        match self {
            LockMode::Writer => &[CONSISTENT_READ, WRITE, RESIZE],
            LockMode::Reader => &[CONSISTENT_READ],
        }
    }

    /// The permissions this mode does not share.
    fn unshared(self) -> &'static [i64] {
        &[WRITE, RESIZE]
    }
}

/// The bytes to lock for `mode`.
fn bytes_to_lock(mode: LockMode) -> Vec<i64> {
    let held = mode.perms().iter().map(|p| PERM_BASE + p);
    held.chain(mode.unshared().iter().map(|p| SHARED_BASE + p))
        .collect()
}

/// The bytes that must not be locked by anyone else, each with what a lock there means.
fn bytes_to_check(mode: LockMode) -> Vec<(i64, &'static str)> {
    // Holders first: "it has the image open for writing" says more than "it does not let
    // others write", which a writer also says.
    let mut out = Vec::new();
    for &p in mode.unshared() {
        out.push((PERM_BASE + p, holding(p)));
    }
    for &p in mode.perms() {
        out.push((SHARED_BASE + p, refusal(p)));
    }
    out
}

/// What another process's lock on `200 + perm` means.
fn refusal(perm: i64) -> &'static str {
    match perm {
        CONSISTENT_READ => "it does not let others read the image",
        WRITE => "it reads the image and does not let others write it",
        _ => "it does not let others resize the image",
    }
}

/// What another process's lock on `100 + perm` means.
fn holding(perm: i64) -> &'static str {
    match perm {
        WRITE => "it has the image open for writing",
        RESIZE => "it may resize the image",
        _ => "it reads the image",
    }
}

/// A one-byte lock request at `byte`.
fn flock_at(kind: libc::c_short, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::c_short::try_from(libc::SEEK_SET).unwrap_or(0),
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// The F_RDLCK/F_WRLCK/F_UNLCK constants as the `l_type` field's type.
fn lock_type(kind: libc::c_int) -> libc::c_short {
    libc::c_short::try_from(kind).unwrap_or(libc::c_short::MAX)
}

/// Locks `file` (the image at `path`) for `mode`, then checks that no other open file holds a
/// conflicting lock. On error the caller drops the file, which releases what was taken.
pub fn lock(file: &File, path: &Path, mode: LockMode) -> Result<(), DiskError> {
    let in_use = |holder| DiskError::InUse {
        path: path.to_path_buf(),
        holder,
    };
    for byte in bytes_to_lock(mode) {
        let req = flock_at(lock_type(libc::F_RDLCK), byte);
        match fcntl(file, FcntlArg::F_OFD_SETLK(&req)) {
            Ok(_) => {}
            // Someone holds an exclusive lock on the byte: a locker other than QEMU (which
            // only takes shared locks) that claims the whole file.
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => {
                return Err(in_use("it holds an exclusive lock on the image"));
            }
            Err(e) => {
                return Err(DiskError::Lock {
                    path: path.to_path_buf(),
                    source: io::Error::from(e),
                });
            }
        }
    }
    for (byte, holder) in bytes_to_check(mode) {
        let mut probe = flock_at(lock_type(libc::F_WRLCK), byte);
        fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| DiskError::Lock {
            path: path.to_path_buf(),
            source: io::Error::from(e),
        })?;
        if probe.l_type != lock_type(libc::F_UNLCK) {
            return Err(in_use(holder));
        }
    }
    Ok(())
}

/// Gives up every lock `file` holds on the image (QEMU's bytes 100..300), keeping the file
/// open: the shared-storage handoff's "inactivate", after which another host's open for
/// writing succeeds. OFD locks belong to the open file description, so this also releases them
/// for every duplicate of `file` (a `try_clone`, a forked child's copy).
pub fn unlock(file: &File, path: &Path) -> Result<(), DiskError> {
    let mut req = flock_at(lock_type(libc::F_UNLCK), PERM_BASE);
    req.l_len = 2 * (SHARED_BASE - PERM_BASE);
    fcntl(file, FcntlArg::F_OFD_SETLK(&req)).map_err(|e| DiskError::Lock {
        path: path.to_path_buf(),
        source: io::Error::from(e),
    })?;
    Ok(())
}

/// What an open file elsewhere holds on the image at `path`, as a lock on QEMU's bytes shows
/// it: `Some(Writer)` when it has the image open for writing, `Some(Reader)` when it only
/// reads it, `None` when nobody has it open (with locks). Does not lock anything itself.
pub fn holder(path: &Path) -> Result<Option<LockMode>, DiskError> {
    let file = File::open(path).map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    holder_of(&file, path)
}

/// The same for an open `file` (named `path` in messages).
pub fn holder_of(file: &File, path: &Path) -> Result<Option<LockMode>, DiskError> {
    let held = |byte| -> Result<bool, DiskError> {
        let mut probe = flock_at(lock_type(libc::F_WRLCK), byte);
        fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| DiskError::Lock {
            path: path.to_path_buf(),
            source: io::Error::from(e),
        })?;
        Ok(probe.l_type != lock_type(libc::F_UNLCK))
    };
    if held(PERM_BASE + WRITE)? {
        Ok(Some(LockMode::Writer))
    } else if held(PERM_BASE + CONSISTENT_READ)? {
        Ok(Some(LockMode::Reader))
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 512-byte file in a new temporary folder (kept while the first value lives).
    fn image() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        (dir, path)
    }

    fn open_rw(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn lock_bytes_match_what_qemu_takes() {
        // What QEMU 10 holds, read from /proc/locks: writer 100,101,103,201,203;
        // read-only backing 100,201,203.
        assert_eq!(
            bytes_to_lock(LockMode::Writer),
            vec![100, 101, 103, 201, 203]
        );
        assert_eq!(bytes_to_lock(LockMode::Reader), vec![100, 201, 203]);
        let writer: Vec<_> = bytes_to_check(LockMode::Writer)
            .iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(writer, vec![101, 103, 200, 201, 203]);
        let reader: Vec<_> = bytes_to_check(LockMode::Reader)
            .iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(reader, vec![101, 103, 200]);
    }

    #[test]
    fn readers_share_and_writers_exclude() {
        let (_dir, path) = image();
        let open = || open_rw(&path);

        let r1 = open();
        let r2 = open();
        lock(&r1, &path, LockMode::Reader).unwrap();
        lock(&r2, &path, LockMode::Reader).unwrap();
        let w = open();
        let err = lock(&w, &path, LockMode::Writer).unwrap_err();
        assert!(
            matches!(err, DiskError::InUse { holder, .. } if holder.contains("does not let others write")),
            "{err}"
        );
        drop((r1, r2, w));

        let w1 = open();
        lock(&w1, &path, LockMode::Writer).unwrap();
        let w2 = open();
        let err = lock(&w2, &path, LockMode::Writer).unwrap_err();
        assert!(
            err.to_string().contains("is in use by another process"),
            "{err}"
        );
        let r = open();
        let err = lock(&r, &path, LockMode::Reader).unwrap_err();
        assert!(
            matches!(err, DiskError::InUse { holder, .. } if holder.contains("open for writing")),
            "{err}"
        );
        // A refused open still holds the bytes it took until its file is closed (callers drop
        // it at once); closing the writer releases the image.
        drop((w2, r, w1));
        let w3 = open();
        lock(&w3, &path, LockMode::Writer).unwrap();
    }

    #[test]
    fn unlock_hands_the_image_over_and_holder_sees_who_has_it() {
        let (_dir, path) = image();
        let open = || open_rw(&path);
        assert_eq!(holder(&path).unwrap(), None);
        let source = open();
        lock(&source, &path, LockMode::Writer).unwrap();
        assert_eq!(holder(&path).unwrap(), Some(LockMode::Writer));
        let dest = open();
        assert!(lock(&dest, &path, LockMode::Writer).is_err());
        drop(dest);
        // Unlocking through a duplicate releases the original's locks too (same OFD).
        let dup = source.try_clone().unwrap();
        unlock(&dup, &path).unwrap();
        assert_eq!(holder(&path).unwrap(), None);
        let dest = open();
        lock(&dest, &path, LockMode::Writer).unwrap();
        // The source, still open, cannot take the image back while the destination has it.
        assert!(lock(&source, &path, LockMode::Writer).is_err());
        // A refused lock keeps the bytes it took until unlocked or closed.
        drop((source, dup, dest));
        let reader = open();
        lock(&reader, &path, LockMode::Reader).unwrap();
        assert_eq!(holder(&path).unwrap(), Some(LockMode::Reader));
    }
}
