//! The VM configuration (TOML) and its validation.
//!
//! ```toml
//! name = "vm1"
//! memory_mib = 256
//! vcpus = 2
//! cpu_compat = false          # mask CPUID to the vendor baseline (see `cpuid`)
//!
//! [[vcpu]]                    # vCPU 0; vCPUs without an entry run `idle`
//! program = "memstress"
//! start_mib = 4               # guest-physical start of the range, MiB (>= 4)
//! size_mib = 64
//! marker_every = 10           # passes per serial marker
//! full_content = false        # true: every byte of every page is checked
//!
//! [[vcpu]]
//! program = "diskstress"
//! disk = 0                    # index into [[disk]]
//! block_size = 4096           # bytes, multiple of 512, at most 65536
//! start_block = 0             # optional
//! blocks = 256                # optional: default is the whole disk (at most 1 Mi blocks)
//! marker_every = 64           # blocks per serial marker
//!
//! [[disk]]
//! path = "disk0.qcow2"        # relative paths are relative to the config file
//! format = "qcow2"            # or "raw"
//!
//! [[nic]]
//! mac = "52:54:00:12:34:56"
//! switch = "lab-switch"
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::layout::{
    HIGH_RAM_START, LOW_RAM_END, MAX_DISKS, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB,
    MemoryLayout, SYSTEM_AREA_END,
};
use crate::disk::DiskSpec;

/// Largest block size of `diskstress` (the per-vCPU buffer).
pub const MAX_BLOCK_SIZE: u32 = 64 * 1024;
/// Most blocks one `diskstress` program cycles over.
pub const MAX_DISKSTRESS_BLOCKS: u64 = 1 << 20;
/// Longest VM name.
pub const MAX_NAME_LEN: usize = 64;
/// Most NICs.
pub const MAX_NICS: usize = 16;

/// Errors of the VM configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the VM configuration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The text is not a valid configuration.
    #[error("the VM configuration is not valid TOML for a vmgate VM")]
    Parse(#[source] toml::de::Error),
    /// The name is empty, too long or has characters other than letters, digits, `-_.`.
    #[error(
        "VM name {0:?} is invalid: use 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    Name(String),
    /// Memory outside the supported range.
    #[error("memory_mib = {0} is outside the supported range {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}")]
    Memory(u64),
    /// vCPU count outside the supported range.
    #[error("vcpus = {0} is outside the supported range 1..={MAX_VCPUS}")]
    VcpuCount(u32),
    /// More `[[vcpu]]` program entries than vCPUs.
    #[error("{programs} [[vcpu]] entries are given but the VM has only {vcpus} vCPUs")]
    TooManyPrograms {
        /// Entries given.
        programs: usize,
        /// vCPUs.
        vcpus: u32,
    },
    /// A memstress range is empty, outside RAM or inside the system area.
    #[error(
        "vCPU {vcpu}: memstress range {start_mib}..{end_mib} MiB is not inside guest RAM above the 4 MiB system area (RAM: {ram})"
    )]
    Range {
        /// The vCPU.
        vcpu: u32,
        /// Start (MiB).
        start_mib: u64,
        /// End (MiB).
        end_mib: u64,
        /// The RAM ranges, for the message.
        ram: String,
    },
    /// Two memstress ranges overlap.
    #[error("the memstress ranges of vCPU {a} and vCPU {b} overlap; give each vCPU its own range")]
    Overlap {
        /// First vCPU.
        a: u32,
        /// Second vCPU.
        b: u32,
    },
    /// `marker_every` is zero.
    #[error("vCPU {0}: marker_every must be at least 1")]
    MarkerEvery(u32),
    /// A diskstress program names a disk that does not exist.
    #[error("vCPU {vcpu}: diskstress uses disk {disk} but only {disks} [[disk]] entries exist")]
    NoSuchDisk {
        /// The vCPU.
        vcpu: u32,
        /// The disk index.
        disk: usize,
        /// Disks configured.
        disks: usize,
    },
    /// Invalid block size.
    #[error("vCPU {vcpu}: block_size = {size} must be a multiple of 512 between 512 and 65536")]
    BlockSize {
        /// The vCPU.
        vcpu: u32,
        /// The size given.
        size: u32,
    },
    /// Invalid block count.
    #[error("vCPU {vcpu}: blocks = {blocks} must be between 1 and {MAX_DISKSTRESS_BLOCKS}")]
    Blocks {
        /// The vCPU.
        vcpu: u32,
        /// The count given.
        blocks: u64,
    },
    /// Too many disks.
    #[error("{0} disks are configured; at most {MAX_DISKS} are supported")]
    TooManyDisks(usize),
    /// Too many NICs.
    #[error("{0} NICs are configured; at most {MAX_NICS} are supported")]
    TooManyNics(usize),
    /// A MAC address that is not six colon-separated hex pairs, or is multicast or zero.
    #[error(
        "NIC {nic}: MAC address {mac:?} is invalid: {why} (expected a unicast address like 52:54:00:12:34:56)"
    )]
    Mac {
        /// The NIC index.
        nic: usize,
        /// The text given.
        mac: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Two NICs with one MAC.
    #[error("NICs {a} and {b} have the same MAC address {mac}")]
    DuplicateMac {
        /// First NIC.
        a: usize,
        /// Second NIC.
        b: usize,
        /// The MAC.
        mac: String,
    },
    /// An invalid virtual switch name.
    #[error(
        "NIC {nic}: virtual switch name {name:?} is invalid: use 1 to 64 letters, digits, '-', '_', '.' or spaces"
    )]
    Switch {
        /// The NIC index.
        nic: usize,
        /// The name given.
        name: String,
    },
}

