//! Backing chains across a move: what the source sends, where the destination puts each
//! layer, which layers it already has, and how it rebuilds the chain.
//!
//! Layers are numbered as in the protocol's DiskLayer message: 0 is the base, the highest is
//! the active layer (the one the guest writes).
//!
//! - **Source** ([`describe_chain`]): every layer with its format, sizes, backing reference
//!   as written, and for the read-only parents the SHA-256 of the file.
//! - **Destination** ([`plan_destination`]): the active layer goes to the requested file,
//!   every parent next to it under its own file name; each path passes the storage-root
//!   policy. A layer's backing reference is rewritten for the destination folder: a relative
//!   reference stays relative (the parent's file name), an absolute one becomes the parent's
//!   new absolute path. A parent already at its destination is **reused** when it is
//!   identical, which is decided by checksum, never by name: the SHA-256 of the file there,
//!   with its backing reference read as the source's, must equal the source's checksum, and
//!   its actual reference must be the one this plan would write.
//! - Parents are copied byte for byte into `<file>.vmgate-partial` ([`begin_file`] +
//!   [`crate::storage::mirror::copy_file`]), checked against what the source announced (a
//!   copied parent whose header names another backing file is refused), their backing
//!   reference is rewritten if needed, and they are renamed into place ([`finish_parent`]),
//!   base first. The active layer is created empty on top of them ([`create_active`]), its
//!   whole chain is opened beneath the roots and must be exactly the planned files
//!   ([`verify_chain`]); it is filled by the mirror, then renamed ([`commit_file`]). A
//!   [`Cleanup`] removes everything created if the move does not complete.
//! - Everything happens in the chain's folder held open beneath its storage root
//!   ([`ChainFolder`]): folders and files are created owner-only (0700/0600), renames never
//!   replace a file, and every name is reserved ([`super::reserve`]) before it is written, so
//!   two moves never touch each other's files.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::beneath::{Entry, Folder};
use super::paths::{CheckedPath, StoragePathError, StorageRoots, partial_path};
use super::reserve::{Reservation, ReserveError, Use, folder_in_use};
use crate::disk::{
    Disk, DiskChain, DiskError, DiskFormat, DiskSpec, FileId, Sha256Digest, format_qcow2,
    format_raw,
};

/// Longest backing reference a qcow2 header holds (QEMU's limit).
const MAX_BACKING_NAME: usize = 1023;
/// Largest first cluster read (qcow2's largest cluster size).
const MAX_CLUSTER: u64 = 2 << 20;

/// Errors of chain planning and layer creation. Messages name the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A destination path was refused.
    #[error("the destination is not allowed")]
    Path(#[from] StoragePathError),
    /// A chain without layers.
    #[error("the disk has no layers")]
    EmptyChain,
    /// Computing a checksum failed.
    #[error("cannot compute the checksum of layer {layer}")]
    Checksum {
        /// The layer.
        layer: u32,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// Two layers would get the same destination file.
    #[error(
        "layers {first} and {second} of the chain would both be written to {}; rename one of them at the source",
        .path.display()
    )]
    NameClash {
        /// The file.
        path: PathBuf,
        /// One layer.
        first: u32,
        /// The other.
        second: u32,
    },
    /// A different file is where a parent should go. Says nothing of what the file holds.
    #[error(
        "{} already exists at the destination and is not identical to layer {layer} of the disk; remove it or choose another destination",
        .path.display()
    )]
    Conflict {
        /// The file.
        path: PathBuf,
        /// The layer.
        layer: u32,
    },
    /// A copied parent is not what the source announced: its header names another backing
    /// file (or another format). Says nothing of what it names.
    #[error(
        "layer {layer} of the disk ({}) is not what the source announced: {what}; the move is refused",
        .path.display()
    )]
    NotAnnounced {
        /// The file at the destination.
        path: PathBuf,
        /// The layer.
        layer: u32,
        /// What differs.
        what: &'static str,
    },
    /// The chain opened at the destination is not the planned one.
    #[error(
        "the backing chain of {} does not consist of the files this move placed ({what}); the move is refused",
        .path.display()
    )]
    ChainMismatch {
        /// The active layer.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// A destination name is in use by another move.
    #[error("the destination is in use")]
    Reserved(#[from] ReserveError),
    /// A qcow2 header whose backing reference cannot be rewritten.
    #[error("cannot rewrite the backing reference of {}: {reason}", .path.display())]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// A file operation failed.
    #[error("cannot {op} {}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating or opening a destination image failed.
    #[error("cannot prepare the destination image {}", .path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// Not enough free space at the destination.
    #[error(
        "the destination {} has {available} bytes free but the move needs {needed}; free some space or choose another destination",
        .path.display()
    )]
    NoSpace {
        /// The destination folder (or its deepest existing ancestor).
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The caller's cancel flag was raised.
    #[error("the move was cancelled")]
    Cancelled,
}

/// One layer as the source describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceLayer {
    /// Index in the chain, 0 = base; the highest is the active layer.
    pub layer: u32,
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// The disk size it presents.
    pub virtual_size: u64,
    /// The file's length.
    pub file_size: u64,
    /// Bytes the file occupies on disk (a sparse copy needs about as much).
    pub allocated_bytes: u64,
    /// SHA-256 of the file: read-only parents only (the active layer keeps changing).
    pub checksum: Option<Sha256Digest>,
    /// The backing reference exactly as written in the header (None for the base).
    pub backing_name: Option<PathBuf>,
    /// The file itself, when it is a local one (the source's layers).
    #[serde(skip)]
    pub id: Option<FileId>,
}

