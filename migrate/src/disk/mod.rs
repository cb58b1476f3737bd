//! Disk images (raw, qcow2 with backing chains) and the block device backend.
//!
//! [`Disk`] is a synchronous, thread-safe handle on one disk: a raw file (read and written with
//! `pread`/`pwrite`), or a qcow2 image and its backing chain (through imago, built in its
//! native synchronous mode). Guest writes land in the top layer only; every lower layer is
//! opened read-only. Accesses beyond the disk's size are refused, never extend the image.
//!
//! Opening a disk locks its files the way QEMU does (OFD byte-range locks on the same bytes),
//! so a disk that a vmgate VM or a QEMU process has open for writing cannot be opened for
//! writing a second time; read-only parents are shared but cannot be written. A disk
//! also records which 64 KiB blocks were written ([`Disk::take_dirty`]) and can tell which
//! parts of its top layer hold data ([`Disk::allocated`]), which is what the storage phase of a
//! move needs: copy the allocated parts of the active layer in bulk, then re-send what the
//! guest wrote meanwhile.
//!
//! [`chain()`] inspects a disk without opening it for I/O, [`file_checksum`] identifies a layer,
//! and [`create_raw`] / [`create_qcow2`] make new images.

mod chain;
mod dirty;
mod header;
mod image;
mod lock;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, ShallowMapping, StorageOpenOptions,
};
use serde::{Deserialize, Serialize};

use crate::storage::paths::StorageRoots;

pub(crate) use chain::read_layer_header;
pub use chain::{DiskChain, LayerInfo, MAX_CHAIN_LAYERS, chain, chain_files, chain_in};
pub use dirty::{DIRTY_BLOCK_SIZE, DirtyBlocks};
pub use header::HeaderError;
pub use image::{Sha256Digest, create_qcow2, create_raw, file_checksum, format_qcow2, format_raw};
pub use lock::{LockMode, holder as lock_holder, holder_of as lock_holder_of};

use dirty::DirtyBitmap;

/// The largest virtual disk size accepted (16 TiB; its dirty bitmap is 32 MiB).
pub const MAX_DISK_SIZE: u64 = 16 << 40;

/// The format of a disk image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain file, byte for byte the guest's disk.
    Raw,
    /// QEMU copy-on-write v2/v3, possibly with a backing chain.
    Qcow2,
}

/// A file by device and inode: the same file under any name (or after a rename).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileId {
    /// The device holding it.
    pub dev: u64,
    /// Its inode on that device.
    pub ino: u64,
}

