//! Backing chains: which files make up a disk, top layer first.
//!
//! A qcow2 image may name a backing file (relative names are relative to the directory of the
//! image that names them, as in QEMU); the chain ends at a layer without one. Walking it reads
//! only headers, through [`super::header`], and refuses loops, chains longer than
//! [`MAX_CHAIN_LAYERS`], missing files, and backing references that are not plain files
//! (`json:` descriptions, network protocols). [`Disk::open`](super::Disk::open) uses the same
//! walk, locking each file as it goes, and hands the opened files to the qcow2 driver, so what
//! is inspected is what is opened.
//!
//! Given the host's storage roots ([`chain_in`], [`super::Disk::open_in`]), every layer is
//! opened beneath them ([`StorageRoots::open_beneath`]): a disk path or backing reference that
//! leads outside the roots — absolute, through `..`, or through a symbolic link — is refused
//! ([`DiskError::OutsideRoots`]), and the refusal names the disk, never what a file holds.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::header::{self, HeaderError};
use super::lock::{self, LockMode};
use super::{DiskError, DiskFormat, DiskSpec, FileId, MAX_DISK_SIZE};
use crate::storage::paths::{StoragePathError, StorageRoots};

/// The longest backing chain accepted, top layer included.
pub const MAX_CHAIN_LAYERS: usize = 16;

/// The largest first cluster read to parse a header (qcow2's largest cluster size).
const MAX_HEADER_READ: u64 = 2 * 1024 * 1024;

/// One file of a disk's backing chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// The file, as an absolute path (symbolic links are not resolved).
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// The disk size this layer presents, in bytes.
    pub virtual_size: u64,
    /// The next layer down, resolved to an absolute path, if any.
    pub backing: Option<PathBuf>,
    /// The backing reference exactly as written in this layer's header (may be relative).
    pub backing_name: Option<PathBuf>,
    /// The file's length in bytes (for a sparse file, its apparent size).
    pub file_size: u64,
    /// The qcow2 cluster size, for qcow2 layers.
    pub cluster_size: Option<u64>,
    /// The file itself (device and inode) as it was opened.
    #[serde(default)]
    pub id: FileId,
}

/// A disk's backing chain, top (the layer the guest writes to) first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskChain {
    /// The layers, top first; never empty.
    pub layers: Vec<LayerInfo>,
}

impl DiskChain {
    /// The active (top) layer.
    pub fn top(&self) -> Option<&LayerInfo> {
        self.layers.first()
    }

    /// The read-only parents, nearest first (everything but the top).
    pub fn parents(&self) -> &[LayerInfo] {
        self.layers.get(1..).unwrap_or(&[])
    }

    /// The disk size the guest sees.
    pub fn virtual_size(&self) -> u64 {
        self.top().map_or(0, |l| l.virtual_size)
    }
}

/// Reads the backing chain of `spec` without opening it for I/O and without locking it (like
/// `qemu-img info --backing-chain -U`).
pub fn chain(spec: &DiskSpec) -> Result<DiskChain, DiskError> {
    let walked = walk(spec, false, false, None)?;
    Ok(DiskChain {
        layers: walked.infos(),
    })
}

/// The same, every layer opened beneath `roots`: a chain with a file outside them is refused.
pub fn chain_in(spec: &DiskSpec, roots: &StorageRoots) -> Result<DiskChain, DiskError> {
    let walked = walk(spec, false, false, Some(roots))?;
    Ok(DiskChain {
        layers: walked.infos(),
    })
}

/// The files of the chain of `spec` as far as it can be followed (headers only, no locks,
/// nothing confined): a broken chain gives the layers before the break. For telling which
/// files a VM that is off still needs.
pub fn chain_files(spec: &DiskSpec) -> Vec<(PathBuf, FileId)> {
    let mut out = Vec::new();
    let mut next = Some(spec.clone());
    while let Some(s) = next.take() {
        if out.len() == MAX_CHAIN_LAYERS {
            break;
        }
        // One layer at a time: its own header tells the next.
        let Ok(walked) = walk_one(&s) else {
            break;
        };
        if out.iter().any(|(_, id)| *id == walked.id) {
            break;
        }
        out.push((walked.path.clone(), walked.id));
        next = walked.backing.map(|path| DiskSpec {
            path,
            format: DiskFormat::Raw,
        });
    }
    out
}