/// A disk's chain as the source describes it, base first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourcePlan {
    /// The layers, base first; the last is the active layer. Never empty.
    pub layers: Vec<SourceLayer>,
}

impl SourcePlan {
    /// The active layer.
    pub fn active(&self) -> Option<&SourceLayer> {
        self.layers.last()
    }

    /// The read-only parents, base first.
    pub fn parents(&self) -> &[SourceLayer] {
        self.layers
            .split_last()
            .map_or(&[][..], |(_, parents)| parents)
    }
}

/// What the destination does with a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerAction {
    /// A read-only parent to copy byte for byte.
    Copy,
    /// A read-only parent the destination already has, identical: not sent.
    Reuse,
    /// The active layer: created empty on the parents, filled by the mirror.
    Mirror,
}

/// One layer at the destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestLayer {
    /// Index in the chain, 0 = base.
    pub layer: u32,
    /// Where it ends up.
    pub path: PathBuf,
    /// Where it is written until complete.
    pub partial: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// The disk size it presents.
    pub virtual_size: u64,
    /// For copied parents: the file's length.
    pub file_size: u64,
    /// The backing reference written into its header (None for the base).
    pub backing_name: Option<PathBuf>,
    /// The format of the layer below (None for the base).
    pub backing_format: Option<DiskFormat>,
    /// The source's reference, when it differs from `backing_name` (the header is rewritten).
    pub source_backing_name: Option<PathBuf>,
    /// The source's checksum (parents).
    pub checksum: Option<Sha256Digest>,
    /// What happens to it.
    pub action: LayerAction,
}

/// Where a disk's chain goes at the destination, base first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestinationPlan {
    /// The layers, base first; the last is the active layer.
    pub layers: Vec<DestLayer>,
    /// Folders to create first, outermost first.
    pub folders: Vec<PathBuf>,
    /// Bytes the destination needs (copied parents plus `active_bytes` given to the plan).
    pub bytes_needed: u64,
}

impl DestinationPlan {
    /// The active layer.
    pub fn active(&self) -> Option<&DestLayer> {
        self.layers.last()
    }

    /// The folder the chain goes to.
    pub fn folder(&self) -> Option<&Path> {
        self.active().and_then(|l| l.path.parent())
    }
}

/// Describes the chain of an open disk (`chain` from [`Disk::layers`] or
/// [`crate::disk::chain`], top first), computing the parents' checksums. Reads every parent
/// in full; `cancel` is checked between layers.
pub fn describe_chain(chain: &DiskChain, cancel: &AtomicBool) -> Result<SourcePlan, PlanError> {
    if chain.layers.is_empty() {
        return Err(PlanError::EmptyChain);
    }
    let count = chain.layers.len();
    let mut layers = Vec::with_capacity(count);
    for (top_index, info) in chain.layers.iter().enumerate().rev() {
        if cancel.load(Ordering::Relaxed) {
            return Err(PlanError::Cancelled);
        }
        let layer = u32::try_from(count - 1 - top_index).unwrap_or(u32::MAX);
        let is_active = top_index == 0;
        let meta = std::fs::metadata(&info.path).map_err(|source| PlanError::Io {
            op: "inspect",
            path: info.path.clone(),
            source,
        })?;
        let checksum = if is_active {
            None
        } else {
            Some(
                crate::disk::file_checksum(&info.path)
                    .map_err(|source| PlanError::Checksum { layer, source })?,
            )
        };
        layers.push(SourceLayer {
            layer,
            path: info.path.clone(),
            format: info.format,
            virtual_size: info.virtual_size,
            file_size: info.file_size,
            allocated_bytes: meta.blocks().saturating_mul(512),
            checksum,
            backing_name: info.backing_name.clone(),
            id: Some(info.id),
        });
    }
    Ok(SourcePlan { layers })
}

/// Plans the destination of a chain whose active layer goes to `active_path`; parents go
/// next to it under their own file names. Checks every path against `roots` and decides
/// reuse by checksum; writes nothing. `active_bytes` is what the active layer will occupy
/// (e.g. the bytes of its allocated blocks), for [`DestinationPlan::bytes_needed`].
pub fn plan_destination(
    source: &SourcePlan,
    active_path: &Path,
    roots: &StorageRoots,
    active_bytes: u64,
) -> Result<DestinationPlan, PlanError> {
    if source.layers.is_empty() {
        return Err(PlanError::EmptyChain);
    }
    let top: CheckedPath = roots.check_file(active_path, false)?;
    let folder = top
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut out: Vec<DestLayer> = Vec::new();
    let mut needed = active_bytes;
    for (i, l) in source.layers.iter().enumerate() {
        let is_active = i + 1 == source.layers.len();
        let path = if is_active {
            top.path.clone()
        } else {
            let name = l.path.file_name().ok_or_else(|| PlanError::Header {
                path: l.path.clone(),
                reason: "the layer's path has no file name",
            })?;
            folder.join(name)
        };
        if let Some(prev) = out.iter().find(|d| d.path == path) {
            return Err(PlanError::NameClash {
                path,
                first: prev.layer,
                second: l.layer,
            });
        }
        let below = out.last();
        let backing_name = match (&l.backing_name, below) {
            (Some(name), Some(below)) => Some(destination_reference(name, &below.path)),
            _ => None,
        };
        let source_backing_name = match (&l.backing_name, &backing_name) {
            (Some(s), Some(d)) if s != d => Some(s.clone()),
            _ => None,
        };
        let action = if is_active {
            LayerAction::Mirror
        } else {
            let checked = roots.check_file(&path, true)?;
            if checked.exists {
                verify_reuse(roots, &path, l, backing_name.as_deref())?;
                LayerAction::Reuse
            } else {
                needed = needed.saturating_add(l.allocated_bytes);
                LayerAction::Copy
            }
        };
        out.push(DestLayer {
            layer: l.layer,
            partial: partial_path(&path),
            path,
            format: l.format,
            virtual_size: l.virtual_size,
            file_size: l.file_size,
            backing_name,
            backing_format: below.map(|b| b.format),
            source_backing_name,
            checksum: l.checksum,
            action,
        });
    }
    Ok(DestinationPlan {
        layers: out,
        folders: top.missing_folders,
        bytes_needed: needed,
    })
}