impl FileId {
    /// The file at `path` (links followed).
    pub fn of(path: &Path) -> io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// An open file.
    pub fn of_file(file: &File) -> io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    pub(crate) fn from_stat(st: &nix::sys::stat::FileStat) -> FileId {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// Where a disk image is and what format it has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The image file (for qcow2: the top, writable layer).
    pub path: PathBuf,
    /// The image's format.
    pub format: DiskFormat,
}

/// Errors of the disk layer. Every message names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image file could not be opened.
    #[error("cannot open disk image {}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A backing file named in the chain does not exist.
    #[error("backing file {} of disk image {} does not exist", .backing.display(), .image.display())]
    MissingBacking {
        /// The image that names the backing file.
        image: PathBuf,
        /// The missing file, resolved to an absolute path.
        backing: PathBuf,
    },
    /// The path is a directory, device or other non-regular file.
    #[error("disk image {} is not a regular file", .path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Another open file (this process or another, vmgate or QEMU) holds a conflicting lock.
    #[error(
        "image {} is in use by another process ({holder}); stop that process, or wait until it has released the image",
        .path.display()
    )]
    InUse {
        /// The locked file.
        path: PathBuf,
        /// What the other holder's lock means.
        holder: &'static str,
    },
    /// Locking failed for a reason other than a conflict (e.g. a file system without OFD locks).
    #[error("cannot lock disk image {}", .path.display())]
    Lock {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The header could not be read.
    #[error("cannot read the header of disk image {}", .path.display())]
    ReadHeader {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a qcow2 image vmgate can use.
    #[error("disk image {} is not a usable qcow2 image", .path.display())]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong with the header.
        #[source]
        source: HeaderError,
    },
    /// A layer of the disk lies outside the host's storage roots (its path, a `..` or a
    /// symbolic link leads out of them). Names the disk, never the reference's text.
    #[error(
        "{} of disk image {} is outside this host's storage roots ({roots}): its path, a symbolic link or \"..\" leads out of them",
        layer_name(*.layer), .disk.display()
    )]
    OutsideRoots {
        /// The disk (its top layer, as given).
        disk: PathBuf,
        /// Which layer: 0 is the disk image itself, 1 its backing file, and so on.
        layer: usize,
        /// The roots.
        roots: crate::storage::paths::RootList,
    },
    /// Opening a layer beneath the storage roots failed for another reason.
    #[error("cannot open {} inside this host's storage roots", .path.display())]
    Confine {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<crate::storage::paths::StoragePathError>,
    },
    /// A backing reference that is not a plain local file.
    #[error("disk image {} names its backing file as {name:?}, which is not a local file path", .image.display())]
    BackingName {
        /// The image whose header holds the reference.
        image: PathBuf,
        /// The reference.
        name: String,
    },
    /// A backing format other than raw or qcow2.
    #[error("disk image {} names the backing format {format:?}; only \"raw\" and \"qcow2\" are supported", .image.display())]
    BackingFormat {
        /// The image whose header names the format.
        image: PathBuf,
        /// The format name.
        format: String,
    },
    /// More layers than [`MAX_CHAIN_LAYERS`].
    #[error("the backing chain of disk image {} has more than {max} layers", .path.display())]
    ChainTooLong {
        /// The top image.
        path: PathBuf,
        /// The limit.
        max: usize,
    },
    /// A layer appears twice in its own chain.
    #[error("the backing chain of disk image {} loops: {} appears in it twice", .path.display(), .repeated.display())]
    ChainLoop {
        /// The top image.
        path: PathBuf,
        /// The layer met again.
        repeated: PathBuf,
    },
    /// A virtual size beyond [`MAX_DISK_SIZE`].
    #[error("disk image {} is {size} bytes, more than the {max} bytes vmgate supports", .path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its virtual size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The qcow2 driver refused the image.
    #[error("the qcow2 driver cannot open disk image {}", .path.display())]
    Driver {
        /// The file.
        path: PathBuf,
        /// The driver's reason.
        #[source]
        source: io::Error,
    },
    /// A read, write or zeroing failed.
    #[error("cannot {op} {len} bytes at offset {offset} of disk image {}", .path.display())]
    Io {
        /// The disk (its top layer).
        path: PathBuf,
        /// "read", "write", "zero" or "map".
        op: &'static str,
        /// Start of the access.
        offset: u64,
        /// Its length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Flushing to stable storage failed.
    #[error("cannot flush disk image {} to stable storage", .path.display())]
    Flush {
        /// The disk (its top layer).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An access that does not fit in the disk.
    #[error(
        "the {len}-byte {op} at offset {offset} is beyond the end of disk image {} ({size} bytes)",
        .path.display()
    )]
    OutOfRange {
        /// The disk.
        path: PathBuf,
        /// "read", "write" or "zero".
        op: &'static str,
        /// Start of the access.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk's size.
        size: u64,
    },
    /// A write to a disk opened read-only.
    #[error("disk image {} is open read-only and cannot be written", .path.display())]
    ReadOnly {
        /// The disk.
        path: PathBuf,
    },
    /// A write to a disk handed over to another host (shared storage): this host no longer
    /// owns the image.
    #[error(
        "disk image {} was handed over to another host and cannot be written here",
        .path.display()
    )]
    Released {
        /// The disk.
        path: PathBuf,
    },
    /// Creating an image file failed (including: it already exists).
    #[error("cannot create disk image {}", .path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A qcow2 image without a backing file needs an explicit size.
    #[error("cannot create disk image {}: a qcow2 image without a backing file needs a size", .path.display())]
    SizeRequired {
        /// The file.
        path: PathBuf,
    },
    /// Reading a file for its checksum failed.
    #[error("cannot compute the checksum of {}", .path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// "the file" / "the backing file" / "layer N of the backing chain", for messages.
