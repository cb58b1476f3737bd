//! The entries of an MIT keytab (format 0x0502): principal, key version number and encryption
//! type — to find a host's principal as the keytab spells it (the live delegation check) and to
//! compare key versions with the directory's `msDS-KeyVersionNumber` (`vmgate doctor`). The
//! reader is bounded and never panics on a damaged file; [`read`] skips the key bytes.
//!
//! For rewriting a keytab ([`crate::krb::refresh`]): [`read_raw`] keeps each entry's bytes
//! (zeroed when dropped) so that kept entries are written back unchanged, [`encode_entry`]
//! writes a new one, and [`write_atomic`] replaces the file in one rename.

use std::io::Read;
use std::path::Path;

/// The largest keytab read.
pub const MAX_KEYTAB: u64 = 1024 * 1024;

/// One key of a keytab (without the key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeytabEntry {
    /// `name/instance` without the realm.
    pub name: String,
    /// The realm.
    pub realm: String,
    /// The key version number (the 32-bit field when present, else the 8-bit one).
    pub kvno: u32,
    /// The encryption type (18 aes256, 17 aes128, 23 rc4).
    pub enctype: u16,
}

/// Errors of reading a keytab.
#[derive(Debug, thiserror::Error)]
pub enum KeytabError {
    /// The file cannot be read.
    #[error("cannot read the keytab {}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a keytab this reader knows, or is damaged.
    #[error("{} is not a usable keytab: {reason}", path.display())]
    Bad {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Reads the keytab at `path` (bounded).
pub fn read(path: &Path) -> Result<Vec<KeytabEntry>, KeytabError> {
    let err = |source| KeytabError::Read {
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut bytes = Vec::new();
    f.take(MAX_KEYTAB + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_KEYTAB {
        return Err(KeytabError::Bad {
            path: path.to_owned(),
            reason: "larger than any keytab (1 MiB)",
        });
    }
    parse(&bytes).map_err(|reason| KeytabError::Bad {
        path: path.to_owned(),
        reason,
    })
}

fn counted(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = buf.split_first_chunk::<2>()?;
    rest.split_at_checked(usize::from(u16::from_be_bytes(*len)))
}

fn u32_at(buf: &[u8]) -> Option<(u32, &[u8])> {
    let (b, rest) = buf.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*b), rest))
}

/// Parses keytab bytes (format version 0x0502).
pub fn parse(bytes: &[u8]) -> Result<Vec<KeytabEntry>, &'static str> {
    let (version, mut rest) = bytes.split_first_chunk::<2>().ok_or("the file is empty")?;
    if *version != [0x05, 0x02] {
        return Err("unknown format version (expected 0x0502)");
    }
    let mut out = Vec::new();
    while let Some((size, tail)) = rest.split_first_chunk::<4>() {
        let size = i32::from_be_bytes(*size);
        if size == 0 {
            break;
        }
        let len = usize::try_from(size.unsigned_abs()).map_err(|_| "an entry is too large")?;
        let (entry, after) = tail
            .split_at_checked(len)
            .ok_or("an entry runs past the end of the file")?;
        rest = after;
        if size < 0 {
            continue; // a hole left by a deleted entry
        }
        out.push(entry_of(entry).ok_or("a damaged entry")?);
    }
    Ok(out)
}

fn entry_of(entry: &[u8]) -> Option<KeytabEntry> {
    let (count, rest) = entry.split_first_chunk::<2>()?;
    let count = u16::from_be_bytes(*count);
    if count == 0 || count > 16 {
        return None;
    }
    let (realm, mut rest) = counted(rest)?;
    let mut comps = Vec::new();
    for _ in 0..count {
        let (c, r) = counted(rest)?;
        comps.push(String::from_utf8_lossy(c).into_owned());
        rest = r;
    }
    let (_name_type, rest) = u32_at(rest)?;
    let (_timestamp, rest) = u32_at(rest)?;
    let (&vno8, rest) = rest.split_first()?;
    let (enctype, rest) = rest.split_first_chunk::<2>()?;
    let (_key, rest) = counted(rest)?;
    let kvno = match u32_at(rest) {
        Some((v, _)) if v != 0 => v,
        _ => u32::from(vno8),
    };
    Some(KeytabEntry {
        name: comps.join("/"),
        realm: String::from_utf8_lossy(realm).into_owned(),
        kvno,
        enctype: u16::from_be_bytes(*enctype),
    })
}