/// The reference to write at the destination for a source reference `name` to a parent
/// now at `parent`: relative stays relative (the file name, as parents sit next to the
/// layer), absolute becomes the new absolute path.
fn destination_reference(name: &Path, parent: &Path) -> PathBuf {
    let bytes = name.as_os_str().as_bytes();
    let plain = bytes
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case(b"file:"))
        .and_then(|_| bytes.get(5..))
        .map_or(name, |rest| Path::new(std::ffi::OsStr::from_bytes(rest)));
    if plain.is_absolute() {
        parent.to_path_buf()
    } else {
        parent
            .file_name()
            .map_or_else(|| parent.to_path_buf(), PathBuf::from)
    }
}

/// Checks that the file at `path` (opened beneath `roots`) is the source parent `l` with
/// `reference` as its backing reference (what [`plan_destination`] writes): its actual
/// reference must be `reference`, and its SHA-256, with the reference read as the source's,
/// must be the source's checksum. [`PlanError::Conflict`] otherwise, which says nothing of
/// what the file holds. This is the reuse decision of [`plan_destination`].
pub fn verify_reuse(
    roots: &StorageRoots,
    path: &Path,
    l: &SourceLayer,
    reference: Option<&Path>,
) -> Result<(), PlanError> {
    let Some(expected) = l.checksum else {
        return Err(PlanError::EmptyChain);
    };
    let conflict = || PlanError::Conflict {
        path: path.to_path_buf(),
        layer: l.layer,
    };
    let mut file = roots.open_beneath(path, false)?;
    if l.format == DiskFormat::Qcow2 && l.backing_name.is_some() {
        // An unreadable header is just "not identical": nothing of the file is told.
        let here = read_backing_name(&file, path).map_err(|_| conflict())?;
        if here.as_deref() != reference {
            return Err(conflict());
        }
    }
    let found = match (&l.backing_name, reference) {
        (Some(src), Some(dst)) if src.as_path() != dst => {
            checksum_with_backing(&mut file, path, src.as_os_str().as_bytes())?
        }
        _ => sha256_of(&mut file, path, 0, Sha256::new())?,
    };
    if found != expected {
        return Err(conflict());
    }
    Ok(())
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PlanError + 'a {
    move |source| PlanError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a qcow2 file's first cluster (the header, its extensions and the backing name).
fn read_first_cluster(file: &File, path: &Path) -> Result<Vec<u8>, PlanError> {
    let size = file.metadata().map_err(io_err("inspect", path))?.len();
    let mut fixed = [0u8; 24];
    file.read_exact_at(&mut fixed, 0)
        .map_err(io_err("read the header of", path))?;
    if fixed.get(..4) != Some(b"QFI\xfb".as_slice()) {
        return Err(PlanError::Header {
            path: path.to_path_buf(),
            reason: "it is not a qcow2 image",
        });
    }
    let bits = u32::from_be_bytes([fixed[20], fixed[21], fixed[22], fixed[23]]);
    if !(9..=21).contains(&bits) {
        return Err(PlanError::Header {
            path: path.to_path_buf(),
            reason: "its cluster size is invalid",
        });
    }
    let len = (1u64 << bits).min(MAX_CLUSTER).min(size);
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_exact_at(&mut buf, 0)
        .map_err(io_err("read the header of", path))?;
    Ok(buf)
}

/// Where the backing name sits in a first cluster: (offset, length).
fn backing_slot(cluster: &[u8]) -> Option<(usize, usize)> {
    let off = u64::from_be_bytes(cluster.get(8..16)?.try_into().ok()?);
    let len = u32::from_be_bytes(cluster.get(16..20)?.try_into().ok()?);
    if off == 0 {
        return None;
    }
    Some((usize::try_from(off).ok()?, usize::try_from(len).ok()?))
}

/// The backing reference in the header of the open qcow2 `file` (named `path` in messages).
fn read_backing_name(file: &File, path: &Path) -> Result<Option<PathBuf>, PlanError> {
    let cluster = read_first_cluster(file, path)?;
    Ok(backing_slot(&cluster).and_then(|(off, len)| {
        cluster
            .get(off..off.checked_add(len)?)
            .map(|b| PathBuf::from(std::ffi::OsStr::from_bytes(b)))
    }))
}

/// The first cluster with its backing reference replaced by `name`. Only the name's bytes
/// and its length field change, so the rewrite is reversible: the bytes a longer name covers
/// must be zero (nothing else lives after the name in the header cluster).
fn patch_backing(cluster: &[u8], path: &Path, name: &[u8]) -> Result<Vec<u8>, PlanError> {
    let bad = |reason| PlanError::Header {
        path: path.to_path_buf(),
        reason,
    };
    let (off, old) = backing_slot(cluster).ok_or(bad("it has no backing reference"))?;
    if name.is_empty() || name.len() > MAX_BACKING_NAME {
        return Err(bad("the new reference is empty or longer than 1023 bytes"));
    }
    let end = off
        .checked_add(old.max(name.len()))
        .filter(|&e| e <= cluster.len())
        .ok_or(bad("the new reference does not fit in the header cluster"))?;
    let tail = cluster.get(off + old..end).unwrap_or(&[]);
    if tail.iter().any(|&b| b != 0) {
        return Err(bad("other header data follows the reference"));
    }
    let mut out = cluster.to_vec();
    let slot = out
        .get_mut(off..end)
        .ok_or(bad("the header is truncated"))?;
    slot.fill(0);
    slot.get_mut(..name.len())
        .ok_or(bad("the header is truncated"))?
        .copy_from_slice(name);
    let len = u32::try_from(name.len()).map_err(|_| bad("the new reference is too long"))?;
    out.get_mut(16..20)
        .ok_or(bad("the header is truncated"))?
        .copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// SHA-256 of the open qcow2 `file` as it would be with backing reference `name`.
pub fn checksum_with_backing(
    file: &mut File,
    path: &Path,
    name: &[u8],
) -> Result<Sha256Digest, PlanError> {
    let cluster = read_first_cluster(file, path)?;
    let patched = patch_backing(&cluster, path, name)?;
    let mut hasher = Sha256::new();
    hasher.update(&patched);
    let skip = u64::try_from(cluster.len()).unwrap_or(u64::MAX);
    sha256_of(file, path, skip, hasher)
}

/// Feeds `file` from `from` to its end into `hasher`.
fn sha256_of(
    file: &mut File,
    path: &Path,
    from: u64,
    mut hasher: Sha256,
) -> Result<Sha256Digest, PlanError> {
    io::Seek::seek(file, io::SeekFrom::Start(from)).map_err(io_err("read", path))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match io::Read::read(file, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", path)(e)),
        };
        hasher.update(buf.get(..n).unwrap_or(&[]));
    }
    Ok(Sha256Digest(hasher.finalize().into()))
}

/// Rewrites the backing reference of the qcow2 file at `path` to `name` (like
/// `qemu-img rebase -u`: the data is not touched).
pub fn rewrite_backing(path: &Path, name: &[u8]) -> Result<(), PlanError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    rewrite_backing_of(&file, path, name)
}

