//! Reaching a host's daemon: resolving `--host`, and talking to it over its local control
//! socket ("logged on to the host") or through its gateway (TLS 1.3 + Kerberos as the
//! caller, authorized by the host's admin group: "a workstation").
//!
//! `--host H` is resolved, in order:
//! 1. `$VMGATE_LAB_DIR/H/vmgated.toml` (the demo lab, `tests/lab/up`);
//! 2. `/etc/vmgate/vmgated.toml` when its `host_name` or `fqdn` is H (this machine);
//! 3. H as a DNS name, port 6600 (`H.<realm>` when H has no dot; the realm from
//!    `VMGATE_REALM`).
//!
//! With a configuration file at hand (read with the daemon's own parser,
//! [`vmgate_control::config`]) the CLI knows the host's control socket, its FQDN and realm, and
//! the migration addresses it offers, by priority. Without `--host`, the daemon of this machine
//! is used through its socket (`--socket`, or the one in `/etc/vmgate/vmgated.toml`, or
//! `/run/vmgate/vmgated.sock`).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use vmgate_auth::Diagnosis;
use vmgate_auth::channel::AuthenticatedStream;
use vmgate_auth::spn::{Spn, SpnError};
use vmgate_control::api::{Request, Response};
use vmgate_control::client::{ClientError, ControlClient, LocalClient};
use vmgate_control::config::{Config, ConfigError};
use vmgate_control::gateway::{self, GatewayError, GatewayTarget};
use vmgate_control::{DEFAULT_PORT, DEFAULT_SOCKET, MIGRATION_SERVICE_CLASS, SYSTEM_CONFIG};

use crate::exit;

/// Why the CLI could not talk to a daemon, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The host's configuration in the lab folder cannot be used.
    #[error("cannot resolve the host \"{host}\"")]
    Config {
        /// The name.
        host: String,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// The host has no DNS name the CLI can form.
    #[error(
        "cannot resolve the host \"{0}\": give its DNS name (hv2.lab.example.test) or set VMGATE_REALM"
    )]
    NoDnsName(String),
    /// The host's name does not resolve.
    #[error("cannot resolve the host \"{host}\"")]
    Resolve {
        /// The name.
        host: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host's realm is unknown, so no gateway channel can be opened.
    #[error("cannot resolve the host \"{0}\": its realm is unknown: set VMGATE_REALM")]
    NoRealm(String),
    /// The host's migration SPN cannot be formed from its name.
    #[error("cannot resolve the host \"{host}\"")]
    Spn {
        /// The name.
        host: String,
        /// Why.
        #[source]
        source: SpnError,
    },
    /// The local socket does not answer.
    #[error("{} (is vmgated running on {host}?)", vmgate_control::error::chain(.error))]
    Local {
        /// The host.
        host: String,
        /// Why.
        error: ClientError,
    },
    /// The gateway could not be reached, or refused the caller.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// The caller's credential cache is not a file.
    #[error(
        "the credential cache {0} is not a file: handing a ticket to the daemon needs a FILE: cache (kinit -c FILE:/tmp/krb5cc_me ...)"
    )]
    CcacheNotAFile(String),
    /// The caller's credential cache cannot be read.
    #[error(
        "cannot read your credential cache {path}: {error}; fix: kinit (with a forwardable ticket: kinit -f)"
    )]
    CcacheUnreadable {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The conversation failed.
    #[error("the daemon's answer could not be read")]
    Protocol(#[source] ClientError),
}

impl ControlError {
    /// The exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            ControlError::Config { .. }
            | ControlError::NoDnsName(_)
            | ControlError::Resolve { .. }
            | ControlError::NoRealm(_)
            | ControlError::Spn { .. } => exit::NOT_FOUND,
            ControlError::Local { .. }
            | ControlError::Protocol(_)
            | ControlError::Gateway(
                GatewayError::Unreachable { .. }
                | GatewayError::NoAddress(_)
                | GatewayError::Tls(_),
            ) => exit::UNREACHABLE,
            ControlError::Gateway(_)
            | ControlError::CcacheNotAFile(_)
            | ControlError::CcacheUnreadable { .. } => exit::DENIED,
        }
    }

    /// The diagnosis of a refusal.
    pub fn diagnosis(&self) -> Option<&Diagnosis> {
        match self {
            ControlError::Gateway(g) => g.diagnosis(),
            _ => None,
        }
    }
}

/// A host as the CLI knows it.
#[derive(Debug, Clone)]
pub struct HostTarget {
    /// The short name (`hv1`).
    pub name: String,
    /// The DNS name (its SPN's host).
    pub fqdn: String,
    /// The realm, when known.
    pub realm: Option<String>,
    /// The local control socket, when the host's configuration is on this machine.
    pub socket: Option<PathBuf>,
    /// Its gateway addresses, in the order it offers them for migration.
    pub addresses: Vec<SocketAddr>,
}

impl HostTarget {
    fn from_config(c: &Config) -> HostTarget {
        HostTarget {
            name: c.host_name.clone(),
            fqdn: c.fqdn.clone(),
            realm: Some(c.realm.clone()),
            socket: Some(c.control_socket.clone()),
            addresses: c.offered_addresses(),
        }
    }

    /// The host's migration SPN (`Microsoft Virtual System Migration Service/hv1.lab...`).
    pub fn spn(&self) -> Result<Spn, ControlError> {
        Spn::new(MIGRATION_SERVICE_CLASS, &self.fqdn).map_err(|source| ControlError::Spn {
            host: self.name.clone(),
            source,
        })
    }
}

fn load(path: &Path) -> Option<Config> {
    path.exists().then(|| Config::load(path).ok()).flatten()
}

