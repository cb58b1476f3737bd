//! vmgate-auth: who is asking, and may they.
//!
//! SPNs and the AD directory, delegation analysis, Kerberos through GSSAPI, the TLS + Kerberos
//! authenticated channel with channel binding, and the Windows error codes every failure is
//! reported with. See DESIGN.md §3.

pub mod authz;
pub mod channel;
pub mod delegation;
pub mod directory;
pub mod discover;
pub mod host;
pub mod krb;
pub mod netfilter;
pub mod secret;
pub mod spn;
pub mod tls;
pub mod winerr;

pub use secret::Secret;
pub use winerr::{Diagnosis, WinCode};
