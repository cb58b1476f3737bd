//! The gateway's admin-group lookups with ldap3's async client: the admin group resolved once
//! (by DN, SID, or a name only one group has), then "is this authenticated account a member,
//! through nested groups too?". Plain `ldap://` with a SASL GSSAPI bind as the host (its
//! keytab, through the process's Kerberos environment) and GSSAPI sealing, as Samba requires.
//! The semantics are `vmgate_auth::authz::LdapGroups`'s: the group pinned by its SID, the
//! account found exactly (`sAMAccountName`, computer or user) in its realm's naming context.
//!
//! The authorizer asks from the gateway's blocking handshake thread (and the group is resolved
//! at start from a blocking thread); the lookup runs there on the daemon's runtime
//! (`Handle::block_on`), so the GSSAPI bind's blocking calls to the KDC stay off the runtime's
//! workers, while the connection itself is driven by a task on the runtime. One connection is
//! kept and reused, and made again once when it has dropped.

#![forbid(unsafe_code)]

use std::fmt;
use std::time::Duration;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use tokio::runtime::Handle;
use vmgate_auth::authz::{AuthzError, GroupDirectory, GroupSpec, ResolvedGroup};
use vmgate_auth::directory::account::{exact_account_filter, sid_to_string};
use vmgate_auth::directory::{MATCHING_RULE_IN_CHAIN, dns_domain_of, filter};
use vmgate_auth::krb::Principal;

/// Group membership from the AD directory, over ldap3's async API.
pub struct AsyncGroups {
    url: String,
    spn_host: String,
    timeout: Duration,
    runtime: Handle,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

/// A bound connection and its domain's naming context.
struct Conn {
    ldap: Ldap,
    base_dn: String,
}

/// One entry found: its DN, `sAMAccountName` and SID.
struct Found {
    dn: String,
    sam: Option<String>,
    sid: Option<String>,
}

impl fmt::Debug for AsyncGroups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncGroups")
            .field("url", &self.url)
            .field("spn_host", &self.spn_host)
            .finish_non_exhaustive()
    }
}

fn ldap_err(what: &str, e: impl fmt::Display) -> AuthzError {
    AuthzError::Ldap(format!("{what}: {e}"))
}

