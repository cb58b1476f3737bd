//! [`ProtocolError`]: everything that can go wrong in the codec and the state machines, with
//! who is at fault.

use super::types::{MessageType, ProtocolVersion, SessionId};

/// Who is at fault for a [`ProtocolError`] (rustls' habit: bad bytes, a misbehaving peer, an
/// incompatible peer, or our own bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The peer sent bytes that do not decode.
    MalformedBytes,
    /// The peer sent well-formed messages at the wrong time, more than once, or with values
    /// outside what the session allows.
    MisbehavingPeer,
    /// The peer speaks a protocol version we cannot work with.
    IncompatiblePeer,
    /// Our own code asked for something impossible (a bug in vmgate, on this side).
    OwnBug,
    /// The connection failed (I/O error or closed mid-frame).
    Transport,
}

/// An error of the migration protocol. Messages are sentences; none repeats its `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    // ---- malformed bytes -------------------------------------------------------------------
    /// The frame does not start with the magic.
    #[error(
        "The peer sent a frame that does not start with the vmgate migration magic (it sent {found:#06x}): it does not speak this protocol, or the stream is out of step."
    )]
    BadMagic {
        /// The two bytes found instead, little-endian.
        found: u16,
    },
    /// Type 0.
    #[error("The peer sent a frame of message type 0, which is never valid.")]
    ZeroType,
    /// A type this version does not know.
    #[error("The peer sent a frame of unknown message type {0}.")]
    UnknownType(u16),
    /// Header version 0.
    #[error("The peer sent a frame with protocol version 0, which does not exist.")]
    ZeroVersion,
    /// Flags set that no version defines.
    #[error("The peer set frame flags {0:#06x}, but this protocol version defines none.")]
    UnknownFlags(u16),
    /// The header announces more than the type allows.
    #[error(
        "The peer announced a {kind} frame of {len} bytes, but a {kind} may be at most {max} bytes."
    )]
    FrameTooLong {
        /// The frame's type.
        kind: MessageType,
        /// The announced payload length.
        len: u32,
        /// The type's limit.
        max: usize,
    },
    /// A field runs past the end of the payload.
    #[error("The peer's {kind} message ends in the middle of its {field}.")]
    Truncated {
        /// The message.
        kind: MessageType,
        /// The field that did not fit.
        field: &'static str,
    },
    /// Bytes left after the last field.
    #[error("The peer's {kind} message has {extra} bytes after its last field.")]
    TrailingBytes {
        /// The message.
        kind: MessageType,
        /// How many bytes were left.
        extra: usize,
    },
    /// A field's value is not allowed.
    #[error("The peer's {kind} message has an invalid {field}: {reason}.")]
    InvalidField {
        /// The message.
        kind: MessageType,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A compressed page or block does not decompress to exactly one unit.
    #[error(
        "The peer sent a compressed unit {index} that does not decompress to exactly {unit} bytes."
    )]
    BadCompressedUnit {
        /// Page or block index.
        index: u64,
        /// The unit size.
        unit: usize,
    },

    // ---- incompatible peer -----------------------------------------------------------------
    /// A non-handshake frame of a version this build cannot decode.
    #[error(
        "The peer sent a {kind} frame of protocol version {version}; this build decodes versions {min} to {max}."
    )]
    UnsupportedVersion {
        /// The frame's type.
        kind: MessageType,
        /// The frame's version.
        version: ProtocolVersion,
        /// Oldest decodable.
        min: ProtocolVersion,
        /// Newest decodable.
        max: ProtocolVersion,
    },
    /// The destination refused our version (source side) or we refused the source's
    /// (destination side); the text names both software and protocol versions.
    #[error("{0}")]
    VersionRefused(String),

    // ---- misbehaving peer ------------------------------------------------------------------
    /// A message that is not allowed in the current state (out of order, replayed, or from the
    /// wrong side).
    #[error("The peer sent a {got} message while this side was {state}, where it is not allowed.")]
    UnexpectedMessage {
        /// The message received.
        got: MessageType,
        /// Our state's name.
        state: &'static str,
    },
    /// A frame whose header version is not the session's.
    #[error(
        "The peer sent a {kind} frame of protocol version {got} in a session that negotiated version {negotiated}."
    )]
    VersionChanged {
        /// The frame's type.
        kind: MessageType,
        /// The frame's version.
        got: ProtocolVersion,
        /// The session's version.
        negotiated: ProtocolVersion,
    },
    /// A Hello whose channel fields disagree with its purpose or the session.
    #[error("The peer's Hello is inconsistent: {0}.")]
    BadHello(String),
    /// A join for another session.
    #[error("The peer tried to join session {got} to session {expected}.")]
    WrongSession {
        /// The session named in the Hello.
        got: SessionId,
        /// This session.
        expected: SessionId,
    },
    /// A message on a channel that does not exist or has not joined.
    #[error("The peer sent a {kind} message on channel {channel}, which {why}.")]
    BadChannel {
        /// The message.
        kind: MessageType,
        /// The channel.
        channel: u16,
        /// Why that channel may not carry it.
        why: &'static str,
    },
    /// A second Hello for a channel that already joined.
    #[error("The peer joined channel {0} a second time.")]
    DuplicateChannel(u16),
    /// A page beyond the VM's memory.
    #[error("The peer sent page {page}, but the VM's memory has only {pages} pages.")]
    PageOutOfRange {
        /// The page index.
        page: u64,
        /// The page count.
        pages: u64,
    },
    /// A page or block on a channel other than its stripe's.
    #[error(
        "The peer sent {unit} {index} on channel {channel}; with {channels} channels it belongs on channel {expected}."
    )]
    WrongStripe {
        /// "page" or "disk block".
        unit: &'static str,
        /// Its index.
        index: u64,
        /// The channel it came on.
        channel: u16,
        /// The channel count.
        channels: u16,
        /// The channel it belongs on.
        expected: u16,
    },
    /// A batch or RoundEnd for a round other than the channel's current one.
    #[error(
        "The peer sent a {kind} for round {got} on channel {channel}, whose current round is {expected}."
    )]
    WrongRound {
        /// The message.
        kind: MessageType,
        /// The channel.
        channel: u16,
        /// The round in the message.
        got: u32,
        /// The channel's current round.
        expected: u32,
    },
    /// Data for a round after the announced final one.
    #[error("The peer sent data for round {round} after announcing {final_round} as the last.")]
    AfterFinalRound {
        /// The round.
        round: u32,
        /// The announced final round.
        final_round: u32,
    },
    /// SwitchoverBegin naming a final round that a channel has already finished.
    #[error(
        "The peer announced round {final_round} as the last, but channel {channel} already finished it."
    )]
    FinalRoundPassed {
        /// The announced final round.
        final_round: u32,
        /// The channel that is past it.
        channel: u16,
    },
    /// A count the peer announced does not match what arrived.
    #[error("The peer announced {announced} {what}, but {received} arrived.")]
    CountMismatch {
        /// What was counted ("batches on channel 2 in round 3").
        what: String,
        /// The peer's count.
        announced: u64,
        /// Ours.
        received: u64,
    },
    /// vCPU index out of range.
    #[error("The peer sent the state of vCPU {index}, but the VM has {vcpus} vCPUs.")]
    VcpuOutOfRange {
        /// The index.
        index: u32,
        /// The VM's vCPU count.
        vcpus: u32,
    },
    /// A piece of state sent twice.
    #[error("The peer sent {0} twice.")]
    Duplicate(String),
    /// Complete before everything arrived.
    #[error("The peer declared the move complete, but {0} is missing.")]
    Incomplete(String),
    /// A disk or layer index out of range or not announced.
    #[error("The peer sent {kind} for disk {disk} layer {layer}, which {why}.")]
    BadLayer {
        /// The message.
        kind: MessageType,
        /// The disk.
        disk: u32,
        /// The layer.
        layer: u32,
        /// What is wrong.
        why: &'static str,
    },
    /// A disk block beyond the layer's size.
    #[error(
        "The peer sent block {block} of disk {disk} layer {layer}, but that layer has {blocks} blocks."
    )]
    BlockOutOfRange {
        /// The disk.
        disk: u32,
        /// The layer.
        layer: u32,
        /// The block index.
        block: u64,
        /// The layer's block count.
        blocks: u64,
    },
    /// A RoundAck that does not follow what we sent (source side).
    #[error("The peer acknowledged round {acked}, but {why}.")]
    BadRoundAck {
        /// The acknowledged round.
        acked: u32,
        /// What is wrong ("only 3 rounds were ended").
        why: String,
    },
    /// The peer's outcome answer is for another session (source side).
    #[error("The peer answered about session {got}, but we asked about session {expected}.")]
    WrongOutcomeSession {
        /// The session answered about.
        got: SessionId,
        /// The session asked about.
        expected: SessionId,
    },

    // ---- transport -------------------------------------------------------------------------
    /// The connection closed in the middle of a frame.
    #[error(
        "The connection closed in the middle of a frame ({got} of {expected} bytes of its {part})."
    )]
    ClosedMidFrame {
        /// "header" or "payload".
        part: &'static str,
        /// Bytes read.
        got: usize,
        /// Bytes needed.
        expected: usize,
    },
    /// Reading or writing the connection failed.
    #[error("Reading or writing the migration connection failed.")]
    Io(#[from] std::io::Error),

    // ---- our own bug -----------------------------------------------------------------------
    /// Our own code broke an internal rule.
    #[error("This side broke its own rule: {0}. This is a bug in vmgate.")]
    InternalBug(String),
    /// We tried to encode something the protocol cannot carry.
    #[error("This side tried to send an invalid {kind}: {reason}. This is a bug in vmgate.")]
    EncodeInvalid {
        /// The message.
        kind: MessageType,
        /// What is wrong.
        reason: String,
    },
    /// A local call that the state does not allow (a bug in the engine driving the state
    /// machine).
    #[error("This side called {call} while it was {state}. This is a bug in vmgate.")]
    CallOutOfOrder {
        /// The call.
        call: &'static str,
        /// The state's name.
        state: &'static str,
    },
}