/// The same on an open file (named `path` in messages).
fn rewrite_backing_of(file: &File, path: &Path, name: &[u8]) -> Result<(), PlanError> {
    let cluster = read_first_cluster(file, path)?;
    let patched = patch_backing(&cluster, path, name)?;
    file.write_all_at(&patched, 0)
        .map_err(io_err("write the header of", path))?;
    Ok(())
}

/// Removes what a move created unless it completed ([`Cleanup::disarm`]): files first, newest
/// first, then the folders it created (only if they are empty and no other move works in
/// them). Everything is removed through the folders held open, never by path. It also holds
/// the move's reservations of destination names ([`super::reserve`]) until it is dropped, or
/// until its files are removed: another move never gets a name this one may still remove.
#[derive(Debug)]
pub struct Cleanup {
    files: Vec<(Arc<Folder>, OsString)>,
    folders: Vec<(Arc<Folder>, OsString)>,
    reservations: Vec<Reservation>,
    armed: bool,
}

impl Cleanup {
    /// An armed, empty cleanup.
    pub fn new() -> Cleanup {
        Cleanup {
            files: Vec::new(),
            folders: Vec::new(),
            reservations: Vec::new(),
            armed: true,
        }
    }

    /// Holds `reservation` until the move's files are removed or the cleanup is dropped.
    pub fn hold(&mut self, reservation: Reservation) {
        self.reservations.push(reservation);
    }

    /// Removes `name` in `folder` on failure.
    pub fn file(&mut self, folder: &Arc<Folder>, name: &OsStr) {
        self.files.push((Arc::clone(folder), name.to_os_string()));
    }

    /// Creates the missing folders of `folder` beneath `roots` (owner-only), to be removed on
    /// failure; returns it, open.
    pub fn create_folders(
        &mut self,
        roots: &StorageRoots,
        folder: &Path,
    ) -> Result<Arc<Folder>, PlanError> {
        let (dir, created) = roots.create_folders(folder)?;
        self.folders.extend(created);
        Ok(Arc::new(dir))
    }

    /// The move completed: keep everything.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Removes what was created now (also done on drop while armed).
    pub fn run(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        for (dir, name) in self.files.drain(..).rev() {
            let _ = dir.remove_file(&name);
        }
        // Our names are free again; a folder another move works in now stays.
        self.reservations.clear();
        for (parent, name) in self.folders.drain(..).rev() {
            let busy = parent
                .folder(&name)
                .and_then(|f| f.id())
                .is_ok_and(folder_in_use);
            if !busy {
                let _ = parent.remove_folder(&name);
            }
        }
    }
}

