//! The messages and their payload layouts (version 1). Texts and blobs are `Cow`: decoding
//! borrows from the frame buffer, replies we build own their data.

use super::batch::{DiskBlocks, MemoryBatch};
use super::error::ProtocolError;
use super::types::{
    DiskFormat, ErrorCode, MAX_CONFIG_LEN, MAX_DEVICE_STATE_LEN, MAX_DISK_BYTES, MAX_DISKS,
    MAX_INCOMPATIBILITIES, MAX_LAYERS, MAX_MEMORY_BYTES, MAX_NAME_LEN, MAX_SOFTWARE_LEN,
    MAX_TEXT_LEN, MAX_VCPU_STATE_LEN, MAX_VCPUS, MessageType, MoveOutcome, PAGE_SIZE,
    ProtocolVersion, Purpose, SessionId,
};
use super::wire::{WireReader, WireWriter};
use std::borrow::Cow;
use std::fmt;

/// First frame of every connection, from the source. Its layout is the same in every version.
///
/// `u16 version | text software | [16] session | u8 purpose | u16 channel | u16 channels`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello<'a> {
    /// The source's protocol version: the session runs at this version if the destination
    /// accepts it.
    pub version: ProtocolVersion,
    /// The source's software version, for messages ("vmgate 0.1.0").
    pub software: Cow<'a, str>,
    /// The move's session id.
    pub session: SessionId,
    /// What the connection is for.
    pub purpose: Purpose,
    /// This channel's index (0 for Move and QueryOutcome).
    pub channel: u16,
    /// How many channels the move uses in all (1 for QueryOutcome).
    pub channels: u16,
}

/// The destination accepts the version. `u16 version | text software | [16] session | u16 channel`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck<'a> {
    /// The session's version (the source's).
    pub version: ProtocolVersion,
    /// The destination's software version.
    pub software: Cow<'a, str>,
    /// Echo of the session id.
    pub session: SessionId,
    /// Echo of the channel index.
    pub channel: u16,
}

/// The destination refuses the source's version; both are named.
///
/// `u16 source | text source_software | u16 destination_min | u16 destination | text destination_software`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRefused<'a> {
    /// The source's protocol version.
    pub source: ProtocolVersion,
    /// The source's software version (echoed from its Hello).
    pub source_software: Cow<'a, str>,
    /// The oldest source version the destination accepts.
    pub destination_min: ProtocolVersion,
    /// The destination's own (newest) version.
    pub destination: ProtocolVersion,
    /// The destination's software version.
    pub destination_software: Cow<'a, str>,
}

impl fmt::Display for VersionRefused<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.source > self.destination {
            write!(
                f,
                "The destination runs {} (migration protocol {}), which is older than the source's {} (protocol {}): a VM can move only to a host of the same or a newer version. Upgrade the destination to {} or later.",
                self.destination_software,
                self.destination,
                self.source_software,
                self.source,
                self.source_software
            )
        } else {
            write!(
                f,
                "The destination runs {} (migration protocols {} to {}), which no longer accepts the source's {} (protocol {}). Upgrade the source.",
                self.destination_software,
                self.destination_min,
                self.destination,
                self.source_software,
                self.source
            )
        }
    }
}

/// The VM's configuration: a few typed fields the receiver checks before it parses the
/// document itself (TOML, written by the VM layer).
///
/// `text name | u64 memory_bytes | u32 vcpus | u32 disks | blob config`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig<'a> {
    /// The VM's name.
    pub name: Cow<'a, str>,
    /// Guest memory size: a non-zero multiple of the page size.
    pub memory_bytes: u64,
    /// vCPU count (at least 1).
    pub vcpus: u32,
    /// Disk count.
    pub disks: u32,
    /// The full configuration document.
    pub config: Cow<'a, [u8]>,
}

impl VmConfig<'_> {
    /// Pages of guest memory.
    pub fn pages(&self) -> u64 {
        self.memory_bytes / PAGE_SIZE as u64
    }
}

/// One reason the destination cannot take the VM. `u32 id | text message`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility<'a> {
    /// A stable id for scripts (the compatibility checker's numbering).
    pub id: u32,
    /// What is wrong and how to fix it.
    pub message: Cow<'a, str>,
}

/// The full incompatibility report (never empty). `u32 count | count × Incompatibility`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatible<'a> {
    /// Every reason.
    pub report: Vec<Incompatibility<'a>>,
}

/// End of one channel's share of a round. `u32 round | u64 batches | u64 pages | u64 blocks`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// The round.
    pub round: u32,
    /// MemoryBatch and DiskBlocks messages this channel sent in the round.
    pub batches: u64,
    /// Pages in those batches.
    pub pages: u64,
    /// Disk blocks in those batches.
    pub blocks: u64,
}

/// Every channel finished every round up to `round`. `u32 round`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundAck {
    /// The newest round all channels finished.
    pub round: u32,
}