/// A whole VM configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The VM's name.
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Mask CPUID to the vendor's documented baseline so the VM can move between CPUs.
    #[serde(default)]
    pub cpu_compat: bool,
    /// Guest program per vCPU (index = vCPU); missing entries run `idle`.
    #[serde(default, rename = "vcpu")]
    pub programs: Vec<GuestProgram>,
    /// Disks, attached as block devices 0, 1, ...
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskSpec>,
    /// Network adapters (definitions only: MAC and virtual switch).
    #[serde(default, rename = "nic")]
    pub nics: Vec<NicConfig>,
}

/// A network adapter definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Virtual switch name.
    pub switch: String,
}

/// A built-in guest program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "program", rename_all = "lowercase", deny_unknown_fields)]
pub enum GuestProgram {
    /// Touch every page of a range, pass after pass (QEMU migration-test style).
    Memstress(MemstressConfig),
    /// Write sequence-numbered blocks to a disk.
    Diskstress(DiskstressConfig),
    /// Halt.
    Idle,
}

impl GuestProgram {
    /// The program's name as in the config.
    pub fn name(&self) -> &'static str {
        match self {
            GuestProgram::Memstress(_) => "memstress",
            GuestProgram::Diskstress(_) => "diskstress",
            GuestProgram::Idle => "idle",
        }
    }
}

impl fmt::Display for GuestProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parameters of `memstress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemstressConfig {
    /// Guest-physical start of the range, MiB.
    pub start_mib: u64,
    /// Size of the range, MiB.
    pub size_mib: u64,
    /// Passes per serial marker.
    #[serde(default = "default_marker_every")]
    pub marker_every: u64,
    /// Fill whole pages with content derived from (page, pass) instead of incrementing byte 0.
    #[serde(default)]
    pub full_content: bool,
    /// Stop after this many passes: the program then stops its vCPU (it stays stopped across
    /// pauses, snapshots and moves, like a halted guest) and the memory keeps the last pass.
    /// Absent: run forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passes: Option<u64>,
}

impl MemstressConfig {
    /// First guest-physical address of the range.
    pub fn start_gpa(&self) -> u64 {
        self.start_mib << 20
    }

    /// Guest-physical address just past the range.
    pub fn end_gpa(&self) -> u64 {
        (self.start_mib + self.size_mib) << 20
    }
}

/// Parameters of `diskstress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskstressConfig {
    /// Index of the disk (block device).
    pub disk: usize,
    /// Block size in bytes.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// First block (in `block_size` units) of the region written.
    #[serde(default)]
    pub start_block: u64,
    /// Blocks in the region; default: up to the end of the disk (at most 1 Mi blocks).
    #[serde(default)]
    pub blocks: Option<u64>,
    /// Blocks written per serial marker.
    #[serde(default = "default_disk_marker_every")]
    pub marker_every: u64,
}

fn default_marker_every() -> u64 {
    16
}

fn default_disk_marker_every() -> u64 {
    64
}

fn default_block_size() -> u32 {
    4096
}

