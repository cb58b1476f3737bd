//! Who sent a request, with the proof that the daemon's checks let them in: a local process
//! admitted by its peer credentials ([`LocalAdmitted`], made only by
//! [`crate::admission::admit`]), or a user over the network whom Kerberos authenticated and the
//! admin group authorized ([`Authorized`], made only by `vmgate_auth`'s authorizer). The
//! dispatch and every engine entry point take a [`Caller`], so a path that skips
//! authentication or authorization does not compile.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use vmgate_auth::authz::Authorized;
use vmgate_auth::channel::{ActingFor, PeerAuthenticated};

use crate::admission::{LocalAdmitted, LocalPeer};

/// A caller that came through the gateway: Kerberos authenticated it, the admin group
/// authorized it.
#[derive(Debug)]
pub struct RemotePeer {
    /// `alice@LAB.EXAMPLE.TEST`.
    pub principal: String,
    /// Where it connected from.
    pub addr: SocketAddr,
    /// What this host may use to act for the caller towards another host.
    pub acting: ActingFor,
}

/// Who sent a request, and the proof they were let in.
#[derive(Debug)]
pub enum Caller {
    /// A process on this host, by its peer credentials ("logged on to the host").
    Local {
        /// The process.
        peer: LocalPeer,
        /// The admission's proof.
        admitted: LocalAdmitted,
    },
    /// A user over the network.
    Remote {
        /// The user.
        peer: RemotePeer,
        /// The authorization's proof.
        authorized: Authorized,
    },
}

impl Caller {
    /// A local caller, as the socket's admission let it in.
    pub fn local(peer: LocalPeer, admitted: LocalAdmitted) -> Caller {
        Caller::Local { peer, admitted }
    }

    /// A remote caller, as the gateway's Kerberos logon and authorization let it in.
    pub fn remote(peer: &PeerAuthenticated, acting: ActingFor, authorized: Authorized) -> Caller {
        Caller::Remote {
            peer: RemotePeer {
                principal: peer.principal().to_string(),
                addr: peer.addr(),
                acting,
            },
            authorized,
        }
    }

    /// Who, for logs and job records (`root (uid 0) on this host`,
    /// `alice@LAB.EXAMPLE.TEST from 127.0.0.1`).
    pub fn describe(&self) -> String {
        match self {
            Caller::Local { peer, .. } => match &peer.user {
                Some(u) => format!("{u} (uid {}) on this host", peer.uid),
                None => format!("uid {} on this host", peer.uid),
            },
            Caller::Remote { peer, .. } => format!("{} from {}", peer.principal, peer.addr.ip()),
        }
    }

    /// The user a job runs as: the principal of a remote caller, the description of a local
    /// one.
    pub fn user(&self) -> String {
        match self {
            Caller::Remote { peer, .. } => peer.principal.clone(),
            Caller::Local { .. } => self.describe(),
        }
    }
}
