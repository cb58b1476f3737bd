//! Building a host's gateway settings: see [`vmgate_auth::host`]; plus pointing this process's
//! own Kerberos client at the host's keytab (for the directory's GSSAPI bind).

use std::path::Path;

pub use vmgate_auth::host::{Admission, HostIdentity, server_settings, url_host};

/// Points this process's own Kerberos client (the directory's GSSAPI bind) at the host's
/// keytab and a private cache.
///
/// # Safety
/// Must be called while the process has a single thread (before any other thread starts):
/// changing the environment races with threads reading it.
pub unsafe fn use_host_keytab_for_ldap(keytab: &Path, ccache: &Path) {
    // SAFETY: the caller guarantees no other thread runs (see above).
    unsafe {
        std::env::set_var("KRB5_CLIENT_KTNAME", format!("FILE:{}", keytab.display()));
        std::env::set_var("KRB5CCNAME", format!("FILE:{}", ccache.display()));
    }
}
