//! The source's state machine, as pure logic, with the handoff rules:
//!
//! * Until the source has sent Complete, the VM is the source's: any failure, cancel or lost
//!   link ends the move with the VM running on the source (resumed if it was paused).
//! * After Complete, the destination decides: it resumes the VM and sends Resumed, or
//!   discards the move and sends Error (or closes). The source cannot cancel any more.
//!   On Resumed the source releases the VM (and says Released); on Error or Cancel it resumes.
//! * If the link breaks after Complete and before an answer, the source is in doubt: it must
//!   not resume (the VM may already run on the destination) and must not release (it may
//!   not). It asks the destination on a new connection (Hello with purpose QueryOutcome),
//!   whose Outcome is final: Resumed → release; Discarded or Unknown → resume here.
//!
//! ```text
//!  AwaitingAck ─HelloAck─▶ Negotiated ─config_sent─▶ AwaitingVerdict ─Compatible─▶ Joining
//!      │ VersionRefused                                   │ Incompatible             │ all acks
//!      ▼                                                  ▼                          ▼
//!  RunningHere ◀──── failure / cancel / link lost ──── (any state up to here) ── Copying
//!      ▲                                                                             │ switchover
//!      │ Error, Cancel,                                                              ▼
//!      │ Outcome(Discarded|Unknown)                                            SwitchingOver
//!      │                                                                             │ complete
//!      ├──────────────── HandingOff ◀────────────────────────────────────────────────┘
//!      │                  │ link lost ─▶ InDoubt ─Outcome(Resumed)─┐
//!      │                  │ Resumed                                ▼
//!      └──── InDoubt      └───────────────────────────────────▶ Released
//! ```

use super::error::ProtocolError;
use super::frame::Frame;
use super::message::{
    Cancel, Complete, ErrorMessage, Hello, Incompatibility, Message, SwitchoverBegin,
    VersionRefused,
};
use super::receiver::{Rejected, bounded_text, error_reply};
use super::types::{
    ErrorCode, MAX_CHANNELS, MessageType, MoveOutcome, ProtocolVersion, Purpose, SessionId,
};
use std::borrow::Cow;

