//! Kerberos constrained delegation between hosts: what the directory says, what a live move
//! S→D started as U needs, whether it has it, and how to configure it.
//!
//! * [`facts`]: the directory facts a verdict depends on (plain data).
//! * [`analysis`]: the verdict, a pure function of the facts (unit-tested without a network),
//!   and the [`DelegationAllowed`] proof only a passing verdict creates.
//! * [`gather`]: reading the facts (and the `show` / `find` reports) from the directory.
//! * [`configure`]: msDS-AllowedToDelegateTo with Samba's twins, the flags, `allow-migration`.
//! * [`live`]: the real S4U2Self / S4U2Proxy exchange with the KDC, next to the prediction.
//! * [`sd`]: a bounded reader of the security descriptors in
//!   msDS-AllowedToActOnBehalfOfOtherIdentity (resource-based delegation).

pub mod analysis;
pub mod configure;
pub mod facts;
pub mod gather;
pub mod live;
pub mod sd;

pub use analysis::{
    DelegationAllowed, KdcAnswer, Requirement, RequirementId, Verdict, analyze,
    needs_protocol_transition,
};
pub use facts::{
    AuthType, DelegateTo, DelegationFacts, DirectoryKind, MIGRATION_SERVICE_CLASS, MoveStart,
    SourceAccount, SpnHolders, TargetHost, Uac, UserFacts,
};

use crate::directory::{DirectoryError, ErrorKind};
use crate::spn::SpnError;

/// Errors of the delegation commands (reading facts, configuring, the live check).
#[derive(Debug, thiserror::Error)]
pub enum DelegationError {
    /// The directory failed or refused (boxed: directory errors are large).
    #[error(transparent)]
    Directory(Box<DirectoryError>),
    /// An SPN given is malformed.
    #[error(transparent)]
    BadSpn(#[from] SpnError),
    /// A command that takes SPNs got none.
    #[error("no SPN given")]
    NoSpn,
    /// No computer account for a host.
    #[error("there is no computer account for host {name} in the domain")]
    UnknownHost {
        /// The name given.
        name: String,
    },
    /// No account with that name.
    #[error("there is no account named {name} in the domain")]
    UnknownAccount {
        /// The name given.
        name: String,
    },
    /// `del-service` of an SPN the account does not list.
    #[error("{spn} is not in msDS-AllowedToDelegateTo of {account}: nothing was changed")]
    NotListed {
        /// The SPN.
        spn: String,
        /// The account.
        account: String,
    },
    /// `allow-migration` from a host to itself.
    #[error("the source and the destination are the same host ({host})")]
    SameHost {
        /// The host.
        host: String,
    },
    /// msDS-AllowedToActOnBehalfOfOtherIdentity does not decode.
    #[error(
        "the resource-based delegation descriptor (msDS-AllowedToActOnBehalfOfOtherIdentity) \
         cannot be decoded"
    )]
    BadDescriptor {
        /// Why.
        #[source]
        source: sd::SdError,
    },
    /// The live check could not run (keytab, ccache, GSSAPI set-up).
    #[error(transparent)]
    Live(Box<live::LiveError>),
}

impl From<DirectoryError> for DelegationError {
    fn from(e: DirectoryError) -> Self {
        DelegationError::Directory(Box::new(e))
    }
}

impl From<live::LiveError> for DelegationError {
    fn from(e: live::LiveError) -> Self {
        DelegationError::Live(Box::new(e))
    }
}

impl DelegationError {
    /// The kind of failure, for exit codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DelegationError::Directory(e) => e.kind(),
            DelegationError::BadSpn(_)
            | DelegationError::NoSpn
            | DelegationError::SameHost { .. } => ErrorKind::Usage,
            DelegationError::UnknownHost { .. }
            | DelegationError::UnknownAccount { .. }
            | DelegationError::NotListed { .. } => ErrorKind::NotFound,
            DelegationError::BadDescriptor { .. } => ErrorKind::Refused,
            DelegationError::Live(e) => e.kind(),
        }
    }
}
