//! A credential handed to the daemon over the local socket: the content of the caller's
//! Kerberos credential cache ("logged on to the source").

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// The largest forwarded credential cache accepted.
pub const MAX_CCACHE: usize = 512 * 1024;

/// A forwarded credential: the content of a Kerberos ccache file. Zeroed on drop; `Debug`
/// prints `(secret, N bytes)`. On the wire it is base64 text, bounded before decoding.
#[derive(Clone, PartialEq, Eq)]
pub struct CcacheBlob(Zeroizing<Vec<u8>>);

impl CcacheBlob {
    /// Wraps the bytes of a ccache file.
    pub fn new(bytes: Vec<u8>) -> CcacheBlob {
        CcacheBlob(Zeroizing::new(bytes))
    }

    /// The bytes, for the one place that writes them into a private ccache.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for CcacheBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(secret, {} bytes)", self.0.len())
    }
}

impl Serialize for CcacheBlob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*self.0));
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for CcacheBlob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<CcacheBlob, D::Error> {
        let text = Zeroizing::new(String::deserialize(deserializer)?);
        // The decoded size is 3/4 of the text: check before decoding.
        if text.len() / 4 * 3 > MAX_CCACHE {
            return Err(serde::de::Error::custom(format!(
                "the credential cache is larger than {MAX_CCACHE} bytes"
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|_| serde::de::Error::custom("the credential cache is not valid base64"))?;
        Ok(CcacheBlob::new(bytes))
    }
}