impl VmConfig {
    /// Reads and validates a configuration file; relative disk paths are resolved against the
    /// file's folder.
    pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty());
        VmConfig::from_toml(&text, base)
    }

    /// Parses and validates TOML text; relative disk paths are joined to `base` if given.
    pub fn from_toml(text: &str, base: Option<&Path>) -> Result<VmConfig, ConfigError> {
        let mut config: VmConfig = toml::from_str(text).map_err(ConfigError::Parse)?;
        if let Some(base) = base {
            for d in &mut config.disks {
                if d.path.is_relative() {
                    d.path = base.join(&d.path);
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The configuration as TOML text.
    pub fn to_toml(&self) -> String {
        // Serializing our own plain structs cannot fail: every field is a string, integer,
        // bool or a table of those.
        toml::to_string(self).unwrap_or_default()
    }

    /// The program of vCPU `index` (`idle` past the configured entries).
    pub fn program(&self, index: u32) -> &GuestProgram {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.programs.get(i))
            .unwrap_or(&GuestProgram::Idle)
    }

    /// The memory layout this configuration implies.
    pub fn layout(&self) -> MemoryLayout {
        MemoryLayout::new(self.memory_mib)
    }

    /// Checks every rule that does not need the disks opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_NAME_LEN
            && self
                .name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(ConfigError::Name(self.name.clone()));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpus));
        }
        if self.programs.len() > usize::try_from(self.vcpus).unwrap_or(usize::MAX) {
            return Err(ConfigError::TooManyPrograms {
                programs: self.programs.len(),
                vcpus: self.vcpus,
            });
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        let layout = self.layout();
        let ram = describe_ram(&layout);
        let mut ranges: Vec<(u32, u64, u64)> = Vec::new();
        for (i, program) in self.programs.iter().enumerate() {
            let vcpu = u32::try_from(i).unwrap_or(u32::MAX);
            match program {
                GuestProgram::Memstress(m) => {
                    let end_mib = m.start_mib.saturating_add(m.size_mib);
                    let start = m.start_mib.saturating_mul(1 << 20);
                    let len = m.size_mib.saturating_mul(1 << 20);
                    if m.size_mib == 0
                        || end_mib > MAX_MEMORY_MIB + (HIGH_RAM_START >> 20)
                        || start < SYSTEM_AREA_END
                        || !layout.is_ram(start, len)
                    {
                        return Err(ConfigError::Range {
                            vcpu,
                            start_mib: m.start_mib,
                            end_mib,
                            ram,
                        });
                    }
                    if m.marker_every == 0 {
                        return Err(ConfigError::MarkerEvery(vcpu));
                    }
                    for &(other, s, e) in &ranges {
                        if m.start_mib < e && s < end_mib {
                            return Err(ConfigError::Overlap { a: other, b: vcpu });
                        }
                    }
                    ranges.push((vcpu, m.start_mib, end_mib));
                }
                GuestProgram::Diskstress(d) => {
                    if d.disk >= self.disks.len() {
                        return Err(ConfigError::NoSuchDisk {
                            vcpu,
                            disk: d.disk,
                            disks: self.disks.len(),
                        });
                    }
                    if d.block_size < 512
                        || d.block_size > MAX_BLOCK_SIZE
                        || d.block_size % 512 != 0
                    {
                        return Err(ConfigError::BlockSize {
                            vcpu,
                            size: d.block_size,
                        });
                    }
                    if let Some(blocks) = d.blocks.filter(|b| *b == 0 || *b > MAX_DISKSTRESS_BLOCKS)
                    {
                        return Err(ConfigError::Blocks { vcpu, blocks });
                    }
                    if d.marker_every == 0 {
                        return Err(ConfigError::MarkerEvery(vcpu));
                    }
                }
                GuestProgram::Idle => {}
            }
        }
        if self.nics.len() > MAX_NICS {
            return Err(ConfigError::TooManyNics(self.nics.len()));
        }
        let mut macs: Vec<(usize, [u8; 6])> = Vec::new();
        for (i, nic) in self.nics.iter().enumerate() {
            let mac = parse_mac(&nic.mac).map_err(|why| ConfigError::Mac {
                nic: i,
                mac: nic.mac.clone(),
                why,
            })?;
            if let Some(&(a, _)) = macs.iter().find(|(_, m)| *m == mac) {
                return Err(ConfigError::DuplicateMac {
                    a,
                    b: i,
                    mac: nic.mac.clone(),
                });
            }
            macs.push((i, mac));
            let switch_ok = !nic.switch.trim().is_empty()
                && nic.switch.len() <= 64
                && nic
                    .switch
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '));
            if !switch_ok {
                return Err(ConfigError::Switch {
                    nic: i,
                    name: nic.switch.clone(),
                });
            }
        }
        Ok(())
    }
}

fn describe_ram(layout: &MemoryLayout) -> String {
    layout
        .slots()
        .iter()
        .map(|s| format!("{}..{} MiB", s.gpa >> 20, (s.gpa + s.len) >> 20))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast and all-zero addresses.
pub fn parse_mac(text: &str) -> Result<[u8; 6], &'static str> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut out {
        let part = parts.next().ok_or("it has fewer than six parts")?;
        if part.len() != 2 {
            return Err("each part must be two hex digits");
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| "it has a character that is not hex")?;
    }
    if parts.next().is_some() {
        return Err("it has more than six parts");
    }
    if out[0] & 1 != 0 {
        return Err("it is a multicast address");
    }
    if out == [0; 6] {
        return Err("it is all zeros");
    }
    Ok(out)
}