/// An entry with its bytes as stored (size prefix included), for writing it back unchanged.
#[derive(Debug)]
pub struct RawEntry {
    /// What the entry is.
    pub entry: KeytabEntry,
    bytes: zeroize::Zeroizing<Vec<u8>>,
}

/// Reads the keytab at `path` (bounded), keeping every entry's bytes. A missing file is an
/// empty keytab.
pub fn read_raw(path: &Path) -> Result<Vec<RawEntry>, KeytabError> {
    let err = |source| KeytabError::Read {
        path: path.to_owned(),
        source,
    };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e)),
    };
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    f.take(MAX_KEYTAB + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_KEYTAB {
        return Err(KeytabError::Bad {
            path: path.to_owned(),
            reason: "larger than any keytab (1 MiB)",
        });
    }
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    parse_raw(&bytes).map_err(|reason| KeytabError::Bad {
        path: path.to_owned(),
        reason,
    })
}

/// Parses keytab bytes, keeping each live entry's bytes.
pub fn parse_raw(bytes: &[u8]) -> Result<Vec<RawEntry>, &'static str> {
    let (version, mut rest) = bytes.split_first_chunk::<2>().ok_or("the file is empty")?;
    if *version != [0x05, 0x02] {
        return Err("unknown format version (expected 0x0502)");
    }
    let mut out = Vec::new();
    while let Some((size_bytes, tail)) = rest.split_first_chunk::<4>() {
        let size = i32::from_be_bytes(*size_bytes);
        if size == 0 {
            break;
        }
        let len = usize::try_from(size.unsigned_abs()).map_err(|_| "an entry is too large")?;
        let (entry, after) = tail
            .split_at_checked(len)
            .ok_or("an entry runs past the end of the file")?;
        rest = after;
        if size < 0 {
            continue;
        }
        let mut raw = zeroize::Zeroizing::new(size_bytes.to_vec());
        raw.extend_from_slice(entry);
        out.push(RawEntry {
            entry: entry_of(entry).ok_or("a damaged entry")?,
            bytes: raw,
        });
    }
    Ok(out)
}

/// A new entry to write.
#[derive(Debug)]
pub struct NewEntry {
    /// The name's components (`["HOST", "hv1.lab.example.test"]`, `["HV1$"]`).
    pub components: Vec<String>,
    /// The realm.
    pub realm: String,
    /// The key version.
    pub kvno: u32,
    /// The encryption type.
    pub enctype: u16,
    /// The key.
    pub key: zeroize::Zeroizing<Vec<u8>>,
    /// Seconds since 1970 (informational).
    pub timestamp: u32,
}

fn push_counted(out: &mut Vec<u8>, s: &[u8]) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.get(..usize::from(len)).unwrap_or(s));
}

/// One entry's bytes (size prefix included), name type KRB5_NT_PRINCIPAL, the 32-bit key
/// version after the key.
pub fn encode_entry(e: &NewEntry) -> zeroize::Zeroizing<Vec<u8>> {
    let mut body = zeroize::Zeroizing::new(Vec::new());
    let count = u16::try_from(e.components.len()).unwrap_or(u16::MAX);
    body.extend_from_slice(&count.to_be_bytes());
    push_counted(&mut body, e.realm.as_bytes());
    for c in e.components.iter().take(usize::from(count)) {
        push_counted(&mut body, c.as_bytes());
    }
    body.extend_from_slice(&1u32.to_be_bytes());
    body.extend_from_slice(&e.timestamp.to_be_bytes());
    body.push(u8::try_from(e.kvno & 0xff).unwrap_or(0));
    body.extend_from_slice(&e.enctype.to_be_bytes());
    push_counted(&mut body, &e.key);
    body.extend_from_slice(&e.kvno.to_be_bytes());
    let size = i32::try_from(body.len()).unwrap_or(i32::MAX);
    let mut out = zeroize::Zeroizing::new(size.to_be_bytes().to_vec());
    out.extend_from_slice(&body);
    out
}

/// A whole keytab from kept entries and new ones (in that order).
pub fn encode(kept: &[&RawEntry], new: &[NewEntry]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(vec![0x05, 0x02]);
    for k in kept {
        out.extend_from_slice(&k.bytes);
    }
    for n in new {
        out.extend_from_slice(&encode_entry(n));
    }
    out
}