/// A disk layer is about to be copied.
///
/// `u32 disk | u32 layer | u8 format | u64 size | [32] checksum | text backing | text name |
/// bool active`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayer<'a> {
    /// The disk's index in the configuration.
    pub disk: u32,
    /// The layer's index in the chain (0 = the base, the highest = the active layer).
    pub layer: u32,
    /// The image format.
    pub format: DiskFormat,
    /// The layer's virtual size in bytes.
    pub size: u64,
    /// SHA-256 of the layer file, so a destination holding an identical read-only parent can
    /// reuse it.
    pub checksum: [u8; 32],
    /// The backing file name the layer refers to (empty for a base layer).
    pub backing: Cow<'a, str>,
    /// The layer file's own name (a plain file name: no `/`, not `.` or `..`, at most
    /// [`MAX_NAME_LEN`] bytes), so the destination can place a parent before it learns the
    /// reference of the layer above.
    pub name: Cow<'a, str>,
    /// The active layer (the one the guest writes; mirrored, never reused).
    pub active: bool,
}

/// Whether the destination reuses an identical layer it already has (then the source skips
/// it). `u32 disk | u32 layer | u8 reuse`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLayerAnswer {
    /// The disk.
    pub disk: u32,
    /// The layer.
    pub layer: u32,
    /// True: do not send this layer's blocks.
    pub reuse: bool,
}

/// The VM is paused on the source; `final_round` is the last round. `u32 final_round`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchoverBegin {
    /// The last round (at least 1).
    pub final_round: u32,
}

/// One vCPU's state, serialized by the VM layer. `u32 index | blob state`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState<'a> {
    /// The vCPU's index.
    pub index: u32,
    /// The opaque state.
    pub state: Cow<'a, [u8]>,
}

/// VM-wide and device state (clock, irqchip, PIT, devices), serialized by the VM layer.
/// `blob state`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState<'a> {
    /// The opaque state.
    pub state: Cow<'a, [u8]>,
}

/// Everything was sent; the destination checks these totals (all channels, all rounds) and
/// resumes the VM. `u64 batches | u64 pages | u64 blocks`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    /// MemoryBatch and DiskBlocks messages.
    pub batches: u64,
    /// Pages.
    pub pages: u64,
    /// Disk blocks.
    pub blocks: u64,
}

/// The move is cancelled. `text reason`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancel<'a> {
    /// Why, for the log.
    pub reason: Cow<'a, str>,
}

/// The move failed on the sender of this message. `u16 code | text message`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage<'a> {
    /// The category.
    pub code: ErrorCode,
    /// What happened.
    pub message: Cow<'a, str>,
}