impl ProtocolError {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        use ProtocolError as E;
        match self {
            E::BadMagic { .. }
            | E::ZeroType
            | E::UnknownType(_)
            | E::ZeroVersion
            | E::UnknownFlags(_)
            | E::FrameTooLong { .. }
            | E::Truncated { .. }
            | E::TrailingBytes { .. }
            | E::InvalidField { .. }
            | E::BadCompressedUnit { .. } => Fault::MalformedBytes,
            E::UnsupportedVersion { .. } | E::VersionRefused(_) => Fault::IncompatiblePeer,
            E::UnexpectedMessage { .. }
            | E::VersionChanged { .. }
            | E::BadHello(_)
            | E::WrongSession { .. }
            | E::BadChannel { .. }
            | E::DuplicateChannel(_)
            | E::PageOutOfRange { .. }
            | E::WrongStripe { .. }
            | E::WrongRound { .. }
            | E::AfterFinalRound { .. }
            | E::FinalRoundPassed { .. }
            | E::CountMismatch { .. }
            | E::VcpuOutOfRange { .. }
            | E::Duplicate(_)
            | E::Incomplete(_)
            | E::BadLayer { .. }
            | E::BlockOutOfRange { .. }
            | E::BadRoundAck { .. }
            | E::WrongOutcomeSession { .. } => Fault::MisbehavingPeer,
            E::ClosedMidFrame { .. } | E::Io(_) => Fault::Transport,
            E::InternalBug(_) | E::EncodeInvalid { .. } | E::CallOutOfOrder { .. } => Fault::OwnBug,
        }
    }

    /// The code to put in the Error message that tells the peer about this error.
    pub fn wire_code(&self) -> super::types::ErrorCode {
        use super::types::ErrorCode;
        match self.fault() {
            Fault::MalformedBytes => ErrorCode::Malformed,
            Fault::MisbehavingPeer => ErrorCode::Misbehaving,
            Fault::IncompatiblePeer => ErrorCode::Incompatible,
            Fault::OwnBug => ErrorCode::Internal,
            Fault::Transport => ErrorCode::Transport,
        }
    }

    pub(crate) fn invalid(
        kind: MessageType,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        ProtocolError::InvalidField {
            kind,
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn encode(kind: MessageType, reason: impl Into<String>) -> Self {
        ProtocolError::EncodeInvalid {
            kind,
            reason: reason.into(),
        }
    }
}
