//! The destination's state machine, as pure logic: it takes decoded frames (and the engine's
//! local results) and says what to do next. Each transition consumes the state, so an old
//! state cannot be reused; a message that the state does not allow is rejected with the error
//! and what to do about it, never a panic.
//!
//! One state serves one move: the engine feeds it the frames of all the move's channels, each
//! with its channel index, in the order it reads them (each channel's own order is kept; the
//! rules do not depend on how channels interleave). Page batches are validated here — round,
//! range, stripe — and then written by the engine straight from the frame buffer.
//!
//! ```text
//!   Idle ──Hello(Move)──▶ Negotiated ──VmConfig──▶ Checking ──verdict──▶ Configured
//!    │  └─Hello(QueryOutcome)──▶ Answered           │ Incompatible          │ all channels
//!    └─version refused──▶ Refused ◀─────────────────┘                       ▼ joined
//!                                 SwitchingOver ◀──SwitchoverBegin── ReceivingMemory
//!                                      │ Complete (all rounds acked, all state, totals)
//!                                      ▼
//!                                  Resuming ──on_resumed──▶ Resumed ──Released──▶ Done
//!   any state before Resumed ──Cancel / Error / link lost / local failure──▶ Cancelled|Failed
//!                                                                    (discard everything)
//! ```

use super::batch::Units;
use super::error::ProtocolError;
use super::frame::Frame;
use super::message::{
    ErrorMessage, Hello, HelloAck, Incompatibility, Incompatible, Message, RoundAck, VersionRefused,
};
use super::types::{
    DISK_BLOCK_SIZE, ErrorCode, MAX_CHANNELS, MAX_INCOMPATIBILITIES, MAX_TEXT_LEN, MessageType,
    MoveOutcome, ProtocolVersion, Purpose, SessionId, stripe_channel,
};
use std::borrow::Cow;
use std::fmt;

/// What this destination accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverPolicy {
    /// Our software version, for HelloAck and refusals ("vmgate 0.1.0").
    pub software: Cow<'static, str>,
    /// The oldest source protocol version we accept.
    pub min_version: ProtocolVersion,
    /// Our protocol version: the newest source version we accept.
    pub version: ProtocolVersion,
    /// Most channels one move may use here (at most [`MAX_CHANNELS`]).
    pub max_channels: u16,
}

impl ReceiverPolicy {
    /// This build's versions and the protocol's channel limit.
    pub fn new(software: impl Into<Cow<'static, str>>) -> ReceiverPolicy {
        ReceiverPolicy {
            software: software.into(),
            min_version: ProtocolVersion::MIN_SUPPORTED,
            version: ProtocolVersion::CURRENT,
            max_channels: MAX_CHANNELS,
        }
    }

    /// The version rule: a destination accepts source versions in `[min_version, version]`,
    /// and the session runs at the source's version. A newer source is refused (a VM moves
    /// only to a host of the same or a newer version), naming both versions.
    pub fn negotiate(&self, hello: &Hello<'_>) -> Result<ProtocolVersion, VersionRefused<'static>> {
        if hello.version >= self.min_version && hello.version <= self.version {
            Ok(hello.version)
        } else {
            Err(VersionRefused {
                source: hello.version,
                source_software: Cow::Owned(hello.software.to_string()),
                destination_min: self.min_version,
                destination: self.version,
                destination_software: self.software.clone(),
            })
        }
    }
}

/// The engine's verdict on a VmConfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The skeleton is built.
    Compatible,
    /// Every reason the VM cannot come here (empty is a bug).
    Incompatible(Vec<Incompatibility<'static>>),
}

/// What the engine must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverAction {
    /// Nothing.
    None,
    /// Send this message on the channel the frame came from.
    Send(Message<'static>),
    /// Send this message, then close the connection (the move is over).
    SendAndClose(Message<'static>),
    /// Check the VmConfig just received (CPU, switches, memory, paths, slots), build the
    /// skeleton if it fits, then call [`ReceiverState::on_verdict`].
    CheckConfig,
    /// Write the MemoryBatch's pages into guest memory (indices were checked).
    StorePages,
    /// Write the DiskBlocks into the layer (indices were checked).
    StoreBlocks,
    /// Look for an identical layer (by checksum), then call [`ReceiverState::answer_layer`].
    PrepareLayer,
    /// Keep this vCPU's state for the restore.
    StoreVcpuState(u32),
    /// Keep the device state for the restore.
    StoreDeviceState,
    /// Everything arrived: restore the state and resume the VM, then call
    /// [`ReceiverState::on_resumed`] (or [`ReceiverState::on_local_failure`]).
    Resume,
    /// Discard everything built for this move (the source keeps or resumes the VM); send
    /// `reply` first if there is one.
    Discard {
        /// The Error to tell the peer, if the link is still usable.
        reply: Option<Message<'static>>,
    },
    /// The move is over and the VM runs here: release the session's resources (not the VM).
    Finish,
    /// Look up how the named session ended and answer with an Outcome message.
    AnswerOutcome(SessionId),
}

/// A transition's result.
#[derive(Debug)]
pub struct ReceiverStep {
    /// The next state.
    pub state: ReceiverState,
    /// What to do.
    pub action: ReceiverAction,
}

/// A message the state did not allow (or an engine call out of order): the error, and the
/// step to take instead (a terminal state, and either discarding the move or — once the VM
/// was resumed here — keeping it).
#[derive(Debug)]
pub struct Rejected<S> {
    /// What went wrong.
    pub error: ProtocolError,
    /// What to do about it.
    pub then: S,
}

impl<S> fmt::Display for Rejected<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// The destination's state. See the module doc for the diagram.
#[derive(Debug)]
pub enum ReceiverState {
    /// Nothing received yet.
    Idle(ReceiverPolicy),
    /// Version accepted; waiting for the VM's configuration.
    Negotiated(Box<Negotiated>),
    /// Configuration received; the engine is checking it.
    Checking(Box<Transfer>),
    /// Skeleton built; waiting for the parallel channels to join.
    Configured(Box<Transfer>),
    /// Pre-copy: pages (and disk blocks) arrive in rounds.
    ReceivingMemory(Box<Transfer>),
    /// The VM is paused on the source; the last round and the state arrive.
    SwitchingOver(Box<Transfer>),
    /// Complete received; the engine restores and resumes the VM.
    Resuming(Box<Transfer>),
    /// The VM runs here; waiting for the source to say it let go.
    Resumed(Box<Transfer>),
    /// The move completed; the VM runs here.
    Done,
    /// An outcome query was answered.
    Answered,
    /// The version or the configuration was refused.
    Refused,
    /// The source (or we) cancelled; everything was discarded.
    Cancelled,
    /// The move failed; everything was discarded.
    Failed,
}

/// State after the version was accepted.
#[derive(Debug, Clone)]
pub struct Negotiated {
    policy: ReceiverPolicy,
    version: ProtocolVersion,
    session: SessionId,
    channels: u16,
}

#[derive(Debug, Clone, Default)]
struct ChannelProgress {
    joined: bool,
    /// The channel's current (open) round; rounds before it ended on this channel.
    round: u32,
    batches: u64,
    pages: u64,
    blocks: u64,
}

#[derive(Debug, Clone)]
struct Layer {
    disk: u32,
    layer: u32,
    blocks: u64,
    reuse: Option<bool>,
}

/// The session's bookkeeping from the configuration on.
#[derive(Debug, Clone)]
pub struct Transfer {
    neg: Negotiated,
    pages: u64,
    vcpus: u32,
    disks: u32,
    chans: Vec<ChannelProgress>,
    acked: u32,
    final_round: Option<u32>,
    batches: u64,
    pages_received: u64,
    blocks: u64,
    layers: Vec<Layer>,
    vcpu_seen: Vec<bool>,
    device_seen: bool,
}

impl Transfer {
    /// The session id.
    pub fn session(&self) -> SessionId {
        self.neg.session
    }

    /// The newest round every channel finished.
    pub fn acked_round(&self) -> u32 {
        self.acked
    }
}

fn step(
    state: ReceiverState,
    action: ReceiverAction,
) -> Result<ReceiverStep, Box<Rejected<ReceiverStep>>> {
    Ok(ReceiverStep { state, action })
}

/// Turns an error into the Error message that tells the peer (a printable, bounded text).
pub fn error_reply(error: &ProtocolError) -> Message<'static> {
    Message::Error(ErrorMessage {
        code: error.wire_code(),
        message: Cow::Owned(bounded_text(&error.to_string())),
    })
}

pub(crate) fn bounded_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT_LEN));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_TEXT_LEN {
            break;
        }
        out.push(c);
    }
    out
}

