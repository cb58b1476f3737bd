//! TLS 1.3 with rustls (ring) and ephemeral certificates: secrecy, not identity.
