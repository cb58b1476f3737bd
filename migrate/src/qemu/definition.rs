//! A QEMU VM's definition (TOML) and its validation against the host.
//!
//! ```toml
//! name = "linux"
//! backend = "qemu"
//! memory_mib = 256
//! vcpus = 1
//! cpu_model = "qemu64"        # a named baseline model of `qemu-system-x86_64 -cpu help`
//! accel = "tcg"               # or "kvm"; always explicit
//! machine = "q35"             # optional: "q35" (default), "pc", or a versioned type
//! agent = true                # optional: the guest agent channel (vmgate's test guest)
//! serial_log = "linux/console.log"   # optional; default: the VM's runtime folder
//! autostart = false           # optional: start when vmgated starts (the daemon acts on it)
//!
//! [boot]                      # either a kernel ...
//! kernel = "linux/vmlinuz"
//! initrd = "linux/initrd.img"
//! cmdline = "console=ttyS0"
//! # ... or firmware booting a disk:  firmware = "bios"  disk = 0
//!
//! [[disk]]                    # virtio-blk; qcow2 backing chains are followed
//! path = "linux/disk.qcow2"
//! format = "qcow2"            # or "raw"
//! read_only = false           # optional
//!
//! [[nic]]                     # virtio-net on a virtual switch of the host
//! mac = "52:54:00:12:34:57"
//! switch = "Lab"
//! ```
//!
//! Relative paths are relative to the host's first storage root. [`QemuHost::validate`]
//! checks everything before anything is started and names the field at fault: every file
//! (kernel, initrd, each disk and each of its backing files, the serial log) resolved beneath
//! a storage root ([`super::paths`]), the CPU model and machine type known to the installed
//! QEMU, sizes and counts bounded, NICs on known switches with valid, distinct MACs. The only
//! way to a [`ValidatedVm`] is through that check, and only a [`ValidatedVm`] can be started.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::host::{QemuHost, VirtualSwitch};
use super::paths::{self, DotDot, PathProblem, Want};
use crate::disk::{self, DiskError, DiskFormat, DiskSpec};

/// Smallest memory size, MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest memory size, MiB (1 TiB; the host's own memory is also a limit).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most vCPUs.
pub const MAX_VCPUS: u32 = 64;
/// Most disks.
pub const MAX_DISKS: usize = 16;
/// Most NICs.
pub const MAX_NICS: usize = 8;
/// Longest kernel command line, bytes (x86's limit, without the terminating zero).
pub const MAX_CMDLINE: usize = 2047;
/// Longest VM name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest UNIX socket path (`sun_path` without its terminating zero).
pub const MAX_SOCKET_PATH: usize = 107;

/// The backend a definition is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A QEMU process per VM.
    Qemu,
}

/// The accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization (real hosts).
    Kvm,
    /// QEMU's software emulation (tests here: this machine's KVM cannot run a guest kernel at
    /// a useful speed).
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The firmware that boots a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// QEMU's built-in SeaBIOS.
    Bios,
}

/// A QEMU VM's definition, as written (paths unresolved).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuVmDefinition {
    /// The VM's name.
    pub name: String,
    /// Must be `qemu`.
    pub backend: Backend,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The CPU model (processor compatibility: a named baseline).
    pub cpu_model: String,
    /// The accelerator.
    pub accel: Accel,
    /// The machine type (`q35` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Whether the guest agent channel is present.
    #[serde(default)]
    pub agent: bool,
    /// Where the serial console is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log: Option<String>,
    /// Start with the daemon.
    #[serde(default)]
    pub autostart: bool,
    /// How it boots.
    pub boot: BootDefinition,
    /// Disks.
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskDefinition>,
    /// NICs.
    #[serde(default, rename = "nic", skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicDefinition>,
}

/// How the VM boots: a kernel (with initrd and command line), or firmware booting a disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootDefinition {
    /// The kernel (direct boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// The initrd (direct boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The kernel command line (direct boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// The firmware (disk boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// The disk the firmware boots (index into `[[disk]]`, default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<usize>,
}