impl ReceiverState {
    /// A fresh destination for one incoming connection.
    pub fn new(policy: ReceiverPolicy) -> ReceiverState {
        ReceiverState::Idle(policy)
    }

    /// The state's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ReceiverState::Idle(_) => "waiting for Hello",
            ReceiverState::Negotiated(_) => "waiting for the VM configuration",
            ReceiverState::Checking(_) => "checking the VM configuration",
            ReceiverState::Configured(_) => "waiting for the parallel channels to join",
            ReceiverState::ReceivingMemory(_) => "receiving memory",
            ReceiverState::SwitchingOver(_) => "switching over",
            ReceiverState::Resuming(_) => "resuming the VM",
            ReceiverState::Resumed(_) => "running the VM, waiting for the source to release it",
            ReceiverState::Done => "done",
            ReceiverState::Answered => "done answering an outcome query",
            ReceiverState::Refused => "refused",
            ReceiverState::Cancelled => "cancelled",
            ReceiverState::Failed => "failed",
        }
    }

    /// How the move ended, for answering a source's outcome query; `None` while it is still
    /// in progress before the handoff.
    pub fn outcome(&self) -> Option<MoveOutcome> {
        match self {
            ReceiverState::Resumed(_) | ReceiverState::Done => Some(MoveOutcome::Resumed),
            ReceiverState::Refused | ReceiverState::Cancelled | ReceiverState::Failed => {
                Some(MoveOutcome::Discarded)
            }
            _ => None,
        }
    }

    /// Whether the VM runs here (from the moment it was resumed).
    pub fn owns_vm(&self) -> bool {
        matches!(self, ReceiverState::Resumed(_) | ReceiverState::Done)
    }

    /// The step for a failure in this state: before the VM resumed here, fail and discard
    /// (telling the peer); after, keep the VM and end the session.
    fn fail(self, error: ProtocolError) -> Box<Rejected<ReceiverStep>> {
        let then = if self.owns_vm() {
            ReceiverStep {
                state: ReceiverState::Done,
                action: ReceiverAction::Finish,
            }
        } else {
            ReceiverStep {
                state: ReceiverState::Failed,
                action: ReceiverAction::Discard {
                    reply: Some(error_reply(&error)),
                },
            }
        };
        Box::new(Rejected { error, then })
    }

    fn unexpected(self, got: MessageType) -> Box<Rejected<ReceiverStep>> {
        let state = self.name();
        self.fail(ProtocolError::UnexpectedMessage { got, state })
    }

    /// Feeds one frame that arrived on `channel` (0 for the control channel; for a joining
    /// channel's Hello, the index it joins as).
    pub fn on_message(
        self,
        channel: u16,
        frame: &Frame<'_>,
    ) -> Result<ReceiverStep, Box<Rejected<ReceiverStep>>> {
        let msg = &frame.message;
        let kind = msg.message_type();
        if let ReceiverState::Idle(policy) = self {
            return on_hello(policy, channel, frame);
        }
        // From here on the session has a version: every frame must carry it.
        if let Some(neg) = self.negotiated() {
            if frame.version != neg.version {
                let negotiated = neg.version;
                return Err(self.fail(ProtocolError::VersionChanged {
                    kind,
                    got: frame.version,
                    negotiated,
                }));
            }
            if channel >= neg.channels {
                return Err(self.fail(ProtocolError::BadChannel {
                    kind,
                    channel,
                    why: "does not exist in this move",
                }));
            }
        }
        // Messages every live state handles the same way.
        match (&self, msg) {
            (ReceiverState::Done | ReceiverState::Answered | ReceiverState::Refused, _)
            | (ReceiverState::Cancelled | ReceiverState::Failed, _) => {
                return Err(self.unexpected(kind));
            }
            (_, Message::Ping(n)) => return step(self, ReceiverAction::Send(Message::Pong(*n))),
            (_, Message::Pong(_)) => return step(self, ReceiverAction::None),
            (ReceiverState::Resumed(_), Message::Cancel(_) | Message::Error(_)) => {
                // The VM runs here now: the source cannot take it back.
                return Err(self.unexpected(kind));
            }
            (_, Message::Cancel(_)) => {
                return step(
                    ReceiverState::Cancelled,
                    ReceiverAction::Discard { reply: None },
                );
            }
            (_, Message::Error(_)) => {
                return step(
                    ReceiverState::Failed,
                    ReceiverAction::Discard { reply: None },
                );
            }
            _ => {}
        }
        match self {
            ReceiverState::Negotiated(neg) => match msg {
                Message::VmConfig(cfg) if channel == 0 => {
                    let channels = usize::from(neg.channels);
                    let vcpus = usize::try_from(cfg.vcpus).unwrap_or(usize::MAX);
                    let mut chans = vec![ChannelProgress::default(); channels];
                    for c in &mut chans {
                        c.round = 1;
                    }
                    if let Some(c0) = chans.first_mut() {
                        c0.joined = true;
                    }
                    // vcpus <= MAX_VCPUS and disks <= MAX_DISKS: checked by the decoder.
                    step(
                        ReceiverState::Checking(Box::new(Transfer {
                            neg: *neg,
                            pages: cfg.pages(),
                            vcpus: cfg.vcpus,
                            disks: cfg.disks,
                            chans,
                            acked: 0,
                            final_round: None,
                            batches: 0,
                            pages_received: 0,
                            blocks: 0,
                            layers: Vec::new(),
                            vcpu_seen: vec![false; vcpus],
                            device_seen: false,
                        })),
                        ReceiverAction::CheckConfig,
                    )
                }
                _ => Err(ReceiverState::Negotiated(neg).control_or_unexpected(channel, kind)),
            },
            ReceiverState::Configured(mut t) => match msg {
                Message::Hello(h) if h.purpose == Purpose::Join => {
                    if let Err(e) = t.join(channel, h) {
                        return Err(ReceiverState::Configured(t).fail(e));
                    }
                    let ack = Message::HelloAck(HelloAck {
                        version: t.neg.version,
                        software: t.neg.policy.software.clone(),
                        session: t.neg.session,
                        channel,
                    });
                    let all = t.chans.iter().all(|c| c.joined);
                    let state = if all {
                        ReceiverState::ReceivingMemory(t)
                    } else {
                        ReceiverState::Configured(t)
                    };
                    step(state, ReceiverAction::Send(ack))
                }
                _ => Err(ReceiverState::Configured(t).unexpected(kind)),
            },
            ReceiverState::ReceivingMemory(t) => receiving(t, false, channel, msg),
            ReceiverState::SwitchingOver(t) => receiving(t, true, channel, msg),
            ReceiverState::Resumed(t) => match msg {
                Message::Released if channel == 0 => {
                    step(ReceiverState::Done, ReceiverAction::Finish)
                }
                _ => Err(ReceiverState::Resumed(t).unexpected(kind)),
            },
            other => Err(other.unexpected(kind)),
        }
    }

    fn control_or_unexpected(self, channel: u16, kind: MessageType) -> Box<Rejected<ReceiverStep>> {
        if channel != 0 {
            self.fail(ProtocolError::BadChannel {
                kind,
                channel,
                why: "is not the control channel",
            })
        } else {
            self.unexpected(kind)
        }
    }

    fn negotiated(&self) -> Option<&Negotiated> {
        match self {
            ReceiverState::Negotiated(n) => Some(n),
            ReceiverState::Checking(t)
            | ReceiverState::Configured(t)
            | ReceiverState::ReceivingMemory(t)
            | ReceiverState::SwitchingOver(t)
            | ReceiverState::Resuming(t)
            | ReceiverState::Resumed(t) => Some(&t.neg),
            _ => None,
        }
    }

    /// The engine's verdict on the configuration (only while Checking).
    pub fn on_verdict(self, verdict: Verdict) -> Result<ReceiverStep, Box<Rejected<ReceiverStep>>> {
        let ReceiverState::Checking(t) = self else {
            let state = self.name();
            return Err(self.fail(ProtocolError::CallOutOfOrder {
                call: "on_verdict",
                state,
            }));
        };
        match verdict {
            Verdict::Compatible => {
                let state = if t.neg.channels <= 1 {
                    ReceiverState::ReceivingMemory(t)
                } else {
                    ReceiverState::Configured(t)
                };
                step(state, ReceiverAction::Send(Message::Compatible))
            }
            Verdict::Incompatible(report) if report.is_empty() => Err(ReceiverState::Checking(t)
                .fail(ProtocolError::InternalBug(
                    "an incompatibility verdict came with an empty report".into(),
                ))),
            Verdict::Incompatible(mut report) => {
                if report.len() > MAX_INCOMPATIBILITIES {
                    let more = report.len() - (MAX_INCOMPATIBILITIES - 1);
                    report.truncate(MAX_INCOMPATIBILITIES - 1);
                    report.push(Incompatibility {
                        id: 0,
                        message: Cow::Owned(format!("and {more} more incompatibilities")),
                    });
                }
                for entry in &mut report {
                    if entry.message.len() > MAX_TEXT_LEN
                        || entry.message.chars().any(char::is_control)
                    {
                        entry.message = Cow::Owned(bounded_text(&entry.message));
                    }
                }
                step(
                    ReceiverState::Refused,
                    ReceiverAction::SendAndClose(Message::Incompatible(Incompatible { report })),
                )
            }
        }
    }

    /// The engine's answer for an announced layer: `reuse` when it holds an identical one.
    pub fn answer_layer(
        self,
        disk: u32,
        layer: u32,
        reuse: bool,
    ) -> Result<ReceiverStep, Box<Rejected<ReceiverStep>>> {
        let ReceiverState::ReceivingMemory(mut t) = self else {
            let state = self.name();
            return Err(self.fail(ProtocolError::CallOutOfOrder {
                call: "answer_layer",
                state,
            }));
        };
        match t
            .layers
            .iter_mut()
            .find(|l| l.disk == disk && l.layer == layer)
        {
            Some(l) if l.reuse.is_none() => {
                l.reuse = Some(reuse);
                step(
                    ReceiverState::ReceivingMemory(t),
                    ReceiverAction::Send(Message::DiskLayerAnswer(
                        super::message::DiskLayerAnswer { disk, layer, reuse },
                    )),
                )
            }
            _ => Err(
                ReceiverState::ReceivingMemory(t).fail(ProtocolError::CallOutOfOrder {
                    call: "answer_layer for a layer that is not waiting for an answer",
                    state: "receiving memory",
                }),
            ),
        }
    }

    /// The engine resumed the VM: acknowledge (the handoff's acknowledgement).
    pub fn on_resumed(self) -> Result<ReceiverStep, Box<Rejected<ReceiverStep>>> {
        match self {
            ReceiverState::Resuming(t) => step(
                ReceiverState::Resumed(t),
                ReceiverAction::Send(Message::Resumed),
            ),
            other => {
                let state = other.name();
                Err(other.fail(ProtocolError::CallOutOfOrder {
                    call: "on_resumed",
                    state,
                }))
            }
        }
    }

    /// The engine failed locally (restoring state, writing memory, disk full). Before the VM
    /// resumed here: discard and tell the source, which keeps or resumes the VM. After: keep
    /// the VM (the failure is the engine's to report) and end the session.
    pub fn on_local_failure(self, what: &str) -> ReceiverStep {
        if self.owns_vm() {
            return ReceiverStep {
                state: ReceiverState::Done,
                action: ReceiverAction::Finish,
            };
        }
        ReceiverStep {
            state: ReceiverState::Failed,
            action: ReceiverAction::Discard {
                reply: Some(Message::Error(ErrorMessage {
                    code: ErrorCode::LocalFailure,
                    message: Cow::Owned(bounded_text(what)),
                })),
            },
        }
    }

    /// A channel's link broke. Before the VM resumed here — even while resuming — discard and
    /// never resume: the source will resume it. After: the VM stays here; the source learns
    /// the outcome by asking.
    pub fn on_link_lost(self) -> ReceiverStep {
        match self {
            ReceiverState::Resumed(_) | ReceiverState::Done => ReceiverStep {
                state: ReceiverState::Done,
                action: ReceiverAction::Finish,
            },
            ReceiverState::Answered => ReceiverStep {
                state: ReceiverState::Answered,
                action: ReceiverAction::None,
            },
            ReceiverState::Idle(_) => ReceiverStep {
                state: ReceiverState::Failed,
                action: ReceiverAction::None,
            },
            terminal @ (ReceiverState::Refused
            | ReceiverState::Cancelled
            | ReceiverState::Failed) => ReceiverStep {
                state: terminal,
                action: ReceiverAction::None,
            },
            _ => ReceiverStep {
                state: ReceiverState::Failed,
                action: ReceiverAction::Discard { reply: None },
            },
        }
    }
}

