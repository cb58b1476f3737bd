//! The command-line options the probes share: a serving host's identity and admission rules
//! ([`HostArgs`]), and a connecting side's credential ([`CredentialArgs`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use vmgate_auth::host::{Admission, HostIdentity};
use vmgate_auth::krb::{
    Credential, HostCredentials, KrbError, OpCcache, Principal, UserCredential,
};
use vmgate_auth::spn::Spn;

/// The command-line options of a serving host, shared by the probes (`vmgate-channel serve`,
/// `vmgate-host receive`).
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// Address to listen on (127.0.0.0/8 in tests).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The host's keytab (its account's and its migration SPNs' keys).
    #[arg(long)]
    pub keytab: PathBuf,
    /// The host account (`hv2$`); default: the SPN's host name followed by `$`.
    #[arg(long)]
    pub account: Option<String>,
    /// The realm.
    #[arg(long, env = "VMGATE_REALM")]
    pub realm: String,
    /// The host's migration SPN.
    #[arg(long)]
    pub spn: Spn,
    /// Folder for private credential caches (default: a folder under /tmp).
    #[arg(long)]
    pub ccache_dir: Option<PathBuf>,
    /// A principal allowed to connect (repeatable).
    #[arg(long)]
    pub allow: Vec<String>,
    /// An AD group whose members may connect: a DN, a SID, or a unique name (repeatable;
    /// needs --ldap-url).
    #[arg(long)]
    pub allow_group: Vec<String>,
    /// A realm besides the host's whose principals are accepted (repeatable).
    #[arg(long)]
    pub trusted_realm: Vec<String>,
    /// A host (`hv1`) that may open migration channels as itself (repeatable).
    #[arg(long)]
    pub peer_host: Vec<String>,
    /// LDAP URL for group lookups (`ldap://DC` binds with GSSAPI sealing as the host).
    #[arg(long)]
    pub ldap_url: Option<String>,
    /// CA file for `ldaps://`.
    #[arg(long)]
    pub ldap_ca: Option<PathBuf>,
    /// Allowed source networks (CIDR, repeatable, or "any").
    #[arg(long, default_value = "any")]
    pub networks: Vec<String>,
}

impl HostArgs {
    /// The host's short name (the SPN's host up to the first dot).
    pub fn host_name(&self) -> String {
        self.spn
            .host()
            .split('.')
            .next()
            .unwrap_or("host")
            .to_owned()
    }

    /// The identity and admission rules; `tool` names the default credential-cache folder.
    pub fn into_parts(self, tool: &str) -> (HostIdentity, Admission) {
        let host = self.host_name();
        let account = self.account.unwrap_or_else(|| format!("{host}$"));
        let ccache_dir = self.ccache_dir.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("{tool}-{host}-{}", std::process::id()))
        });
        (
            HostIdentity {
                keytab: self.keytab,
                account,
                realm: self.realm,
                spn: self.spn,
                ccache_dir,
            },
            Admission {
                principals: self.allow,
                groups: self.allow_group,
                trusted_realms: self.trusted_realm,
                peer_hosts: self.peer_host,
                ldap_url: self.ldap_url,
                ldap_ca: self.ldap_ca,
                networks: self.networks,
            },
        )
    }
}

/// The command-line options of a connecting side: a user's credential cache, or a host's
/// keytab (`vmgate-channel connect`, `vmgate-host send`).
#[derive(Debug, Clone, clap::Args)]
pub struct CredentialArgs {
    /// Connect as the user of this credential cache.
    #[arg(long, conflicts_with = "keytab")]
    pub ccache: Option<String>,
    /// Connect as a host from this keytab instead.
    #[arg(long, requires = "account")]
    pub keytab: Option<PathBuf>,
    /// The host account for --keytab.
    #[arg(long)]
    pub account: Option<String>,
    /// The realm.
    #[arg(long, env = "VMGATE_REALM")]
    pub realm: String,
}

/// Why [`CredentialArgs::acquire`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// The user's credential cache cannot be used (diagnose it with [`vmgate_auth::krb::diagnose`]).
    #[error(transparent)]
    Ccache(KrbError),
    /// The host account is not a valid principal.
    #[error(transparent)]
    Account(KrbError),
    /// The host's keytab cannot be used.
    #[error(transparent)]
    Host(KrbError),
    /// Neither was given.
    #[error("give --ccache or --keytab")]
    Missing,
}

impl CredentialArgs {
    /// The credential, and for a keytab the host's private cache, which must live as long as
    /// the credential is used. `tool` names that cache's folder.
    pub fn acquire(&self, tool: &str) -> Result<(Credential, Option<OpCcache>), AcquireError> {
        match (&self.ccache, &self.keytab) {
            (Some(cc), _) => UserCredential::from_ccache(cc)
                .map(|c| (c, None))
                .map_err(AcquireError::Ccache),
            (None, Some(kt)) => {
                let acct = self.account.clone().unwrap_or_default();
                let p =
                    Principal::parse(&acct, Some(&self.realm)).map_err(AcquireError::Account)?;
                let dir = std::env::temp_dir().join(format!("{tool}-{}", std::process::id()));
                let host = HostCredentials::new(kt, p, dir).map_err(AcquireError::Host)?;
                let (c, cache) = host.initiator().map_err(AcquireError::Host)?;
                Ok((c, Some(cache)))
            }
            (None, None) => Err(AcquireError::Missing),
        }
    }
}

/// Points this process's own Kerberos client (the directory's GSSAPI bind) at the host's
/// keytab and a private cache: each probe host is its own process.
///
/// # Safety
/// Must be called while the process has a single thread (before any other thread starts):
/// changing the environment races with threads reading it.
pub unsafe fn use_host_keytab_for_ldap(keytab: &std::path::Path, ccache: &std::path::Path) {
    // SAFETY: the caller guarantees no other thread runs (see above).
    unsafe {
        std::env::set_var("KRB5_CLIENT_KTNAME", format!("FILE:{}", keytab.display()));
        std::env::set_var("KRB5CCNAME", format!("FILE:{}", ccache.display()));
    }
}
