//! A host's gateway settings from its identity (keytab, account, SPN) and its admission rules
//! (principals, AD groups through the directory, networks): what `vmgate-channel serve`,
//! `vmgate-host receive` and `vmgated` all build.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::authz::{Authorizer, GroupSpec, LdapGroups, LdapSource};
use crate::channel::ServerSettings;
use crate::directory::{Bind, DirectoryConfig};
use crate::krb::{
    AcceptedServices, Credential, HostCredentials, KrbError, OpCcache, Principal, UserCredential,
};
use crate::netfilter::NetworkFilter;
use crate::spn::Spn;
use crate::tls::TlsContext;

/// What a host serving migrations is.
#[derive(Debug, Clone)]
pub struct HostIdentity {
    /// The keytab with the account's and the migration SPNs' keys.
    pub keytab: PathBuf,
    /// The host account (`HV2$`).
    pub account: String,
    /// The realm.
    pub realm: String,
    /// The host's migration SPN (FQDN form).
    pub spn: Spn,
    /// Folder for the host's private credential caches.
    pub ccache_dir: PathBuf,
}

/// Who may connect, and for what (see [`crate::authz`]).
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// Principals allowed (control and migration; hosts only through `peer_hosts`).
    pub principals: Vec<String>,
    /// AD groups whose (nested) user members are allowed: a DN, a SID, or a name that must
    /// match exactly one group (an ambiguous name stops [`server_settings`]).
    pub groups: Vec<String>,
    /// Realms besides the host's own whose principals are accepted (default: none).
    pub trusted_realms: Vec<String>,
    /// Hosts (`hv1`) whose computer accounts may open migration channels with their own
    /// identity (a source in host-identity mode). Hosts never get control channels.
    pub peer_hosts: Vec<String>,
    /// LDAP URL for the group lookups (`ldap://DC` binds with GSSAPI sealing).
    pub ldap_url: Option<String>,
    /// CA for `ldaps://`.
    pub ldap_ca: Option<PathBuf>,
    /// Allowed source networks (CIDR or "any").
    pub networks: Vec<String>,
}

/// The migration SPNs a host accepts tickets for: the FQDN form and the short form
/// (`class/hv2.lab.example.test`, `class/hv2`).
pub fn migration_spns(fqdn_spn: &Spn) -> Vec<Spn> {
    let mut spns = vec![fqdn_spn.clone()];
    if let Some((short, _)) = fqdn_spn.host().split_once('.') {
        if let Ok(s) = Spn::new(fqdn_spn.class(), short) {
            spns.push(s);
        }
    }
    spns
}

/// The gateway settings, and the directory used for group lookups (if any).
///
/// The admin groups are resolved here, once: a group that does not exist or whose name matches
/// several groups is an error (naming the candidates' DNs) that stops the caller. A directory
/// that cannot be reached is not: it is logged and the groups are resolved at the first
/// lookup.
pub fn server_settings(
    id: &HostIdentity,
    admit: &Admission,
    handshake_timeout: Duration,
    max_handshakes: usize,
) -> Result<(ServerSettings, Option<Arc<LdapGroups>>), String> {
    let host_name = id.spn.host().split('.').next().unwrap_or("host").to_owned();
    let account = Principal::parse(&id.account, Some(&id.realm)).map_err(|e| e.to_string())?;
    let directory: Option<Arc<LdapGroups>> = admit.ldap_url.as_ref().map(|url| {
        let host = url_host(url).unwrap_or_default();
        let timeout = Duration::from_secs(5);
        let source = if url.starts_with("ldap://") {
            LdapSource::SealedGssapi {
                url: url.clone(),
                spn_host: host,
                timeout,
            }
        } else {
            let mut c = DirectoryConfig::new(url.clone(), admit.ldap_ca.clone(), Bind::Gssapi);
            c.timeout = timeout;
            c.gssapi_host = Some(host);
            LdapSource::Directory(c)
        };
        Arc::new(LdapGroups::with_source(source))
    });
    let creds =
        HostCredentials::new(&id.keytab, account, &id.ccache_dir).map_err(|e| e.to_string())?;
    let filter = NetworkFilter::parse_list(admit.networks.iter().map(String::as_str))
        .map_err(|e| e.to_string())?;
    let mut authorizer = Authorizer::new(host_name.clone(), &id.realm);
    for r in &admit.trusted_realms {
        authorizer = authorizer.trust_realm(r);
    }
    for a in &admit.principals {
        let p = Principal::parse(a, Some(&id.realm)).map_err(|e| e.to_string())?;
        authorizer = authorizer.allow_principal(p);
    }
    for h in &admit.peer_hosts {
        authorizer = authorizer.allow_peer_host(h);
    }
    if !admit.groups.is_empty() {
        let Some(groups) = directory.clone() else {
            return Err("admitting AD groups needs an LDAP URL".into());
        };
        for g in &admit.groups {
            authorizer = authorizer.allow_group(GroupSpec::parse(g), groups.clone());
        }
        match authorizer.resolve_groups() {
            Ok(resolved) => {
                for g in resolved {
                    tracing::info!(group = %g.spec, dn = %g.dn, sid = ?g.sid, "admin group resolved");
                }
            }
            Err(e) if e.is_unreachable() => {
                tracing::warn!(error = %e, "the admin group could not be resolved yet; it will be at the first logon");
            }
            Err(e) => return Err(format!("the admin group cannot be used: {e}")),
        }
    }
    let tls = TlsContext::ephemeral().map_err(|e| e.to_string())?;
    Ok((
        ServerSettings {
            host_name,
            realm: id.realm.clone(),
            tls,
            credentials: creds,
            filter,
            authorizer,
            handshake_timeout,
            max_handshakes,
            migration_filter: None,
            services: AcceptedServices::new(migration_spns(&id.spn), &id.realm),
        },
        directory,
    ))
}

/// The host part of `ldaps://host[:port][/...]`.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_owned())
}

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
    /// The user's credential cache cannot be used (diagnose it with [`crate::krb::diagnose`]).
    #[error(transparent)]
    Ccache(KrbError),
    /// The host account is not a valid principal.
    #[error("{0}")]
    Account(String),
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
                let p = Principal::parse(&acct, Some(&self.realm))
                    .map_err(|e| AcquireError::Account(e.to_string()))?;
                let dir = std::env::temp_dir().join(format!("{tool}-{}", std::process::id()));
                let host = HostCredentials::new(kt, p, dir).map_err(AcquireError::Host)?;
                let (c, cache) = host.initiator().map_err(AcquireError::Host)?;
                Ok((c, Some(cache)))
            }
            (None, None) => Err(AcquireError::Missing),
        }
    }
}