/// One layer's facts, for [`chain_files`] (its format is probed).
struct OneLayer {
    path: PathBuf,
    id: FileId,
    backing: Option<PathBuf>,
}

fn walk_one(spec: &DiskSpec) -> Result<OneLayer, DiskError> {
    let path = std::path::absolute(&spec.path).map_err(|source| DiskError::Open {
        path: spec.path.clone(),
        source,
    })?;
    let file = File::open(&path).map_err(|source| DiskError::Open {
        path: path.clone(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| DiskError::Open {
        path: path.clone(),
        source,
    })?;
    let id = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let mut magic = [0u8; 4];
    let n = read_prefix(&file, &path, &mut magic)?;
    if !header::has_qcow2_magic(magic.get(..n).unwrap_or(&[])) {
        return Ok(OneLayer {
            path,
            id,
            backing: None,
        });
    }
    let (_, name) = read_qcow2_header(&file, &path, meta.len())?;
    let backing = name.map(|n| resolve_backing(&path, &n)).transpose()?;
    Ok(OneLayer { path, id, backing })
}

/// A layer's header facts and its open file.
#[derive(Debug)]
pub(crate) struct OpenedLayer {
    /// What the header says.
    pub info: LayerInfo,
    /// The file, open read-write for a writable top, read-only otherwise.
    pub file: File,
}

/// The opened files of a chain: the top and its parents, nearest first.
#[derive(Debug)]
pub(crate) struct Walked {
    /// The top layer.
    pub top: OpenedLayer,
    /// Its parents, nearest first.
    pub parents: Vec<OpenedLayer>,
}

impl Walked {
    /// The layers' facts, top first.
    pub fn infos(&self) -> Vec<LayerInfo> {
        std::iter::once(&self.top)
            .chain(&self.parents)
            .map(|l| l.info.clone())
            .collect()
    }
}

/// How the format of the next layer is known.
enum NextFormat {
    /// Named in the header.
    Known(DiskFormat),
    /// Not named: look at the file's first bytes (QEMU's probing, restricted to qcow2 or raw).
    Probe,
}

/// Opens one layer: beneath the roots when given, as a plain path otherwise.
fn open_layer(
    path: &Path,
    write: bool,
    roots: Option<&StorageRoots>,
    top: &Path,
    index: usize,
) -> Result<File, DiskError> {
    let Some(roots) = roots else {
        return OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            });
    };
    roots.open_beneath(path, write).map_err(|e| match e {
        StoragePathError::Missing { .. } => DiskError::Open {
            path: path.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotFound),
        },
        StoragePathError::NotAFile { .. } => DiskError::NotAFile {
            path: path.to_path_buf(),
        },
        e if e.is_outside() => DiskError::OutsideRoots {
            disk: top.to_path_buf(),
            layer: index,
            roots: roots.list(),
        },
        source => DiskError::Confine {
            path: path.to_path_buf(),
            source: Box::new(source),
        },
    })
}

