//! The VM's state without its memory, and its versioned, size-capped, checksummed container.
//!
//! [`VmState`] is what a switchover sends after the last memory pages: per vCPU the KVM
//! state (regs, sregs, xsave, xcrs, lapic, msrs, vcpu events, mp state, debug regs, CPUID,
//! TSC frequency), the VM-wide KVM state (clock, PIC/IOAPIC, PIT), the devices, and the
//! configuration. KVM structures are stored as their kernel ABI bytes (kvm-bindings' serde
//! support), the rest with postcard.
//!
//! Container (little-endian):
//!
//! ```text
//! 0   magic "VMGSTATE"
//! 8   format version (u32) = 1
//! 12  flags (u32) = 0
//! 16  payload length (u64), at most MAX_STATE_BYTES
//! 24  CRC-32 of the payload
//! 28  CRC-32 of bytes 0..28
//! 32  payload (postcard)
//! ```
//!
//! Decoding checks, in order: length of the header, magic, header checksum, version, the
//! announced length against the cap (before allocating anything), truncation, trailing bytes,
//! payload checksum, and only then parses.

use std::io::Read;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use super::config::VmConfig;
use super::devices::DeviceState;

/// Magic at the start of a state container.
pub const STATE_MAGIC: [u8; 8] = *b"VMGSTATE";
/// The container format version this build writes and reads.
pub const STATE_VERSION: u32 = 1;
/// Largest payload accepted (64 MiB).
pub const MAX_STATE_BYTES: u64 = 64 << 20;
/// Bytes of the container header.
pub const STATE_HEADER_LEN: usize = 32;

/// Errors of the state container.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Shorter than the header.
    #[error(
        "the VM state is {len} bytes, shorter than its {STATE_HEADER_LEN}-byte header: it is truncated"
    )]
    TooShort {
        /// Bytes present.
        len: usize,
    },
    /// Not a vmgate state.
    #[error("this is not a vmgate VM state: it does not start with \"VMGSTATE\"")]
    BadMagic,
    /// The header's checksum does not match.
    #[error("the VM state's header is corrupt: its checksum does not match")]
    HeaderChecksum,
    /// Another format version.
    #[error("the VM state has format version {found}; this vmgate reads version {supported} only")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version understood.
        supported: u32,
    },
    /// Announced length above the cap.
    #[error(
        "the VM state announces {len} bytes, more than the limit of {max} bytes; refusing to read it"
    )]
    TooLarge {
        /// Length announced.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// Fewer bytes than announced.
    #[error(
        "the VM state is truncated: its header announces {expected} bytes but only {found} follow"
    )]
    Truncated {
        /// Announced.
        expected: u64,
        /// Present.
        found: u64,
    },
    /// More bytes than announced.
    #[error("the VM state has {extra} unexpected bytes after its end")]
    Trailing {
        /// Extra bytes.
        extra: u64,
    },
    /// The payload's checksum does not match.
    #[error(
        "the VM state is corrupt: the payload's CRC-32 is {found:#010x} but the header says {expected:#010x}"
    )]
    Checksum {
        /// In the header.
        expected: u32,
        /// Computed.
        found: u32,
    },
    /// The payload did not parse.
    #[error(
        "the VM state passed its checksum but does not decode; it was written by an incompatible vmgate"
    )]
    Decode(#[source] postcard::Error),
    /// Encoding failed (a bug).
    #[error("the VM state could not be encoded")]
    Encode(#[source] postcard::Error),
    /// Reading the state failed.
    #[error("reading the VM state failed")]
    Io(#[source] std::io::Error),
}

/// The state of one vCPU.
///
/// The legacy FPU state (`KVM_GET_FPU`) is not stored separately: it is the first 512 bytes
/// of the XSAVE area, which `KVM_SET_XSAVE` restores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (KVM vCPU id).
    pub index: u32,
    /// Multiprocessing state (saved first).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: Xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// MSRs from the host's MSR index list that KVM could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending events (saved last).
    pub vcpu_events: kvm_vcpu_events,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// TSC frequency (kHz), if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// The XSAVE area (`kvm_xsave` is not `Clone` in kvm-bindings: its flexible array member
/// has no length, and the fixed 4096-byte `region` is all KVM_GET_XSAVE fills).
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Xsave(pub kvm_xsave);

impl Clone for Xsave {
    fn clone(&self) -> Xsave {
        Xsave(kvm_xsave {
            region: self.0.region,
            ..Default::default()
        })
    }
}

/// VM-wide KVM state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmWideState {
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// PIC master (irqchip 0).
    pub pic_master: kvm_irqchip,
    /// PIC slave (irqchip 1).
    pub pic_slave: kvm_irqchip,
    /// IOAPIC (irqchip 2).
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
}

/// The VM's whole state except guest memory (which travels separately).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The configuration (stored as its TOML text, validated again when decoded).
    #[serde(with = "config_as_toml")]
    pub config: VmConfig,
    /// Per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: VmWideState,
    /// Devices.
    pub devices: DeviceState,
}