impl Default for Cleanup {
    fn default() -> Self {
        Cleanup::new()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// The folder a chain goes to: created (owner-only) and held open beneath its storage root,
/// with every name of the chain reserved for this move ([`super::reserve`]; the
/// [`Cleanup`] holds the reservation).
#[derive(Debug)]
pub struct ChainFolder {
    folder: Arc<Folder>,
    roots: StorageRoots,
}

impl ChainFolder {
    /// Creates the plan's missing folders (registered with `cleanup`), opens its folder
    /// beneath `roots` and reserves every layer's name there (held by `cleanup`): written
    /// layers exclusively, reused parents shared. No file is created if a name is taken.
    pub fn prepare(
        roots: &StorageRoots,
        plan: &DestinationPlan,
        cleanup: &mut Cleanup,
    ) -> Result<ChainFolder, PlanError> {
        let folder_path = plan.folder().ok_or(PlanError::EmptyChain)?;
        let folder = cleanup.create_folders(roots, folder_path)?;
        let mut reservation = Reservation::new();
        for l in &plan.layers {
            let how = match l.action {
                LayerAction::Reuse => Use::Reuse,
                LayerAction::Copy | LayerAction::Mirror => Use::Write,
            };
            reservation.take(&folder, name_of(&l.path)?, how)?;
        }
        cleanup.hold(reservation);
        Ok(ChainFolder {
            folder,
            roots: roots.clone(),
        })
    }

    /// The folder, open.
    pub fn folder(&self) -> &Arc<Folder> {
        &self.folder
    }
}

fn name_of(path: &Path) -> Result<&OsStr, PlanError> {
    path.file_name().ok_or_else(|| {
        PlanError::Path(StoragePathError::NoFileName {
            path: path.to_path_buf(),
        })
    })
}

/// Creates `layer.partial` in `dir` (replacing a leftover partial file of an earlier attempt)
/// with the layer's file length, sparse, owner-only, registered with `cleanup`; returns it
/// open for writing.
pub fn begin_file(
    dir: &ChainFolder,
    layer: &DestLayer,
    cleanup: &mut Cleanup,
) -> Result<File, PlanError> {
    let name = name_of(&layer.partial)?;
    remove_leftover(dir, &layer.partial)?;
    let file = dir
        .folder
        .create_file(name)
        .map_err(io_err("create", &layer.partial))?;
    cleanup.file(&dir.folder, name);
    file.set_len(layer.file_size)
        .map_err(io_err("size", &layer.partial))?;
    Ok(file)
}

/// Removes a leftover partial file (a regular file only; the name is reserved by this move).
fn remove_leftover(dir: &ChainFolder, partial: &Path) -> Result<(), PlanError> {
    let name = name_of(partial)?;
    match dir.folder.entry(name) {
        Ok(Entry::File(_)) => dir
            .folder
            .remove_file(name)
            .map_err(io_err("remove the leftover", partial)),
        Ok(Entry::Missing) => Ok(()),
        Ok(_) => Err(PlanError::Path(StoragePathError::NotAFile {
            path: partial.to_path_buf(),
        })),
        Err(e) => Err(io_err("inspect", partial)(e)),
    }
}

/// Completes a copied parent (still open as `file`): checks that it is what the source
/// announced (its header names the announced backing file and format; a raw layer holds no
/// qcow2 header), rewrites its backing reference if the plan says so, makes it durable, and
/// renames it into place (registered with `cleanup`).
pub fn finish_parent(
    dir: &ChainFolder,
    layer: &DestLayer,
    file: &File,
    cleanup: &mut Cleanup,
) -> Result<(), PlanError> {
    check_announced(layer, file)?;
    if let (Some(_), Some(name)) = (&layer.source_backing_name, &layer.backing_name) {
        rewrite_backing_of(file, &layer.partial, name.as_os_str().as_bytes())?;
    }
    file.sync_all().map_err(io_err("flush", &layer.partial))?;
    commit_file(dir, &layer.partial, &layer.path, cleanup)
}

/// Checks a copied parent's header against the announcement (see [`finish_parent`]).
fn check_announced(layer: &DestLayer, file: &File) -> Result<(), PlanError> {
    let refuse = |what| PlanError::NotAnnounced {
        path: layer.path.clone(),
        layer: layer.layer,
        what,
    };
    let header = crate::disk::read_layer_header(file, &layer.partial)
        .map_err(|_| refuse("its header cannot be used"))?;
    let announced = layer
        .source_backing_name
        .as_ref()
        .or(layer.backing_name.as_ref());
    match layer.format {
        DiskFormat::Raw if header.qcow2 => Err(refuse(
            "it was announced as a raw image but holds a qcow2 header",
        )),
        DiskFormat::Raw => Ok(()),
        DiskFormat::Qcow2 if !header.qcow2 => {
            Err(refuse("it was announced as a qcow2 image but is not one"))
        }
        DiskFormat::Qcow2 => {
            if header.backing_name.as_ref() != announced {
                return Err(refuse(
                    "its header names another backing file than the one announced",
                ));
            }
            let format_ok = matches!(
                (header.backing_format.as_deref(), layer.backing_format),
                (None, _)
                    | (Some("qcow2"), Some(DiskFormat::Qcow2))
                    | (Some("raw" | "file"), Some(DiskFormat::Raw))
            );
            if !format_ok {
                return Err(refuse(
                    "its header names another backing format than the one announced",
                ));
            }
            Ok(())
        }
    }
}

/// Renames `partial` to `path` (both in `dir`; `path` must not exist, and is never
/// replaced) and makes the rename durable, registered with `cleanup`. The file may stay open
/// and be written further (the active layer is renamed before the mirror's final pass, which
/// flushes its data).
pub fn commit_file(
    dir: &ChainFolder,
    partial: &Path,
    path: &Path,
    cleanup: &mut Cleanup,
) -> Result<(), PlanError> {
    let name = name_of(path)?;
    match dir.folder.rename_new(name_of(partial)?, name) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            return Err(PlanError::Path(StoragePathError::Exists {
                path: path.to_path_buf(),
            }));
        }
        Err(e) => return Err(io_err("rename into place", partial)(e)),
    }
    cleanup.file(&dir.folder, name);
    let _ = dir.folder.sync();
    Ok(())
}