/// What the source must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAction {
    /// Nothing.
    None,
    /// Send this message on the control channel.
    Send(Message<'static>),
    /// Send the VmConfig, then call [`SourceState::config_sent`].
    SendConfig,
    /// Open channels 1.. and send each its Join Hello ([`SourceState::join_hello`]).
    OpenChannels,
    /// Start the pre-copy rounds.
    StartCopy,
    /// The move is over and the VM runs here: resume its vCPUs if they were paused, drop
    /// everything sent; send `notify` first if there is one and the link is usable.
    KeepHere {
        /// The Cancel or Error to tell the destination.
        notify: Option<Message<'static>>,
    },
    /// The destination refused our version; report this (it names both versions). The VM
    /// was never paused.
    ReportRefused(VersionRefused<'static>),
    /// The destination cannot take the VM; report every reason. The VM was never paused.
    ReportIncompatible(Vec<Incompatibility<'static>>),
    /// The VM runs on the destination: stop it here for good, send Released, delete what
    /// the move says to delete.
    Release,
    /// Connect again and ask how the move ended ([`SourceState::outcome_query`]).
    QueryOutcome,
    /// A cancel came too late: the destination has everything and decides.
    CancelRefused,
    /// The destination's answer about a disk layer, for the storage copier.
    LayerAnswer {
        /// The disk.
        disk: u32,
        /// The layer.
        layer: u32,
        /// Skip this layer.
        reuse: bool,
    },
    /// The destination finished these rounds on every channel (for the bandwidth estimate).
    RoundAcked(u32),
}

/// A transition's result.
#[derive(Debug)]
pub struct SourceStep {
    /// The next state.
    pub state: SourceState,
    /// What to do.
    pub action: SourceAction,
}

#[derive(Debug, Clone)]
struct Session {
    session: SessionId,
    software: Cow<'static, str>,
    version: ProtocolVersion,
    channels: u16,
    joined: Vec<bool>,
    ended: u32,
    acked: u32,
    final_round: Option<u32>,
}

/// The source's state. See the module doc.
#[derive(Debug)]
pub enum SourceState {
    /// Hello sent on channel 0.
    AwaitingAck(Box<SourceSession>),
    /// Version accepted: send the configuration.
    Negotiated(Box<SourceSession>),
    /// Configuration sent.
    AwaitingVerdict(Box<SourceSession>),
    /// Compatible: parallel channels joining.
    Joining(Box<SourceSession>),
    /// Pre-copy.
    Copying(Box<SourceSession>),
    /// The VM is paused here; the final round and the state are being sent.
    SwitchingOver(Box<SourceSession>),
    /// Complete sent: the destination decides.
    HandingOff(Box<SourceSession>),
    /// The link broke during the handoff: ask the destination.
    InDoubt(Box<SourceSession>),
    /// The VM runs on the destination.
    Released,
    /// The move ended before the handoff (or the destination discarded it): the VM runs here.
    RunningHere,
}

/// The source's session data (opaque).
#[derive(Debug, Clone)]
pub struct SourceSession(Session);

impl SourceSession {
    /// The session id.
    pub fn session(&self) -> SessionId {
        self.0.session
    }

    /// The newest round every destination channel finished.
    pub fn acked_round(&self) -> u32 {
        self.0.acked
    }
}

fn ok(state: SourceState, action: SourceAction) -> Result<SourceStep, Box<Rejected<SourceStep>>> {
    Ok(SourceStep { state, action })
}

impl SourceState {
    /// Starts a move: returns the state and the Hello to send on channel 0.
    pub fn start(
        session: SessionId,
        channels: u16,
        software: impl Into<Cow<'static, str>>,
    ) -> Result<(SourceState, Message<'static>), ProtocolError> {
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(ProtocolError::encode(
                MessageType::Hello,
                format!("{channels} channels is not between 1 and {MAX_CHANNELS}"),
            ));
        }
        let software = software.into();
        let hello = Message::Hello(Hello {
            version: ProtocolVersion::CURRENT,
            software: software.clone(),
            session,
            purpose: Purpose::Move,
            channel: 0,
            channels,
        });
        let mut joined = vec![false; usize::from(channels)];
        if let Some(first) = joined.first_mut() {
            *first = true;
        }
        let s = Session {
            session,
            software,
            version: ProtocolVersion::CURRENT,
            channels,
            joined,
            ended: 0,
            acked: 0,
            final_round: None,
        };
        Ok((SourceState::AwaitingAck(Box::new(SourceSession(s))), hello))
    }

    /// The state's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            SourceState::AwaitingAck(_) => "waiting for the destination's Hello",
            SourceState::Negotiated(_) => "about to send the VM configuration",
            SourceState::AwaitingVerdict(_) => "waiting for the compatibility check",
            SourceState::Joining(_) => "opening the parallel channels",
            SourceState::Copying(_) => "copying memory",
            SourceState::SwitchingOver(_) => "switching over",
            SourceState::HandingOff(_) => "waiting for the destination to resume the VM",
            SourceState::InDoubt(_) => "asking the destination how the move ended",
            SourceState::Released => "released",
            SourceState::RunningHere => "ended with the VM running here",
        }
    }

    fn session(&self) -> Option<&Session> {
        match self {
            SourceState::AwaitingAck(s)
            | SourceState::Negotiated(s)
            | SourceState::AwaitingVerdict(s)
            | SourceState::Joining(s)
            | SourceState::Copying(s)
            | SourceState::SwitchingOver(s)
            | SourceState::HandingOff(s)
            | SourceState::InDoubt(s) => Some(&s.0),
            SourceState::Released | SourceState::RunningHere => None,
        }
    }

    /// Whether the destination decides how the move ends (Complete was sent).
    pub fn is_handing_off(&self) -> bool {
        matches!(self, SourceState::HandingOff(_) | SourceState::InDoubt(_))
    }

    /// The step for a failure: before the handoff, the VM stays (or resumes) here and the
    /// destination is told; during the handoff, the source is in doubt and asks.
    fn fail(self, error: ProtocolError) -> Box<Rejected<SourceStep>> {
        let then = match self {
            SourceState::HandingOff(s) | SourceState::InDoubt(s) => SourceStep {
                state: SourceState::InDoubt(s),
                action: SourceAction::QueryOutcome,
            },
            SourceState::Released => SourceStep {
                state: SourceState::Released,
                action: SourceAction::None,
            },
            _ => SourceStep {
                state: SourceState::RunningHere,
                action: SourceAction::KeepHere {
                    notify: Some(error_reply(&error)),
                },
            },
        };
        Box::new(Rejected { error, then })
    }

    fn unexpected(self, got: MessageType) -> Box<Rejected<SourceStep>> {
        let state = self.name();
        self.fail(ProtocolError::UnexpectedMessage { got, state })
    }

    fn out_of_order(self, call: &'static str) -> Box<Rejected<SourceStep>> {
        let state = self.name();
        self.fail(ProtocolError::CallOutOfOrder { call, state })
    }

    /// Feeds one frame from the destination, received on `channel`.
    pub fn on_message(
        self,
        channel: u16,
        frame: &Frame<'_>,
    ) -> Result<SourceStep, Box<Rejected<SourceStep>>> {
        let msg = &frame.message;
        let kind = msg.message_type();
        let Some(s) = self.session() else {
            return Err(self.unexpected(kind));
        };
        if frame.version != s.version && !kind.is_handshake() {
            let negotiated = s.version;
            return Err(self.fail(ProtocolError::VersionChanged {
                kind,
                got: frame.version,
                negotiated,
            }));
        }
        if channel >= s.channels {
            return Err(self.fail(ProtocolError::BadChannel {
                kind,
                channel,
                why: "does not exist in this move",
            }));
        }
        let in_doubt = matches!(self, SourceState::InDoubt(_));
        match (self, msg) {
            (state, Message::Ping(n)) if !in_doubt => {
                ok(state, SourceAction::Send(Message::Pong(*n)))
            }
            (state, Message::Pong(_)) if !in_doubt => ok(state, SourceAction::None),

            (SourceState::AwaitingAck(s), Message::HelloAck(a)) if channel == 0 => {
                if a.version != s.0.version || a.session != s.0.session || a.channel != 0 {
                    let e = ProtocolError::BadHello(format!(
                        "the destination acknowledged version {} session {} channel {}, we asked for version {} session {} channel 0",
                        a.version, a.session, a.channel, s.0.version, s.0.session
                    ));
                    return Err(SourceState::AwaitingAck(s).fail(e));
                }
                ok(SourceState::Negotiated(s), SourceAction::SendConfig)
            }
            (SourceState::AwaitingAck(_), Message::VersionRefused(r)) if channel == 0 => ok(
                SourceState::RunningHere,
                SourceAction::ReportRefused(owned_refusal(r)),
            ),
            (SourceState::AwaitingVerdict(s), Message::Compatible) if channel == 0 => {
                if s.0.channels > 1 {
                    ok(SourceState::Joining(s), SourceAction::OpenChannels)
                } else {
                    ok(SourceState::Copying(s), SourceAction::StartCopy)
                }
            }
            (SourceState::AwaitingVerdict(_), Message::Incompatible(i)) if channel == 0 => ok(
                SourceState::RunningHere,
                SourceAction::ReportIncompatible(
                    i.report
                        .iter()
                        .map(|e| Incompatibility {
                            id: e.id,
                            message: Cow::Owned(e.message.to_string()),
                        })
                        .collect(),
                ),
            ),
            (SourceState::Joining(mut s), Message::HelloAck(a)) if channel != 0 => {
                let slot = s.0.joined.get_mut(usize::from(channel));
                let fine =
                    a.version == s.0.version && a.session == s.0.session && a.channel == channel;
                match slot {
                    Some(joined) if fine && !*joined => *joined = true,
                    _ => {
                        let e = ProtocolError::BadHello(format!(
                            "the destination acknowledged channel {} on channel {channel}, which was not waiting for it",
                            a.channel
                        ));
                        return Err(SourceState::Joining(s).fail(e));
                    }
                }
                if s.0.joined.iter().all(|j| *j) {
                    ok(SourceState::Copying(s), SourceAction::StartCopy)
                } else {
                    ok(SourceState::Joining(s), SourceAction::None)
                }
            }
            (SourceState::Copying(s), Message::RoundAck(a)) => round_ack(s, false, a.round),
            (SourceState::SwitchingOver(s), Message::RoundAck(a)) => round_ack(s, true, a.round),
            (SourceState::Copying(s), Message::DiskLayerAnswer(a)) if channel == 0 => ok(
                SourceState::Copying(s),
                SourceAction::LayerAnswer {
                    disk: a.disk,
                    layer: a.layer,
                    reuse: a.reuse,
                },
            ),
            (SourceState::HandingOff(_), Message::Resumed) if channel == 0 => {
                ok(SourceState::Released, SourceAction::Release)
            }
            // The destination discarded the move: it will never resume the VM.
            (SourceState::HandingOff(_), Message::Error(_) | Message::Cancel(_)) => ok(
                SourceState::RunningHere,
                SourceAction::KeepHere { notify: None },
            ),
            (SourceState::InDoubt(s), Message::Outcome(o)) => {
                if o.session != s.0.session {
                    let e = ProtocolError::WrongOutcomeSession {
                        got: o.session,
                        expected: s.0.session,
                    };
                    return Err(SourceState::InDoubt(s).fail(e));
                }
                match o.outcome {
                    MoveOutcome::Resumed => ok(SourceState::Released, SourceAction::Release),
                    MoveOutcome::Discarded | MoveOutcome::Unknown => ok(
                        SourceState::RunningHere,
                        SourceAction::KeepHere { notify: None },
                    ),
                }
            }
            // Before the handoff, a Cancel or Error from the destination ends the move here.
            (state, Message::Error(_) | Message::Cancel(_)) if !state.is_handing_off() => ok(
                SourceState::RunningHere,
                SourceAction::KeepHere { notify: None },
            ),
            (state, _) => Err(state.unexpected(kind)),
        }
    }

    /// The VmConfig was sent.
    pub fn config_sent(self) -> Result<SourceStep, Box<Rejected<SourceStep>>> {
        match self {
            SourceState::Negotiated(s) => ok(SourceState::AwaitingVerdict(s), SourceAction::None),
            other => Err(other.out_of_order("config_sent")),
        }
    }

    /// The Hello for parallel channel `channel` (1..channels), while joining.
    pub fn join_hello(&self, channel: u16) -> Result<Message<'static>, ProtocolError> {
        match self {
            SourceState::Joining(s) if channel > 0 && channel < s.0.channels => {
                Ok(Message::Hello(Hello {
                    version: s.0.version,
                    software: s.0.software.clone(),
                    session: s.0.session,
                    purpose: Purpose::Join,
                    channel,
                    channels: s.0.channels,
                }))
            }
            other => Err(ProtocolError::CallOutOfOrder {
                call: "join_hello",
                state: other.name(),
            }),
        }
    }

    /// Every channel sent its RoundEnd for `round` (rounds are numbered from 1, in order).
    pub fn round_ended(self, round: u32) -> Result<SourceStep, Box<Rejected<SourceStep>>> {
        match self {
            SourceState::Copying(mut s) | SourceState::SwitchingOver(mut s)
                if Some(round) == s.0.ended.checked_add(1)
                    && s.0.final_round.is_none_or(|f| round <= f) =>
            {
                s.0.ended = round;
                let state = if s.0.final_round.is_some() {
                    SourceState::SwitchingOver(s)
                } else {
                    SourceState::Copying(s)
                };
                ok(state, SourceAction::None)
            }
            other => Err(other.out_of_order("round_ended")),
        }
    }

    /// The VM was paused: the next round is the last. Returns SwitchoverBegin to send.
    pub fn switchover(self) -> Result<SourceStep, Box<Rejected<SourceStep>>> {
        match self {
            SourceState::Copying(mut s) => match s.0.ended.checked_add(1) {
                Some(final_round) => {
                    s.0.final_round = Some(final_round);
                    ok(
                        SourceState::SwitchingOver(s),
                        SourceAction::Send(Message::SwitchoverBegin(SwitchoverBegin {
                            final_round,
                        })),
                    )
                }
                None => Err(SourceState::Copying(s)
                    .out_of_order("switchover after the last possible round")),
            },
            other => Err(other.out_of_order("switchover")),
        }
    }

    /// Everything was sent and the destination acknowledged the final round: returns Complete
    /// to send. From here on the destination decides.
    pub fn complete(self, totals: Complete) -> Result<SourceStep, Box<Rejected<SourceStep>>> {
        match self {
            SourceState::SwitchingOver(s) if s.0.final_round.is_some_and(|f| s.0.acked >= f) => ok(
                SourceState::HandingOff(s),
                SourceAction::Send(Message::Complete(totals)),
            ),
            other => Err(other.out_of_order("complete before the final round was acknowledged")),
        }
    }

    /// The user (or the engine) cancels. Before the handoff the VM stays here and the
    /// destination is told; after Complete it is too late.
    pub fn cancel(self, reason: &str) -> SourceStep {
        match self {
            state @ (SourceState::HandingOff(_)
            | SourceState::InDoubt(_)
            | SourceState::Released) => SourceStep {
                state,
                action: SourceAction::CancelRefused,
            },
            SourceState::RunningHere => SourceStep {
                state: SourceState::RunningHere,
                action: SourceAction::None,
            },
            _ => SourceStep {
                state: SourceState::RunningHere,
                action: SourceAction::KeepHere {
                    notify: Some(Message::Cancel(Cancel {
                        reason: Cow::Owned(bounded_text(reason)),
                    })),
                },
            },
        }
    }

    /// Something failed on the source. Before the handoff: the VM stays here, the
    /// destination is told. During the handoff nothing changes: the destination decides.
    pub fn on_local_failure(self, what: &str) -> SourceStep {
        match self {
            state @ (SourceState::HandingOff(_)
            | SourceState::InDoubt(_)
            | SourceState::Released
            | SourceState::RunningHere) => SourceStep {
                state,
                action: SourceAction::None,
            },
            _ => SourceStep {
                state: SourceState::RunningHere,
                action: SourceAction::KeepHere {
                    notify: Some(Message::Error(ErrorMessage {
                        code: ErrorCode::LocalFailure,
                        message: Cow::Owned(bounded_text(what)),
                    })),
                },
            },
        }
    }

    /// A channel's link broke. Before the handoff the VM stays here; during it, ask.
    pub fn on_link_lost(self) -> SourceStep {
        match self {
            SourceState::HandingOff(s) | SourceState::InDoubt(s) => SourceStep {
                state: SourceState::InDoubt(s),
                action: SourceAction::QueryOutcome,
            },
            SourceState::Released => SourceStep {
                state: SourceState::Released,
                action: SourceAction::None,
            },
            _ => SourceStep {
                state: SourceState::RunningHere,
                action: SourceAction::KeepHere { notify: None },
            },
        }
    }

    /// The Hello for an outcome query (only when in doubt).
    pub fn outcome_query(&self) -> Result<Message<'static>, ProtocolError> {
        match self {
            SourceState::InDoubt(s) => Ok(Message::Hello(Hello {
                version: s.0.version,
                software: s.0.software.clone(),
                session: s.0.session,
                purpose: Purpose::QueryOutcome,
                channel: 0,
                channels: 1,
            })),
            other => Err(ProtocolError::CallOutOfOrder {
                call: "outcome_query",
                state: other.name(),
            }),
        }
    }
}