fn layer_name(layer: usize) -> String {
    match layer {
        0 => "the file".into(),
        1 => "the backing file".into(),
        n => format!("layer {n} of the backing chain (counting the image as 0)"),
    }
}

/// A part of the top layer that holds data of its own (see [`Disk::allocated`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Start, in bytes of the virtual disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The layer records this range as zeroes (qcow2 zero clusters): a copy can write zeroes
    /// instead of data.
    pub zero: bool,
}

/// How the bytes of the disk are reached.
enum Backend {
    /// A raw file: positional reads and writes.
    Raw(File),
    /// A qcow2 image (and its chain) through imago.
    Image(FormatAccess<imago::file::File>),
}

/// An open disk image: a synchronous, thread-safe handle.
pub struct Disk {
    /// What was opened.
    spec: DiskSpec,
    /// The top layer's absolute path (used in messages).
    path: PathBuf,
    /// Virtual size in bytes.
    size: u64,
    /// Opened for writing.
    writable: bool,
    /// The chain as it was when opened, top first.
    layers: Vec<LayerInfo>,
    /// The I/O path.
    backend: Backend,
    /// Blocks written since the last [`Disk::take_dirty`].
    dirty: DirtyBitmap,
    /// A duplicate of the top layer's file (same open file description, so the same locks),
    /// kept to give the locks up at a shared-storage handoff; `None` for a read-only disk.
    lock_handle: Option<File>,
    /// Handed over ([`Disk::release`]): writes are refused.
    released: AtomicBool,
    /// The storage roots it was opened beneath (and is reopened beneath), if any.
    roots: Option<StorageRoots>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.path)
            .field("format", &self.spec.format)
            .field("size", &self.size)
            .field("writable", &self.writable)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

/// Compile-time proof that a `Disk` can be shared between vCPU and I/O threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Disk>();
};

impl Disk {
    /// Opens the image described by `spec` and its backing chain, for writing if `writable`
    /// (only the top layer is ever written), and locks the files as QEMU does.
    pub fn open(spec: &DiskSpec, writable: bool) -> Result<Disk, DiskError> {
        Disk::open_with(spec, writable, None)
    }

    /// The same, every layer opened beneath the host's storage roots
    /// ([`StorageRoots::open_beneath`]): a disk or backing file outside them is refused
    /// ([`DiskError::OutsideRoots`]). [`Disk::reopen`] keeps to the same roots.
    pub fn open_in(
        spec: &DiskSpec,
        writable: bool,
        roots: &StorageRoots,
    ) -> Result<Disk, DiskError> {
        Disk::open_with(spec, writable, Some(roots))
    }

    /// Opens the same image again (fresh metadata, fresh locks), beneath the same roots.
    pub fn reopen(&self, writable: bool) -> Result<Disk, DiskError> {
        Disk::open_with(&self.spec, writable, self.roots.as_ref())
    }

    /// The storage roots the disk was opened beneath, if any.
    pub fn roots(&self) -> Option<&StorageRoots> {
        self.roots.as_ref()
    }

    fn open_with(
        spec: &DiskSpec,
        writable: bool,
        roots: Option<&StorageRoots>,
    ) -> Result<Disk, DiskError> {
        let walked = chain::walk(spec, writable, true, roots)?;
        let layers = walked.infos();
        let path = walked.top.info.path.clone();
        let size = walked.top.info.virtual_size;
        let lock_handle = if writable {
            let dup = walked.top.file.try_clone();
            Some(dup.map_err(|source| DiskError::Lock {
                path: path.clone(),
                source,
            })?)
        } else {
            None
        };

        let backend = if walked.parents.is_empty() && spec.format == DiskFormat::Raw {
            Backend::Raw(walked.top.file)
        } else {
            Backend::Image(open_image_chain(walked, writable)?)
        };
        let dirty = DirtyBitmap::new(size, DIRTY_BLOCK_SIZE).ok_or(DiskError::TooLarge {
            path: path.clone(),
            size,
            max: MAX_DISK_SIZE,
        })?;
        Ok(Disk {
            spec: spec.clone(),
            path,
            size,
            writable,
            layers,
            backend,
            dirty,
            lock_handle,
            released: AtomicBool::new(false),
            roots: roots.cloned(),
        })
    }

