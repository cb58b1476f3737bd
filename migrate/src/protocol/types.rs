//! Small wire types: versions, ids, message type tags, enumerations and the limits.
//!
//! Every enumeration has an explicit wire value; zero is never valid and an unknown value is
//! rejected (`TryFrom<u8>` / `TryFrom<u16>` return the raw value as the error so the caller can
//! name it).

use std::fmt;

/// Size of a guest page on the wire.
pub const PAGE_SIZE: usize = 4096;
/// Size of a disk block on the wire (storage moves).
pub const DISK_BLOCK_SIZE: usize = 64 * 1024;

/// Most page/block data one batch may carry: 1024 raw pages, or 64 raw disk blocks.
pub const MAX_BATCH_DATA: usize = 4 * 1024 * 1024;
/// Most entries (pages or blocks) one batch may list. Zero pages carry no data, so a batch may
/// list more entries than fit as raw data.
pub const MAX_BATCH_ENTRIES: usize = 4096;
/// One table entry: `u64 index, u8 kind, u32 length`.
pub const BATCH_ENTRY_SIZE: usize = 13;

/// Most parallel channels a move may use (channel 0 included).
pub const MAX_CHANNELS: u16 = 16;
/// Pages and disk blocks are striped over the channels in runs of `1 << STRIPE_SHIFT` units,
/// so that every copy of one page travels on one (ordered) channel: see the module doc.
pub const STRIPE_SHIFT: u32 = 9;

/// Largest guest memory the protocol can describe (64 TiB); a host's own limit is lower and is
/// part of the compatibility check, not of the protocol.
pub const MAX_MEMORY_BYTES: u64 = 1 << 46;
/// Most vCPUs a VM may have on the wire.
pub const MAX_VCPUS: u32 = 1024;
/// Most disks a VM may have on the wire.
pub const MAX_DISKS: u32 = 64;
/// Most layers (backing-chain files, the active layer included) one disk may have.
pub const MAX_LAYERS: u32 = 16;
/// Largest disk (layer virtual size) the protocol can describe: 64 TiB.
pub const MAX_DISK_BYTES: u64 = 1 << 46;

/// Longest software version string ("vmgate 0.1.0 (abcdef)").
pub const MAX_SOFTWARE_LEN: usize = 64;
/// Longest VM name.
pub const MAX_NAME_LEN: usize = 255;
/// Longest human-readable text (reasons, error messages, incompatibility descriptions, backing
/// file names).
pub const MAX_TEXT_LEN: usize = 1024;
/// Most entries in an incompatibility report.
pub const MAX_INCOMPATIBILITIES: usize = 256;
/// Largest VM configuration document.
pub const MAX_CONFIG_LEN: usize = 1024 * 1024;
/// Largest serialized state of one vCPU.
pub const MAX_VCPU_STATE_LEN: usize = 1024 * 1024;
/// Largest serialized VM and device state (clock, irqchip, PIT, devices).
pub const MAX_DEVICE_STATE_LEN: usize = 16 * 1024 * 1024;

/// A migration protocol version. Version 0 does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion(u16);

impl ProtocolVersion {
    /// The first version.
    pub const V1: ProtocolVersion = ProtocolVersion(1);
    /// The version this build speaks (and sends as a source).
    pub const CURRENT: ProtocolVersion = ProtocolVersion::V1;
    /// The oldest source version this build accepts as a destination.
    pub const MIN_SUPPORTED: ProtocolVersion = ProtocolVersion::V1;

    /// A version from its wire value; `None` for 0.
    pub const fn new(value: u16) -> Option<ProtocolVersion> {
        if value == 0 {
            None
        } else {
            Some(ProtocolVersion(value))
        }
    }

