//! A bounded, panic-free reader for the parts of a qcow2 header that chain inspection needs.
//!
//! Image files are untrusted input (a guest of another host may have written a qcow2 header
//! into its raw disk, and images arrive over the network during storage moves). This parser
//! looks at a caller-supplied prefix of the file, never indexes, never allocates by a length it
//! has not bounded, and reports what it cannot accept. The qcow2 driver proper (imago) reads the
//! image again when it is opened; this module only decides which files form the chain and
//! refuses features that vmgate does not handle.
//!
//! Layout (all big-endian), from QEMU's `docs/interop/qcow2.txt`:
//!
//! ```text
//!   0  magic "QFI\xfb"           4  version (2 or 3)
//!   8  backing_file_offset      16  backing_file_size (<= 1023)
//!  20  cluster_bits (9..=21)    24  size (virtual size in bytes)
//!  32  crypt_method             ... (v3 only:)
//!  72  incompatible_features    80  compatible_features    88  autoclear_features
//!  96  refcount_order          100  header_length
//! then header extensions: { u32 type, u32 length, data padded to 8 bytes }, type 0 ends them.
//! ```

/// The qcow2 magic bytes.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The longest backing file name QEMU accepts (and so do we).
pub const MAX_BACKING_NAME: u32 = 1023;

/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Incompatible feature bit: the image is marked corrupt.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit: data lives in an external data file.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// The incompatible feature bits that are defined (dirty, corrupt, external data file,
/// compression type, extended L2 entries).
const INCOMPAT_KNOWN: u64 = 0b1_1111;

/// Length of a version 2 header (and of the fixed part of a version 3 header before the
/// feature fields).
const V2_HEADER_LEN: usize = 72;
/// Minimum length of a version 3 header.
const V3_MIN_HEADER_LEN: u32 = 104;

/// What the qcow2 header says about the image, as far as chain inspection cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Where the backing file name is stored and how long it is, if there is one.
    pub backing_name_at: Option<(u64, u32)>,
    /// The backing format named in the header extension, if any.
    pub backing_format: Option<String>,
    /// The incompatible feature bits (0 for version 2).
    pub incompatible_features: u64,
}

/// Why a header was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than a header needs.
    #[error("the file is too short to hold a qcow2 header ({0} bytes)")]
    TooShort(usize),
    /// Wrong magic.
    #[error("the file does not start with the qcow2 magic bytes")]
    BadMagic,
    /// Version other than 2 or 3.
    #[error("qcow2 version {0} is not supported (only 2 and 3 are)")]
    Version(u32),
    /// Cluster size out of range.
    #[error("the cluster size 2^{0} is outside the valid range 2^9..=2^21")]
    ClusterBits(u32),
    /// A v3 header length that is too short or beyond the first cluster.
    #[error("the header length {0} is invalid")]
    HeaderLength(u32),
    /// Backing name longer than allowed or placed inconsistently.
    #[error("the backing file name (offset {offset}, {len} bytes) is invalid")]
    BackingName {
        /// Where the header says it is.
        offset: u64,
        /// Its stated length.
        len: u32,
    },
    /// Encrypted image.
    #[error("the image is encrypted (method {0}), which vmgate does not support")]
    Encrypted(u32),
    /// Marked corrupt by QEMU.
    #[error("the image is marked corrupt; repair it with `qemu-img check -r all`")]
    Corrupt,
    /// External data file.
    #[error("the image keeps its data in an external data file, which vmgate does not support")]
    ExternalDataFile,
    /// Unknown incompatible feature bits.
    #[error("the image uses unknown incompatible features (bits {0:#x})")]
    UnknownFeatures(u64),
    /// A header extension runs past the end of the first cluster.
    #[error("a header extension at offset {0} runs past the end of the header cluster")]
    Extension(usize),
    /// The backing format name is not UTF-8.
    #[error("the backing format name is not valid UTF-8")]
    BackingFormatName,
}

/// Reads a big-endian u32 at `at`, if `buf` holds it.
fn be32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// Reads a big-endian u64 at `at`, if `buf` holds it.
fn be64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Whether `buf` starts with the qcow2 magic.
pub fn has_qcow2_magic(buf: &[u8]) -> bool {
    buf.get(..4) == Some(&QCOW2_MAGIC[..])
}

