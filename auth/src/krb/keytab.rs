//! The entries of an MIT keytab (format 0x0502): principal, key version number and encryption
//! type — to find a host's principal as the keytab spells it (the live delegation check) and to
//! compare key versions with the directory's `msDS-KeyVersionNumber` (`vmgate doctor`). Key
//! bytes are skipped, never kept. The reader is bounded and never panics on a damaged file.

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
}
