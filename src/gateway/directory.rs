//! The gateway's group lookups with ldap3's async client: is the authenticated user a member
//! (through nested groups too) of the admin group? Plain `ldap://` with a SASL GSSAPI bind as
//! the host (its keytab, through the process's Kerberos environment) and GSSAPI sealing, as
//! Samba requires.
//!
//! The authorizer asks from the gateway's blocking handshake thread; the lookup runs there on
//! the daemon's runtime (`Handle::block_on`), so the GSSAPI bind's blocking calls to the KDC
//! stay off the runtime's workers, while the connection itself is driven by a task on the
//! runtime. One connection is kept and reused, and made again once when it has dropped.

#![forbid(unsafe_code)]

use std::fmt;
use std::time::Duration;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use tokio::runtime::Handle;
use vmgate_auth::authz::{AuthzError, GroupDirectory};
use vmgate_auth::directory::{MATCHING_RULE_IN_CHAIN, filter};
use vmgate_auth::krb::Principal;

/// Group membership from the AD directory, over ldap3's async API.
pub struct AsyncGroups {
    url: String,
    spn_host: String,
    timeout: Duration,
    runtime: Handle,
    conn: tokio::sync::Mutex<Option<(Ldap, String)>>,
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

    async fn connect(&self) -> Result<(Ldap, String), AuthzError> {
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
        Ok((ldap, base_dn))
    }

    /// The DN of the one entry under `base` that `filter` finds, if any.
    async fn one(
        &self,
        ldap: &mut Ldap,
        base: &str,
        scope: Scope,
        filter: &str,
    ) -> Result<Option<String>, AuthzError> {
        let (entries, _) = ldap
            .with_timeout(self.timeout)
            .search(base, scope, filter, vec!["1.1"])
            .await
            .and_then(ldap3::SearchResult::success)
            .map_err(|e| ldap_err("search", e))?;
        Ok(entries
            .into_iter()
            .map(SearchEntry::construct)
            .map(|e| e.dn)
            .find(|dn| !dn.is_empty()))
    }

    async fn lookup(
        &self,
        ldap: &mut Ldap,
        base_dn: &str,
        user: &Principal,
        group: &str,
    ) -> Result<bool, AuthzError> {
        let gf = format!(
            "(&(objectClass=group)(|{}{}))",
            filter::eq("sAMAccountName", group),
            filter::eq("cn", group)
        );
        let group_dn = self
            .one(ldap, base_dn, Scope::Subtree, &gf)
            .await?
            .ok_or_else(|| AuthzError::NoSuchGroup(group.to_owned()))?;
        let uf = format!(
            "(&(|(objectClass=user)(objectClass=computer))(|{}{}))",
            filter::eq("sAMAccountName", user.name()),
            filter::eq("userPrincipalName", user.as_str())
        );
        let Some(user_dn) = self.one(ldap, base_dn, Scope::Subtree, &uf).await? else {
            return Err(AuthzError::NoSuchUser(user.to_string()));
        };
        let mf = format!(
            "(memberOf:{MATCHING_RULE_IN_CHAIN}:={})",
            filter::escape_value(&group_dn)
        );
        Ok(self.one(ldap, &user_dn, Scope::Base, &mf).await?.is_some())
    }

    async fn is_member_async(&self, user: &Principal, group: &str) -> Result<bool, AuthzError> {
        let mut guard = self.conn.lock().await;
        // A kept connection may have dropped (the DC restarted, an idle timeout): one more
        // try on a new one.
        for attempt in 0..2 {
            let (mut ldap, base_dn) = match guard.take() {
                Some(c) => c,
                None => self.connect().await?,
            };
            match self.lookup(&mut ldap, &base_dn, user, group).await {
                Ok(member) => {
                    *guard = Some((ldap, base_dn));
                    return Ok(member);
                }
                Err(e @ (AuthzError::NoSuchGroup(_) | AuthzError::NoSuchUser(_))) => {
                    *guard = Some((ldap, base_dn));
                    return Err(e);
                }
                Err(e) if attempt == 1 => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "the directory connection failed; connecting again");
                }
            }
        }
        Err(AuthzError::Ldap("the directory could not be asked".into()))
    }
}

impl GroupDirectory for AsyncGroups {
    fn is_member(&self, user: &Principal, group: &str) -> Result<bool, AuthzError> {
        // The authorizer calls from a blocking thread (the gateway's handshake), never from
        // the runtime's workers: waiting here blocks no task.
        self.runtime.block_on(self.is_member_async(user, group))
    }
}
