//! The migration wire protocol: versioned, length-prefixed frames.