/// Walks the chain of `spec`, opening every file (the top for writing if `writable`) and, if
/// `take_locks`, locking each as QEMU would (writer on a writable top, reader elsewhere).
/// With `roots`, every layer is opened beneath them.
pub(crate) fn walk(
    spec: &DiskSpec,
    writable: bool,
    take_locks: bool,
    roots: Option<&StorageRoots>,
) -> Result<Walked, DiskError> {
    let top = std::path::absolute(&spec.path).map_err(|source| DiskError::Open {
        path: spec.path.clone(),
        source,
    })?;
    let mut layers: Vec<OpenedLayer> = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some((top.clone(), NextFormat::Known(spec.format)));

    while let Some((path, format)) = next.take() {
        let is_top = layers.is_empty();
        if layers.len() == MAX_CHAIN_LAYERS {
            return Err(DiskError::ChainTooLong {
                path: top,
                max: MAX_CHAIN_LAYERS,
            });
        }
        let file = match open_layer(&path, is_top && writable, roots, &top, layers.len()) {
            Ok(f) => f,
            Err(DiskError::Open { source, .. })
                if source.kind() == io::ErrorKind::NotFound && !is_top =>
            {
                let image = layers
                    .last()
                    .map_or_else(|| top.clone(), |l| l.info.path.clone());
                return Err(DiskError::MissingBacking {
                    image,
                    backing: path,
                });
            }
            Err(e) => return Err(e),
        };
        let meta = file.metadata().map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile { path });
        }
        if !seen.insert((meta.dev(), meta.ino())) {
            return Err(DiskError::ChainLoop {
                path: top,
                repeated: path,
            });
        }
        if take_locks {
            let mode = if is_top && writable {
                LockMode::Writer
            } else {
                LockMode::Reader
            };
            lock::lock(&file, &path, mode)?;
        }

        let format = match format {
            NextFormat::Known(f) => f,
            NextFormat::Probe => {
                let mut magic = [0u8; 4];
                let n = read_prefix(&file, &path, &mut magic)?;
                if header::has_qcow2_magic(magic.get(..n).unwrap_or(&[])) {
                    DiskFormat::Qcow2
                } else {
                    DiskFormat::Raw
                }
            }
        };

        let file_size = meta.len();
        let id = FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        let info = match format {
            DiskFormat::Raw => LayerInfo {
                path: path.clone(),
                format,
                virtual_size: file_size,
                backing: None,
                backing_name: None,
                file_size,
                cluster_size: None,
                id,
            },
            DiskFormat::Qcow2 => {
                let (hdr, backing_name) = read_qcow2_header(&file, &path, file_size)?;
                if let Some(name) = &backing_name {
                    let resolved = resolve_backing(&path, name)?;
                    let next_format = match hdr.backing_format.as_deref() {
                        Some("qcow2") => NextFormat::Known(DiskFormat::Qcow2),
                        Some("raw" | "file") => NextFormat::Known(DiskFormat::Raw),
                        Some(other) => {
                            return Err(DiskError::BackingFormat {
                                image: path,
                                format: other.to_owned(),
                            });
                        }
                        None => NextFormat::Probe,
                    };
                    next = Some((resolved, next_format));
                }
                LayerInfo {
                    path: path.clone(),
                    format,
                    virtual_size: hdr.size,
                    backing: next.as_ref().map(|(p, _)| p.clone()),
                    backing_name,
                    file_size,
                    cluster_size: Some(1u64 << hdr.cluster_bits),
                    id,
                }
            }
        };
        if info.virtual_size > MAX_DISK_SIZE {
            return Err(DiskError::TooLarge {
                path,
                size: info.virtual_size,
                max: MAX_DISK_SIZE,
            });
        }
        layers.push(OpenedLayer { info, file });
    }
    let mut layers = layers.into_iter();
    match layers.next() {
        Some(top) => Ok(Walked {
            top,
            parents: layers.collect(),
        }),
        // The loop always opens the top (or returns an error) before it ends.
        None => Err(DiskError::Open {
            path: top,
            source: io::Error::other("no layer was opened"),
        }),
    }
}