    /// The wire value.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// Whether this build can decode frames of this version (other than the handshake, whose
    /// layout is the same in every version).
    pub fn is_supported(self) -> bool {
        (ProtocolVersion::MIN_SUPPORTED..=ProtocolVersion::CURRENT).contains(&self)
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A move's session id: 16 random bytes chosen by the source. Parallel channels present it to
/// join the session (each channel is also authenticated on its own, as the same user).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// Defines a `#[repr]` enum with explicit wire values, `TryFrom<raw>` that rejects unknown
/// values (and zero, which no list uses) and a `name()`.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident : $raw:ty {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($raw)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// Every value, in wire order.
            pub const ALL: &'static [$name] = &[ $( $name::$variant, )+ ];

            /// The wire value.
            pub const fn to_wire(self) -> $raw {
                self as $raw
            }

            /// The value's name, as written in the protocol documentation.
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => stringify!($variant), )+
                }
            }
        }

        impl TryFrom<$raw> for $name {
            /// The unknown raw value.
            type Error = $raw;

            fn try_from(raw: $raw) -> Result<Self, $raw> {
                match raw {
                    $( $value => Ok($name::$variant), )+
                    other => Err(other),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

wire_enum! {
    /// The type tag of a frame. 0 is never valid; the values are fixed for all versions (a new
    /// version may add types, never renumber them).
    pub enum MessageType: u16 {
        /// S→D, first frame of every connection.
        Hello = 1,
        /// D→S, the version is accepted.
        HelloAck = 2,
        /// D→S, the version is not accepted; the connection ends.
        VersionRefused = 3,
        /// S→D, the VM's configuration.
        VmConfig = 4,
        /// D→S, the skeleton is built; send the data.
        Compatible = 5,
        /// D→S, the full incompatibility report; the move ends.
        Incompatible = 6,
        /// S→D, guest pages.
        MemoryBatch = 7,
        /// S→D, this channel sent everything of a round.
        RoundEnd = 8,
        /// D→S, every channel finished every round up to this one.
        RoundAck = 9,
        /// S→D, a disk layer (backing-chain file) is about to be copied.
        DiskLayer = 10,
        /// D→S, whether D already has an identical layer and wants it skipped.
        DiskLayerAnswer = 11,
        /// S→D, disk blocks of one layer.
        DiskBlocks = 12,
        /// S→D, the VM is paused on the source; one last round follows.
        SwitchoverBegin = 13,
        /// S→D, the state of one vCPU.
        VcpuState = 14,
        /// S→D, VM-wide and device state.
        DeviceState = 15,
        /// S→D, everything was sent: D may resume the VM (the handoff begins).
        Complete = 16,
        /// D→S, the VM runs on the destination (the handoff's acknowledgement).
        Resumed = 17,
        /// S→D, the source let the VM go.
        Released = 18,
        /// Either way, the move is cancelled; the reason is for the log.
        Cancel = 19,
        /// Either way, the move failed; code and text say why.
        Error = 20,
        /// Either way, liveness probe.
        Ping = 21,
        /// Either way, the answer to a Ping.
        Pong = 22,
        /// D→S, the answer to an outcome query (after a lost handoff acknowledgement).
        Outcome = 23,
    }
}

impl MessageType {
    /// The largest payload a frame of this type may have. Checked on the header, before
    /// anything is allocated or read.
    pub const fn max_payload(self) -> usize {
        match self {
            MessageType::VmConfig => 2 + MAX_NAME_LEN + 8 + 4 + 4 + 4 + MAX_CONFIG_LEN,
            MessageType::Incompatible => 4 + MAX_INCOMPATIBILITIES * (4 + 2 + MAX_TEXT_LEN),
            MessageType::MemoryBatch => {
                crate::protocol::batch::MEMORY_BATCH_HEADER
                    + MAX_BATCH_DATA
                    + MAX_BATCH_ENTRIES * BATCH_ENTRY_SIZE
            }
            MessageType::DiskBlocks => {
                crate::protocol::batch::DISK_BATCH_HEADER
                    + MAX_BATCH_DATA
                    + MAX_BATCH_ENTRIES * BATCH_ENTRY_SIZE
            }
            MessageType::VcpuState => 4 + 4 + MAX_VCPU_STATE_LEN,
            MessageType::DeviceState => 4 + MAX_DEVICE_STATE_LEN,
            // Every other message is a few fixed fields and at most one short text.
            _ => 4096,
        }
    }

    /// Whether the payload layout is frozen across versions: the handshake, which two builds
    /// of any version must be able to read to tell each other their versions.
    pub const fn is_handshake(self) -> bool {
        matches!(
            self,
            MessageType::Hello | MessageType::HelloAck | MessageType::VersionRefused
        )
    }
}

wire_enum! {
    /// What a connection is for, said in its Hello.
    pub enum Purpose: u8 {
        /// Channel 0 of a new move: the control channel (it carries data too).
        Move = 1,
        /// A parallel data channel joining an existing move (channel 1..channels).
        Join = 2,
        /// A source that lost its link during the handoff asks how the move ended.
        QueryOutcome = 3,
    }
}

wire_enum! {
    /// How one page or disk block is encoded in a batch.
    pub enum UnitKind: u8 {
        /// All zero; no data.
        Zero = 1,
        /// The bytes as they are (exactly one page or block).
        Raw = 2,
        /// An LZ4 block (lz4_flex block format), shorter than the raw unit.
        Lz4 = 3,
        /// A zstd frame, shorter than the raw unit.
        Zstd = 4,
    }
}

wire_enum! {
    /// A disk layer's image format.
    pub enum DiskFormat: u8 {
        /// A raw image.
        Raw = 1,
        /// A qcow2 image (possibly with a backing file).
        Qcow2 = 2,
    }
}

wire_enum! {
    /// The category of an Error message. Like the fault of a [`super::ProtocolError`], it says
    /// who is at fault.
    pub enum ErrorCode: u16 {
        /// The peer sent bytes that do not decode.
        Malformed = 1,
        /// The peer sent a valid message at the wrong time or with values out of range.
        Misbehaving = 2,
        /// The peers cannot work together (versions).
        Incompatible = 3,
        /// A bug in the sender of the Error.
        Internal = 4,
        /// The sender of the Error failed locally (restoring state, writing memory, disk full).
        LocalFailure = 5,
        /// The connection or the other channels of the move failed.
        Transport = 6,
    }
}

wire_enum! {
    /// How a move ended, as the destination tells a source that asks after losing its link
    /// during the handoff.
    pub enum MoveOutcome: u8 {
        /// The destination resumed the VM: it runs there; the source must release it.
        Resumed = 1,
        /// The destination discarded the move and will never resume it: the source resumes.
        Discarded = 2,
        /// The destination knows no such session (e.g. it restarted, which discards every
        /// move it had not resumed): the source resumes.
        Unknown = 3,
    }
}

/// The channel a page (or disk block) with this index must travel on. Every copy of one unit
/// goes through the same channel, whose frames arrive in order, so an older copy can never
/// overwrite a newer one on the destination.
pub fn stripe_channel(index: u64, channels: u16) -> u16 {
    let channels = u64::from(channels.max(1));
    let stripe = index >> STRIPE_SHIFT;
    // The remainder is below `channels`, which came from a u16.
    u16::try_from(stripe % channels).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_never_a_valid_wire_value() {
        assert_eq!(MessageType::try_from(0u16), Err(0));
        assert_eq!(Purpose::try_from(0u8), Err(0));
        assert_eq!(UnitKind::try_from(0u8), Err(0));
        assert_eq!(DiskFormat::try_from(0u8), Err(0));
        assert_eq!(ErrorCode::try_from(0u16), Err(0));
        assert_eq!(MoveOutcome::try_from(0u8), Err(0));
        assert_eq!(ProtocolVersion::new(0), None);
    }

    #[test]
    fn every_message_type_round_trips_and_the_next_value_is_unknown() {
        for (i, t) in MessageType::ALL.iter().enumerate() {
            assert_eq!(usize::from(t.to_wire()), i + 1, "{t} is numbered in order");
            assert_eq!(MessageType::try_from(t.to_wire()), Ok(*t));
        }
        let next = u16::try_from(MessageType::ALL.len() + 1).unwrap();
        assert_eq!(MessageType::try_from(next), Err(next));
        assert_eq!(MessageType::try_from(u16::MAX), Err(u16::MAX));
    }

    #[test]
    fn every_limit_fits_the_u32_length_field() {
        for t in MessageType::ALL {
            assert!(u32::try_from(t.max_payload()).is_ok(), "{t}");
        }
        assert_eq!(MessageType::Ping.max_payload(), 4096);
        assert!(MessageType::MemoryBatch.max_payload() < 4 * 1024 * 1024 + 64 * 1024);
    }

    #[test]
    fn stripes_spread_consecutive_runs_over_all_channels() {
        let run = 1u64 << STRIPE_SHIFT;
        assert_eq!(stripe_channel(0, 4), 0);
        assert_eq!(stripe_channel(run - 1, 4), 0);
        assert_eq!(stripe_channel(run, 4), 1);
        assert_eq!(stripe_channel(4 * run, 4), 0);
        assert_eq!(stripe_channel(u64::MAX, 16), 15);
        assert_eq!(stripe_channel(12345, 1), 0);
        assert_eq!(stripe_channel(12345, 0), 0);
    }

    #[test]
    fn session_ids_print_as_hex() {
        let mut id = [0u8; 16];
        id[0] = 0xab;
        id[15] = 0x01;
        assert_eq!(
            SessionId(id).to_string(),
            "ab000000000000000000000000000001"
        );
    }
}