/// Parses a qcow2 header from `buf`, a prefix of the image file (ideally its whole first
/// cluster, at most 2 MiB, which is where the header and its extensions must live).
pub fn parse(buf: &[u8]) -> Result<Qcow2Header, HeaderError> {
    let too_short = || HeaderError::TooShort(buf.len());
    if buf.len() < V2_HEADER_LEN {
        return Err(too_short());
    }
    if !has_qcow2_magic(buf) {
        return Err(HeaderError::BadMagic);
    }
    let version = be32(buf, 4).ok_or_else(too_short)?;
    if version != 2 && version != 3 {
        return Err(HeaderError::Version(version));
    }
    let backing_offset = be64(buf, 8).ok_or_else(too_short)?;
    let backing_len = be32(buf, 16).ok_or_else(too_short)?;
    let cluster_bits = be32(buf, 20).ok_or_else(too_short)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(HeaderError::ClusterBits(cluster_bits));
    }
    let cluster_size = 1u64 << cluster_bits;
    let size = be64(buf, 24).ok_or_else(too_short)?;
    let crypt_method = be32(buf, 32).ok_or_else(too_short)?;
    if crypt_method != 0 {
        return Err(HeaderError::Encrypted(crypt_method));
    }

    let (incompatible_features, header_len) = if version == 3 {
        let incompat = be64(buf, 72).ok_or_else(too_short)?;
        let header_len = be32(buf, 100).ok_or_else(too_short)?;
        if header_len < V3_MIN_HEADER_LEN || u64::from(header_len) > cluster_size {
            return Err(HeaderError::HeaderLength(header_len));
        }
        (incompat, header_len)
    } else {
        (0, 72)
    };
    if incompatible_features & INCOMPAT_CORRUPT != 0 {
        return Err(HeaderError::Corrupt);
    }
    if incompatible_features & INCOMPAT_DATA_FILE != 0 {
        return Err(HeaderError::ExternalDataFile);
    }
    let unknown = incompatible_features & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(HeaderError::UnknownFeatures(unknown));
    }

    let backing_name_at = if backing_offset == 0 {
        None
    } else {
        let end = backing_offset.checked_add(u64::from(backing_len));
        if backing_len == 0
            || backing_len > MAX_BACKING_NAME
            || end.is_none_or(|end| end > cluster_size)
        {
            return Err(HeaderError::BackingName {
                offset: backing_offset,
                len: backing_len,
            });
        }
        Some((backing_offset, backing_len))
    };

    let mut backing_format = None;
    // Extensions live between the header and the end of the first cluster; `buf` may be
    // shorter than the cluster (a short file), in which case missing bytes are an error only
    // if an extension actually claims them.
    let mut at = usize::try_from(header_len).map_err(|_| HeaderError::HeaderLength(header_len))?;
    let cluster_end = usize::try_from(cluster_size).unwrap_or(usize::MAX);
    // Running out of bytes for another extension header ends the list, as in QEMU when the
    // cluster is exhausted.
    while let Some(kind) = be32(buf, at) {
        if kind == 0 {
            break;
        }
        let len = be32(buf, at + 4).ok_or(HeaderError::Extension(at))?;
        let data_start = at + 8;
        let len = usize::try_from(len).map_err(|_| HeaderError::Extension(at))?;
        let data_end = data_start
            .checked_add(len)
            .ok_or(HeaderError::Extension(at))?;
        if data_end > cluster_end {
            return Err(HeaderError::Extension(at));
        }
        let data = buf
            .get(data_start..data_end)
            .ok_or(HeaderError::Extension(at))?;
        // Other extensions (feature names, bitmaps, the external data file's name, which is
        // refused through its feature bit) do not matter for chain inspection.
        if kind == EXT_BACKING_FORMAT {
            let name = std::str::from_utf8(data).map_err(|_| HeaderError::BackingFormatName)?;
            backing_format = Some(name.to_owned());
        }
        let padded = len
            .div_ceil(8)
            .checked_mul(8)
            .ok_or(HeaderError::Extension(at))?;
        at = data_start
            .checked_add(padded)
            .ok_or(HeaderError::Extension(at))?;
    }

    Ok(Qcow2Header {
        version,
        cluster_bits,
        size,
        backing_name_at,
        backing_format,
        incompatible_features,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a version 3 header with an optional backing name and format, as QEMU lays it out
    /// (header, extensions, end marker, then the backing name).
    pub(crate) fn build_v3(size: u64, backing: Option<(&str, &str)>) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[0..4].copy_from_slice(&QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        if let Some((_, fmt)) = backing {
            h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            h.extend_from_slice(&u32::try_from(fmt.len()).unwrap().to_be_bytes());
            h.extend_from_slice(fmt.as_bytes());
            while h.len() % 8 != 0 {
                h.push(0);
            }
        }
        h.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some((name, _)) = backing {
            let at = u64::try_from(h.len()).unwrap();
            h[8..16].copy_from_slice(&at.to_be_bytes());
            h[16..20].copy_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
            h.extend_from_slice(name.as_bytes());
        }
        h
    }

    #[test]
    fn parses_plain_and_backed_headers() {
        let plain = parse(&build_v3(1 << 30, None)).unwrap();
        assert_eq!(plain.version, 3);
        assert_eq!(plain.size, 1 << 30);
        assert_eq!(plain.cluster_bits, 16);
        assert_eq!(plain.backing_name_at, None);
        assert_eq!(plain.backing_format, None);

        let buf = build_v3(4096, Some(("base.qcow2", "qcow2")));
        let h = parse(&buf).unwrap();
        let (at, len) = h.backing_name_at.unwrap();
        let at = usize::try_from(at).unwrap();
        let len = usize::try_from(len).unwrap();
        assert_eq!(&buf[at..at + len], b"base.qcow2");
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
    }

    #[test]
    fn refuses_bad_headers_with_the_reason() {
        let good = build_v3(4096, None);
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(parse(&b), Err(HeaderError::BadMagic));
        let mut b = good.clone();
        b[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(parse(&b), Err(HeaderError::Version(4)));
        let mut b = good.clone();
        b[20..24].copy_from_slice(&22u32.to_be_bytes());
        assert_eq!(parse(&b), Err(HeaderError::ClusterBits(22)));
        let mut b = good.clone();
        b[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(parse(&b), Err(HeaderError::Encrypted(2)));
        let mut b = good.clone();
        b[72..80].copy_from_slice(&INCOMPAT_CORRUPT.to_be_bytes());
        assert_eq!(parse(&b), Err(HeaderError::Corrupt));
        let mut b = good.clone();
        b[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes());
        assert_eq!(parse(&b), Err(HeaderError::ExternalDataFile));
        let mut b = good.clone();
        b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(parse(&b), Err(HeaderError::UnknownFeatures(1 << 40)));
        let mut b = good.clone();
        b[8..16].copy_from_slice(&200u64.to_be_bytes());
        b[16..20].copy_from_slice(&2000u32.to_be_bytes());
        assert_eq!(
            parse(&b),
            Err(HeaderError::BackingName {
                offset: 200,
                len: 2000
            })
        );
        let mut b = good.clone();
        b[100..104].copy_from_slice(&50u32.to_be_bytes());
        assert_eq!(parse(&b), Err(HeaderError::HeaderLength(50)));
        // An extension that claims more bytes than the first cluster holds.
        let mut b = good;
        b.truncate(104);
        b.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse(&b), Err(HeaderError::Extension(104)));
    }

    #[test]
    fn every_truncation_and_random_garbage_is_an_error_not_a_panic() {
        let full = build_v3(1 << 20, Some(("../images/base.raw", "raw")));
        for n in 0..full.len() {
            let r = parse(&full[..n]);
            if n < V2_HEADER_LEN {
                assert_eq!(r, Err(HeaderError::TooShort(n)));
            }
        }
        // Deterministic pseudo-random mutations of a valid header.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut b = full.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let idx = usize::try_from(state % u64::try_from(b.len()).unwrap()).unwrap();
                b[idx] = u8::try_from(state >> 56).unwrap();
            }
            let _ = parse(&b);
        }
    }
}