/// Fills as much of `buf` as the file holds from offset 0; returns the bytes read.
fn read_prefix(file: &File, path: &Path, buf: &mut [u8]) -> Result<usize, DiskError> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..) {
        if rest.is_empty() {
            break;
        }
        let at = u64::try_from(done).unwrap_or(u64::MAX);
        match file.read_at(rest, at) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(DiskError::ReadHeader {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    Ok(done)
}

/// Reads and parses a qcow2 header and the backing name it points to.
fn read_qcow2_header(
    file: &File,
    path: &Path,
    file_size: u64,
) -> Result<(header::Qcow2Header, Option<PathBuf>), DiskError> {
    let bad = |source| DiskError::Header {
        path: path.to_path_buf(),
        source,
    };
    // The cluster size is in the first 24 bytes; the header and its extensions fill at most
    // the first cluster.
    let mut fixed = [0u8; 24];
    let n = read_prefix(file, path, &mut fixed)?;
    if n < fixed.len() {
        return Err(bad(HeaderError::TooShort(n)));
    }
    if !header::has_qcow2_magic(&fixed) {
        return Err(bad(HeaderError::BadMagic));
    }
    let cluster_bits = u32::from_be_bytes([fixed[20], fixed[21], fixed[22], fixed[23]]);
    let cluster = if cluster_bits <= 21 {
        1u64 << cluster_bits
    } else {
        MAX_HEADER_READ
    };
    let want = cluster.min(MAX_HEADER_READ).min(file_size);
    let mut buf = vec![0u8; usize::try_from(want).unwrap_or(0)];
    let n = read_prefix(file, path, &mut buf)?;
    buf.truncate(n);
    let hdr = header::parse(&buf).map_err(bad)?;
    let backing_name = match hdr.backing_name_at {
        None => None,
        Some((at, len)) => {
            // Bounded by the parser: len <= 1023 and the name lies within the first cluster.
            let name = usize::try_from(at)
                .ok()
                .zip(usize::try_from(len).ok())
                .and_then(|(at, len)| buf.get(at..at.checked_add(len)?))
                .ok_or(bad(HeaderError::BackingName { offset: at, len }))?;
            Some(PathBuf::from(OsStr::from_bytes(name)))
        }
    };
    Ok((hdr, backing_name))
}

/// What a file's first bytes say about it as a layer of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayerHeader {
    /// It starts with the qcow2 magic.
    pub qcow2: bool,
    /// The backing reference in its header, exactly as written.
    pub backing_name: Option<PathBuf>,
    /// The backing format its header names, if any.
    pub backing_format: Option<String>,
}

/// Reads the header of the open `file` (named `path` in messages): whether it is qcow2 and,
/// if so, what it names as its backing file (a qcow2 header vmgate would refuse is an error).
pub(crate) fn read_layer_header(file: &File, path: &Path) -> Result<LayerHeader, DiskError> {
    let size = file
        .metadata()
        .map_err(|source| DiskError::ReadHeader {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut magic = [0u8; 4];
    let n = read_prefix(file, path, &mut magic)?;
    if !header::has_qcow2_magic(magic.get(..n).unwrap_or(&[])) {
        return Ok(LayerHeader {
            qcow2: false,
            backing_name: None,
            backing_format: None,
        });
    }
    let (hdr, backing_name) = read_qcow2_header(file, path, size)?;
    Ok(LayerHeader {
        qcow2: true,
        backing_name,
        backing_format: hdr.backing_format,
    })
}

/// Protocol prefixes QEMU would treat as something other than a local file.
const PROTOCOLS: &[&str] = &[
    "json:",
    "nbd:",
    "nbd+",
    "http:",
    "https:",
    "ftp:",
    "ftps:",
    "ssh:",
    "iscsi:",
    "gluster:",
    "gluster+",
    "rbd:",
    "nfs:",
    "vvfat:",
    "blkdebug:",
    "blkverify:",
    "null-co:",
    "null-aio:",
    "host_device:",
    "host_cdrom:",
    "fat:",
];

/// Resolves the backing reference `name` written in the image at `image`: relative names are
/// relative to the image's directory; anything but a plain local file is refused.
pub(crate) fn resolve_backing(image: &Path, name: &Path) -> Result<PathBuf, DiskError> {
    let bytes = name.as_os_str().as_bytes();
    let refused = || DiskError::BackingName {
        image: image.to_path_buf(),
        name: name.to_string_lossy().into_owned(),
    };
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(refused());
    }
    let lower = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    if PROTOCOLS.iter().any(|p| lower.starts_with(p)) || lower.contains("://") {
        return Err(refused());
    }
    // QEMU accepts an explicit "file:" protocol prefix for local files.
    let name = lower
        .starts_with("file:")
        .then(|| bytes.get(5..).map(|b| Path::new(OsStr::from_bytes(b))))
        .flatten()
        .unwrap_or(name);
    let joined = if name.is_absolute() {
        name.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("/")).join(name)
    };
    std::path::absolute(&joined).map_err(|_| refused())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_resolve_like_qemu() {
        let img = Path::new("/var/lib/vmgate/vms/vm1/top.qcow2");
        assert_eq!(
            resolve_backing(img, Path::new("base.qcow2")).unwrap(),
            Path::new("/var/lib/vmgate/vms/vm1/base.qcow2")
        );
        assert_eq!(
            resolve_backing(img, Path::new("../templates/debian.raw")).unwrap(),
            Path::new("/var/lib/vmgate/vms/vm1/../templates/debian.raw")
        );
        assert_eq!(
            resolve_backing(img, Path::new("/srv/base.qcow2")).unwrap(),
            Path::new("/srv/base.qcow2")
        );
        assert_eq!(
            resolve_backing(img, Path::new("file:/srv/base.qcow2")).unwrap(),
            Path::new("/srv/base.qcow2")
        );
        for bad in [
            "json:{\"file\":{}}",
            "nbd://10.0.0.1/x",
            "NBD:localhost:10809",
            "https://x/y",
            "",
        ] {
            let err = resolve_backing(img, Path::new(bad)).unwrap_err();
            assert!(matches!(err, DiskError::BackingName { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn chain_of_hand_built_headers() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 8192]).unwrap();
        let top = dir.path().join("top.qcow2");
        std::fs::write(
            &top,
            header::tests::build_v3(8192, Some(("base.raw", "raw"))),
        )
        .unwrap();
        let c = chain(&DiskSpec {
            path: top.clone(),
            format: DiskFormat::Qcow2,
        })
        .unwrap();
        assert_eq!(c.layers.len(), 2);
        assert_eq!(c.layers[0].path, top);
        assert_eq!(c.layers[0].backing.as_deref(), Some(base.as_path()));
        assert_eq!(
            c.layers[0].backing_name.as_deref(),
            Some(Path::new("base.raw"))
        );
        assert_eq!(c.layers[1].format, DiskFormat::Raw);
        assert_eq!(c.layers[1].virtual_size, 8192);
        assert_eq!(c.parents().len(), 1);

        // A layer that names itself is a loop.
        let selfref = dir.path().join("self.qcow2");
        std::fs::write(
            &selfref,
            header::tests::build_v3(8192, Some(("self.qcow2", "qcow2"))),
        )
        .unwrap();
        let err = chain(&DiskSpec {
            path: selfref.clone(),
            format: DiskFormat::Qcow2,
        })
        .unwrap_err();
        assert!(
            matches!(&err, DiskError::ChainLoop { repeated, .. } if *repeated == selfref),
            "{err}"
        );

        // 17 layers, each backed by the next: too long.
        for i in 0..17 {
            let name = format!("l{}.qcow2", i + 1);
            let backing = (i < 16).then_some((name.as_str(), "qcow2"));
            std::fs::write(
                dir.path().join(format!("l{i}.qcow2")),
                header::tests::build_v3(4096, backing),
            )
            .unwrap();
        }
        let err = chain(&DiskSpec {
            path: dir.path().join("l0.qcow2"),
            format: DiskFormat::Qcow2,
        })
        .unwrap_err();
        assert!(
            matches!(err, DiskError::ChainTooLong { max: 16, .. }),
            "{err}"
        );
        // 16 are fine.
        let c = chain(&DiskSpec {
            path: dir.path().join("l1.qcow2"),
            format: DiskFormat::Qcow2,
        })
        .unwrap();
        assert_eq!(c.layers.len(), 16);

        // Unknown backing format, and a probed one.
        std::fs::write(
            &top,
            header::tests::build_v3(8192, Some(("base.raw", "vmdk"))),
        )
        .unwrap();
        let err = chain(&DiskSpec {
            path: top.clone(),
            format: DiskFormat::Qcow2,
        })
        .unwrap_err();
        assert!(err.to_string().contains("\"vmdk\""), "{err}");
        let mut h = header::tests::build_v3(8192, None);
        let name = b"l16.qcow2";
        let at = u64::try_from(h.len()).unwrap();
        h[8..16].copy_from_slice(&at.to_be_bytes());
        h[16..20].copy_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
        h.extend_from_slice(name);
        std::fs::write(&top, h).unwrap();
        let c = chain(&DiskSpec {
            path: top,
            format: DiskFormat::Qcow2,
        })
        .unwrap();
        assert_eq!(c.layers[1].format, DiskFormat::Qcow2);
    }
}
