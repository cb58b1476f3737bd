//! Opening a control channel through a host's gateway as the user: TLS 1.3 + Kerberos with the
//! user's ticket, authorized by the host's admin group ("from a workstation"). The addresses
//! are tried in the order given; an address that does not answer is skipped, a refusal (with
//! its Windows diagnosis) ends the attempt.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use vmgate_auth::Diagnosis;
use vmgate_auth::channel::{
    self, AuthenticatedStream, ChannelError, ClientSettings, ConnectRequest, Purpose, Route, Target,
};
use vmgate_auth::krb::{AuthFacts, Credential, UserCredential};
use vmgate_auth::spn::Spn;
use vmgate_auth::tls::{TlsContext, TlsError};

use crate::client::ControlClient;

/// The time a gateway handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A host's gateway, as the client knows it.
#[derive(Debug, Clone)]
pub struct GatewayTarget {
    /// The host's short name (`hv1`), for messages and diagnoses.
    pub name: String,
    /// Its migration SPN (the gateway's Kerberos identity).
    pub spn: Spn,
    /// The realm.
    pub realm: String,
    /// Its gateway addresses, in the order to try them.
    pub addresses: Vec<SocketAddr>,
}

/// One address that did not answer.
#[derive(Debug)]
pub struct Attempt {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub error: ChannelError,
}

/// The addresses tried, one a line.
#[derive(Debug)]
pub struct Attempts(pub Vec<Attempt>);

impl fmt::Display for Attempts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for a in &self.0 {
            write!(f, "\n  {}: {}", a.addr, crate::error::chain(&a.error))?;
        }
        Ok(())
    }
}

/// Why no control channel could be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The user's credential cannot be used (no ticket, expired, ...).
    #[error("{0}")]
    Credential(Diagnosis),
    /// The gateway refused the user (Kerberos or authorization), with its diagnosis.
    #[error("{0}")]
    Denied(Diagnosis),
    /// No address answered.
    #[error("cannot reach vmgated on {host}:{tried}")]
    Unreachable {
        /// The host.
        host: String,
        /// Each address and why.
        tried: Attempts,
    },
    /// The host has no known address.
    #[error("{0} has no known address")]
    NoAddress(String),
    /// The client's TLS context cannot be built.
    #[error("cannot set up TLS")]
    Tls(#[source] TlsError),
}

impl GatewayError {
    /// The Windows diagnosis of a refusal or of an unusable credential.
    pub fn diagnosis(&self) -> Option<&Diagnosis> {
        match self {
            GatewayError::Credential(d) | GatewayError::Denied(d) => Some(d),
            _ => None,
        }
    }
}

/// Opens a control channel to `target` as the user of `ccache`; `forward_credentials` sends
/// the user's TGT along (what a CredSSP source needs to act for the user).
pub fn connect(
    target: &GatewayTarget,
    ccache: &str,
    forward_credentials: bool,
) -> Result<ControlClient<AuthenticatedStream>, GatewayError> {
    let realm = target.realm.clone();
    let credential: Credential = UserCredential::from_ccache(ccache).map_err(|e| {
        GatewayError::Credential(vmgate_auth::krb::diagnose::diagnose(
            &e,
            &AuthFacts {
                realm: Some(realm.clone()),
                ..AuthFacts::default()
            },
        ))
    })?;
    let settings = ClientSettings {
        source: None,
        tls: TlsContext::ephemeral().map_err(GatewayError::Tls)?,
        realm: realm.clone(),
        handshake_timeout: HANDSHAKE_TIMEOUT,
        local_host: None,
    };
    let mut tried = Vec::new();
    for addr in &target.addresses {
        let req = ConnectRequest {
            target: Target {
                addr: *addr,
                spn: target.spn.clone(),
            },
            purpose: Purpose::Control,
            forward_tgt: forward_credentials,
            route: Route::OwnTicket,
            via: String::new(),
            facts: AuthFacts {
                realm: Some(realm.clone()),
                target_spn: Some(target.spn.clone()),
                peer_host: Some(target.name.clone()),
                ..AuthFacts::default()
            },
        };
        match channel::connect(&settings, &req, &credential) {
            Ok(ch) => return Ok(ControlClient::over(ch.stream)),
            Err(error) => {
                let unanswered = matches!(
                    error,
                    ChannelError::Connect { .. } | ChannelError::TimedOut { .. }
                );
                match error.diagnosis() {
                    Some(d) if !unanswered => return Err(GatewayError::Denied(d)),
                    _ => tried.push(Attempt { addr: *addr, error }),
                }
            }
        }
    }
    if tried.is_empty() {
        Err(GatewayError::NoAddress(target.name.clone()))
    } else {
        Err(GatewayError::Unreachable {
            host: target.name.clone(),
            tried: Attempts(tried),
        })
    }
}