fn on_hello(
    policy: ReceiverPolicy,
    channel: u16,
    frame: &Frame<'_>,
) -> Result<ReceiverStep, Box<Rejected<ReceiverStep>>> {
    let fail = |error: ProtocolError| {
        Err(Box::new(Rejected {
            then: ReceiverStep {
                state: ReceiverState::Failed,
                action: ReceiverAction::Discard {
                    reply: Some(error_reply(&error)),
                },
            },
            error,
        }))
    };
    let Message::Hello(hello) = &frame.message else {
        return fail(ProtocolError::UnexpectedMessage {
            got: frame.message.message_type(),
            state: "waiting for Hello",
        });
    };
    let version = match policy.negotiate(hello) {
        Ok(v) => v,
        Err(refused) => {
            return step(
                ReceiverState::Refused,
                ReceiverAction::SendAndClose(Message::VersionRefused(refused)),
            );
        }
    };
    match hello.purpose {
        Purpose::Move => {
            let max = policy.max_channels.clamp(1, MAX_CHANNELS);
            if hello.channel != 0 || channel != 0 {
                return fail(ProtocolError::BadHello(format!(
                    "a new move must start on channel 0, not {}",
                    hello.channel
                )));
            }
            if hello.channels == 0 || hello.channels > max {
                return fail(ProtocolError::BadHello(format!(
                    "{} channels is not between 1 and {max}",
                    hello.channels
                )));
            }
            let ack = Message::HelloAck(HelloAck {
                version,
                software: policy.software.clone(),
                session: hello.session,
                channel: 0,
            });
            step(
                ReceiverState::Negotiated(Box::new(Negotiated {
                    policy,
                    version,
                    session: hello.session,
                    channels: hello.channels,
                })),
                ReceiverAction::Send(ack),
            )
        }
        Purpose::QueryOutcome => {
            if hello.channel != 0 || hello.channels != 1 {
                return fail(ProtocolError::BadHello(
                    "an outcome query uses channel 0 of 1".into(),
                ));
            }
            step(
                ReceiverState::Answered,
                ReceiverAction::AnswerOutcome(hello.session),
            )
        }
        Purpose::Join => fail(ProtocolError::BadHello(format!(
            "it joins session {}, which this destination does not have",
            hello.session
        ))),
    }
}

impl Transfer {
    fn join(&mut self, channel: u16, h: &Hello<'_>) -> Result<(), ProtocolError> {
        if h.session != self.neg.session {
            return Err(ProtocolError::WrongSession {
                got: h.session,
                expected: self.neg.session,
            });
        }
        if h.version != self.neg.version {
            return Err(ProtocolError::BadHello(format!(
                "channel {} speaks version {}, the session version {}",
                h.channel, h.version, self.neg.version
            )));
        }
        if h.channel != channel || h.channels != self.neg.channels || h.channel == 0 {
            return Err(ProtocolError::BadHello(format!(
                "it joins as channel {} of {} on channel {channel} of a {}-channel move",
                h.channel, h.channels, self.neg.channels
            )));
        }
        let slot = self
            .chans
            .get_mut(usize::from(channel))
            .ok_or_else(|| ProtocolError::BadHello(format!("channel {channel} does not exist")))?;
        if slot.joined {
            return Err(ProtocolError::DuplicateChannel(channel));
        }
        slot.joined = true;
        Ok(())
    }