/// A disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDefinition {
    /// The image (for qcow2, the top layer).
    pub path: String,
    /// Its format.
    pub format: DiskFormat,
    /// Read-only for the guest.
    #[serde(default)]
    pub read_only: bool,
}

/// A NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicDefinition {
    /// Its MAC address (kept across moves).
    pub mac: String,
    /// The virtual switch it is on.
    pub switch: String,
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl FromStr for MacAddress {
    type Err = ();

    fn from_str(s: &str) -> Result<MacAddress, ()> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or(())?;
            if p.len() != 2 {
                return Err(());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| ())?;
        }
        if parts.next().is_some() {
            return Err(());
        }
        Ok(MacAddress(out))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Errors of a definition. Field errors name the field as written in the TOML
/// (`disk[0].path`, `nic[1].mac`, ...), then what is wrong; the error's source is the cause
/// of that problem, if it has one (an I/O error), so a chain printer shows each once.
#[derive(Debug)]
#[non_exhaustive]
pub enum DefinitionError {
    /// The text is not a definition (TOML syntax, unknown or missing keys, wrong types); the
    /// parser's message names the key and line.
    Parse(toml::de::Error),
    /// A field's value is refused.
    Field {
        /// The field.
        field: String,
        /// What is wrong with it.
        problem: FieldProblem,
    },
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DefinitionError::Parse(_) => {
                f.write_str("the VM definition is not valid TOML for a QEMU VM")
            }
            DefinitionError::Field { field, problem } => write!(f, "{field}: {problem}"),
        }
    }
}

impl std::error::Error for DefinitionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DefinitionError::Parse(e) => Some(e),
            DefinitionError::Field { problem, .. } => problem.source(),
        }
    }
}

/// What is wrong with a field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FieldProblem {
    /// A bad VM name.
    #[error(
        "{0:?} is not a valid VM name: use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    Name(String),
    /// A number outside its range.
    #[error("{value} is outside the supported range {min}..={max}{unit}")]
    OutOfRange {
        /// The value.
        value: u64,
        /// Minimum.
        min: u64,
        /// Maximum.
        max: u64,
        /// Unit suffix for the message (" MiB").
        unit: &'static str,
    },
    /// More memory than the host has.
    #[error("{value} MiB is more than this host's memory ({host} MiB)")]
    MoreThanHost {
        /// Asked.
        value: u64,
        /// The host's total.
        host: u64,
    },
    /// Too many entries.
    #[error("{count} entries; at most {max} are supported")]
    TooMany {
        /// Given.
        count: usize,
        /// Maximum.
        max: usize,
    },
    /// Text too long.
    #[error("{len} bytes; at most {max} are supported")]
    TooLong {
        /// Given.
        len: usize,
        /// Maximum.
        max: usize,
    },
    /// A control character in text passed on.
    #[error("contains a control character")]
    ControlCharacter,
    /// An unknown CPU model.
    #[error(
        "{model:?} is not a CPU model of QEMU {qemu}; give a named baseline such as {examples} (list: qemu-system-x86_64 -cpu help)"
    )]
    UnknownCpuModel {
        /// The model.
        model: String,
        /// QEMU's version.
        qemu: String,
        /// Some valid models.
        examples: String,
    },
    /// A CPU model that depends on the host's processor.
    #[error(
        "{model:?} is not a named baseline: it follows the host's processor, so the VM could not keep its CPU on another host; give a named baseline such as {examples}"
    )]
    NotABaseline {
        /// The model.
        model: String,
        /// Some valid models.
        examples: String,
    },
    /// An unknown machine type.
    #[error(
        "{machine:?} is not a PC machine type of this QEMU; use {known}, or a versioned type of `qemu-system-x86_64 -machine help`"
    )]
    UnknownMachine {
        /// The type.
        machine: String,
        /// The aliases and what they stand for.
        known: String,
    },
    /// KVM is asked for but not there.
    #[error("kvm needs /dev/kvm, which this host does not have; use accel = \"tcg\" or load kvm")]
    KvmUnavailable,
    /// A path is refused.
    #[error(transparent)]
    Path(PathProblem),
    /// A disk image cannot be read.
    #[error(transparent)]
    Disk(DiskError),
    /// Two disks use the same file.
    #[error("{} is also used by disk[{other}]", .path.display())]
    SharedFile {
        /// The file.
        path: PathBuf,
        /// The other disk.
        other: usize,
    },
    /// The boot section is inconsistent.
    #[error("{0}")]
    Boot(&'static str),
    /// The boot disk does not exist.
    #[error("disk {index} does not exist (the VM has {disks} disks)")]
    NoSuchDisk {
        /// The index.
        index: usize,
        /// Disks defined.
        disks: usize,
    },
    /// An invalid MAC.
    #[error(
        "{0:?} is not a unicast MAC address: give six two-digit hex bytes separated by ':', e.g. 52:54:00:12:34:56"
    )]
    Mac(String),
    /// A MAC used twice.
    #[error("{mac} is also the MAC of nic[{other}]")]
    DuplicateMac {
        /// The MAC.
        mac: MacAddress,
        /// The other NIC.
        other: usize,
    },
    /// An unknown switch.
    #[error("{name:?} is not a virtual switch of this host (known: {known})")]
    UnknownSwitch {
        /// The switch.
        name: String,
        /// The host's switches.
        known: String,
    },
    /// The VM's runtime socket paths would not fit.
    #[error(
        "the VM's sockets under {} would be longer than {MAX_SOCKET_PATH} bytes; use a shorter name or a shorter runtime folder", .run_dir.display()
    )]
    SocketPath {
        /// The host's runtime folder.
        run_dir: PathBuf,
    },
}

