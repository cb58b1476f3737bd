//! The migration wire protocol: versioned, length-prefixed frames, the messages of a live
//! move, and the state machines of both ends as pure logic.
//!
//! # Frames
//!
//! Every frame is a 12-byte header — magic `"VG"`, `u16` protocol version, `u16` message type
//! (0 is never valid, unknown types are rejected), `u16` flags (none defined, must be 0), `u32`
//! payload length — followed by the payload. Integers are little-endian. Each message type has
//! a payload limit (4 KiB for control messages, 1 MiB for a VM configuration, 4 MiB of data
//! plus a 52 KiB table for a batch, 1 MiB per vCPU state, 16 MiB of device state), checked on
//! the header before anything is read or allocated; every count inside a payload is checked
//! against the payload's length before it is used. Decoders never panic; `fuzz/` has a
//! libFuzzer target for [`decode_frame`], and the unit tests feed it random and mutated frames.
//! See [`frame`] for the header and [`batch`] for the page batch layout.
//!
//! # Channels
//!
//! A move uses 1 to 16 authenticated connections ("channels"). Channel 0 carries the control
//! messages and data; channels 1.. carry data (MemoryBatch, DiskBlocks, RoundEnd) and join the
//! session by presenting its random id in a Hello of purpose Join (each channel is also
//! authenticated on its own, as the same user, by the layer below). Page `p` (and disk block
//! `b`) always travels on channel `(p >> 9) % channels` — runs of 512 units per channel — so
//! every copy of one page goes through one ordered stream: a stale copy can never arrive after
//! a newer one. The receiver enforces the striping.
//!
//! # Message sequence
//!
//! ```text
//!  source S                                              destination D
//!  ── setup ────────────────────────────────────────────────────────────────────────
//!  Hello{version, software, session, Move, channel 0 of n} ──▶
//!                       ◀── HelloAck{version}   or   VersionRefused{both versions} ✕
//!  VmConfig{name, memory, vcpus, disks, config document} ──▶
//!                       ◀── Compatible (skeleton built)  or  Incompatible{full report} ✕
//!  on channels 1..n:  Hello{Join, session, channel i of n} ──▶
//!                       ◀── HelloAck{channel i}
//!  ── storage (shared-nothing moves) ───────────────────────────────────────────────
//!  DiskLayer{disk, layer, size, sha256, backing, name, active} ──▶  (base first)
//!                       ◀── DiskLayerAnswer{reuse: D holds an identical parent}
//!  DiskBlocks{disk, layer, round, blocks…} ──▶   (any channel, by stripe; not if reused;
//!                                                 counted in RoundEnd like pages)
//!  ── memory pre-copy, rounds r = 1, 2, … ──────────────────────────────────────────
//!  MemoryBatch{r, pages…} ──▶  (any channel, by stripe; zero pages as flags, lz4/zstd)
//!  RoundEnd{r, batches, pages, blocks} ──▶  (on every channel, counting its own data)
//!                       ◀── RoundAck{r} (once every channel ended round r)
//!  ── switchover (vCPUs paused on S) ───────────────────────────────────────────────
//!  SwitchoverBegin{final round f} ──▶
//!  MemoryBatch{f}… DiskBlocks{f}… RoundEnd{f} (every channel) ──▶
//!                       ◀── RoundAck{f}
//!  VcpuState{i, state} × vcpus, DeviceState{state} ──▶
//!  Complete{batches, pages, blocks in all} ──▶      (from here D decides)
//!  ── handoff ──────────────────────────────────────────────────────────────────────
//!                       ◀── Resumed   (D restored and resumed the VM)
//!  Released ──▶                       (S let the VM go)
//!  ── at any time ──────────────────────────────────────────────────────────────────
//!  Ping{n} ◀──▶ Pong{n};  Cancel{reason} / Error{code, text} either way before the handoff
//!  ── after a link lost during the handoff (new connection) ─────────────────────────
//!  Hello{QueryOutcome, session} ──▶
//!                       ◀── Outcome{session, Resumed | Discarded | Unknown}
//! ```
//!
//! The VM runs in exactly one place at all times. Until S sends Complete the VM is S's: any
//! failure, cancel or lost link ends the move with the VM running on S, and D discards
//! everything it built. After Complete, D decides: it resumes and acknowledges (Resumed), or
//! discards and says so (Error) — never resuming once its link is gone before it resumed.
//! S releases the VM only on Resumed; if its link breaks first, it neither resumes nor
//! releases but asks D (QueryOutcome), whose answer is final. See [`source`] and [`receiver`].
//!
//! # The receiver's states
//!
//! ```text
//!   Idle ─Hello─▶ Negotiated ─VmConfig─▶ Checking ─Compatible─▶ Configured ─joins─▶ ReceivingMemory
//!                                                                                     │ SwitchoverBegin
//!   Done ◀─Released─ Resumed ◀─resumed─ Resuming ◀─Complete (everything arrived)─ SwitchingOver
//!   Refused (version or configuration), Cancelled, Failed: terminal, everything discarded
//! ```
//!
//! [`ReceiverState::on_message`] rejects what a state does not allow: a replayed Hello or
//! SwitchoverBegin, data before every channel joined, a batch for another round than its
//! channel's, a batch after the final round, a page beyond the configured memory or off its
//! stripe, vCPU state before the switchover or twice, a Complete before every channel finished
//! the final round or with totals that do not match.
//!
//! # Versions
//!
//! Version 1 is the only version. The rule for later ones: the session runs at the source's
//! version; a destination accepts source versions in `[MIN_SUPPORTED, CURRENT]`, so a newer
//! destination accepts an older source, and an older destination refuses a newer source with
//! a VersionRefused that names both software and protocol versions. The frame header and the
//! handshake payloads (Hello, HelloAck, VersionRefused) keep their layout in every version, so
//! any two builds can tell each other their versions; message type numbers are never reused.

pub mod batch;
mod error;
pub mod frame;
mod message;
pub mod receiver;
pub mod source;
mod types;
mod wire;

pub use batch::{
    BatchEncoder, Compression, DiskBlocks, MemoryBatch, Unit, UnitData, UnitDecoder, UnitIter,
    Units, is_zero,
};
pub use error::{Fault, ProtocolError};
pub use frame::{
    Decoded, FRAME_HEADER_LEN, Frame, FrameHeader, FrameReader, decode_frame, write_frame,
};
pub use message::{
    Cancel, Complete, DeviceState, DiskLayer, DiskLayerAnswer, ErrorMessage, Hello, HelloAck,
    Incompatibility, Incompatible, Message, Outcome, RoundAck, RoundEnd, SwitchoverBegin,
    VcpuState, VersionRefused, VmConfig,
};
pub use receiver::{
    ReceiverAction, ReceiverPolicy, ReceiverState, ReceiverStep, Rejected, Verdict, error_reply,
};
pub use source::{SourceAction, SourceState, SourceStep};
pub use types::*;