    fn channel(
        &mut self,
        kind: MessageType,
        channel: u16,
    ) -> Result<&mut ChannelProgress, ProtocolError> {
        match self.chans.get_mut(usize::from(channel)) {
            Some(c) if c.joined => Ok(c),
            Some(_) => Err(ProtocolError::BadChannel {
                kind,
                channel,
                why: "has not joined",
            }),
            None => Err(ProtocolError::BadChannel {
                kind,
                channel,
                why: "does not exist in this move",
            }),
        }
    }

    /// Checks a batch's round against its channel and the final round.
    fn check_round(
        &mut self,
        kind: MessageType,
        channel: u16,
        round: u32,
    ) -> Result<(), ProtocolError> {
        let final_round = self.final_round;
        let c = self.channel(kind, channel)?;
        if round != c.round {
            return Err(ProtocolError::WrongRound {
                kind,
                channel,
                got: round,
                expected: c.round,
            });
        }
        match final_round {
            Some(f) if round > f => Err(ProtocolError::AfterFinalRound {
                round,
                final_round: f,
            }),
            _ => Ok(()),
        }
    }

    fn check_stripes(
        &self,
        unit: &'static str,
        channel: u16,
        units: &Units<'_>,
    ) -> Result<(), ProtocolError> {
        let channels = self.neg.channels;
        if channels <= 1 {
            return Ok(());
        }
        for u in units.iter() {
            let expected = stripe_channel(u.index, channels);
            if expected != channel {
                return Err(ProtocolError::WrongStripe {
                    unit,
                    index: u.index,
                    channel,
                    channels,
                    expected,
                });
            }
        }
        Ok(())
    }

    fn on_memory(
        &mut self,
        channel: u16,
        b: &super::batch::MemoryBatch<'_>,
    ) -> Result<(), ProtocolError> {
        self.check_round(MessageType::MemoryBatch, channel, b.round)?;
        let pages = b.pages();
        if pages.last_index() >= self.pages {
            return Err(ProtocolError::PageOutOfRange {
                page: pages.last_index(),
                pages: self.pages,
            });
        }
        self.check_stripes("page", channel, pages)?;
        let count = u64::from(pages.count());
        let c = self.channel(MessageType::MemoryBatch, channel)?;
        c.batches = c.batches.saturating_add(1);
        c.pages = c.pages.saturating_add(count);
        self.batches = self.batches.saturating_add(1);
        self.pages_received = self.pages_received.saturating_add(count);
        Ok(())
    }

    fn on_disk(
        &mut self,
        channel: u16,
        b: &super::batch::DiskBlocks<'_>,
    ) -> Result<(), ProtocolError> {
        let kind = MessageType::DiskBlocks;
        let Some(layer) = self
            .layers
            .iter()
            .find(|l| l.disk == b.disk && l.layer == b.layer)
        else {
            return Err(ProtocolError::BadLayer {
                kind,
                disk: b.disk,
                layer: b.layer,
                why: "was not announced",
            });
        };
        match layer.reuse {
            None => {
                return Err(ProtocolError::BadLayer {
                    kind,
                    disk: b.disk,
                    layer: b.layer,
                    why: "the destination has not answered for yet",
                });
            }
            Some(true) => {
                return Err(ProtocolError::BadLayer {
                    kind,
                    disk: b.disk,
                    layer: b.layer,
                    why: "the destination reuses and asked not to be sent",
                });
            }
            Some(false) => {}
        }
        let layer_blocks = layer.blocks;
        self.check_round(kind, channel, b.round)?;
        let blocks = b.blocks();
        if blocks.last_index() >= layer_blocks {
            return Err(ProtocolError::BlockOutOfRange {
                disk: b.disk,
                layer: b.layer,
                block: blocks.last_index(),
                blocks: layer_blocks,
            });
        }
        self.check_stripes("disk block", channel, blocks)?;
        let count = u64::from(blocks.count());
        let c = self.channel(kind, channel)?;
        c.batches = c.batches.saturating_add(1);
        c.blocks = c.blocks.saturating_add(count);
        self.batches = self.batches.saturating_add(1);
        self.blocks = self.blocks.saturating_add(count);
        Ok(())
    }

    /// Returns the round to acknowledge, if every channel's finished rounds moved forward.
    fn on_round_end(
        &mut self,
        channel: u16,
        e: &super::message::RoundEnd,
    ) -> Result<Option<u32>, ProtocolError> {
        let kind = MessageType::RoundEnd;
        self.check_round(kind, channel, e.round)?;
        let c = self.channel(kind, channel)?;
        for (what, announced, received) in [
            ("batches", e.batches, c.batches),
            ("pages", e.pages, c.pages),
            ("disk blocks", e.blocks, c.blocks),
        ] {
            if announced != received {
                return Err(ProtocolError::CountMismatch {
                    what: format!("{what} on channel {channel} in round {}", e.round),
                    announced,
                    received,
                });
            }
        }
        c.round = c.round.checked_add(1).ok_or_else(|| {
            ProtocolError::invalid(kind, "round", "the round counter is exhausted")
        })?;
        c.batches = 0;
        c.pages = 0;
        c.blocks = 0;
        let done = self
            .chans
            .iter()
            .map(|c| c.round.saturating_sub(1))
            .min()
            .unwrap_or(0);
        if done > self.acked {
            self.acked = done;
            Ok(Some(done))
        } else {
            Ok(None)
        }
    }

    fn on_layer(&mut self, l: &super::message::DiskLayer<'_>) -> Result<(), ProtocolError> {
        if l.disk >= self.disks {
            return Err(ProtocolError::BadLayer {
                kind: MessageType::DiskLayer,
                disk: l.disk,
                layer: l.layer,
                why: "is not in the VM's configuration",
            });
        }
        if self
            .layers
            .iter()
            .any(|x| x.disk == l.disk && x.layer == l.layer)
        {
            return Err(ProtocolError::Duplicate(format!(
                "the announcement of disk {} layer {}",
                l.disk, l.layer
            )));
        }
        // disk < MAX_DISKS and layer < MAX_LAYERS (decoder), unique: at most 1024 entries.
        let unit = DISK_BLOCK_SIZE as u64;
        self.layers.push(Layer {
            disk: l.disk,
            layer: l.layer,
            blocks: l.size.div_ceil(unit),
            reuse: None,
        });
        Ok(())
    }

    /// The final round is announced on channel 0 before its data there, so channel 0 must
    /// not have ended it. A parallel channel is a separate stream: its part of the final
    /// round may have ended before channel 0's SwitchoverBegin is read here, but nothing of
    /// the round after it may have arrived.
    fn on_switchover(&mut self, final_round: u32) -> Result<(), ProtocolError> {
        for (i, c) in self.chans.iter().enumerate() {
            let limit = if i == 0 {
                final_round
            } else {
                final_round.saturating_add(1)
            };
            let started_next = c.round == limit && i != 0 && (c.batches > 0 || c.blocks > 0);
            if c.round > limit || started_next {
                return Err(ProtocolError::FinalRoundPassed {
                    final_round,
                    channel: u16::try_from(i).unwrap_or(u16::MAX),
                });
            }
        }
        self.final_round = Some(final_round);
        Ok(())
    }

    fn on_complete(&self, m: &super::message::Complete) -> Result<(), ProtocolError> {
        let final_round = self.final_round.unwrap_or(u32::MAX);
        if self.acked < final_round {
            return Err(ProtocolError::Incomplete(format!(
                "round {final_round} on every channel (rounds up to {} are complete)",
                self.acked
            )));
        }
        if let Some(i) = self.vcpu_seen.iter().position(|seen| !seen) {
            return Err(ProtocolError::Incomplete(format!("the state of vCPU {i}")));
        }
        if !self.device_seen {
            return Err(ProtocolError::Incomplete("the device state".into()));
        }
        if let Some(l) = self.layers.iter().find(|l| l.reuse.is_none()) {
            // The engine must answer every announcement before the switchover ends.
            return Err(ProtocolError::InternalBug(format!(
                "disk {} layer {} was never answered",
                l.disk, l.layer
            )));
        }
        for (what, announced, received) in [
            ("batches in all", m.batches, self.batches),
            ("pages in all", m.pages, self.pages_received),
            ("disk blocks in all", m.blocks, self.blocks),
        ] {
            if announced != received {
                return Err(ProtocolError::CountMismatch {
                    what: what.into(),
                    announced,
                    received,
                });
            }
        }
        Ok(())
    }
}

