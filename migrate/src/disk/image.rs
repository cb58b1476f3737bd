//! Creating image files, and checksums of layers.
//!
//! Creation goes through imago (qcow2 v3, 64 KiB clusters, 16-bit refcounts, as `qemu-img
//! create` makes by default); new files are never created over existing ones, and are
//! owner-only (0600) whatever the umask. [`format_raw`] / [`format_qcow2`] format a file the
//! caller created (beneath the storage roots, see [`crate::storage::paths::StorageRoots`]). Checksums are
//! SHA-256 over a layer's whole file, the same value `sha256sum` prints, so a destination can
//! tell that a read-only parent it already has is byte-for-byte the one the source uses.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

use imago::qcow2::Qcow2;
use imago::{FormatCreateBuilder, StorageOpenOptions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::chain::{chain, resolve_backing};
use super::{DiskError, DiskFormat, DiskSpec, MAX_DISK_SIZE};

/// Creates `path` exclusively (refusing an existing file), owner-only.
fn create_new(path: &Path) -> Result<File, DiskError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| DiskError::Create {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    // The umask may have taken bits away, never added: set the mode exactly.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    Ok(file)
}

/// Refuses sizes the disk layer would refuse to open.
fn check_size(path: &Path, size: u64) -> Result<(), DiskError> {
    if size > MAX_DISK_SIZE {
        return Err(DiskError::TooLarge {
            path: path.to_path_buf(),
            size,
            max: MAX_DISK_SIZE,
        });
    }
    Ok(())
}

/// Creates a sparse raw image of `size` bytes (all zeroes).
pub fn create_raw(path: &Path, size: u64) -> Result<(), DiskError> {
    check_size(path, size)?;
    let file = create_new(path)?;
    format_raw(&file, path, size)
}

/// Makes the new, empty `file` (named `path` in messages) a sparse raw image of `size` bytes.
pub fn format_raw(file: &File, path: &Path, size: u64) -> Result<(), DiskError> {
    check_size(path, size)?;
    file.set_len(size).map_err(|source| DiskError::Create {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates a qcow2 image. With a backing image, the reference is written into the header as
/// given (relative references are relative to the new image's directory, as in QEMU) together
/// with its format, and `size` may be `None` to take the backing image's size.
pub fn create_qcow2(
    path: &Path,
    size: Option<u64>,
    backing: Option<&DiskSpec>,
) -> Result<(), DiskError> {
    let size = match (size, backing) {
        (Some(size), _) => size,
        (None, Some(b)) => {
            let image = std::path::absolute(path).map_err(|source| DiskError::Create {
                path: path.to_path_buf(),
                source,
            })?;
            let resolved = resolve_backing(&image, &b.path)?;
            chain(&DiskSpec {
                path: resolved,
                format: b.format,
            })?
            .virtual_size()
        }
        (None, None) => {
            return Err(DiskError::SizeRequired {
                path: path.to_path_buf(),
            });
        }
    };
    let file = create_new(path)?;
    format_qcow2(file, path, size, backing).inspect_err(|_| {
        // Do not leave a half-formatted file behind.
        let _ = std::fs::remove_file(path);
    })
}

/// Formats the new, empty `file` (named `path` in messages) as a qcow2 image of `size` bytes,
/// on `backing` (written into the header as given, with its format) if any. On failure the
/// file may be half-formatted: the caller removes it.
pub fn format_qcow2(
    file: File,
    path: &Path,
    size: u64,
    backing: Option<&DiskSpec>,
) -> Result<(), DiskError> {
    check_size(path, size)?;
    let backing_ref = match backing {
        None => None,
        Some(b) => {
            let name = b.path.to_str().ok_or_else(|| DiskError::BackingName {
                image: path.to_path_buf(),
                name: b.path.to_string_lossy().into_owned(),
            })?;
            let fmt = match b.format {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            Some((name.to_owned(), fmt.to_owned()))
        }
    };
    let result = (|| -> io::Result<()> {
        let storage = imago::file::File::from_open_file(
            file,
            StorageOpenOptions::new().write(true).filename(path),
        )?;
        let mut builder = Qcow2::<imago::file::File>::create_builder(storage).size(size);
        if let Some((name, fmt)) = backing_ref {
            builder = builder.backing(name, fmt);
        }
        builder.create()
    })();
    result.map_err(|source| DiskError::Create {
        path: path.to_path_buf(),
        source,
    })
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sha256Digest(pub [u8; 32]);

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

/// SHA-256 of the whole file at `path` (what `sha256sum` prints).
pub fn file_checksum(path: &Path) -> Result<Sha256Digest, DiskError> {
    let err = |source| DiskError::Checksum {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(e)),
        };
        hasher.update(buf.get(..n).unwrap_or(&[]));
    }
    Ok(Sha256Digest(hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_known_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            file_checksum(&p).unwrap().to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn creation_refuses_existing_files_and_missing_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        create_raw(&p, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let err = create_raw(&p, 1 << 20).unwrap_err();
        assert!(matches!(err, DiskError::Create { .. }), "{err}");
        let q = dir.path().join("b.qcow2");
        let err = create_qcow2(&q, None, None).unwrap_err();
        assert!(matches!(err, DiskError::SizeRequired { .. }), "{err}");
        assert!(!q.exists());
        let err = create_raw(&q, MAX_DISK_SIZE + 1).unwrap_err();
        assert!(matches!(err, DiskError::TooLarge { .. }), "{err}");
    }
}