// The device window must not be inside the RAM a memstress range can name.
const _: () = assert!(LOW_RAM_END >= SYSTEM_AREA_END);

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "vm1"
memory_mib = 256
vcpus = 3

[[vcpu]]
program = "memstress"
start_mib = 4
size_mib = 64
marker_every = 10

[[vcpu]]
program = "diskstress"
disk = 0
block_size = 4096
blocks = 128

[[disk]]
path = "d0.qcow2"
format = "qcow2"

[[nic]]
mac = "52:54:00:12:34:56"
switch = "lab switch"
"#;

    #[test]
    fn parses_and_resolves_relative_disks() {
        let c = VmConfig::from_toml(GOOD, Some(Path::new("/srv/vms"))).unwrap();
        assert_eq!(c.disks[0].path, Path::new("/srv/vms/d0.qcow2"));
        assert_eq!(c.program(0).name(), "memstress");
        assert_eq!(c.program(1).name(), "diskstress");
        assert_eq!(c.program(2).name(), "idle");
        let again = VmConfig::from_toml(&c.to_toml(), None).unwrap();
        assert_eq!(again, c);
    }

    fn with(replace: &str, by: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_toml(&GOOD.replace(replace, by), None)
    }

    #[test]
    fn refuses_bad_values_with_clear_messages() {
        let e = with("memory_mib = 256", "memory_mib = 4").unwrap_err();
        assert_eq!(
            e.to_string(),
            "memory_mib = 4 is outside the supported range 8..=65536"
        );
        let e = with("start_mib = 4", "start_mib = 2").unwrap_err();
        assert!(
            e.to_string()
                .contains("not inside guest RAM above the 4 MiB system area")
        );
        let e = with("size_mib = 64", "size_mib = 300").unwrap_err();
        assert!(matches!(e, ConfigError::Range { vcpu: 0, .. }), "{e}");
        let e = with("52:54:00:12:34:56", "53:54:00:12:34:56").unwrap_err();
        assert_eq!(
            e.to_string(),
            "NIC 0: MAC address \"53:54:00:12:34:56\" is invalid: it is a multicast address (expected a unicast address like 52:54:00:12:34:56)"
        );
        let e = with("52:54:00:12:34:56", "52:54:00:12:34").unwrap_err();
        assert!(e.to_string().contains("fewer than six parts"));
        let e = with("disk = 0", "disk = 1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "vCPU 1: diskstress uses disk 1 but only 1 [[disk]] entries exist"
        );
        let e = with("block_size = 4096", "block_size = 1000").unwrap_err();
        assert!(matches!(
            e,
            ConfigError::BlockSize {
                vcpu: 1,
                size: 1000
            }
        ));
        let e = with("vcpus = 3", "vcpus = 1").unwrap_err();
        assert!(matches!(
            e,
            ConfigError::TooManyPrograms {
                programs: 2,
                vcpus: 1
            }
        ));
        let e = with("name = \"vm1\"", "name = \"vm 1\"").unwrap_err();
        assert!(matches!(e, ConfigError::Name(_)));
        let e = with("format = \"qcow2\"", "format = \"vhdx\"").unwrap_err();
        assert!(matches!(e, ConfigError::Parse(_)));
        let e = with("switch = \"lab switch\"", "switch = \"\"").unwrap_err();
        assert!(matches!(e, ConfigError::Switch { nic: 0, .. }));
    }

    #[test]
    fn refuses_overlapping_ranges() {
        let text = r#"
name = "vm"
memory_mib = 64
vcpus = 2
[[vcpu]]
program = "memstress"
start_mib = 4
size_mib = 16
[[vcpu]]
program = "memstress"
start_mib = 16
size_mib = 8
"#;
        let e = VmConfig::from_toml(text, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the memstress ranges of vCPU 0 and vCPU 1 overlap; give each vCPU its own range"
        );
    }

    #[test]
    fn range_may_not_cross_the_device_window() {
        let text = r#"
name = "vm"
memory_mib = 4096
vcpus = 1
[[vcpu]]
program = "memstress"
start_mib = 3000
size_mib = 100
"#;
        assert!(matches!(
            VmConfig::from_toml(text, None),
            Err(ConfigError::Range { .. })
        ));
        let ok = text.replace("start_mib = 3000", "start_mib = 4096");
        VmConfig::from_toml(&ok, None).unwrap();
    }
}