/// Creates the active layer as `layer.partial` in `dir` (raw, or qcow2 on the destination
/// parents with the planned backing reference), owner-only, registered with `cleanup`, checks
/// that its whole chain opened beneath the roots is the planned one ([`verify_chain`]), and
/// opens it for writing beneath the roots.
pub fn create_active(
    dir: &ChainFolder,
    plan: &DestinationPlan,
    cleanup: &mut Cleanup,
) -> Result<Disk, PlanError> {
    let layer = plan.active().ok_or(PlanError::EmptyChain)?;
    let name = name_of(&layer.partial)?;
    remove_leftover(dir, &layer.partial)?;
    let image_err = |source| PlanError::Image {
        path: layer.partial.clone(),
        source,
    };
    let file = dir.folder.create_file(name).map_err(|source| {
        image_err(DiskError::Create {
            path: layer.partial.clone(),
            source,
        })
    })?;
    cleanup.file(&dir.folder, name);
    match (layer.format, &layer.backing_name, layer.backing_format) {
        (DiskFormat::Raw, _, _) => format_raw(&file, &layer.partial, layer.virtual_size),
        (DiskFormat::Qcow2, Some(backing), Some(format)) => format_qcow2(
            file,
            &layer.partial,
            layer.virtual_size,
            Some(&DiskSpec {
                path: backing.clone(),
                format,
            }),
        ),
        (DiskFormat::Qcow2, _, _) => format_qcow2(file, &layer.partial, layer.virtual_size, None),
    }
    .map_err(image_err)?;
    verify_chain(dir, plan, &layer.partial)?;
    open_layer(&dir.roots, &layer.partial, layer.format)
}

/// Checks that the chain of the active layer at `active` (its partial or final name), every
/// file opened beneath the roots, is exactly the plan's: the same files (by device and
/// inode, as found in the chain's folder), in order, in the planned formats. A backing
/// reference that leads anywhere else — outside the roots, or to another file inside them —
/// is refused.
pub fn verify_chain(
    dir: &ChainFolder,
    plan: &DestinationPlan,
    active: &Path,
) -> Result<(), PlanError> {
    let active_layer = plan.active().ok_or(PlanError::EmptyChain)?;
    let mismatch = |what: String| PlanError::ChainMismatch {
        path: active_layer.path.clone(),
        what,
    };
    let chain = crate::disk::chain_in(
        &DiskSpec {
            path: active.to_path_buf(),
            format: active_layer.format,
        },
        &dir.roots,
    )
    .map_err(|source| PlanError::Image {
        path: active_layer.path.clone(),
        source,
    })?;
    if chain.layers.len() != plan.layers.len() {
        return Err(mismatch(format!(
            "{} layers found, {} placed",
            chain.layers.len(),
            plan.layers.len()
        )));
    }
    // The chain is top first, the plan base first.
    for (found, placed) in chain.layers.iter().rev().zip(&plan.layers) {
        let is_active = std::ptr::eq(placed, active_layer);
        let name = if is_active {
            name_of(active)?
        } else {
            name_of(&placed.path)?
        };
        let id = match dir.folder.entry(name) {
            Ok(Entry::File(id)) => id,
            _ => return Err(mismatch(format!("layer {} is missing", placed.layer))),
        };
        if found.id != id {
            return Err(mismatch(format!(
                "layer {} is another file than the one placed",
                placed.layer
            )));
        }
        if found.format != placed.format {
            return Err(mismatch(format!(
                "layer {} is read as another format than announced",
                placed.layer
            )));
        }
    }
    Ok(())
}