/// The naming context of a realm's domain: `LAB.EXAMPLE.TEST` → `DC=lab,DC=example,DC=test`.
fn realm_naming_context(realm: &str) -> String {
    realm
        .split('.')
        .map(|label| {
            format!(
                "DC={}",
                filter::escape_dn_value(&label.to_ascii_lowercase())
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Conn {
    /// A search; a base this directory does not hold (noSuchObject, a referral) finds nothing.
    async fn search(
        &mut self,
        base: &str,
        scope: Scope,
        filter: &str,
        timeout: Duration,
    ) -> Result<Vec<Found>, AuthzError> {
        let res = self
            .ldap
            .with_timeout(timeout)
            .search(base, scope, filter, vec!["sAMAccountName", "objectSid"])
            .await
            .map_err(|e| ldap_err("search", e))?;
        // noSuchObject (32) or a referral (10): this directory does not hold the base.
        if matches!(res.1.rc, 10 | 32) {
            return Ok(Vec::new());
        }
        let (entries, _) = res.success().map_err(|e| ldap_err("search", e))?;
        Ok(entries
            .into_iter()
            .map(SearchEntry::construct)
            .filter(|e| !e.dn.is_empty())
            .map(|e| Found {
                sam: e
                    .attrs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("sAMAccountName"))
                    .and_then(|(_, v)| v.first().cloned()),
                sid: e
                    .bin_attrs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("objectSid"))
                    .and_then(|(_, v)| v.first())
                    .and_then(|b| sid_to_string(b)),
                dn: e.dn,
            })
            .collect())
    }

    /// The one group `spec` names.
    async fn resolve(
        &mut self,
        spec: &GroupSpec,
        timeout: Duration,
    ) -> Result<ResolvedGroup, AuthzError> {
        let base = self.base_dn.clone();
        let found = match spec {
            GroupSpec::Dn(dn) => {
                self.search(dn, Scope::Base, "(objectClass=group)", timeout)
                    .await?
            }
            GroupSpec::Sid(sid) => {
                let f = format!("(&(objectClass=group){})", filter::eq("objectSid", sid));
                self.search(&base, Scope::Subtree, &f, timeout).await?
            }
            GroupSpec::Name(name) => {
                let f = format!(
                    "(&(objectClass=group)(|{}{}))",
                    filter::eq("sAMAccountName", name),
                    filter::eq("cn", name)
                );
                self.search(&base, Scope::Subtree, &f, timeout).await?
            }
        };
        match <[Found; 1]>::try_from(found) {
            Ok([g]) => Ok(ResolvedGroup {
                spec: spec.clone(),
                name: g.sam.unwrap_or_else(|| spec.to_string()),
                dn: g.dn,
                sid: g.sid,
            }),
            Err(found) if found.is_empty() => Err(AuthzError::NoSuchGroup(spec.to_string())),
            Err(found) => Err(AuthzError::AmbiguousGroup {
                name: spec.to_string(),
                candidates: found.into_iter().map(|g| g.dn).collect(),
            }),
        }
    }

    /// Whether `user`'s account is a member of `group` (nested membership counts).
    async fn member(
        &mut self,
        user: &Principal,
        group: &ResolvedGroup,
        timeout: Duration,
    ) -> Result<bool, AuthzError> {
        // The group as pinned: found again by its SID (it may have been renamed or moved since
        // it was resolved); a group without a SID by its DN.
        let group_dn = match &group.sid {
            Some(sid) => {
                let base = self.base_dn.clone();
                let f = format!("(&(objectClass=group){})", filter::eq("objectSid", sid));
                match self
                    .search(&base, Scope::Subtree, &f, timeout)
                    .await?
                    .as_slice()
                {
                    [g] => g.dn.clone(),
                    _ => return Err(AuthzError::NoSuchGroup(group.spec.to_string())),
                }
            }
            None => group.dn.clone(),
        };
        // The account in its realm's naming context: this domain's, or a trusted realm's
        // (found only when this directory holds it).
        let base = if dns_domain_of(&self.base_dn).eq_ignore_ascii_case(user.realm()) {
            self.base_dn.clone()
        } else {
            realm_naming_context(user.realm())
        };
        let f = format!(
            "(&{}(memberOf:{MATCHING_RULE_IN_CHAIN}:={}))",
            exact_account_filter(user.name()),
            filter::escape_value(&group_dn)
        );
        Ok(!self
            .search(&base, Scope::Subtree, &f, timeout)
            .await?
            .is_empty())
    }
}

impl AsyncGroups {
    /// Lookups at `url` (`ldap://dc1`), binding as `ldap/<spn_host>`, each operation within
    /// `timeout`, driven on `runtime`.
    pub fn new(url: String, spn_host: String, timeout: Duration, runtime: Handle) -> AsyncGroups {
        AsyncGroups {
            url,
            spn_host,
            timeout,
            runtime,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    async fn connect(&self) -> Result<Conn, AuthzError> {
        let settings = LdapConnSettings::new().set_conn_timeout(self.timeout);
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &self.url)
            .await
            .map_err(|e| ldap_err(&self.url, e))?;
        self.runtime.spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(error = %e, "the directory connection ended");
            }
        });
        let bind = ldap
            .with_timeout(self.timeout)
            .sasl_gssapi_bind(&self.spn_host)
            .await
            .map_err(|e| {
                ldap_err(
                    &format!("GSSAPI bind to {} as ldap/{}", self.url, self.spn_host),
                    e,
                )
            })?;
        if bind.rc != 0 {
            return Err(AuthzError::Ldap(format!(
                "GSSAPI bind to {} as ldap/{}: {} (LDAP result {})",
                self.url, self.spn_host, bind.text, bind.rc
            )));
        }
        let (entries, _) = ldap
            .with_timeout(self.timeout)
            .search(
                "",
                Scope::Base,
                "(objectClass=*)",
                vec!["defaultNamingContext"],
            )
            .await
            .and_then(ldap3::SearchResult::success)
            .map_err(|e| ldap_err("reading the rootDSE", e))?;
        let base_dn = entries
            .into_iter()
            .next()
            .map(SearchEntry::construct)
            .and_then(|e| {
                e.attrs
                    .get("defaultNamingContext")
                    .and_then(|v| v.first().cloned())
            })
            .ok_or_else(|| AuthzError::Ldap("the rootDSE has no defaultNamingContext".into()))?;
        Ok(Conn { ldap, base_dn })
    }

    /// Runs `op` on the kept connection, connecting first, and once more on a new connection
    /// when the directory could not be asked (the kept one may have dropped: the DC restarted,
    /// an idle timeout).
    async fn with_conn<T>(
        &self,
        op: impl AsyncFn(&mut Conn, Duration) -> Result<T, AuthzError>,
    ) -> Result<T, AuthzError> {
        let mut guard = self.conn.lock().await;
        let mut last = None;
        for _attempt in 0..2 {
            let mut conn = match guard.take() {
                Some(c) => c,
                None => self.connect().await?,
            };
            match op(&mut conn, self.timeout).await {
                Err(e) if e.is_unreachable() => {
                    tracing::debug!(error = %e, "the directory connection failed; connecting again");
                    last = Some(e);
                }
                other => {
                    *guard = Some(conn);
                    return other;
                }
            }
        }
        Err(last.unwrap_or_else(|| AuthzError::Ldap("the directory could not be asked".into())))
    }
}

impl GroupDirectory for AsyncGroups {
    fn resolve_group(&self, spec: &GroupSpec) -> Result<ResolvedGroup, AuthzError> {
        // Called from blocking threads only (the daemon's start, the handshakes): waiting
        // here blocks no task.
        self.runtime
            .block_on(self.with_conn(async |c: &mut Conn, t| c.resolve(spec, t).await))
    }

    fn is_member(&self, user: &Principal, group: &ResolvedGroup) -> Result<bool, AuthzError> {
        self.runtime
            .block_on(self.with_conn(async |c: &mut Conn, t| c.member(user, group, t).await))
    }
}