fn field(field: impl Into<String>, problem: FieldProblem) -> DefinitionError {
    DefinitionError::Field {
        field: field.into(),
        problem,
    }
}

impl QemuVmDefinition {
    /// Parses a definition. Only syntax and types are checked here; see
    /// [`QemuHost::validate`].
    pub fn from_toml(text: &str) -> Result<QemuVmDefinition, DefinitionError> {
        toml::from_str(text).map_err(DefinitionError::Parse)
    }

    /// The definition as TOML (to persist it).
    pub fn to_toml(&self) -> String {
        // Serializing plain strings, numbers and tables cannot fail.
        toml::to_string(self).unwrap_or_default()
    }
}

/// The boot of a validated VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// Direct kernel boot.
    Kernel {
        /// The kernel.
        kernel: PathBuf,
        /// The initrd.
        initrd: Option<PathBuf>,
        /// The command line.
        cmdline: String,
    },
    /// Firmware booting a disk.
    Firmware {
        /// The firmware.
        firmware: Firmware,
        /// The boot disk, if the VM has disks.
        disk: Option<usize>,
    },
}

/// One file of a validated disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedLayer {
    /// The file, as the kernel resolved it beneath a storage root.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

/// A validated disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedDisk {
    /// Its files, top (the one the guest writes) first.
    pub layers: Vec<ResolvedLayer>,
    /// Read-only for the guest.
    pub read_only: bool,
    /// The size the guest sees, bytes.
    pub virtual_size: u64,
}

/// A validated NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedNic {
    /// Its MAC.
    pub mac: MacAddress,
    /// Its switch.
    pub switch: VirtualSwitch,
}

/// A definition checked against this host: the only thing [`super::QemuVm::start`] takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatedVm {
    pub(crate) definition: QemuVmDefinition,
    pub(crate) machine_type: String,
    pub(crate) boot: Boot,
    pub(crate) disks: Vec<ResolvedDisk>,
    pub(crate) nics: Vec<ResolvedNic>,
    pub(crate) serial_log: Option<PathBuf>,
}

impl ValidatedVm {
    /// The definition as written.
    pub fn definition(&self) -> &QemuVmDefinition {
        &self.definition
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.definition.name
    }

    /// The versioned machine type QEMU will run (e.g. `pc-q35-10.0` for `q35`): what a
    /// destination must offer.
    pub fn machine_type(&self) -> &str {
        &self.machine_type
    }

    /// How it boots.
    pub fn boot(&self) -> &Boot {
        &self.boot
    }