    /// Hands the image over to another host that sees the same file (shared storage):
    /// makes every completed write durable, then gives up the locks on the top layer while
    /// keeping the file open, and refuses writes from now on. The caller guarantees that no
    /// request is in flight (the VM is paused). To take the image back, open it again
    /// ([`Disk::open`]), which re-reads its metadata: the other host may have changed it
    /// meanwhile. The read-only parents keep their shared read locks, which other readers
    /// accept.
    pub fn release(&self) -> Result<(), DiskError> {
        self.flush()?;
        self.released.store(true, Ordering::SeqCst);
        match &self.lock_handle {
            Some(file) => lock::unlock(file, &self.path),
            None => Ok(()),
        }
    }

    /// Whether [`Disk::release`] handed the image over.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    /// Refuses writes to a read-only or released disk.
    fn check_writable(&self) -> Result<(), DiskError> {
        if !self.writable {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        if self.is_released() {
            return Err(DiskError::Released {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// The disk's virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// What was opened.
    pub fn spec(&self) -> &DiskSpec {
        &self.spec
    }

    /// The top layer's absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the disk was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The backing chain as found when the disk was opened, top first.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// Refuses accesses that do not fit in the disk.
    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DiskError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                path: self.path.clone(),
                op,
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// An I/O error on this disk.
    fn io_error(&self, op: &'static str, offset: u64, len: u64, source: io::Error) -> DiskError {
        DiskError::Io {
            path: self.path.clone(),
            op,
            offset,
            len,
            source,
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.check_range("read", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        let result = match &self.backend {
            Backend::Raw(file) => file.read_exact_at(buf, offset),
            Backend::Image(image) => image.read(buf, offset),
        };
        result.map_err(|e| self.io_error("read", offset, len, e))
    }

    /// Writes `buf` at `offset` (into the top layer).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.check_writable()?;
        self.check_range("write", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        let result = match &self.backend {
            Backend::Raw(file) => file.write_all_at(buf, offset),
            Backend::Image(image) => image.write(buf, offset),
        };
        // Marked after the data is in place (and also after a failed write, which may have
        // changed part of the range), so a concurrent take_dirty never clears a block before
        // its new contents can be read.
        self.dirty.mark(offset, len);
        result.map_err(|e| self.io_error("write", offset, len, e))
    }

    /// Makes `[offset, offset + len)` read as zeroes (into the top layer).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_writable()?;
        self.check_range("zero", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let result = match &self.backend {
            Backend::Raw(file) => zero_raw(file, offset, len),
            Backend::Image(image) => image.write_zeroes(offset, len),
        };
        self.dirty.mark(offset, len);
        result.map_err(|e| self.io_error("zero", offset, len, e))
    }

    /// Writes cached metadata and makes all completed writes durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        let result = match &self.backend {
            Backend::Raw(file) => file.sync_data(),
            Backend::Image(image) => image.flush().and_then(|()| image.sync()),
        };
        result.map_err(|source| DiskError::Flush {
            path: self.path.clone(),
            source,
        })
    }

    /// Returns the blocks written since the previous call (or since the disk was opened) and
    /// starts a new round. Granularity: [`DIRTY_BLOCK_SIZE`].
    pub fn take_dirty(&self) -> DirtyBlocks {
        self.dirty.take()
    }

    /// Marks the whole disk as written, so the next [`Disk::take_dirty`] returns every block
    /// (e.g. to restart a mirror from scratch).
    pub fn mark_all_dirty(&self) {
        self.dirty.mark_all();
    }

    /// The number of blocks written since the last [`Disk::take_dirty`], without clearing them.
    pub fn dirty_count(&self) -> u64 {
        self.dirty.count()
    }

    /// The parts of the top layer that hold data of their own, in order, adjacent parts of the
    /// same kind merged: for qcow2 the allocated clusters (data, compressed or zero clusters;
    /// everything else comes from the backing chain or reads as zeroes), for a raw file its
    /// data extents (holes of a sparse file are left out).
    pub fn allocated(&self) -> Result<Vec<Extent>, DiskError> {
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |offset: u64, len: u64, zero: bool| match out.last_mut() {
            Some(last) if last.zero == zero && last.offset + last.len == offset => {
                last.len += len;
            }
            _ => out.push(Extent { offset, len, zero }),
        };
        match &self.backend {
            Backend::Raw(file) => {
                for (offset, len) in raw_data_extents(file, self.size)
                    .map_err(|e| self.io_error("map", 0, self.size, e))?
                {
                    push(offset, len, false);
                }
            }
            Backend::Image(image) => {
                let mut offset = 0;
                while offset < self.size {
                    let (mapping, len) = image
                        .get_shallow_mapping(offset, self.size - offset)
                        .map_err(|e| self.io_error("map", offset, self.size - offset, e))?;
                    if len == 0 {
                        break;
                    }
                    match mapping {
                        ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => {
                            push(offset, len, false);
                        }
                        ShallowMapping::Zero { explicit: true, .. } => push(offset, len, true),
                        ShallowMapping::Zero {
                            explicit: false, ..
                        }
                        | ShallowMapping::Indirect { .. } => {}
                        ShallowMapping::Eof { .. } => break,
                        // A mapping kind newer than this code: copy it as data to be safe.
                        _ => push(offset, len, false),
                    }
                    offset += len;
                }
            }
        }
        Ok(out)
    }
}

/// Builds imago's view of a chain from files that [`chain::walk`] opened and locked, bottom
/// up, each layer handed explicitly to the one above (no file is opened behind our back).
fn open_image_chain(
    walked: chain::Walked,
    writable: bool,
) -> Result<FormatAccess<imago::file::File>, DiskError> {
    let mut below: Option<FormatAccess<imago::file::File>> = None;
    let bottom_up = walked.parents.into_iter().rev().map(|l| (l, false));
    for (layer, is_top) in bottom_up.chain(std::iter::once((walked.top, true))) {
        let write = is_top && writable;
        let path = layer.info.path;
        let driver_err = |source| DiskError::Driver {
            path: path.clone(),
            source,
        };
        let storage = imago::file::File::from_open_file(
            layer.file,
            StorageOpenOptions::new().write(write).filename(&path),
        )
        .map_err(driver_err)?;
        let access = match layer.info.format {
            DiskFormat::Raw => FormatAccess::new(
                Raw::builder(storage)
                    .write(write)
                    .open(DenyImplicitOpenGate::default())
                    .map_err(driver_err)?,
            ),
            DiskFormat::Qcow2 => FormatAccess::new(
                Qcow2::<imago::file::File>::builder(storage)
                    .write(write)
                    .backing(below.take())
                    .data_file(None)
                    .open(DenyImplicitOpenGate::default())
                    .map_err(driver_err)?,
            ),
        };
        if is_top {
            return Ok(access);
        }
        below = Some(access);
    }
    // The top is the last element of the iteration and returns above.
    Err(DiskError::Open {
        path: PathBuf::new(),
        source: io::Error::other("no top layer"),
    })
}

/// Zeroes a range of a raw file: the file system's zero-range operation where it has one,
/// otherwise by writing zeroes.
fn zero_raw(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    if fallocate(
        file,
        FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off,
        l,
    )
    .is_ok()
    {
        return Ok(());
    }
    let chunk = vec![0u8; usize::try_from(len.min(1 << 20)).unwrap_or(1 << 20)];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = usize::try_from((end - at).min(1 << 20)).unwrap_or(1 << 20);
        file.write_all_at(chunk.get(..n).unwrap_or(&chunk), at)?;
        at += u64::try_from(n).unwrap_or(0);
    }
    Ok(())
}

/// The data extents of a (possibly sparse) raw file up to `size`, via SEEK_DATA/SEEK_HOLE;
/// where the file system cannot say, the whole range counts as data.
fn raw_data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let at = i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let data = match lseek(file, at, Whence::SeekData) {
            Ok(d) => u64::try_from(d).unwrap_or(size),
            Err(nix::errno::Errno::ENXIO) => break, // no data after pos
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP) => {
                out.push((pos, size - pos));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let at = i64::try_from(data).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let hole = match lseek(file, at, Whence::SeekHole) {
            Ok(h) => u64::try_from(h).unwrap_or(size).min(size),
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            out.push((data, size - data));
            break;
        }
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}