/// Replaces `path` with `bytes` in one rename: a temporary file in the same folder (mode 0600,
/// or the old file's mode), written and synced, renamed over the old one, and the folder
/// synced. Readers see the old keytab or the new one, never a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keytab".into());
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o600);
    let tmp = dir.join(format!(".{name}.vmgate-{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The highest key version per principal name (case-insensitive), in first-seen order.
pub fn newest_kvnos(entries: &[KeytabEntry]) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = Vec::new();
    for e in entries {
        match out
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(&e.name))
        {
            Some((_, k)) => *k = (*k).max(e.kvno),
            None => out.push((e.name.clone(), e.kvno)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One keytab entry's bytes (for tests).
    fn entry(comps: &[&str], realm: &str, kvno: u32, enctype: u16) -> Vec<u8> {
        let mut e = Vec::new();
        let count = u16::try_from(comps.len()).unwrap();
        e.extend_from_slice(&count.to_be_bytes());
        let counted = |e: &mut Vec<u8>, s: &[u8]| {
            e.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
            e.extend_from_slice(s);
        };
        counted(&mut e, realm.as_bytes());
        for c in comps {
            counted(&mut e, c.as_bytes());
        }
        e.extend_from_slice(&1u32.to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes());
        e.push(u8::try_from(kvno & 0xff).unwrap());
        e.extend_from_slice(&enctype.to_be_bytes());
        counted(&mut e, &[0x11; 32]);
        e.extend_from_slice(&kvno.to_be_bytes());
        let mut out = i32::try_from(e.len()).unwrap().to_be_bytes().to_vec();
        out.extend(e);
        out
    }

    #[test]
    fn reads_kvnos_and_survives_damage() {
        let mut kt = vec![5, 2];
        kt.extend(entry(&["hv1$"], "LAB", 2, 18));
        kt.extend(entry(&["HOST", "hv1"], "LAB", 2, 17));
        kt.extend((-8i32).to_be_bytes());
        kt.extend([0u8; 8]);
        kt.extend(entry(&["HV1$"], "LAB", 300, 18));
        let entries = parse(&kt).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].name, "HOST/hv1");
        assert_eq!(entries[2].kvno, 300);
        assert_eq!(
            newest_kvnos(&entries),
            vec![("hv1$".to_owned(), 300), ("HOST/hv1".to_owned(), 2)]
        );
        for cut in 0..kt.len() {
            let _ = parse(kt.get(..cut).unwrap());
        }
        assert!(parse(&[5, 1]).is_err());
        assert!(parse(&[5, 2, 0x7f, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn kept_and_new_entries_write_back_as_klist_would_read_them() {
        let mut kt = vec![5, 2];
        kt.extend(entry(&["hv1$"], "LAB", 2, 18));
        kt.extend((-8i32).to_be_bytes());
        kt.extend([0u8; 8]);
        kt.extend(entry(&["HOST", "hv1"], "LAB", 2, 17));
        let raw = parse_raw(&kt).unwrap();
        assert_eq!(raw.len(), 2);
        let new = NewEntry {
            components: vec![
                "Microsoft Virtual System Migration Service".into(),
                "hv1.lab".into(),
            ],
            realm: "LAB".into(),
            kvno: 300,
            enctype: 18,
            key: zeroize::Zeroizing::new(vec![9; 32]),
            timestamp: 1,
        };
        let out = encode(&[&raw[1]], &[new]);
        let back = parse(&out).unwrap();
        assert_eq!(
            back.iter()
                .map(|e| (e.name.as_str(), e.kvno))
                .collect::<Vec<_>>(),
            [
                ("HOST/hv1", 2),
                ("Microsoft Virtual System Migration Service/hv1.lab", 300)
            ]
        );
        // The kept entry's bytes are the original ones.
        let original = entry(&["HOST", "hv1"], "LAB", 2, 17);
        assert_eq!(out.get(2..2 + original.len()), Some(original.as_slice()));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.keytab");
        write_atomic(&p, &out).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), out.as_slice());
        assert_eq!(read_raw(&dir.path().join("missing")).unwrap().len(), 0);
        for cut in 0..out.len() {
            let _ = parse_raw(out.get(..cut).unwrap());
        }
    }
}