    /// Its disks, every file resolved.
    pub fn disks(&self) -> &[ResolvedDisk] {
        &self.disks
    }

    /// Its NICs.
    pub fn nics(&self) -> &[ResolvedNic] {
        &self.nics
    }

    /// The serial log named in the definition (resolved); none: the runtime folder's.
    pub fn serial_log(&self) -> Option<&Path> {
        self.serial_log.as_deref()
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= MAX_NAME_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn range(
    name: &str,
    value: u64,
    min: u64,
    max: u64,
    unit: &'static str,
) -> Result<(), DefinitionError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(field(
            name,
            FieldProblem::OutOfRange {
                value,
                min,
                max,
                unit,
            },
        ))
    }
}

impl QemuHost {
    /// Checks a definition against this host (see the module documentation). Nothing is
    /// created, started or locked; files are only inspected.
    pub fn validate(&self, def: &QemuVmDefinition) -> Result<ValidatedVm, DefinitionError> {
        if !valid_name(&def.name) {
            return Err(field("name", FieldProblem::Name(def.name.clone())));
        }
        let longest_socket = self
            .vm_run_dir(&def.name)
            .join(super::process::AGENT_SOCKET);
        if longest_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(field(
                "name",
                FieldProblem::SocketPath {
                    run_dir: self.config.run_dir.clone(),
                },
            ));
        }
        range(
            "memory_mib",
            def.memory_mib,
            MIN_MEMORY_MIB,
            MAX_MEMORY_MIB,
            " MiB",
        )?;
        if def.memory_mib > self.host_memory_mib {
            return Err(field(
                "memory_mib",
                FieldProblem::MoreThanHost {
                    value: def.memory_mib,
                    host: self.host_memory_mib,
                },
            ));
        }
        range("vcpus", u64::from(def.vcpus), 1, u64::from(MAX_VCPUS), "")?;
        if !self.caps.cpu_models.contains(&def.cpu_model) {
            let examples = ["qemu64", "Skylake-Server", "EPYC"]
                .iter()
                .filter(|m| self.caps.cpu_models.contains(**m))
                .map(|m| format!("{m:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            if matches!(def.cpu_model.as_str(), "host" | "max" | "base") {
                return Err(field(
                    "cpu_model",
                    FieldProblem::NotABaseline {
                        model: def.cpu_model.clone(),
                        examples,
                    },
                ));
            }
            return Err(field(
                "cpu_model",
                FieldProblem::UnknownCpuModel {
                    model: def.cpu_model.clone(),
                    qemu: format!(
                        "{}.{}.{}",
                        self.caps.version.major, self.caps.version.minor, self.caps.version.micro
                    ),
                    examples,
                },
            ));
        }
        if def.accel == Accel::Kvm && !Path::new("/dev/kvm").exists() {
            return Err(field("accel", FieldProblem::KvmUnavailable));
        }
        let machine = def.machine.as_deref().unwrap_or("q35");
        let Some(machine_type) = self.caps.machines.get(machine).cloned() else {
            // The aliases (q35, pc) and what they stand for.
            let known = self
                .caps
                .machines
                .iter()
                .filter(|(alias, target)| alias != target)
                .map(|(alias, target)| format!("{alias} ({target})"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(field(
                "machine",
                FieldProblem::UnknownMachine {
                    machine: machine.to_string(),
                    known,
                },
            ));
        };

        let disks = self.validate_disks(def)?;
        let boot = self.validate_boot(def)?;
        let nics = self.validate_nics(def)?;
        let serial_log = match &def.serial_log {
            None => None,
            Some(p) => Some(
                self.resolve_user_path(p, Want::MayCreate)
                    .map_err(|e| field("serial_log", FieldProblem::Path(e)))?,
            ),
        };
        Ok(ValidatedVm {
            definition: def.clone(),
            machine_type,
            boot,
            disks,
            nics,
            serial_log,
        })
    }

    /// A path as the user wrote it: relative ones are relative to the first storage root.
    fn resolve_user_path(&self, written: &str, want: Want) -> Result<PathBuf, PathProblem> {
        let p = Path::new(written);
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            let base = self.roots.roots().first().cloned().unwrap_or_default();
            base.join(p)
        };
        paths::resolve(&self.roots, &full, want, DotDot::Refuse)
    }

    fn validate_disks(&self, def: &QemuVmDefinition) -> Result<Vec<ResolvedDisk>, DefinitionError> {
        if def.disks.len() > MAX_DISKS {
            return Err(field(
                "disk",
                FieldProblem::TooMany {
                    count: def.disks.len(),
                    max: MAX_DISKS,
                },
            ));
        }
        let mut out: Vec<ResolvedDisk> = Vec::new();
        for (i, d) in def.disks.iter().enumerate() {
            let name = format!("disk[{i}].path");
            let top = self
                .resolve_user_path(&d.path, Want::Existing)
                .map_err(|e| field(&name, FieldProblem::Path(e)))?;
            if let Some(other) = out.iter().position(|o| o.layers[0].path == top) {
                return Err(field(&name, FieldProblem::SharedFile { path: top, other }));
            }
            let chain = disk::chain(&DiskSpec {
                path: top.clone(),
                format: d.format,
            })
            .map_err(|e| field(&name, FieldProblem::Disk(e)))?;
            let mut layers = vec![ResolvedLayer {
                path: top,
                format: d.format,
            }];
            for (k, layer) in chain.parents().iter().enumerate() {
                let resolved =
                    paths::resolve(&self.roots, &layer.path, Want::Existing, DotDot::Resolve)
                        .map_err(|e| {
                            field(
                                format!("disk[{i}].path (backing file {})", k + 1),
                                FieldProblem::Path(e),
                            )
                        })?;
                layers.push(ResolvedLayer {
                    path: resolved,
                    format: layer.format,
                });
            }
            out.push(ResolvedDisk {
                layers,
                read_only: d.read_only,
                virtual_size: chain.virtual_size(),
            });
        }
        Ok(out)
    }

    fn validate_boot(&self, def: &QemuVmDefinition) -> Result<Boot, DefinitionError> {
        let b = &def.boot;
        match (&b.kernel, b.firmware) {
            (Some(kernel), None) => {
                if b.disk.is_some() {
                    return Err(field(
                        "boot.disk",
                        FieldProblem::Boot("a boot disk goes with firmware, not with a kernel"),
                    ));
                }
                let kernel = self
                    .resolve_user_path(kernel, Want::Existing)
                    .map_err(|e| field("boot.kernel", FieldProblem::Path(e)))?;
                let initrd = match &b.initrd {
                    None => None,
                    Some(p) => Some(
                        self.resolve_user_path(p, Want::Existing)
                            .map_err(|e| field("boot.initrd", FieldProblem::Path(e)))?,
                    ),
                };
                let cmdline = b.cmdline.clone().unwrap_or_default();
                if cmdline.len() > MAX_CMDLINE {
                    return Err(field(
                        "boot.cmdline",
                        FieldProblem::TooLong {
                            len: cmdline.len(),
                            max: MAX_CMDLINE,
                        },
                    ));
                }
                if cmdline.chars().any(char::is_control) {
                    return Err(field("boot.cmdline", FieldProblem::ControlCharacter));
                }
                Ok(Boot::Kernel {
                    kernel,
                    initrd,
                    cmdline,
                })
            }
            (None, Some(firmware)) => {
                if b.initrd.is_some() || b.cmdline.is_some() {
                    return Err(field(
                        "boot",
                        FieldProblem::Boot(
                            "initrd and cmdline go with a kernel, not with firmware",
                        ),
                    ));
                }
                let disk = match b.disk {
                    Some(index) if index >= def.disks.len() => {
                        return Err(field(
                            "boot.disk",
                            FieldProblem::NoSuchDisk {
                                index,
                                disks: def.disks.len(),
                            },
                        ));
                    }
                    Some(index) => Some(index),
                    None => (!def.disks.is_empty()).then_some(0),
                };
                Ok(Boot::Firmware { firmware, disk })
            }
            (Some(_), Some(_)) => Err(field(
                "boot",
                FieldProblem::Boot(
                    "give either kernel (direct boot) or firmware (disk boot), not both",
                ),
            )),
            (None, None) => Err(field(
                "boot",
                FieldProblem::Boot(
                    "give kernel (direct boot) or firmware = \"bios\" (boot from a disk)",
                ),
            )),
        }
    }

    fn validate_nics(&self, def: &QemuVmDefinition) -> Result<Vec<ResolvedNic>, DefinitionError> {
        if def.nics.len() > MAX_NICS {
            return Err(field(
                "nic",
                FieldProblem::TooMany {
                    count: def.nics.len(),
                    max: MAX_NICS,
                },
            ));
        }
        let mut seen: Vec<MacAddress> = Vec::new();
        let mut out = Vec::new();
        for (i, n) in def.nics.iter().enumerate() {
            let mac = match n.mac.parse::<MacAddress>() {
                Ok(m) if m.0[0] & 1 == 0 && m.0 != [0; 6] => m,
                _ => {
                    return Err(field(
                        format!("nic[{i}].mac"),
                        FieldProblem::Mac(n.mac.clone()),
                    ));
                }
            };
            if let Some(other) = seen.iter().position(|m| *m == mac) {
                return Err(field(
                    format!("nic[{i}].mac"),
                    FieldProblem::DuplicateMac { mac, other },
                ));
            }
            seen.push(mac);
            let Some(switch) = self.switch(&n.switch) else {
                let known: HashSet<&str> = self
                    .config
                    .switches
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                let mut known: Vec<&str> = known.into_iter().collect();
                known.sort_unstable();
                return Err(field(
                    format!("nic[{i}].switch"),
                    FieldProblem::UnknownSwitch {
                        name: n.switch.clone(),
                        known: if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        },
                    },
                ));
            };
            out.push(ResolvedNic {
                mac,
                switch: switch.clone(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_definition_parses_and_round_trips() {
        let text = r#"
name = "linux"
backend = "qemu"
memory_mib = 256
vcpus = 1
cpu_model = "qemu64"
accel = "tcg"
agent = true

[boot]
kernel = "linux/vmlinuz"
initrd = "linux/initrd.img"
cmdline = "console=ttyS0"

[[disk]]
path = "linux/disk.qcow2"
format = "qcow2"

[[nic]]
mac = "52:54:00:12:34:57"
switch = "Lab"
"#;
        let d = QemuVmDefinition::from_toml(text).unwrap();
        assert_eq!(d.name, "linux");
        assert_eq!(d.accel, Accel::Tcg);
        assert_eq!(d.disks[0].format, DiskFormat::Qcow2);
        assert_eq!(QemuVmDefinition::from_toml(&d.to_toml()).unwrap(), d);
    }

    #[test]
    fn unknown_keys_missing_backend_and_a_micro_vm_file_are_refused() {
        let base = "name = \"a\"\nmemory_mib = 64\nvcpus = 1\ncpu_model = \"qemu64\"\naccel = \"tcg\"\n[boot]\nkernel = \"k\"\n";
        let e = QemuVmDefinition::from_toml(base).unwrap_err();
        assert!(format!("{:?}", e).contains("backend"), "{e:?}");
        let e = QemuVmDefinition::from_toml(&format!("backend = \"qemu\"\nvnc = true\n{base}"))
            .unwrap_err();
        assert!(format!("{:?}", e).contains("vnc"), "{e:?}");
        let micro = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../etc/vm-memstress.toml"
        ))
        .unwrap();
        assert!(QemuVmDefinition::from_toml(&micro).is_err());
    }

    #[test]
    fn the_lab_vm_parses() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../etc/vm-linux.toml"))
                .unwrap();
        let d = QemuVmDefinition::from_toml(&text).unwrap();
        assert_eq!(d.name, "linux");
        assert_eq!(d.backend, Backend::Qemu);
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.agent);
        assert_eq!(d.nics[0].switch, "Lab");
    }

    #[test]
    fn macs_parse_and_print() {
        let m: MacAddress = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:01",
            "5254.00ab.cd0f",
            "52:54:00:ab:cd:g0",
            "152:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(valid_name("linux-1.test_a"));
        for bad in ["", "-a", ".a", "a/b", "a b", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
