//! A host's gateway settings from its identity (keytab, account, SPN) and its admission rules
//! (principals, AD groups through the directory, networks): what `vmgated` and the test probes
//! (`vmgate-channel serve`, `vmgate-host receive`) all build.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::authz::{Authorizer, GroupSpec, LdapGroups, LdapSource};
use crate::channel::ServerSettings;
use crate::directory::{Bind, DirectoryConfig};
use crate::krb::{AcceptedServices, HostCredentials, KrbError, Principal};
use crate::netfilter::{NetfilterError, NetworkFilter};
use crate::spn::Spn;
use crate::tls::{TlsContext, TlsError};

/// Why a host's gateway settings cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostSettingsError {
    /// The host account is not a principal.
    #[error("the host account \"{account}\" is not a valid principal")]
    Account {
        /// The account as given.
        account: String,
        /// Why.
        #[source]
        source: KrbError,
    },
    /// An allowed principal is not a principal.
    #[error("the allowed principal \"{principal}\" is not valid")]
    Principal {
        /// The principal as given.
        principal: String,
        /// Why.
        #[source]
        source: KrbError,
    },
    /// The host's keytab cannot be used.
    #[error("the host's keytab cannot be used")]
    Credentials(#[source] KrbError),
    /// An allowed network is not CIDR (or "any").
    #[error("the allowed networks cannot be read")]
    Networks(#[source] NetfilterError),
    /// The admin group does not exist, or its name is ambiguous.
    #[error("the admin group cannot be used")]
    AdminGroup(#[source] crate::authz::AuthzError),
    /// Groups are admitted, but no directory is named to look them up.
    #[error("admitting AD groups needs an LDAP URL")]
    NoDirectory,
    /// The TLS context cannot be built.
    #[error("cannot set up TLS")]
    Tls(#[source] TlsError),
}

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
) -> Result<(ServerSettings, Option<Arc<LdapGroups>>), HostSettingsError> {
    let host_name = id.spn.host().split('.').next().unwrap_or("host").to_owned();
    let account = Principal::parse(&id.account, Some(&id.realm)).map_err(|source| {
        HostSettingsError::Account {
            account: id.account.clone(),
            source,
        }
    })?;
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
    let creds = HostCredentials::new(&id.keytab, account, &id.ccache_dir)
        .map_err(HostSettingsError::Credentials)?;
    let filter = NetworkFilter::parse_list(admit.networks.iter().map(String::as_str))
        .map_err(HostSettingsError::Networks)?;
    let mut authorizer = Authorizer::new(host_name.clone(), &id.realm);
    for r in &admit.trusted_realms {
        authorizer = authorizer.trust_realm(r);
    }
    for a in &admit.principals {
        let p = Principal::parse(a, Some(&id.realm)).map_err(|source| {
            HostSettingsError::Principal {
                principal: a.clone(),
                source,
            }
        })?;
        authorizer = authorizer.allow_principal(p);
    }
    for h in &admit.peer_hosts {
        authorizer = authorizer.allow_peer_host(h);
    }
    if !admit.groups.is_empty() {
        let Some(groups) = directory.clone() else {
            return Err(HostSettingsError::NoDirectory);
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
            Err(e) => return Err(HostSettingsError::AdminGroup(e)),
        }
    }
    let tls = TlsContext::ephemeral().map_err(HostSettingsError::Tls)?;
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