/// How a move ended, for a source that lost its link during the handoff.
/// `[16] session | u8 outcome`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The session asked about.
    pub session: SessionId,
    /// How it ended.
    pub outcome: MoveOutcome,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// See [`Hello`].
    Hello(Hello<'a>),
    /// See [`HelloAck`].
    HelloAck(HelloAck<'a>),
    /// See [`VersionRefused`].
    VersionRefused(VersionRefused<'a>),
    /// See [`VmConfig`].
    VmConfig(VmConfig<'a>),
    /// The destination built the skeleton; no payload.
    Compatible,
    /// See [`Incompatible`].
    Incompatible(Incompatible<'a>),
    /// See [`MemoryBatch`].
    MemoryBatch(MemoryBatch<'a>),
    /// See [`RoundEnd`].
    RoundEnd(RoundEnd),
    /// See [`RoundAck`].
    RoundAck(RoundAck),
    /// See [`DiskLayer`].
    DiskLayer(DiskLayer<'a>),
    /// See [`DiskLayerAnswer`].
    DiskLayerAnswer(DiskLayerAnswer),
    /// See [`DiskBlocks`].
    DiskBlocks(DiskBlocks<'a>),
    /// See [`SwitchoverBegin`].
    SwitchoverBegin(SwitchoverBegin),
    /// See [`VcpuState`].
    VcpuState(VcpuState<'a>),
    /// See [`DeviceState`].
    DeviceState(DeviceState<'a>),
    /// See [`Complete`].
    Complete(Complete),
    /// The destination resumed the VM; no payload.
    Resumed,
    /// The source released the VM; no payload.
    Released,
    /// See [`Cancel`].
    Cancel(Cancel<'a>),
    /// See [`ErrorMessage`].
    Error(ErrorMessage<'a>),
    /// Liveness probe: `u64 nonce`.
    Ping(u64),
    /// Answer to a Ping: `u64 nonce`.
    Pong(u64),
    /// See [`Outcome`].
    Outcome(Outcome),
}

impl<'a> Message<'a> {
    /// The type tag.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::HelloAck(_) => MessageType::HelloAck,
            Message::VersionRefused(_) => MessageType::VersionRefused,
            Message::VmConfig(_) => MessageType::VmConfig,
            Message::Compatible => MessageType::Compatible,
            Message::Incompatible(_) => MessageType::Incompatible,
            Message::MemoryBatch(_) => MessageType::MemoryBatch,
            Message::RoundEnd(_) => MessageType::RoundEnd,
            Message::RoundAck(_) => MessageType::RoundAck,
            Message::DiskLayer(_) => MessageType::DiskLayer,
            Message::DiskLayerAnswer(_) => MessageType::DiskLayerAnswer,
            Message::DiskBlocks(_) => MessageType::DiskBlocks,
            Message::SwitchoverBegin(_) => MessageType::SwitchoverBegin,
            Message::VcpuState(_) => MessageType::VcpuState,
            Message::DeviceState(_) => MessageType::DeviceState,
            Message::Complete(_) => MessageType::Complete,
            Message::Resumed => MessageType::Resumed,
            Message::Released => MessageType::Released,
            Message::Cancel(_) => MessageType::Cancel,
            Message::Error(_) => MessageType::Error,
            Message::Ping(_) => MessageType::Ping,
            Message::Pong(_) => MessageType::Pong,
            Message::Outcome(_) => MessageType::Outcome,
        }
    }

    /// An owned copy of a control message, for a thread that outlives the frame buffer;
    /// `None` for page and block batches (they are handled in place, never queued).
    pub fn to_static(&self) -> Option<Message<'static>> {
        fn own(c: &str) -> Cow<'static, str> {
            Cow::Owned(c.to_string())
        }
        fn own_bytes(c: &[u8]) -> Cow<'static, [u8]> {
            Cow::Owned(c.to_vec())
        }
        Some(match self {
            Message::Hello(h) => Message::Hello(Hello {
                software: own(&h.software),
                ..*h
            }),
            Message::HelloAck(a) => Message::HelloAck(HelloAck {
                software: own(&a.software),
                ..*a
            }),
            Message::VersionRefused(r) => Message::VersionRefused(VersionRefused {
                source: r.source,
                source_software: own(&r.source_software),
                destination_min: r.destination_min,
                destination: r.destination,
                destination_software: own(&r.destination_software),
            }),
            Message::VmConfig(c) => Message::VmConfig(VmConfig {
                name: own(&c.name),
                memory_bytes: c.memory_bytes,
                vcpus: c.vcpus,
                disks: c.disks,
                config: own_bytes(&c.config),
            }),
            Message::Compatible => Message::Compatible,
            Message::Incompatible(i) => Message::Incompatible(Incompatible {
                report: i
                    .report
                    .iter()
                    .map(|e| Incompatibility {
                        id: e.id,
                        message: own(&e.message),
                    })
                    .collect(),
            }),
            Message::MemoryBatch(_) | Message::DiskBlocks(_) => return None,
            Message::RoundEnd(e) => Message::RoundEnd(*e),
            Message::RoundAck(a) => Message::RoundAck(*a),
            Message::DiskLayer(l) => Message::DiskLayer(DiskLayer {
                disk: l.disk,
                layer: l.layer,
                format: l.format,
                size: l.size,
                checksum: l.checksum,
                backing: own(&l.backing),
                name: own(&l.name),
                active: l.active,
            }),
            Message::DiskLayerAnswer(a) => Message::DiskLayerAnswer(*a),
            Message::SwitchoverBegin(b) => Message::SwitchoverBegin(*b),
            Message::VcpuState(v) => Message::VcpuState(VcpuState {
                index: v.index,
                state: own_bytes(&v.state),
            }),
            Message::DeviceState(d) => Message::DeviceState(DeviceState {
                state: own_bytes(&d.state),
            }),
            Message::Complete(c) => Message::Complete(*c),
            Message::Resumed => Message::Resumed,
            Message::Released => Message::Released,
            Message::Cancel(c) => Message::Cancel(Cancel {
                reason: own(&c.reason),
            }),
            Message::Error(e) => Message::Error(ErrorMessage {
                code: e.code,
                message: own(&e.message),
            }),
            Message::Ping(n) => Message::Ping(*n),
            Message::Pong(n) => Message::Pong(*n),
            Message::Outcome(o) => Message::Outcome(*o),
        })
    }

    /// Appends the whole frame (header and payload) for `version` to `out`. Fails, as our
    /// own bug, if a field is out of the protocol's bounds or the payload exceeds its type's
    /// limit; `out` is then left as it was.
    pub fn encode(&self, version: ProtocolVersion, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let kind = self.message_type();
        if !kind.is_handshake() && !version.is_supported() {
            return Err(ProtocolError::encode(
                kind,
                format!("this build cannot encode protocol version {version}"),
            ));
        }
        let start = out.len();
        super::frame::write_header_placeholder(out, version, kind);
        let result = self
            .encode_payload(out)
            .and_then(|()| super::frame::patch_length(out, start, kind));
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let kind = self.message_type();
        match self {
            Message::MemoryBatch(b) => {
                b.encode_payload(out);
                return Ok(());
            }
            Message::DiskBlocks(b) => {
                b.encode_payload(out);
                return Ok(());
            }
            _ => {}
        }
        let mut w = WireWriter::new(kind, out);
        match self {
            Message::MemoryBatch(_) | Message::DiskBlocks(_) => {}
            Message::Hello(m) => {
                w.u16(m.version.get());
                w.text("software", &m.software, MAX_SOFTWARE_LEN)?;
                w.bytes(&m.session.0);
                w.u8(m.purpose.to_wire());
                w.u16(m.channel);
                w.u16(m.channels);
            }
            Message::HelloAck(m) => {
                w.u16(m.version.get());
                w.text("software", &m.software, MAX_SOFTWARE_LEN)?;
                w.bytes(&m.session.0);
                w.u16(m.channel);
            }
            Message::VersionRefused(m) => {
                w.u16(m.source.get());
                w.text("source software", &m.source_software, MAX_SOFTWARE_LEN)?;
                w.u16(m.destination_min.get());
                w.u16(m.destination.get());
                w.text(
                    "destination software",
                    &m.destination_software,
                    MAX_SOFTWARE_LEN,
                )?;
            }
            Message::VmConfig(m) => {
                check_vm_config(m).map_err(|reason| ProtocolError::encode(kind, reason))?;
                w.text("name", &m.name, MAX_NAME_LEN)?;
                w.u64(m.memory_bytes);
                w.u32(m.vcpus);
                w.u32(m.disks);
                w.blob("config", &m.config, MAX_CONFIG_LEN)?;
            }
            Message::Compatible | Message::Resumed | Message::Released => {}
            Message::Incompatible(m) => {
                let n = m.report.len();
                if n == 0 || n > MAX_INCOMPATIBILITIES {
                    return Err(ProtocolError::encode(
                        kind,
                        format!(
                            "its report has {n} entries, it needs 1 to {MAX_INCOMPATIBILITIES}"
                        ),
                    ));
                }
                w.u32(u32::try_from(n).unwrap_or(u32::MAX));
                for entry in &m.report {
                    w.u32(entry.id);
                    w.text("message", &entry.message, MAX_TEXT_LEN)?;
                }
            }
            Message::RoundEnd(m) => {
                w.u32(m.round);
                w.u64(m.batches);
                w.u64(m.pages);
                w.u64(m.blocks);
            }
            Message::RoundAck(m) => w.u32(m.round),
            Message::DiskLayer(m) => {
                check_disk_layer(m).map_err(|reason| ProtocolError::encode(kind, reason))?;
                w.u32(m.disk);
                w.u32(m.layer);
                w.u8(m.format.to_wire());
                w.u64(m.size);
                w.bytes(&m.checksum);
                w.text("backing", &m.backing, MAX_TEXT_LEN)?;
                w.text("name", &m.name, MAX_NAME_LEN)?;
                w.bool(m.active);
            }
            Message::DiskLayerAnswer(m) => {
                w.u32(m.disk);
                w.u32(m.layer);
                w.bool(m.reuse);
            }
            Message::SwitchoverBegin(m) => {
                if m.final_round == 0 {
                    return Err(ProtocolError::encode(kind, "round 0 does not exist"));
                }
                w.u32(m.final_round);
            }
            Message::VcpuState(m) => {
                if m.index >= MAX_VCPUS {
                    return Err(ProtocolError::encode(
                        kind,
                        format!("vCPU {} is out of range", m.index),
                    ));
                }
                w.u32(m.index);
                w.blob("state", &m.state, MAX_VCPU_STATE_LEN)?;
            }
            Message::DeviceState(m) => w.blob("state", &m.state, MAX_DEVICE_STATE_LEN)?,
            Message::Complete(m) => {
                w.u64(m.batches);
                w.u64(m.pages);
                w.u64(m.blocks);
            }
            Message::Cancel(m) => w.text("reason", &m.reason, MAX_TEXT_LEN)?,
            Message::Error(m) => {
                w.u16(m.code.to_wire());
                w.text("message", &m.message, MAX_TEXT_LEN)?;
            }
            Message::Ping(n) | Message::Pong(n) => w.u64(*n),
            Message::Outcome(m) => {
                w.bytes(&m.session.0);
                w.u8(m.outcome.to_wire());
            }
        }
        Ok(())
    }

    /// Decodes one payload of type `kind`, sent with header version `version` (already
    /// checked by the frame layer). Never panics.
    pub(crate) fn decode(
        kind: MessageType,
        version: ProtocolVersion,
        payload: &'a [u8],
    ) -> Result<Message<'a>, ProtocolError> {
        let mut r = WireReader::new(kind, payload);
        let msg = match kind {
            MessageType::Hello => {
                let v = version_field(&mut r, "version")?;
                if v != version {
                    return Err(ProtocolError::invalid(
                        kind,
                        "version",
                        format!("it says {v}, the frame header says {version}"),
                    ));
                }
                Message::Hello(Hello {
                    version: v,
                    software: Cow::Borrowed(r.text("software", MAX_SOFTWARE_LEN)?),
                    session: SessionId(r.array("session")?),
                    purpose: enum_field(&mut r, "purpose", |raw: u8| Purpose::try_from(raw))?,
                    channel: r.u16("channel")?,
                    channels: r.u16("channels")?,
                })
            }
            MessageType::HelloAck => Message::HelloAck(HelloAck {
                version: version_field(&mut r, "version")?,
                software: Cow::Borrowed(r.text("software", MAX_SOFTWARE_LEN)?),
                session: SessionId(r.array("session")?),
                channel: r.u16("channel")?,
            }),
            MessageType::VersionRefused => Message::VersionRefused(VersionRefused {
                source: version_field(&mut r, "source version")?,
                source_software: Cow::Borrowed(r.text("source software", MAX_SOFTWARE_LEN)?),
                destination_min: version_field(&mut r, "destination minimum version")?,
                destination: version_field(&mut r, "destination version")?,
                destination_software: Cow::Borrowed(
                    r.text("destination software", MAX_SOFTWARE_LEN)?,
                ),
            }),
            MessageType::VmConfig => {
                let m = VmConfig {
                    name: Cow::Borrowed(r.text("name", MAX_NAME_LEN)?),
                    memory_bytes: r.u64("memory size")?,
                    vcpus: r.u32("vCPU count")?,
                    disks: r.u32("disk count")?,
                    config: Cow::Borrowed(r.blob("config", MAX_CONFIG_LEN)?),
                };
                check_vm_config(&m)
                    .map_err(|reason| ProtocolError::invalid(kind, "configuration", reason))?;
                Message::VmConfig(m)
            }
            MessageType::Compatible => Message::Compatible,
            MessageType::Incompatible => {
                let count = r.u32("entry count")?;
                let n = usize::try_from(count).unwrap_or(usize::MAX);
                // Each entry takes at least 6 bytes: check the count against the payload
                // before reserving room for it.
                if n == 0 || n > MAX_INCOMPATIBILITIES || n.saturating_mul(6) > r.remaining() {
                    return Err(ProtocolError::invalid(
                        kind,
                        "entry count",
                        format!(
                            "{count} entries cannot be right (1 to {MAX_INCOMPATIBILITIES}, in {} bytes)",
                            r.remaining()
                        ),
                    ));
                }
                let mut report = Vec::with_capacity(n);
                for _ in 0..n {
                    report.push(Incompatibility {
                        id: r.u32("id")?,
                        message: Cow::Borrowed(r.text("message", MAX_TEXT_LEN)?),
                    });
                }
                Message::Incompatible(Incompatible { report })
            }
            MessageType::MemoryBatch => {
                return MemoryBatch::decode(payload).map(Message::MemoryBatch);
            }
            MessageType::RoundEnd => Message::RoundEnd(RoundEnd {
                round: round_field(&mut r, "round")?,
                batches: r.u64("batch count")?,
                pages: r.u64("page count")?,
                blocks: r.u64("block count")?,
            }),
            MessageType::RoundAck => Message::RoundAck(RoundAck {
                round: round_field(&mut r, "round")?,
            }),
            MessageType::DiskLayer => {
                let m = DiskLayer {
                    disk: r.u32("disk")?,
                    layer: r.u32("layer")?,
                    format: enum_field(&mut r, "format", |raw: u8| DiskFormat::try_from(raw))?,
                    size: r.u64("size")?,
                    checksum: r.array("checksum")?,
                    backing: Cow::Borrowed(r.text("backing", MAX_TEXT_LEN)?),
                    name: Cow::Borrowed(r.text("name", MAX_NAME_LEN)?),
                    active: r.bool("active")?,
                };
                check_disk_layer(&m)
                    .map_err(|reason| ProtocolError::invalid(kind, "layer", reason))?;
                Message::DiskLayer(m)
            }
            MessageType::DiskLayerAnswer => Message::DiskLayerAnswer(DiskLayerAnswer {
                disk: r.u32("disk")?,
                layer: r.u32("layer")?,
                reuse: r.bool("reuse")?,
            }),
            MessageType::DiskBlocks => return DiskBlocks::decode(payload).map(Message::DiskBlocks),
            MessageType::SwitchoverBegin => Message::SwitchoverBegin(SwitchoverBegin {
                final_round: round_field(&mut r, "final round")?,
            }),
            MessageType::VcpuState => {
                let index = r.u32("vCPU index")?;
                if index >= MAX_VCPUS {
                    return Err(ProtocolError::invalid(
                        kind,
                        "vCPU index",
                        format!("{index} is not below the protocol's limit of {MAX_VCPUS}"),
                    ));
                }
                Message::VcpuState(VcpuState {
                    index,
                    state: Cow::Borrowed(r.blob("state", MAX_VCPU_STATE_LEN)?),
                })
            }
            MessageType::DeviceState => Message::DeviceState(DeviceState {
                state: Cow::Borrowed(r.blob("state", MAX_DEVICE_STATE_LEN)?),
            }),
            MessageType::Complete => Message::Complete(Complete {
                batches: r.u64("batch count")?,
                pages: r.u64("page count")?,
                blocks: r.u64("block count")?,
            }),
            MessageType::Resumed => Message::Resumed,
            MessageType::Released => Message::Released,
            MessageType::Cancel => Message::Cancel(Cancel {
                reason: Cow::Borrowed(r.text("reason", MAX_TEXT_LEN)?),
            }),
            MessageType::Error => Message::Error(ErrorMessage {
                code: enum_field(&mut r, "code", |raw: u16| ErrorCode::try_from(raw))?,
                message: Cow::Borrowed(r.text("message", MAX_TEXT_LEN)?),
            }),
            MessageType::Ping => Message::Ping(r.u64("nonce")?),
            MessageType::Pong => Message::Pong(r.u64("nonce")?),
            MessageType::Outcome => Message::Outcome(Outcome {
                session: SessionId(r.array("session")?),
                outcome: enum_field(&mut r, "outcome", |raw: u8| MoveOutcome::try_from(raw))?,
            }),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// A raw value read from the wire and turned into an enumeration; unknown values rejected.
trait RawField: Sized + fmt::Display {
    fn read(r: &mut WireReader<'_>, field: &'static str) -> Result<Self, ProtocolError>;
}

impl RawField for u8 {
    fn read(r: &mut WireReader<'_>, field: &'static str) -> Result<u8, ProtocolError> {
        r.u8(field)
    }
}

impl RawField for u16 {
    fn read(r: &mut WireReader<'_>, field: &'static str) -> Result<u16, ProtocolError> {
        r.u16(field)
    }
}

fn enum_field<T, R: RawField>(
    r: &mut WireReader<'_>,
    field: &'static str,
    convert: impl Fn(R) -> Result<T, R>,
) -> Result<T, ProtocolError> {
    let raw = R::read(r, field)?;
    let kind = r.kind();
    convert(raw)
        .map_err(|raw| ProtocolError::invalid(kind, field, format!("{raw} is not a known value")))
}

fn version_field(
    r: &mut WireReader<'_>,
    field: &'static str,
) -> Result<ProtocolVersion, ProtocolError> {
    let raw = r.u16(field)?;
    ProtocolVersion::new(raw)
        .ok_or_else(|| ProtocolError::invalid(r.kind(), field, "version 0 does not exist"))
}

fn round_field(r: &mut WireReader<'_>, field: &'static str) -> Result<u32, ProtocolError> {
    let round = r.u32(field)?;
    if round == 0 {
        return Err(ProtocolError::invalid(
            r.kind(),
            field,
            "round 0 does not exist",
        ));
    }
    Ok(round)
}

fn check_vm_config(m: &VmConfig<'_>) -> Result<(), String> {
    if m.name.is_empty() {
        return Err("the VM name is empty".into());
    }
    if m.memory_bytes == 0
        || m.memory_bytes % PAGE_SIZE as u64 != 0
        || m.memory_bytes > MAX_MEMORY_BYTES
    {
        return Err(format!(
            "a memory size of {} bytes is not a non-zero multiple of {PAGE_SIZE} up to {MAX_MEMORY_BYTES}",
            m.memory_bytes
        ));
    }
    if m.vcpus == 0 || m.vcpus > MAX_VCPUS {
        return Err(format!(
            "{} vCPUs is not between 1 and {MAX_VCPUS}",
            m.vcpus
        ));
    }
    if m.disks > MAX_DISKS {
        return Err(format!("{} disks is more than {MAX_DISKS}", m.disks));
    }
    Ok(())
}

fn check_disk_layer(m: &DiskLayer<'_>) -> Result<(), String> {
    if m.disk >= MAX_DISKS {
        return Err(format!("disk {} is not below {MAX_DISKS}", m.disk));
    }
    if m.layer >= MAX_LAYERS {
        return Err(format!("layer {} is not below {MAX_LAYERS}", m.layer));
    }
    if m.size == 0 || m.size > MAX_DISK_BYTES {
        return Err(format!(
            "a size of {} bytes is not between 1 and {MAX_DISK_BYTES}",
            m.size
        ));
    }
    if m.name.is_empty() || m.name == "." || m.name == ".." || m.name.contains(['/', '\0']) {
        return Err(format!(
            "the file name {:?} is not a plain file name",
            m.name
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::batch::{BatchEncoder, Compression};
    use crate::protocol::frame::{Decoded, decode_frame};

    pub(crate) fn session() -> SessionId {
        SessionId(*b"0123456789abcdef")
    }

    /// One of every message type except the batches (built by the batch encoder).
    pub(crate) fn samples() -> Vec<Message<'static>> {
        vec![
            Message::Hello(Hello {
                version: ProtocolVersion::V1,
                software: "vmgate 0.1.0".into(),
                session: session(),
                purpose: Purpose::Move,
                channel: 0,
                channels: 4,
            }),
            Message::HelloAck(HelloAck {
                version: ProtocolVersion::V1,
                software: "vmgate 0.1.0".into(),
                session: session(),
                channel: 3,
            }),
            Message::VersionRefused(VersionRefused {
                source: ProtocolVersion::new(2).unwrap(),
                source_software: "vmgate 0.2.0".into(),
                destination_min: ProtocolVersion::V1,
                destination: ProtocolVersion::V1,
                destination_software: "vmgate 0.1.0".into(),
            }),
            Message::VmConfig(VmConfig {
                name: "vm1".into(),
                memory_bytes: 1 << 30,
                vcpus: 2,
                disks: 1,
                config: b"name = \"vm1\"\nmemory = \"1G\"\n".to_vec().into(),
            }),
            Message::Compatible,
            Message::Incompatible(Incompatible {
                report: vec![
                    Incompatibility {
                        id: 21016,
                        message: "virtual switch \"prod\" does not exist on hv2".into(),
                    },
                    Incompatibility {
                        id: 3,
                        message: "needs 64 GiB of memory, 8 GiB free".into(),
                    },
                ],
            }),
            Message::RoundEnd(RoundEnd {
                round: 3,
                batches: 17,
                pages: 16000,
                blocks: 5,
            }),
            Message::RoundAck(RoundAck { round: 3 }),
            Message::DiskLayer(DiskLayer {
                disk: 0,
                layer: 1,
                format: DiskFormat::Qcow2,
                size: 10 << 30,
                checksum: [0xab; 32],
                backing: "base.qcow2".into(),
                name: "web1.qcow2".into(),
                active: true,
            }),
            Message::DiskLayerAnswer(DiskLayerAnswer {
                disk: 0,
                layer: 0,
                reuse: true,
            }),
            Message::SwitchoverBegin(SwitchoverBegin { final_round: 7 }),
            Message::VcpuState(VcpuState {
                index: 1,
                state: vec![1, 2, 3, 4].into(),
            }),
            Message::DeviceState(DeviceState {
                state: vec![9; 1000].into(),
            }),
            Message::Complete(Complete {
                batches: 100,
                pages: 262144,
                blocks: 0,
            }),
            Message::Resumed,
            Message::Released,
            Message::Cancel(Cancel {
                reason: "cancelled by alice".into(),
            }),
            Message::Error(ErrorMessage {
                code: ErrorCode::LocalFailure,
                message: "restoring vCPU 0 failed".into(),
            }),
            Message::Ping(0x1122334455667788),
            Message::Pong(42),
            Message::Outcome(Outcome {
                session: session(),
                outcome: MoveOutcome::Discarded,
            }),
        ]
    }

    /// Sample frames of every type, batches included.
    pub(crate) fn sample_frames() -> Vec<Vec<u8>> {
        let mut frames: Vec<Vec<u8>> = samples()
            .iter()
            .map(|m| {
                let mut v = Vec::new();
                m.encode(ProtocolVersion::CURRENT, &mut v).unwrap();
                v
            })
            .collect();
        let mut enc = BatchEncoder::new(ProtocolVersion::CURRENT, Compression::Lz4).unwrap();
        enc.begin_memory(2);
        enc.push_zero(1).unwrap();
        let mut p = vec![0u8; 4096];
        p[7] = 7;
        enc.push(2, &p).unwrap();
        let rnd: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13).to_le_bytes()[0])
            .collect();
        enc.push(3, &rnd).unwrap();
        frames.push(enc.finish().unwrap().to_vec());
        enc.begin_disk(1, 0, 1);
        enc.push_zero(4).unwrap();
        frames.push(enc.finish().unwrap().to_vec());
        frames
    }

    fn decode_one(bytes: &[u8]) -> Message<'_> {
        match decode_frame(bytes).unwrap() {
            Decoded::Frame { frame, consumed } => {
                assert_eq!(consumed, bytes.len());
                assert_eq!(frame.version, ProtocolVersion::CURRENT);
                frame.message
            }
            Decoded::NeedMore { .. } => panic!("complete frame reported incomplete"),
        }
    }

    #[test]
    fn every_message_round_trips() {
        let samples = samples();
        let mut seen: Vec<MessageType> = Vec::new();
        for m in &samples {
            let mut bytes = Vec::new();
            m.encode(ProtocolVersion::CURRENT, &mut bytes).unwrap();
            assert_eq!(&decode_one(&bytes), m);
            seen.push(m.message_type());
        }
        seen.push(MessageType::MemoryBatch);
        seen.push(MessageType::DiskBlocks);
        for t in MessageType::ALL {
            assert!(seen.contains(t), "{t} has no round-trip sample");
        }
        // batches: decode, re-encode, same bytes
        for frame in sample_frames() {
            let msg = decode_one(&frame);
            let mut again = Vec::new();
            msg.encode(ProtocolVersion::CURRENT, &mut again).unwrap();
            assert_eq!(again, frame, "{}", msg.message_type());
        }
    }

    #[test]
    fn encoding_refuses_values_the_decoder_would_reject() {
        let bad = [
            Message::Incompatible(Incompatible { report: vec![] }),
            Message::VmConfig(VmConfig {
                name: "vm".into(),
                memory_bytes: 4097,
                vcpus: 1,
                disks: 0,
                config: Cow::Borrowed(b""),
            }),
            Message::Cancel(Cancel {
                reason: "line one\nline two".into(),
            }),
            Message::Cancel(Cancel {
                reason: "x".repeat(MAX_TEXT_LEN + 1).into(),
            }),
            Message::SwitchoverBegin(SwitchoverBegin { final_round: 0 }),
            Message::DeviceState(DeviceState {
                state: vec![0; MAX_DEVICE_STATE_LEN + 1].into(),
            }),
        ];
        for m in &bad {
            let mut out = vec![1, 2, 3];
            let e = m.encode(ProtocolVersion::CURRENT, &mut out).unwrap_err();
            assert_eq!(e.fault(), crate::protocol::Fault::OwnBug, "{e}");
            assert_eq!(
                out,
                [1, 2, 3],
                "a failed encode leaves the buffer as it was"
            );
        }
        let e = Message::Ping(1)
            .encode(ProtocolVersion::new(9).unwrap(), &mut Vec::new())
            .unwrap_err();
        assert!(
            e.to_string().contains("cannot encode protocol version 9"),
            "{e}"
        );
    }

    #[test]
    fn disk_layer_names_must_be_plain_file_names() {
        let layer = |name: &str| {
            Message::DiskLayer(DiskLayer {
                disk: 0,
                layer: 0,
                format: DiskFormat::Raw,
                size: 1 << 20,
                checksum: [7; 32],
                backing: "".into(),
                name: name.to_string().into(),
                active: false,
            })
        };
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/etc/passwd",
            &"n".repeat(MAX_NAME_LEN + 1),
        ] {
            let mut out = Vec::new();
            let e = layer(bad)
                .encode(ProtocolVersion::CURRENT, &mut out)
                .unwrap_err();
            assert_eq!(e.fault(), crate::protocol::Fault::OwnBug, "{bad:?}: {e}");
        }
        // A peer that sends one anyway: the frame of "Q" with the name patched to "/".
        let mut out = Vec::new();
        layer("Q")
            .encode(ProtocolVersion::CURRENT, &mut out)
            .unwrap();
        let at = out.iter().rposition(|&b| b == b'Q').unwrap();
        out[at] = b'/';
        let e = match decode_frame(&out) {
            Err(e) => e,
            Ok(_) => panic!("a layer named \"/\" decoded"),
        };
        assert!(e.to_string().contains("plain file name"), "{e}");
        assert!(
            matches!(
                e.fault(),
                crate::protocol::Fault::MalformedBytes | crate::protocol::Fault::MisbehavingPeer
            ),
            "{e}"
        );
    }

    #[test]
    fn version_refused_names_both_versions() {
        let m = VersionRefused {
            source: ProtocolVersion::new(2).unwrap(),
            source_software: "vmgate 0.2.0".into(),
            destination_min: ProtocolVersion::V1,
            destination: ProtocolVersion::V1,
            destination_software: "vmgate 0.1.0".into(),
        };
        assert_eq!(
            m.to_string(),
            "The destination runs vmgate 0.1.0 (migration protocol 1), which is older than the source's vmgate 0.2.0 (protocol 2): a VM can move only to a host of the same or a newer version. Upgrade the destination to vmgate 0.2.0 or later."
        );
        let old = VersionRefused {
            source: ProtocolVersion::V1,
            source_software: "vmgate 0.1.0".into(),
            destination_min: ProtocolVersion::new(3).unwrap(),
            destination: ProtocolVersion::new(4).unwrap(),
            destination_software: "vmgate 0.9.0".into(),
        };
        assert_eq!(
            old.to_string(),
            "The destination runs vmgate 0.9.0 (migration protocols 3 to 4), which no longer accepts the source's vmgate 0.1.0 (protocol 1). Upgrade the source."
        );
    }
}