/// Resolves `--host` (see the module documentation). `None`: this machine.
pub fn resolve(host: Option<&str>, socket: Option<&Path>) -> Result<HostTarget, ControlError> {
    let Some(name) = host else {
        let mut t = match load(Path::new(SYSTEM_CONFIG)) {
            Some(c) => HostTarget::from_config(&c),
            None => HostTarget {
                name: "localhost".into(),
                fqdn: "localhost".into(),
                realm: std::env::var("VMGATE_REALM").ok(),
                socket: Some(PathBuf::from(DEFAULT_SOCKET)),
                addresses: Vec::new(),
            },
        };
        if let Some(s) = socket {
            t.socket = Some(s.to_owned());
        }
        return Ok(t);
    };
    let short = name.split('.').next().unwrap_or(name).to_ascii_lowercase();
    if let Some(dir) = std::env::var_os("VMGATE_LAB_DIR") {
        let path = Path::new(&dir).join(&short).join("vmgated.toml");
        if path.exists() {
            let c = Config::load(&path).map_err(|source| ControlError::Config {
                host: name.to_owned(),
                source,
            })?;
            return Ok(with_socket(HostTarget::from_config(&c), socket));
        }
    }
    if let Some(c) = load(Path::new(SYSTEM_CONFIG))
        && (c.host_name.eq_ignore_ascii_case(name) || c.fqdn.eq_ignore_ascii_case(name))
    {
        return Ok(with_socket(HostTarget::from_config(&c), socket));
    }
    let realm = std::env::var("VMGATE_REALM").ok();
    let fqdn = if name.contains('.') {
        name.to_ascii_lowercase()
    } else {
        match &realm {
            Some(r) => format!("{short}.{}", r.to_ascii_lowercase()),
            None => return Err(ControlError::NoDnsName(name.to_owned())),
        }
    };
    let addresses: Vec<SocketAddr> = (fqdn.as_str(), DEFAULT_PORT)
        .to_socket_addrs()
        .map_err(|source| ControlError::Resolve {
            host: name.to_owned(),
            source,
        })?
        .collect();
    Ok(HostTarget {
        name: short,
        fqdn,
        realm,
        socket: socket.map(Path::to_owned),
        addresses,
    })
}

fn with_socket(mut t: HostTarget, socket: Option<&Path>) -> HostTarget {
    if let Some(s) = socket {
        t.socket = Some(s.to_owned());
    }
    t
}

/// How to reach the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Local when the host's socket is on this machine, remote otherwise.
    Auto,
    /// The local control socket.
    Local,
    /// The gateway.
    Remote,
}

/// An open conversation with a daemon.
#[derive(Debug)]
pub enum Session {
    /// Over the local socket.
    Local(LocalClient),
    /// Through the gateway.
    Remote(Box<ControlClient<AuthenticatedStream>>),
}

impl Session {
    /// Whether the daemon is on this machine's socket (moves hand over the caller's ticket).
    pub fn is_local(&self) -> bool {
        matches!(self, Session::Local(_))
    }

    /// Sends a request; `on_progress` sees each progress line.
    pub fn call_with(
        &mut self,
        request: &Request,
        on_progress: impl FnMut(&Response),
    ) -> Result<Response, ControlError> {
        match self {
            Session::Local(c) => c.call_with(request, on_progress),
            Session::Remote(c) => c.call_with(request, on_progress),
        }
        .map_err(ControlError::Protocol)
    }

    /// Sends a request and returns the final answer.
    pub fn call(&mut self, request: &Request) -> Result<Response, ControlError> {
        self.call_with(request, |_| {})
    }
}

/// The caller's credential cache: `--ccache`, else `KRB5CCNAME`, else the default file.
pub fn caller_ccache(explicit: Option<&str>) -> String {
    if let Some(c) = explicit {
        return c.to_owned();
    }
    std::env::var("KRB5CCNAME")
        .unwrap_or_else(|_| format!("FILE:/tmp/krb5cc_{}", nix::unistd::getuid()))
}

/// The bytes of a FILE credential cache (to hand over on the local socket).
pub fn ccache_bytes(ccache: &str) -> Result<Vec<u8>, ControlError> {
    let path = ccache.strip_prefix("FILE:").unwrap_or(ccache);
    if path.contains(':') && !path.starts_with('/') {
        return Err(ControlError::CcacheNotAFile(ccache.to_owned()));
    }
    std::fs::read(path).map_err(|error| ControlError::CcacheUnreadable {
        path: path.to_owned(),
        error,
    })
}

/// Opens a session with the host.
pub fn open(
    target: &HostTarget,
    transport: Transport,
    ccache: Option<&str>,
    forward_credentials: bool,
) -> Result<Session, ControlError> {
    let local_ok = target.socket.as_deref().is_some_and(Path::exists);
    let local = match transport {
        Transport::Local => true,
        Transport::Remote => false,
        Transport::Auto => local_ok && !forward_credentials,
    };
    if local {
        let path = target
            .socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        return LocalClient::connect(&path)
            .map(Session::Local)
            .map_err(|error| ControlError::Local {
                host: target.name.clone(),
                error,
            });
    }
    let realm = target
        .realm
        .clone()
        .ok_or_else(|| ControlError::NoRealm(target.name.clone()))?;
    let gateway = GatewayTarget {
        name: target.name.clone(),
        spn: target.spn()?,
        realm,
        addresses: target.addresses.clone(),
    };
    let client = gateway::connect(&gateway, &caller_ccache(ccache), forward_credentials)?;
    Ok(Session::Remote(Box::new(client)))
}