/// The configuration travels as TOML text: its program entries are an internally tagged
/// enum, which postcard (no self-description) cannot decode, and parsing the text runs the
/// same validation as a configuration file.
mod config_as_toml {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::VmConfig;

    pub fn serialize<S: Serializer>(c: &VmConfig, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&c.to_toml())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VmConfig, D::Error> {
        let text = String::deserialize(d)?;
        VmConfig::from_toml(&text, None).map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                msg.push_str(": ");
                msg.push_str(&x.to_string());
                src = x.source();
            }
            serde::de::Error::custom(msg)
        })
    }
}

impl VmState {
    /// Encodes into a container.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let payload = postcard::to_stdvec(self).map_err(StateError::Encode)?;
        let len = payload.len() as u64;
        if len > MAX_STATE_BYTES {
            return Err(StateError::TooLarge {
                len,
                max: MAX_STATE_BYTES,
            });
        }
        let mut out = Vec::with_capacity(STATE_HEADER_LEN + payload.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        let hcrc = crc32fast::hash(&out);
        out.extend_from_slice(&hcrc.to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes a whole container held in memory.
    pub fn decode(bytes: &[u8]) -> Result<VmState, StateError> {
        let (header, rest) = bytes
            .split_at_checked(STATE_HEADER_LEN)
            .ok_or(StateError::TooShort { len: bytes.len() })?;
        let h = Header::parse(header)?;
        let found = rest.len() as u64;
        if found < h.len {
            return Err(StateError::Truncated {
                expected: h.len,
                found,
            });
        }
        if found > h.len {
            return Err(StateError::Trailing {
                extra: found - h.len,
            });
        }
        h.parse_payload(rest)
    }

    /// Reads one container of exactly `available` bytes from `reader` (e.g. a section of a
    /// file), allocating only after the announced length passed the cap.
    pub fn read_from(reader: &mut impl Read, available: u64) -> Result<VmState, StateError> {
        let mut header = [0u8; STATE_HEADER_LEN];
        let got = read_up_to(reader, &mut header).map_err(StateError::Io)?;
        if got < STATE_HEADER_LEN || available < STATE_HEADER_LEN as u64 {
            return Err(StateError::TooShort {
                len: got.min(usize::try_from(available).unwrap_or(usize::MAX)),
            });
        }
        let h = Header::parse(&header)?;
        let body = available - STATE_HEADER_LEN as u64;
        if body < h.len {
            return Err(StateError::Truncated {
                expected: h.len,
                found: body,
            });
        }
        if body > h.len {
            return Err(StateError::Trailing {
                extra: body - h.len,
            });
        }
        // h.len <= MAX_STATE_BYTES (64 MiB) was checked by Header::parse.
        let mut payload = vec![0u8; usize::try_from(h.len).unwrap_or(0)];
        let got = read_up_to(reader, &mut payload).map_err(StateError::Io)?;
        if (got as u64) < h.len {
            return Err(StateError::Truncated {
                expected: h.len,
                found: got as u64,
            });
        }
        h.parse_payload(&payload)
    }
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else {
            break;
        };
        match reader.read(rest) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

struct Header {
    len: u64,
    crc: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

impl Header {
    fn parse(h: &[u8]) -> Result<Header, StateError> {
        if h.get(0..8) != Some(&STATE_MAGIC[..]) {
            return Err(StateError::BadMagic);
        }
        let covered = h.get(0..28).ok_or(StateError::TooShort { len: h.len() })?;
        if crc32fast::hash(covered) != le32(h, 28) {
            return Err(StateError::HeaderChecksum);
        }
        let version = le32(h, 8);
        if version != STATE_VERSION {
            return Err(StateError::UnsupportedVersion {
                found: version,
                supported: STATE_VERSION,
            });
        }
        let len = le64(h, 16);
        if len > MAX_STATE_BYTES {
            return Err(StateError::TooLarge {
                len,
                max: MAX_STATE_BYTES,
            });
        }
        Ok(Header {
            len,
            crc: le32(h, 24),
        })
    }

    fn parse_payload(&self, payload: &[u8]) -> Result<VmState, StateError> {
        let found = crc32fast::hash(payload);
        if found != self.crc {
            return Err(StateError::Checksum {
                expected: self.crc,
                found,
            });
        }
        postcard::from_bytes(payload).map_err(StateError::Decode)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vm::devices::{BlockState, SerialState};

    pub(crate) fn sample() -> VmState {
        let config =
            VmConfig::from_toml("name = \"t\"\nmemory_mib = 16\nvcpus = 1\n", None).unwrap();
        let vcpu = VcpuState {
            index: 0,
            mp_state: kvm_mp_state { mp_state: 0 },
            regs: kvm_regs {
                rip: 0x8_0000,
                rax: 42,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: Xsave(kvm_xsave::default()),
            xcrs: kvm_xcrs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 12345,
                ..Default::default()
            }],
            vcpu_events: kvm_vcpu_events::default(),
            debug_regs: kvm_debugregs::default(),
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x8000_0000,
                ..Default::default()
            }],
            tsc_khz: Some(2_000_000),
        };
        VmState {
            config,
            vcpus: vec![vcpu],
            vm: VmWideState {
                clock: kvm_clock_data::default(),
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip {
                    chip_id: 1,
                    ..Default::default()
                },
                ioapic: kvm_irqchip {
                    chip_id: 2,
                    ..Default::default()
                },
                pit: kvm_pit_state2::default(),
            },
            devices: DeviceState {
                serial: SerialState {
                    bytes_out: 7,
                    ..Default::default()
                },
                block: vec![BlockState {
                    capacity_sectors: 2048,
                    ..Default::default()
                }],
            },
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = s.encode().unwrap();
        assert_eq!(&bytes[..8], b"VMGSTATE");
        let back = VmState::decode(&bytes).unwrap();
        assert_eq!(back.vcpus[0].regs.rax, 42);
        assert_eq!(back.vcpus[0].msrs[0].data, 12345);
        assert_eq!(back.vcpus[0].cpuid[0].ecx, 0x8000_0000);
        assert_eq!(back.vm.ioapic.chip_id, 2);
        assert_eq!(back.devices, s.devices);
        assert_eq!(back.config, s.config);
        let mut reader = &bytes[..];
        let again = VmState::read_from(&mut reader, bytes.len() as u64).unwrap();
        assert_eq!(again.vcpus[0].tsc_khz, Some(2_000_000));
    }

    fn reheader(bytes: &mut [u8]) {
        let crc = crc32fast::hash(&bytes[..28]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn rejects_damage_with_distinct_errors() {
        let good = sample().encode().unwrap();

        let e = VmState::decode(&good[..10]).unwrap_err();
        assert!(matches!(e, StateError::TooShort { len: 10 }), "{e}");

        let mut foreign = good.clone();
        foreign[..8].copy_from_slice(b"QEVM\0\0\0\x03");
        assert!(matches!(
            VmState::decode(&foreign),
            Err(StateError::BadMagic)
        ));

        let mut v2 = good.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        reheader(&mut v2);
        let e = VmState::decode(&v2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the VM state has format version 2; this vmgate reads version 1 only"
        );

        let mut hdr = good.clone();
        hdr[9] ^= 1;
        assert!(matches!(
            VmState::decode(&hdr),
            Err(StateError::HeaderChecksum)
        ));

        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        reheader(&mut huge);
        let e = VmState::decode(&huge).unwrap_err();
        assert!(
            matches!(e, StateError::TooLarge { len, .. } if len == 1 << 40),
            "{e}"
        );
        // The reader refuses before allocating 1 TiB.
        let mut r = &huge[..];
        assert!(matches!(
            VmState::read_from(&mut r, 1 << 41),
            Err(StateError::TooLarge { .. })
        ));

        let short = &good[..good.len() - 5];
        assert!(matches!(
            VmState::decode(short),
            Err(StateError::Truncated { .. })
        ));

        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            VmState::decode(&long),
            Err(StateError::Trailing { extra: 1 })
        ));

        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(
            VmState::decode(&flipped),
            Err(StateError::Checksum { .. })
        ));

        // A payload with a valid checksum that does not parse.
        let mut junk = good[..STATE_HEADER_LEN].to_vec();
        let payload = [0xFFu8; 8];
        junk[16..24].copy_from_slice(&8u64.to_le_bytes());
        junk[24..28].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        reheader(&mut junk);
        junk.extend_from_slice(&payload);
        assert!(matches!(VmState::decode(&junk), Err(StateError::Decode(_))));
    }
}