/// Opens a destination active layer for writing, beneath `roots`.
pub fn open_layer(
    roots: &StorageRoots,
    path: &Path,
    format: DiskFormat,
) -> Result<Disk, PlanError> {
    Disk::open_in(
        &DiskSpec {
            path: path.to_path_buf(),
            format,
        },
        true,
        roots,
    )
    .map_err(|source| PlanError::Image {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks that the file system holding `folder` (or its deepest existing ancestor) has
/// `needed` bytes free.
pub fn check_space(folder: &Path, needed: u64) -> Result<(), PlanError> {
    let mut probe = folder.to_path_buf();
    while !probe.exists() && probe.pop() {}
    let st = nix::sys::statvfs::statvfs(&probe).map_err(|e| PlanError::Io {
        op: "read the free space of",
        path: probe.clone(),
        source: io::Error::from(e),
    })?;
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let available = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
    if available < needed {
        return Err(PlanError::NoSpace {
            path: folder.to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::chain;
    use std::process::Command;

    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// base.raw <- mid.qcow2 (relative) <- top.qcow2 (absolute reference to mid).
    fn make_chain(dir: &Path) -> PathBuf {
        let base = dir.join("base.raw");
        std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
        let mid = dir.join("mid.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
        ]);
        let top = dir.join("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&mid),
            "-F",
            "qcow2",
            s(&top),
        ]);
        top
    }

    fn source_plan(top: &Path) -> SourcePlan {
        let c = chain(&DiskSpec {
            path: top.to_path_buf(),
            format: DiskFormat::Qcow2,
        })
        .unwrap();
        describe_chain(&c, &AtomicBool::new(false)).unwrap()
    }

    #[test]
    fn source_plan_lists_parents_first_with_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let top = make_chain(dir.path());
        let p = source_plan(&top);
        let names: Vec<_> = p
            .layers
            .iter()
            .map(|l| l.path.file_name().unwrap())
            .collect();
        assert_eq!(names, ["base.raw", "mid.qcow2", "top.qcow2"]);
        assert_eq!(
            p.layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(
            p.layers[0].checksum.unwrap(),
            crate::disk::file_checksum(&dir.path().join("base.raw")).unwrap()
        );
        assert!(p.layers[1].checksum.is_some());
        assert!(p.layers[2].checksum.is_none(), "the active layer changes");
        assert_eq!(p.parents().len(), 2);
        assert_eq!(p.active().unwrap().layer, 2);
        assert_eq!(
            p.layers[1].backing_name.as_deref(),
            Some(Path::new("base.raw"))
        );
    }

    #[test]
    fn destination_keeps_relative_references_and_rewrites_absolute_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::create_dir(dir.path().join("dst")).unwrap();
        let top = make_chain(&dir.path().join("src"));
        let roots = StorageRoots::new([dir.path().join("dst")]).unwrap();
        let dst = std::fs::canonicalize(dir.path().join("dst")).unwrap();
        let p = source_plan(&top);
        let d = plan_destination(&p, &dst.join("vm/top.qcow2"), &roots, 0).unwrap();
        assert_eq!(d.folders, vec![dst.join("vm")]);
        let folder = dst.join("vm");
        assert_eq!(d.layers[0].path, folder.join("base.raw"));
        assert_eq!(d.layers[0].backing_name, None);
        assert_eq!(
            d.layers[1].backing_name.as_deref(),
            Some(Path::new("base.raw"))
        );
        assert_eq!(
            d.layers[1].source_backing_name, None,
            "relative stays as is"
        );
        assert_eq!(d.layers[2].backing_name, Some(folder.join("mid.qcow2")));
        assert_eq!(
            d.layers[2].source_backing_name,
            Some(dir.path().join("src/mid.qcow2"))
        );
        assert_eq!(
            d.layers.iter().map(|l| l.action).collect::<Vec<_>>(),
            [LayerAction::Copy, LayerAction::Copy, LayerAction::Mirror]
        );
        assert_eq!(
            d.bytes_needed,
            p.layers[0].allocated_bytes + p.layers[1].allocated_bytes
        );
        // Outside the roots: refused before anything is written.
        let e = plan_destination(&p, &dir.path().join("src/x/top.qcow2"), &roots, 0).unwrap_err();
        assert!(
            matches!(e, PlanError::Path(StoragePathError::OutsideRoots { .. })),
            "{e}"
        );
        assert!(!dir.path().join("src/x").exists());
    }

    #[test]
    fn identical_parents_are_reused_by_checksum_and_different_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::create_dir(dir.path().join("dst")).unwrap();
        let top = make_chain(&dir.path().join("src"));
        let roots = StorageRoots::new([dir.path().join("dst")]).unwrap();
        let dst = std::fs::canonicalize(dir.path().join("dst")).unwrap();
        let p = source_plan(&top);

        // Same name, different bytes: refused, not reused.
        std::fs::write(dst.join("base.raw"), vec![0x12u8; 1 << 20]).unwrap();
        let e = plan_destination(&p, &dst.join("top.qcow2"), &roots, 0).unwrap_err();
        assert!(matches!(e, PlanError::Conflict { layer: 0, .. }), "{e}");
        assert!(e.to_string().contains("is not identical to layer 0"), "{e}");
        // Nothing of the destination's file is told: no checksum, of either file.
        let theirs = crate::disk::file_checksum(&dst.join("base.raw")).unwrap();
        for digest in [theirs, p.layers[0].checksum.unwrap()] {
            assert!(!e.to_string().contains(&digest.to_string()), "{e}");
            assert!(!e.to_string().contains(&digest.to_string()[..8]), "{e}");
        }

        // Identical bytes under the same name: reused.
        std::fs::copy(dir.path().join("src/base.raw"), dst.join("base.raw")).unwrap();
        // mid with the rewritten absolute reference of an earlier move: still identical.
        std::fs::copy(dir.path().join("src/mid.qcow2"), dst.join("mid.qcow2")).unwrap();
        let d = plan_destination(&p, &dst.join("top.qcow2"), &roots, 0).unwrap();
        assert_eq!(d.layers[0].action, LayerAction::Reuse);
        assert_eq!(d.layers[1].action, LayerAction::Reuse);
        assert_eq!(d.bytes_needed, 0);

        // A parent whose own reference would be rewritten (absolute source reference):
        // reuse compares its bytes with the source's reference read back.
        let abs = dir.path().join("src/top2.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&dir.path().join("src/mid.qcow2")),
            "-F",
            "qcow2",
            s(&abs),
        ]);
        let top3 = dir.path().join("src/top3.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "top2.qcow2",
            "-F",
            "qcow2",
            s(&top3),
        ]);
        let p3 = source_plan(&top3);
        let d3 = plan_destination(&p3, &dst.join("top3.qcow2"), &roots, 0).unwrap();
        assert_eq!(d3.layers[2].action, LayerAction::Copy);
        assert_eq!(d3.layers[2].backing_name, Some(dst.join("mid.qcow2")));
        // Make the copy as a move would, then plan again: reused.
        std::fs::copy(&abs, dst.join("top2.qcow2")).unwrap();
        rewrite_backing(
            &dst.join("top2.qcow2"),
            s(&dst.join("mid.qcow2")).as_bytes(),
        )
        .unwrap();
        qemu_img(&["check", "-q", s(&dst.join("top2.qcow2"))]);
        assert_ne!(
            crate::disk::file_checksum(&dst.join("top2.qcow2")).unwrap(),
            p3.layers[2].checksum.unwrap()
        );
        let d3 = plan_destination(&p3, &dst.join("top3.qcow2"), &roots, 0).unwrap();
        assert_eq!(d3.layers[2].action, LayerAction::Reuse);
        // The same bytes pointing elsewhere are not the same layer.
        rewrite_backing(&dst.join("top2.qcow2"), b"/elsewhere/mid.qcow2").unwrap();
        let e = plan_destination(&p3, &dst.join("top3.qcow2"), &roots, 0).unwrap_err();
        assert!(matches!(e, PlanError::Conflict { layer: 2, .. }), "{e}");
    }

    #[test]
    fn cleanup_removes_what_was_created_and_replaces_leftover_partials() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("dst")).unwrap();
        let top = make_chain(dir.path());
        let roots = StorageRoots::new([dir.path().join("dst")]).unwrap();
        let dst = std::fs::canonicalize(dir.path().join("dst")).unwrap();
        std::fs::write(dst.join("keep.txt"), b"not ours").unwrap();
        let d =
            plan_destination(&source_plan(&top), &dst.join("a/b/top.qcow2"), &roots, 0).unwrap();
        assert_eq!(d.folders, vec![dst.join("a"), dst.join("a/b")]);
        {
            let mut cleanup = Cleanup::new();
            let chain_dir = ChainFolder::prepare(&roots, &d, &mut cleanup).unwrap();
            // A partial file left by a crashed attempt is replaced.
            std::fs::write(&d.layers[0].partial, b"old partial").unwrap();
            let f = begin_file(&chain_dir, &d.layers[0], &mut cleanup).unwrap();
            assert_eq!(f.metadata().unwrap().len(), 1 << 20);
            finish_parent(&chain_dir, &d.layers[0], &f, &mut cleanup).unwrap();
            drop(f);
            assert!(d.layers[0].path.exists());
            // A second preparation of the same files (another move) is refused meanwhile.
            let mut other = Cleanup::new();
            let e = ChainFolder::prepare(&roots, &d, &mut other).unwrap_err();
            assert!(matches!(e, PlanError::Reserved(_)), "{e}");
            drop(other);
            assert!(
                d.layers[0].path.exists(),
                "the refused move removed nothing"
            );
            let disk = create_active(&chain_dir, &d, &mut cleanup);
            // mid is not there yet: the active layer cannot open its chain.
            assert!(disk.is_err());
            // Dropped while armed: everything created goes, the folders too.
        }
        assert!(!dst.join("a").exists());
        assert_eq!(std::fs::read(dst.join("keep.txt")).unwrap(), b"not ours");

        // Disarmed: kept.
        let mut cleanup = Cleanup::new();
        let chain_dir = ChainFolder::prepare(&roots, &d, &mut cleanup).unwrap();
        let f = begin_file(&chain_dir, &d.layers[0], &mut cleanup).unwrap();
        finish_parent(&chain_dir, &d.layers[0], &f, &mut cleanup).unwrap();
        drop(f);
        cleanup.disarm();
        drop(cleanup);
        assert!(d.layers[0].path.exists());
        assert!(!d.layers[0].partial.exists());
        // Owner-only, whatever the umask (tests/storage_modes.rs varies it).
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dst.join("a")), 0o700);
        assert_eq!(mode(&dst.join("a/b")), 0o700);
        assert_eq!(mode(&d.layers[0].path), 0o600);
    }

    #[test]
    fn backing_rewrite_is_reversible_and_bounded() {
        let mut cluster = vec![0u8; 4096];
        cluster[..4].copy_from_slice(b"QFI\xfb");
        cluster[8..16].copy_from_slice(&512u64.to_be_bytes());
        cluster[16..20].copy_from_slice(&8u32.to_be_bytes());
        cluster[512..520].copy_from_slice(b"base.raw");
        let p = Path::new("/x");
        let long = patch_backing(&cluster, p, b"/a/much/longer/path/base.raw").unwrap();
        assert_eq!(&long[512..540], b"/a/much/longer/path/base.raw");
        let back = patch_backing(&long, p, b"base.raw").unwrap();
        assert_eq!(back, cluster);
        let e = patch_backing(&cluster, p, &[b'a'; 1024]).unwrap_err();
        assert!(e.to_string().contains("longer than 1023"), "{e}");
        cluster[530] = 1;
        let e = patch_backing(&cluster, p, b"/a/much/longer/path/base.raw").unwrap_err();
        assert!(e.to_string().contains("other header data"), "{e}");
        let mut none = cluster.clone();
        none[8..16].fill(0);
        assert!(patch_backing(&none, p, b"x").is_err());
    }
}