fn round_ack(
    s: Box<SourceSession>,
    switching: bool,
    round: u32,
) -> Result<SourceStep, Box<Rejected<SourceStep>>> {
    let rebuild = |s| {
        if switching {
            SourceState::SwitchingOver(s)
        } else {
            SourceState::Copying(s)
        }
    };
    let why = if round <= s.0.acked {
        Some(format!("round {} was already acknowledged", s.0.acked))
    } else if round > s.0.ended {
        Some(format!("only {} rounds were ended", s.0.ended))
    } else {
        None
    };
    if let Some(why) = why {
        return Err(rebuild(s).fail(ProtocolError::BadRoundAck { acked: round, why }));
    }
    let mut s = s;
    s.0.acked = round;
    ok(rebuild(s), SourceAction::RoundAcked(round))
}

fn owned_refusal(r: &VersionRefused<'_>) -> VersionRefused<'static> {
    VersionRefused {
        source: r.source,
        source_software: Cow::Owned(r.source_software.to_string()),
        destination_min: r.destination_min,
        destination: r.destination,
        destination_software: Cow::Owned(r.destination_software.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Fault;
    use crate::protocol::message::{HelloAck, Incompatible, Outcome, RoundAck};
    use crate::protocol::receiver::{ReceiverAction, ReceiverPolicy, ReceiverState, Verdict};
    use crate::protocol::types::PAGE_SIZE;

    const SESSION: SessionId = SessionId([4; 16]);
    const V1: ProtocolVersion = ProtocolVersion::V1;

    fn f(message: Message<'static>) -> Frame<'static> {
        Frame {
            version: V1,
            message,
        }
    }

    fn step(s: SourceState, m: Message<'static>) -> SourceStep {
        match s.on_message(0, &f(m)) {
            Ok(step) => step,
            Err(r) => panic!("rejected: {}", r.error),
        }
    }

    fn ack() -> Message<'static> {
        Message::HelloAck(HelloAck {
            version: V1,
            software: "vmgate 0.1.0".into(),
            session: SESSION,
            channel: 0,
        })
    }

    fn copying() -> SourceState {
        let (s, _) = SourceState::start(SESSION, 1, "vmgate 0.1.0").unwrap();
        let s = step(s, ack());
        assert_eq!(s.action, SourceAction::SendConfig);
        let s = s.state.config_sent().unwrap().state;
        let s = step(s, Message::Compatible);
        assert_eq!(s.action, SourceAction::StartCopy);
        s.state
    }

    /// Copy one round, switch over, finish the final round: ready for complete().
    fn switched() -> SourceState {
        let s = copying().round_ended(1).unwrap().state;
        let s = step(s, Message::RoundAck(RoundAck { round: 1 })).state;
        let s = s.switchover().unwrap();
        assert_eq!(
            s.action,
            SourceAction::Send(Message::SwitchoverBegin(SwitchoverBegin { final_round: 2 }))
        );
        let s = s.state.round_ended(2).unwrap().state;
        step(s, Message::RoundAck(RoundAck { round: 2 })).state
    }

    fn handing_off() -> SourceState {
        let totals = Complete {
            batches: 1,
            pages: 1,
            blocks: 0,
        };
        let s = switched().complete(totals).unwrap();
        assert_eq!(s.action, SourceAction::Send(Message::Complete(totals)));
        assert!(s.state.is_handing_off());
        s.state
    }

    #[test]
    fn the_source_releases_only_after_resumed() {
        let s = step(handing_off(), Message::Resumed);
        assert!(matches!(s.state, SourceState::Released));
        assert_eq!(s.action, SourceAction::Release);
        // Resumed any earlier is a misbehaving destination: keep the VM here
        for early in [copying(), switched()] {
            let r = early.on_message(0, &f(Message::Resumed)).unwrap_err();
            assert_eq!(r.error.fault(), Fault::MisbehavingPeer);
            assert!(matches!(r.then.state, SourceState::RunningHere));
            assert!(matches!(
                r.then.action,
                SourceAction::KeepHere { notify: Some(_) }
            ));
        }
    }

    #[test]
    fn any_failure_before_complete_leaves_the_vm_running_here() {
        type Event = fn(SourceState) -> SourceStep;
        let events: [(&str, Event); 4] = [
            ("cancel", |s| s.cancel("cancelled by alice")),
            ("local failure", |s| {
                s.on_local_failure("reading guest memory failed")
            }),
            ("link lost", |s| s.on_link_lost()),
            ("destination error", |s| {
                s.on_message(
                    0,
                    &f(Message::Error(ErrorMessage {
                        code: ErrorCode::LocalFailure,
                        message: "disk full".into(),
                    })),
                )
                .unwrap()
            }),
        ];
        for (name, event) in events {
            let states: Vec<(&str, SourceState)> = vec![
                (
                    "awaiting ack",
                    SourceState::start(SESSION, 2, "v").unwrap().0,
                ),
                ("copying", copying()),
                ("switching over", switched()),
            ];
            for (sname, s) in states {
                let out = event(s);
                assert!(
                    matches!(out.state, SourceState::RunningHere),
                    "{name} while {sname}"
                );
                assert!(
                    matches!(out.action, SourceAction::KeepHere { .. }),
                    "{name} while {sname}"
                );
            }
        }
        // a cancel tells the destination why
        let s = copying().cancel("cancelled by alice");
        assert_eq!(
            s.action,
            SourceAction::KeepHere {
                notify: Some(Message::Cancel(Cancel {
                    reason: "cancelled by alice".into()
                }))
            }
        );
    }

    #[test]
    fn after_complete_the_destination_decides() {
        // cancel is refused, local failures change nothing
        let s = handing_off().cancel("too late");
        assert_eq!(s.action, SourceAction::CancelRefused);
        assert!(s.state.is_handing_off());
        let s = handing_off().on_local_failure("x");
        assert_eq!(s.action, SourceAction::None);
        assert!(s.state.is_handing_off());
        // the destination discarded: resume here
        let s = step(
            handing_off(),
            Message::Error(ErrorMessage {
                code: ErrorCode::LocalFailure,
                message: "restore failed".into(),
            }),
        );
        assert!(matches!(s.state, SourceState::RunningHere));
        assert_eq!(s.action, SourceAction::KeepHere { notify: None });
        // a misbehaving destination during the handoff: in doubt, ask
        let r = handing_off()
            .on_message(0, &f(Message::Compatible))
            .unwrap_err();
        assert!(matches!(r.then.state, SourceState::InDoubt(_)));
        assert_eq!(r.then.action, SourceAction::QueryOutcome);
    }

    #[test]
    fn a_link_lost_during_the_handoff_is_resolved_by_asking() {
        let s = handing_off().on_link_lost();
        assert!(matches!(s.state, SourceState::InDoubt(_)));
        assert_eq!(s.action, SourceAction::QueryOutcome);
        let query = s.state.outcome_query().unwrap();
        assert!(
            matches!(&query, Message::Hello(h) if h.purpose == Purpose::QueryOutcome && h.session == SESSION)
        );
        let outcome = |o| {
            Message::Outcome(Outcome {
                session: SESSION,
                outcome: o,
            })
        };
        let r = step(
            handing_off().on_link_lost().state,
            outcome(MoveOutcome::Resumed),
        );
        assert_eq!(r.action, SourceAction::Release);
        for o in [MoveOutcome::Discarded, MoveOutcome::Unknown] {
            let r = step(handing_off().on_link_lost().state, outcome(o));
            assert!(matches!(r.state, SourceState::RunningHere));
            assert_eq!(r.action, SourceAction::KeepHere { notify: None });
        }
        // losing the query's link: ask again; never resume or release on its own
        let s = handing_off().on_link_lost().state.on_link_lost();
        assert_eq!(s.action, SourceAction::QueryOutcome);
        // an answer about another session is not an answer
        let r = handing_off()
            .on_link_lost()
            .state
            .on_message(
                0,
                &f(Message::Outcome(Outcome {
                    session: SessionId([0; 16]),
                    outcome: MoveOutcome::Discarded,
                })),
            )
            .unwrap_err();
        assert!(matches!(r.then.state, SourceState::InDoubt(_)));
    }

    #[test]
    fn refusals_are_reported_with_the_vm_untouched() {
        let (s, _) = SourceState::start(SESSION, 1, "vmgate 0.2.0").unwrap();
        let refused = VersionRefused {
            source: ProtocolVersion::new(2).unwrap(),
            source_software: "vmgate 0.2.0".into(),
            destination_min: V1,
            destination: V1,
            destination_software: "vmgate 0.1.0".into(),
        };
        let s = step(s, Message::VersionRefused(refused.clone()));
        assert!(matches!(s.state, SourceState::RunningHere));
        assert_eq!(s.action, SourceAction::ReportRefused(refused));

        let (s, _) = SourceState::start(SESSION, 1, "v").unwrap();
        let s = step(s, ack()).state.config_sent().unwrap().state;
        let report = vec![Incompatibility {
            id: 1,
            message: "no switch \"prod\"".into(),
        }];
        let s = step(
            s,
            Message::Incompatible(Incompatible {
                report: report.clone(),
            }),
        );
        assert_eq!(s.action, SourceAction::ReportIncompatible(report));
    }

    #[test]
    fn round_acks_must_advance_and_complete_waits_for_the_final_one() {
        let s = copying().round_ended(1).unwrap().state;
        let r = s
            .on_message(0, &f(Message::RoundAck(RoundAck { round: 2 })))
            .unwrap_err();
        assert!(matches!(
            r.error,
            ProtocolError::BadRoundAck { acked: 2, .. }
        ));
        let s = copying().round_ended(1).unwrap().state;
        let s = step(s, Message::RoundAck(RoundAck { round: 1 })).state;
        let r = s
            .on_message(0, &f(Message::RoundAck(RoundAck { round: 1 })))
            .unwrap_err();
        assert!(
            r.error.to_string().contains("already acknowledged"),
            "{}",
            r.error
        );

        let s = copying().round_ended(1).unwrap().state;
        let s = step(s, Message::RoundAck(RoundAck { round: 1 })).state;
        let s = s.switchover().unwrap().state.round_ended(2).unwrap().state;
        let totals = Complete {
            batches: 0,
            pages: 0,
            blocks: 0,
        };
        let r = s.complete(totals).unwrap_err();
        assert_eq!(r.error.fault(), Fault::OwnBug);
        // rounds must be ended in order, and not past the final one
        assert!(copying().round_ended(2).is_err());
        let s = switched();
        assert!(s.round_ended(3).is_err());
    }

    #[test]
    fn parallel_channels_join_before_copying() {
        let (s, hello) = SourceState::start(SESSION, 3, "v").unwrap();
        assert!(
            matches!(&hello, Message::Hello(h) if h.channels == 3 && h.purpose == Purpose::Move)
        );
        let s = step(s, ack()).state.config_sent().unwrap().state;
        let s = step(s, Message::Compatible);
        assert_eq!(s.action, SourceAction::OpenChannels);
        let join = s.state.join_hello(2).unwrap();
        assert!(matches!(&join, Message::Hello(h) if h.channel == 2 && h.purpose == Purpose::Join));
        assert!(s.state.join_hello(0).is_err());
        assert!(s.state.join_hello(3).is_err());
        let ack_on = |c| {
            f(Message::HelloAck(HelloAck {
                version: V1,
                software: "d".into(),
                session: SESSION,
                channel: c,
            }))
        };
        let s = s.state.on_message(2, &ack_on(2)).unwrap();
        assert_eq!(s.action, SourceAction::None);
        let r = s.state.on_message(2, &ack_on(2)).unwrap_err();
        assert!(matches!(r.error, ProtocolError::BadHello(_)));

        let (s, _) = SourceState::start(SESSION, 3, "v").unwrap();
        let s = step(s, ack()).state.config_sent().unwrap().state;
        let s = step(s, Message::Compatible).state;
        let s = s.on_message(1, &ack_on(1)).unwrap().state;
        let s = s.on_message(2, &ack_on(2)).unwrap();
        assert_eq!(s.action, SourceAction::StartCopy);
        assert!(SourceState::start(SESSION, 0, "v").is_err());
        assert!(SourceState::start(SESSION, 17, "v").is_err());
    }

    /// The two state machines talk to each other through the real codec: every message the
    /// source sends is encoded, decoded and fed to the receiver, and back.
    #[test]
    fn source_and_receiver_complete_a_move_through_the_codec() {
        use crate::protocol::batch::{BatchEncoder, Compression};
        use crate::protocol::frame::{Decoded, decode_frame};
        use crate::protocol::message::{DeviceState, RoundEnd, VcpuState, VmConfig};

        fn wire(m: &Message<'_>) -> Vec<u8> {
            let mut v = Vec::new();
            m.encode(V1, &mut v).unwrap();
            v
        }
        fn decoded(bytes: &[u8]) -> Frame<'_> {
            match decode_frame(bytes).unwrap() {
                Decoded::Frame { frame, .. } => frame,
                Decoded::NeedMore { .. } => panic!("incomplete"),
            }
        }
        fn to_dest(r: ReceiverState, m: &Message<'_>) -> (ReceiverState, ReceiverAction) {
            let bytes = wire(m);
            let step = r
                .on_message(0, &decoded(&bytes))
                .unwrap_or_else(|e| panic!("{}", e.error));
            (step.state, step.action)
        }
        fn to_source(s: SourceState, a: ReceiverAction) -> SourceStep {
            let m = match a {
                ReceiverAction::Send(m) | ReceiverAction::SendAndClose(m) => m,
                other => panic!("the destination sent nothing: {other:?}"),
            };
            let bytes = wire(&m);
            s.on_message(0, &decoded(&bytes))
                .unwrap_or_else(|e| panic!("{}", e.error))
        }

        let (src, hello) = SourceState::start(SESSION, 1, "vmgate 0.1.0").unwrap();
        let (dst, a) = to_dest(
            ReceiverState::new(ReceiverPolicy::new("vmgate 0.1.0")),
            &hello,
        );
        let src = to_source(src, a);
        assert_eq!(src.action, SourceAction::SendConfig);
        let cfg = Message::VmConfig(VmConfig {
            name: "vm1".into(),
            memory_bytes: 64 * PAGE_SIZE as u64,
            vcpus: 1,
            disks: 0,
            config: Cow::Borrowed(b""),
        });
        let (dst, a) = to_dest(dst, &cfg);
        assert_eq!(a, ReceiverAction::CheckConfig);
        let src = src.state.config_sent().unwrap().state;
        let v = dst.on_verdict(Verdict::Compatible).unwrap();
        let src = to_source(src, v.action);
        assert_eq!(src.action, SourceAction::StartCopy);

        let mut enc = BatchEncoder::new(V1, Compression::Lz4).unwrap();
        enc.begin_memory(1);
        for p in 0..64u64 {
            let page = vec![u8::try_from(p).unwrap(); PAGE_SIZE];
            enc.push(p, &page).unwrap();
        }
        let batch = enc.finish().unwrap().to_vec();
        let step = v.state.on_message(0, &decoded(&batch)).unwrap();
        assert_eq!(step.action, ReceiverAction::StorePages);
        let (dst, a) = to_dest(
            step.state,
            &Message::RoundEnd(RoundEnd {
                round: 1,
                batches: 1,
                pages: 64,
                blocks: 0,
            }),
        );
        let src = src.state.round_ended(1).unwrap().state;
        let src = to_source(src, a);
        assert_eq!(src.action, SourceAction::RoundAcked(1));
        let sw = src.state.switchover().unwrap();
        let SourceAction::Send(begin) = &sw.action else {
            panic!()
        };
        let (dst, _) = to_dest(dst, begin);
        let (dst, a) = to_dest(
            dst,
            &Message::RoundEnd(RoundEnd {
                round: 2,
                batches: 0,
                pages: 0,
                blocks: 0,
            }),
        );
        let src = sw.state.round_ended(2).unwrap().state;
        let src = to_source(src, a).state;
        let (dst, _) = to_dest(
            dst,
            &Message::VcpuState(VcpuState {
                index: 0,
                state: Cow::Borrowed(b"regs"),
            }),
        );
        let (dst, _) = to_dest(
            dst,
            &Message::DeviceState(DeviceState {
                state: Cow::Borrowed(b"dev"),
            }),
        );
        let done = src
            .complete(Complete {
                batches: 1,
                pages: 64,
                blocks: 0,
            })
            .unwrap();
        let SourceAction::Send(complete) = &done.action else {
            panic!()
        };
        let (dst, a) = to_dest(dst, complete);
        assert_eq!(a, ReceiverAction::Resume);
        let resumed = dst.on_resumed().unwrap();
        let src = to_source(done.state, resumed.action);
        assert_eq!(src.action, SourceAction::Release);
        let (dst, a) = to_dest(resumed.state, &Message::Released);
        assert_eq!(a, ReceiverAction::Finish);
        assert!(matches!(dst, ReceiverState::Done));
        assert!(matches!(src.state, SourceState::Released));
    }
}