/// ReceivingMemory (`switching == false`) and SwitchingOver (`true`).
fn receiving(
    mut t: Box<Transfer>,
    switching: bool,
    channel: u16,
    msg: &Message<'_>,
) -> Result<ReceiverStep, Box<Rejected<ReceiverStep>>> {
    let kind = msg.message_type();
    let rebuild = |t: Box<Transfer>| {
        if switching {
            ReceiverState::SwitchingOver(t)
        } else {
            ReceiverState::ReceivingMemory(t)
        }
    };
    let control_only = matches!(
        msg,
        Message::DiskLayer(_)
            | Message::SwitchoverBegin(_)
            | Message::VcpuState(_)
            | Message::DeviceState(_)
            | Message::Complete(_)
    );
    if control_only && channel != 0 {
        return Err(rebuild(t).control_or_unexpected(channel, kind));
    }
    let result = match msg {
        Message::MemoryBatch(b) => t.on_memory(channel, b).map(|()| ReceiverAction::StorePages),
        Message::DiskBlocks(b) => t.on_disk(channel, b).map(|()| ReceiverAction::StoreBlocks),
        Message::RoundEnd(e) => t.on_round_end(channel, e).map(|ack| match ack {
            Some(round) => ReceiverAction::Send(Message::RoundAck(RoundAck { round })),
            None => ReceiverAction::None,
        }),
        Message::DiskLayer(l) if !switching => t.on_layer(l).map(|()| ReceiverAction::PrepareLayer),
        Message::SwitchoverBegin(s) if !switching => {
            return match t.on_switchover(s.final_round) {
                Ok(()) => step(ReceiverState::SwitchingOver(t), ReceiverAction::None),
                Err(e) => Err(ReceiverState::ReceivingMemory(t).fail(e)),
            };
        }
        Message::VcpuState(v) if switching => {
            let vcpus = t.vcpus;
            match t
                .vcpu_seen
                .get_mut(usize::try_from(v.index).unwrap_or(usize::MAX))
            {
                None => Err(ProtocolError::VcpuOutOfRange {
                    index: v.index,
                    vcpus,
                }),
                Some(true) => Err(ProtocolError::Duplicate(format!(
                    "the state of vCPU {}",
                    v.index
                ))),
                Some(seen) => {
                    *seen = true;
                    Ok(ReceiverAction::StoreVcpuState(v.index))
                }
            }
        }
        Message::DeviceState(_) if switching => {
            if t.device_seen {
                Err(ProtocolError::Duplicate("the device state".into()))
            } else {
                t.device_seen = true;
                Ok(ReceiverAction::StoreDeviceState)
            }
        }
        Message::Complete(m) if switching => {
            return match t.on_complete(m) {
                Ok(()) => step(ReceiverState::Resuming(t), ReceiverAction::Resume),
                Err(e) => Err(ReceiverState::SwitchingOver(t).fail(e)),
            };
        }
        _ => return Err(rebuild(t).unexpected(kind)),
    };
    match result {
        Ok(action) => step(rebuild(t), action),
        Err(e) => Err(rebuild(t).fail(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Fault;
    use crate::protocol::batch::{BatchEncoder, Compression};
    use crate::protocol::frame::{Decoded, decode_frame};
    use crate::protocol::message::{
        Cancel, Complete, DeviceState, DiskLayer, RoundEnd, SwitchoverBegin, VcpuState, VmConfig,
    };
    use crate::protocol::types::{DiskFormat, STRIPE_SHIFT};

    const SESSION: SessionId = SessionId([9; 16]);
    const V1: ProtocolVersion = ProtocolVersion::V1;

    fn frame(message: Message<'static>) -> Frame<'static> {
        Frame {
            version: V1,
            message,
        }
    }

    fn hello(purpose: Purpose, channel: u16, channels: u16) -> Frame<'static> {
        frame(Message::Hello(Hello {
            version: V1,
            software: "vmgate 0.1.0".into(),
            session: SESSION,
            purpose,
            channel,
            channels,
        }))
    }

    fn config(pages: u64, vcpus: u32, disks: u32) -> Frame<'static> {
        frame(Message::VmConfig(VmConfig {
            name: "vm1".into(),
            memory_bytes: pages * 4096,
            vcpus,
            disks,
            config: Cow::Borrowed(b"name = \"vm1\""),
        }))
    }

    /// Frames that hold batches borrow their bytes: keep the bytes, decode when fed.
    struct Batch(Vec<u8>);

    impl Batch {
        fn memory(round: u32, pages: &[u64]) -> Batch {
            let mut enc = BatchEncoder::new(V1, Compression::None).unwrap();
            enc.begin_memory(round);
            let mut page = vec![0u8; 4096];
            for p in pages {
                page[0] = u8::try_from(p % 251).unwrap() + 1;
                enc.push(*p, &page).unwrap();
            }
            Batch(enc.finish().unwrap().to_vec())
        }

        fn disk(disk: u32, layer: u32, round: u32, blocks: &[u64]) -> Batch {
            let mut enc = BatchEncoder::new(V1, Compression::None).unwrap();
            enc.begin_disk(disk, layer, round);
            for b in blocks {
                enc.push_zero(*b).unwrap();
            }
            Batch(enc.finish().unwrap().to_vec())
        }

        fn frame(&self) -> Frame<'_> {
            match decode_frame(&self.0).unwrap() {
                Decoded::Frame { frame, .. } => frame,
                Decoded::NeedMore { .. } => panic!("incomplete"),
            }
        }
    }

    fn round_end(round: u32, batches: u64, pages: u64) -> Frame<'static> {
        frame(Message::RoundEnd(RoundEnd {
            round,
            batches,
            pages,
            blocks: 0,
        }))
    }

    fn ok(s: ReceiverState, channel: u16, f: &Frame<'_>) -> ReceiverStep {
        match s.on_message(channel, f) {
            Ok(step) => step,
            Err(r) => panic!("{} rejected: {}", f.message.message_type(), r.error),
        }
    }

    fn rejected(s: ReceiverState, channel: u16, f: &Frame<'_>) -> Box<Rejected<ReceiverStep>> {
        match s.on_message(channel, f) {
            Ok(step) => panic!(
                "{} accepted in the wrong place (now {})",
                f.message.message_type(),
                step.state.name()
            ),
            Err(r) => r,
        }
    }

    fn policy() -> ReceiverPolicy {
        ReceiverPolicy::new("vmgate 0.1.0")
    }

    /// A one-channel session receiving memory: 1024 pages, 2 vCPUs, 1 disk.
    fn receiving_one_channel() -> ReceiverState {
        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 1)).state;
        let s = ok(s, 0, &config(1024, 2, 1));
        assert_eq!(s.action, ReceiverAction::CheckConfig);
        let s = s.state.on_verdict(Verdict::Compatible).unwrap();
        assert_eq!(s.action, ReceiverAction::Send(Message::Compatible));
        assert!(matches!(s.state, ReceiverState::ReceivingMemory(_)));
        s.state
    }

    /// Runs a whole one-channel move to Resuming; returns the state.
    fn switching_over_complete() -> ReceiverState {
        let s = receiving_one_channel();
        let s = ok(s, 0, &Batch::memory(1, &[0, 1, 1023]).frame()).state;
        let s = ok(s, 0, &round_end(1, 1, 3));
        assert_eq!(
            s.action,
            ReceiverAction::Send(Message::RoundAck(RoundAck { round: 1 }))
        );
        let s = ok(
            s.state,
            0,
            &frame(Message::SwitchoverBegin(SwitchoverBegin { final_round: 2 })),
        )
        .state;
        let s = ok(s, 0, &Batch::memory(2, &[5]).frame());
        assert_eq!(s.action, ReceiverAction::StorePages);
        let s = ok(s.state, 0, &round_end(2, 1, 1)).state;
        let s = ok(s, 0, &vcpu(0)).state;
        let s = ok(s, 0, &vcpu(1)).state;
        let s = ok(s, 0, &device());
        assert_eq!(s.action, ReceiverAction::StoreDeviceState);
        let s = ok(s.state, 0, &complete(2, 4, 0));
        assert_eq!(s.action, ReceiverAction::Resume);
        assert!(matches!(s.state, ReceiverState::Resuming(_)));
        s.state
    }

    fn vcpu(index: u32) -> Frame<'static> {
        frame(Message::VcpuState(VcpuState {
            index,
            state: Cow::Borrowed(b"regs"),
        }))
    }

    fn device() -> Frame<'static> {
        frame(Message::DeviceState(DeviceState {
            state: Cow::Borrowed(b"dev"),
        }))
    }

    fn complete(batches: u64, pages: u64, blocks: u64) -> Frame<'static> {
        frame(Message::Complete(Complete {
            batches,
            pages,
            blocks,
        }))
    }

    #[test]
    fn a_whole_move_with_handoff() {
        let s = switching_over_complete();
        let s = s.on_resumed().unwrap();
        assert_eq!(s.action, ReceiverAction::Send(Message::Resumed));
        assert!(s.state.owns_vm());
        assert_eq!(s.state.outcome(), Some(MoveOutcome::Resumed));
        let s = ok(s.state, 0, &frame(Message::Released));
        assert_eq!(s.action, ReceiverAction::Finish);
        assert!(matches!(s.state, ReceiverState::Done));
    }

    #[test]
    fn hello_ack_carries_the_session_and_our_software() {
        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 2));
        assert_eq!(
            s.action,
            ReceiverAction::Send(Message::HelloAck(HelloAck {
                version: V1,
                software: "vmgate 0.1.0".into(),
                session: SESSION,
                channel: 0,
            }))
        );
    }

    #[test]
    fn a_newer_destination_accepts_an_older_source() {
        let newer = ReceiverPolicy {
            software: "vmgate 0.3.0".into(),
            min_version: V1,
            version: ProtocolVersion::new(3).unwrap(),
            max_channels: 4,
        };
        let s = ok(ReceiverState::new(newer), 0, &hello(Purpose::Move, 0, 1));
        match s.action {
            ReceiverAction::Send(Message::HelloAck(ack)) => assert_eq!(ack.version, V1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_older_destination_refuses_a_newer_source_naming_both_versions() {
        let f = Frame {
            version: ProtocolVersion::new(2).unwrap(),
            message: Message::Hello(Hello {
                version: ProtocolVersion::new(2).unwrap(),
                software: "vmgate 0.2.0".into(),
                session: SESSION,
                purpose: Purpose::Move,
                channel: 0,
                channels: 1,
            }),
        };
        let s = ok(ReceiverState::new(policy()), 0, &f);
        assert!(matches!(s.state, ReceiverState::Refused));
        let ReceiverAction::SendAndClose(Message::VersionRefused(r)) = s.action else {
            panic!("{:?}", s.action)
        };
        assert_eq!(r.source, ProtocolVersion::new(2).unwrap());
        assert_eq!(r.destination, V1);
        let text = r.to_string();
        assert!(
            text.contains("vmgate 0.1.0") && text.contains("vmgate 0.2.0"),
            "{text}"
        );
        assert!(text.contains("Upgrade the destination"), "{text}");
    }

    #[test]
    fn a_replayed_hello_is_rejected_and_the_move_discarded() {
        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 1)).state;
        let r = rejected(s, 0, &hello(Purpose::Move, 0, 1));
        assert!(matches!(
            r.error,
            ProtocolError::UnexpectedMessage {
                got: MessageType::Hello,
                ..
            }
        ));
        assert_eq!(r.error.fault(), Fault::MisbehavingPeer);
        assert!(matches!(r.then.state, ReceiverState::Failed));
        let ReceiverAction::Discard {
            reply: Some(Message::Error(e)),
        } = r.then.action
        else {
            panic!("{:?}", r.then.action)
        };
        assert_eq!(e.code, ErrorCode::Misbehaving);
        assert_eq!(
            e.message,
            "The peer sent a Hello message while this side was waiting for the VM configuration, where it is not allowed."
        );
    }

    #[test]
    fn data_before_hello_or_config_is_rejected() {
        let b = Batch::memory(1, &[0]);
        let r = rejected(ReceiverState::new(policy()), 0, &b.frame());
        assert!(matches!(r.error, ProtocolError::UnexpectedMessage { .. }));
        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 1)).state;
        let r = rejected(s, 0, &b.frame());
        assert!(matches!(r.error, ProtocolError::UnexpectedMessage { .. }));
        // a config while the previous one is being checked
        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 1)).state;
        let s = ok(s, 0, &config(16, 1, 0)).state;
        assert!(
            rejected(s, 0, &config(16, 1, 0))
                .error
                .to_string()
                .contains("checking")
        );
    }

    #[test]
    fn pages_beyond_the_configured_memory_are_rejected() {
        let s = receiving_one_channel();
        let r = rejected(s, 0, &Batch::memory(1, &[3, 1024]).frame());
        assert!(
            matches!(
                r.error,
                ProtocolError::PageOutOfRange {
                    page: 1024,
                    pages: 1024
                }
            ),
            "{}",
            r.error
        );
        assert_eq!(
            r.error.to_string(),
            "The peer sent page 1024, but the VM's memory has only 1024 pages."
        );
        assert!(matches!(r.then.action, ReceiverAction::Discard { .. }));
    }

    #[test]
    fn a_memory_batch_after_the_final_round_is_rejected() {
        let s = receiving_one_channel();
        let s = ok(
            s,
            0,
            &frame(Message::SwitchoverBegin(SwitchoverBegin { final_round: 1 })),
        )
        .state;
        let s = ok(s, 0, &Batch::memory(1, &[1]).frame()).state;
        let s = ok(s, 0, &round_end(1, 1, 1)).state;
        let r = rejected(s, 0, &Batch::memory(2, &[2]).frame());
        assert!(
            matches!(
                r.error,
                ProtocolError::AfterFinalRound {
                    round: 2,
                    final_round: 1
                }
            ),
            "{}",
            r.error
        );
    }

    #[test]
    fn batches_for_the_wrong_round_and_wrong_counts_are_rejected() {
        let s = receiving_one_channel();
        let r = rejected(s, 0, &Batch::memory(2, &[1]).frame());
        assert!(matches!(
            r.error,
            ProtocolError::WrongRound {
                got: 2,
                expected: 1,
                ..
            }
        ));

        let s = receiving_one_channel();
        let s = ok(s, 0, &Batch::memory(1, &[1, 2]).frame()).state;
        let r = rejected(s, 0, &round_end(1, 1, 3));
        assert_eq!(
            r.error.to_string(),
            "The peer announced 3 pages on channel 0 in round 1, but 2 arrived."
        );

        // a replayed RoundEnd is for a round that already ended
        let s = receiving_one_channel();
        let s = ok(s, 0, &round_end(1, 0, 0)).state;
        let r = rejected(s, 0, &round_end(1, 0, 0));
        assert!(matches!(
            r.error,
            ProtocolError::WrongRound {
                got: 1,
                expected: 2,
                ..
            }
        ));
    }

    #[test]
    fn state_only_after_switchover_and_complete_only_when_everything_arrived() {
        let s = receiving_one_channel();
        let r = rejected(s, 0, &vcpu(0));
        assert!(matches!(
            r.error,
            ProtocolError::UnexpectedMessage {
                got: MessageType::VcpuState,
                ..
            }
        ));

        let s = receiving_one_channel();
        let r = rejected(s, 0, &complete(0, 0, 0));
        assert!(matches!(
            r.error,
            ProtocolError::UnexpectedMessage {
                got: MessageType::Complete,
                ..
            }
        ));

        let switching = || {
            let s = receiving_one_channel();
            let s = ok(s, 0, &Batch::memory(1, &[7]).frame()).state;
            ok(
                s,
                0,
                &frame(Message::SwitchoverBegin(SwitchoverBegin { final_round: 1 })),
            )
            .state
        };
        // final round not finished
        let r = rejected(ok(switching(), 0, &vcpu(0)).state, 0, &complete(1, 1, 0));
        assert!(
            r.error.to_string().contains("round 1 on every channel"),
            "{}",
            r.error
        );
        // vCPU 1 missing
        let s = ok(switching(), 0, &round_end(1, 1, 1)).state;
        let s = ok(s, 0, &vcpu(0)).state;
        let s = ok(s, 0, &device()).state;
        let r = rejected(s, 0, &complete(1, 1, 0));
        assert_eq!(
            r.error.to_string(),
            "The peer declared the move complete, but the state of vCPU 1 is missing."
        );
        // vCPU out of range, duplicate vCPU, duplicate device state
        let s = ok(switching(), 0, &round_end(1, 1, 1)).state;
        assert!(matches!(
            rejected(s, 0, &vcpu(2)).error,
            ProtocolError::VcpuOutOfRange { index: 2, vcpus: 2 }
        ));
        let s = ok(ok(switching(), 0, &vcpu(1)).state, 0, &device()).state;
        assert!(matches!(
            rejected(s, 0, &vcpu(1)).error,
            ProtocolError::Duplicate(_)
        ));
        let s = ok(switching(), 0, &device()).state;
        assert!(matches!(
            rejected(s, 0, &device()).error,
            ProtocolError::Duplicate(_)
        ));
        // totals that do not match
        let s = ok(switching(), 0, &round_end(1, 1, 1)).state;
        let s = ok(
            ok(ok(s, 0, &vcpu(0)).state, 0, &vcpu(1)).state,
            0,
            &device(),
        )
        .state;
        let r = rejected(s, 0, &complete(1, 2, 0));
        assert_eq!(
            r.error.to_string(),
            "The peer announced 2 pages in all, but 1 arrived."
        );
        // a second SwitchoverBegin
        let r = rejected(
            switching(),
            0,
            &frame(Message::SwitchoverBegin(SwitchoverBegin { final_round: 1 })),
        );
        assert!(matches!(
            r.error,
            ProtocolError::UnexpectedMessage {
                got: MessageType::SwitchoverBegin,
                ..
            }
        ));
    }

    #[test]
    fn a_final_round_already_passed_is_rejected() {
        let s = receiving_one_channel();
        let s = ok(s, 0, &round_end(1, 0, 0)).state;
        let s = ok(s, 0, &round_end(2, 0, 0)).state;
        let r = rejected(
            s,
            0,
            &frame(Message::SwitchoverBegin(SwitchoverBegin { final_round: 2 })),
        );
        assert!(matches!(
            r.error,
            ProtocolError::FinalRoundPassed {
                final_round: 2,
                channel: 0
            }
        ));
    }

    #[test]
    fn a_parallel_channel_may_end_the_final_round_before_switchover_is_read() {
        let s = receiving_three_channels();
        let s = ok(s, 0, &round_end(1, 0, 0)).state;
        let s = ok(s, 1, &round_end(1, 0, 0)).state;
        let s = ok(s, 2, &round_end(1, 0, 0)).state;
        // Channel 1's (empty) part of round 2 ends before channel 0 announces round 2 as final.
        let s = ok(s, 1, &round_end(2, 0, 0)).state;
        let s = ok(
            s,
            0,
            &frame(Message::SwitchoverBegin(SwitchoverBegin { final_round: 2 })),
        )
        .state;
        assert!(matches!(s, ReceiverState::SwitchingOver(_)));
        // A channel already two rounds on is past the final round.
        let s = receiving_three_channels();
        let s = ok(s, 1, &round_end(1, 0, 0)).state;
        let s = ok(s, 1, &round_end(2, 0, 0)).state;
        let s = ok(s, 1, &round_end(3, 0, 0)).state;
        let r = rejected(
            s,
            0,
            &frame(Message::SwitchoverBegin(SwitchoverBegin { final_round: 1 })),
        );
        assert!(matches!(
            r.error,
            ProtocolError::FinalRoundPassed {
                final_round: 1,
                channel: 1
            }
        ));
    }

    /// A 3-channel session up to ReceivingMemory, 4096 pages.
    fn receiving_three_channels() -> ReceiverState {
        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 3)).state;
        let s = ok(s, 0, &config(4096, 1, 0)).state;
        let s = s.on_verdict(Verdict::Compatible).unwrap().state;
        assert!(matches!(s, ReceiverState::Configured(_)));
        let r = rejected(s, 0, &Batch::memory(1, &[0]).frame());
        assert!(
            matches!(r.error, ProtocolError::UnexpectedMessage { .. }),
            "data before the joins"
        );

        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 3)).state;
        let s = ok(s, 0, &config(4096, 1, 0)).state;
        let s = s.on_verdict(Verdict::Compatible).unwrap().state;
        let s = ok(s, 2, &hello(Purpose::Join, 2, 3));
        assert!(matches!(
            s.action,
            ReceiverAction::Send(Message::HelloAck(HelloAck { channel: 2, .. }))
        ));
        assert!(matches!(s.state, ReceiverState::Configured(_)));
        let s = ok(s.state, 1, &hello(Purpose::Join, 1, 3)).state;
        assert!(matches!(s, ReceiverState::ReceivingMemory(_)));
        s
    }

    #[test]
    fn parallel_channels_join_once_each_and_pages_follow_their_stripe() {
        let run = 1u64 << STRIPE_SHIFT;
        let s = receiving_three_channels();
        // stripe 1 belongs on channel 1
        let s = ok(s, 1, &Batch::memory(1, &[run, run + 5]).frame()).state;
        let r = rejected(s, 2, &Batch::memory(1, &[run + 6]).frame());
        assert!(
            matches!(r.error, ProtocolError::WrongStripe { index, channel: 2, expected: 1, .. } if index == run + 6),
            "{}",
            r.error
        );

        // rounds complete only when every channel ended them; the ack names the newest
        let s = receiving_three_channels();
        let s = ok(s, 0, &Batch::memory(1, &[0, 1]).frame()).state;
        let s = ok(s, 1, &round_end(1, 0, 0));
        assert_eq!(s.action, ReceiverAction::None);
        let s = ok(s.state, 1, &round_end(2, 0, 0));
        assert_eq!(s.action, ReceiverAction::None);
        let s = ok(s.state, 2, &round_end(1, 0, 0));
        assert_eq!(s.action, ReceiverAction::None);
        let s = ok(s.state, 0, &round_end(1, 1, 2));
        assert_eq!(
            s.action,
            ReceiverAction::Send(Message::RoundAck(RoundAck { round: 1 }))
        );
        let s = ok(s.state, 0, &round_end(2, 0, 0)).state;
        let s = ok(s, 2, &round_end(2, 0, 0));
        assert_eq!(
            s.action,
            ReceiverAction::Send(Message::RoundAck(RoundAck { round: 2 }))
        );

        // joins: duplicate, wrong session, wrong index, channel out of range
        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 3)).state;
        let s = ok(s, 0, &config(4096, 1, 0)).state;
        let s = s.on_verdict(Verdict::Compatible).unwrap().state;
        let s = ok(s, 1, &hello(Purpose::Join, 1, 3)).state;
        let fresh = |s: ReceiverState| s;
        let r = rejected(fresh(s), 1, &hello(Purpose::Join, 1, 3));
        assert!(matches!(r.error, ProtocolError::DuplicateChannel(1)));

        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 3)).state;
        let s = ok(s, 0, &config(4096, 1, 0)).state;
        let s = s.on_verdict(Verdict::Compatible).unwrap().state;
        let mut other = hello(Purpose::Join, 1, 3);
        if let Message::Hello(h) = &mut other.message {
            h.session = SessionId([1; 16]);
        }
        assert!(matches!(
            rejected(s, 1, &other).error,
            ProtocolError::WrongSession { .. }
        ));

        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 3)).state;
        let s = ok(s, 0, &config(4096, 1, 0)).state;
        let s = s.on_verdict(Verdict::Compatible).unwrap().state;
        assert!(matches!(
            rejected(s, 1, &hello(Purpose::Join, 2, 3)).error,
            ProtocolError::BadHello(_)
        ));

        let s = receiving_three_channels();
        assert!(matches!(
            rejected(s, 3, &Batch::memory(1, &[0]).frame()).error,
            ProtocolError::BadChannel { channel: 3, .. }
        ));
        // control messages only on channel 0
        let s = receiving_three_channels();
        let r = rejected(
            s,
            1,
            &frame(Message::SwitchoverBegin(SwitchoverBegin { final_round: 1 })),
        );
        assert!(
            matches!(r.error, ProtocolError::BadChannel { channel: 1, .. }),
            "{}",
            r.error
        );
    }

    #[test]
    fn too_many_channels_or_a_move_on_a_data_channel_is_refused() {
        let p = ReceiverPolicy {
            max_channels: 4,
            ..policy()
        };
        let r = rejected(ReceiverState::new(p), 0, &hello(Purpose::Move, 0, 5));
        assert!(
            r.error
                .to_string()
                .contains("5 channels is not between 1 and 4"),
            "{}",
            r.error
        );
        let r = rejected(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 1, 2));
        assert!(matches!(r.error, ProtocolError::BadHello(_)));
        let r = rejected(ReceiverState::new(policy()), 1, &hello(Purpose::Join, 1, 2));
        assert!(r.error.to_string().contains("does not have"), "{}", r.error);
    }

    #[test]
    fn a_frame_of_another_version_mid_session_is_rejected() {
        let s = receiving_one_channel();
        let f = Frame {
            version: ProtocolVersion::new(2).unwrap(),
            message: Message::Ping(1),
        };
        assert!(matches!(
            rejected(s, 0, &f).error,
            ProtocolError::VersionChanged { .. }
        ));
    }

    #[test]
    fn disk_blocks_need_an_answered_announced_layer_and_stay_inside_it() {
        let layer = |disk, layer| {
            frame(Message::DiskLayer(DiskLayer {
                disk,
                layer,
                format: DiskFormat::Raw,
                size: 10 * 65536 + 1,
                checksum: [0; 32],
                backing: "".into(),
                name: "disk.raw".into(),
                active: true,
            }))
        };
        let s = receiving_one_channel();
        let r = rejected(s, 0, &Batch::disk(0, 0, 1, &[0]).frame());
        assert!(
            r.error.to_string().contains("was not announced"),
            "{}",
            r.error
        );

        let s = receiving_one_channel();
        assert!(matches!(
            rejected(s, 0, &layer(1, 0)).error,
            ProtocolError::BadLayer { disk: 1, .. }
        ));

        let s = receiving_one_channel();
        let s = ok(s, 0, &layer(0, 0));
        assert_eq!(s.action, ReceiverAction::PrepareLayer);
        let r = rejected(s.state, 0, &Batch::disk(0, 0, 1, &[0]).frame());
        assert!(
            r.error.to_string().contains("has not answered"),
            "{}",
            r.error
        );

        let s = ok(receiving_one_channel(), 0, &layer(0, 0)).state;
        let s = s.answer_layer(0, 0, false).unwrap().state;
        // 10 blocks and one byte: 11 blocks
        let s = ok(s, 0, &Batch::disk(0, 0, 1, &[0, 10]).frame()).state;
        let r = rejected(s, 0, &Batch::disk(0, 0, 1, &[11]).frame());
        assert!(
            matches!(
                r.error,
                ProtocolError::BlockOutOfRange {
                    block: 11,
                    blocks: 11,
                    ..
                }
            ),
            "{}",
            r.error
        );

        let s = ok(receiving_one_channel(), 0, &layer(0, 0)).state;
        let s = s.answer_layer(0, 0, true).unwrap();
        assert!(matches!(
            s.action,
            ReceiverAction::Send(Message::DiskLayerAnswer(_))
        ));
        let r = rejected(s.state, 0, &Batch::disk(0, 0, 1, &[0]).frame());
        assert!(r.error.to_string().contains("reuses"), "{}", r.error);

        let s = ok(receiving_one_channel(), 0, &layer(0, 0)).state;
        assert!(matches!(
            rejected(s, 0, &layer(0, 0)).error,
            ProtocolError::Duplicate(_)
        ));
    }

    #[test]
    fn cancel_or_failure_before_resume_discards_and_after_resume_keeps_the_vm() {
        let cancel = frame(Message::Cancel(Cancel {
            reason: "cancelled by alice".into(),
        }));
        for s in [receiving_one_channel(), switching_over_complete()] {
            let s = ok(s, 0, &cancel);
            assert!(matches!(s.state, ReceiverState::Cancelled));
            assert_eq!(s.action, ReceiverAction::Discard { reply: None });
            assert_eq!(s.state.outcome(), Some(MoveOutcome::Discarded));
        }
        // the link dropping while resuming: never resume
        let s = switching_over_complete().on_link_lost();
        assert!(matches!(s.state, ReceiverState::Failed));
        assert_eq!(s.action, ReceiverAction::Discard { reply: None });
        // a restore failure: tell the source, discard
        let s = switching_over_complete().on_local_failure("restoring vCPU 0 failed: EINVAL");
        let ReceiverAction::Discard {
            reply: Some(Message::Error(e)),
        } = s.action
        else {
            panic!("{:?}", s.action)
        };
        assert_eq!(e.code, ErrorCode::LocalFailure);
        // once resumed: a cancel is refused and the VM stays; a lost link keeps it too
        let resumed = || switching_over_complete().on_resumed().unwrap().state;
        let r = rejected(resumed(), 0, &cancel);
        assert!(matches!(r.then.state, ReceiverState::Done));
        assert_eq!(r.then.action, ReceiverAction::Finish);
        let s = resumed().on_link_lost();
        assert!(matches!(s.state, ReceiverState::Done));
        assert_eq!(s.action, ReceiverAction::Finish);
        assert_eq!(
            resumed().on_local_failure("x").action,
            ReceiverAction::Finish
        );
    }

    #[test]
    fn engine_calls_out_of_order_are_our_bug() {
        let r = receiving_one_channel().on_resumed().unwrap_err();
        assert_eq!(r.error.fault(), Fault::OwnBug);
        let r = receiving_one_channel()
            .on_verdict(Verdict::Compatible)
            .unwrap_err();
        assert_eq!(r.error.fault(), Fault::OwnBug);
        let r = receiving_one_channel()
            .answer_layer(0, 0, true)
            .unwrap_err();
        assert_eq!(r.error.fault(), Fault::OwnBug);
        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 1)).state;
        let s = ok(s, 0, &config(16, 1, 0)).state;
        let r = s.on_verdict(Verdict::Incompatible(vec![])).unwrap_err();
        assert_eq!(r.error.fault(), Fault::OwnBug);
    }

    #[test]
    fn an_incompatibility_report_is_sent_whole_and_bounded() {
        let s = ok(ReceiverState::new(policy()), 0, &hello(Purpose::Move, 0, 1)).state;
        let s = ok(s, 0, &config(16, 1, 0)).state;
        let report: Vec<_> = (0..300)
            .map(|i| Incompatibility {
                id: i,
                message: Cow::Owned(format!("problem {i}")),
            })
            .collect();
        let s = s.on_verdict(Verdict::Incompatible(report)).unwrap();
        assert!(matches!(s.state, ReceiverState::Refused));
        let ReceiverAction::SendAndClose(Message::Incompatible(inc)) = s.action else {
            panic!("{:?}", s.action)
        };
        assert_eq!(inc.report.len(), MAX_INCOMPATIBILITIES);
        assert_eq!(inc.report[0].message, "problem 0");
        assert_eq!(inc.report[255].message, "and 45 more incompatibilities");
        let mut bytes = Vec::new();
        Message::Incompatible(inc).encode(V1, &mut bytes).unwrap();
    }

    #[test]
    fn an_outcome_query_is_answered_without_a_session() {
        let s = ok(
            ReceiverState::new(policy()),
            0,
            &hello(Purpose::QueryOutcome, 0, 1),
        );
        assert_eq!(s.action, ReceiverAction::AnswerOutcome(SESSION));
        assert!(
            rejected(s.state, 0, &frame(Message::Ping(1))).error.fault() == Fault::MisbehavingPeer
        );
    }

    #[test]
    fn pings_are_answered_in_every_live_state() {
        let s = ok(receiving_one_channel(), 0, &frame(Message::Ping(77)));
        assert_eq!(s.action, ReceiverAction::Send(Message::Pong(77)));
        let s = ok(switching_over_complete(), 0, &frame(Message::Ping(78)));
        assert_eq!(s.action, ReceiverAction::Send(Message::Pong(78)));
    }
}
