//! The host's side of the QEMU backend: which QEMU runs the VMs, where their runtime files
//! go, the storage roots and virtual switches, and what the installed QEMU offers (its
//! version, CPU models and machine types, read once from the binary itself).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::paths::{StoragePathError, StorageRoots};

/// Where QEMU's runtime files go by default (a folder per VM).
pub const DEFAULT_RUN_DIR: &str = "/run/vmgate/qemu";
/// The QEMU binary by default (looked up in `PATH`).
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// The systemd slice QEMU scopes go into by default (libvirt's).
pub const DEFAULT_SLICE: &str = "machine.slice";

/// What the daemon tells the backend about the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuHostConfig {
    /// The QEMU binary (a name is looked up in `PATH`).
    pub qemu_binary: PathBuf,
    /// The folder of the VMs' runtime files (QMP and agent sockets, pidfile, QEMU's log). It
    /// is created mode 0700. Keep it short: UNIX socket paths are limited to 107 bytes.
    pub run_dir: PathBuf,
    /// The storage roots: every file a VM uses must lie beneath one. The first one is the
    /// base of relative paths in VM definitions (Hyper-V's default VM folder).
    pub storage_roots: Vec<PathBuf>,
    /// The virtual switches NICs may name.
    pub switches: Vec<VirtualSwitch>,
    /// How QEMU processes are kept apart from the daemon's own process tree.
    pub scope: ScopeMode,
}

impl QemuHostConfig {
    /// A configuration with the defaults for everything but the roots and switches.
    pub fn new(storage_roots: Vec<PathBuf>, switches: Vec<VirtualSwitch>) -> QemuHostConfig {
        QemuHostConfig {
            qemu_binary: PathBuf::from(DEFAULT_QEMU),
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            storage_roots,
            switches,
            scope: ScopeMode::Auto,
        }
    }
}

/// A virtual switch: a Linux bridge, possibly inside a network namespace. A NIC on it is a
/// tap the backend creates in that namespace and attaches to the bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualSwitch {
    /// The name VM definitions use (Hyper-V: the switch name).
    pub name: String,
    /// The bridge interface.
    pub bridge: String,
    /// The network namespace the bridge lives in (a name under `/run/netns`, as `ip netns`
    /// makes them); none: the daemon's own.
    pub netns: Option<String>,
}

/// How each QEMU is kept out of the daemon's process tree and cgroup, so that stopping,
/// restarting or upgrading the daemon does not take the guests with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopeMode {
    /// Under systemd (when `/run/systemd/system` exists), [`ScopeMode::Systemd`] with
    /// [`DEFAULT_SLICE`]; otherwise [`ScopeMode::Session`].
    Auto,
    /// Its own session and process group (`setsid`): no signal to the daemon's process group
    /// or terminal reaches it. Enough without systemd.
    Session,
    /// Its own session, and moved into a transient scope unit `vmgate-qemu-NAME.scope` in
    /// this slice right after it is started (systemd's StartTransientUnit, as libvirt does
    /// through machined), so stopping the daemon's service does not stop it.
    Systemd {
        /// The slice.
        slice: String,
    },
}

/// Errors of setting up the host side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// QEMU could not be run.
    #[error("cannot run QEMU ({})", .binary.display())]
    RunQemu {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// QEMU ran but failed.
    #[error("`{} {args}` failed ({status}): {stderr}", .binary.display())]
    QemuFailed {
        /// The binary.
        binary: PathBuf,
        /// Its arguments.
        args: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// QEMU's answer could not be understood.
    #[error("cannot understand what `{} {args}` printed: {output:?}", .binary.display())]
    QemuOutput {
        /// The binary.
        binary: PathBuf,
        /// Its arguments.
        args: String,
        /// The start of what it printed.
        output: String,
    },
    /// The storage roots are not usable.
    #[error("the storage roots cannot be used")]
    Roots(#[source] StoragePathError),
    /// A switch is badly defined.
    #[error("virtual switch {name:?}: {problem}")]
    Switch {
        /// The switch.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The runtime folder cannot be made.
    #[error("cannot create the QEMU runtime folder {}", .path.display())]
    RunDir {
        /// The folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A QEMU version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
    /// The distribution's package version, if any (e.g. `Debian 1:10.0.2+ds-2`).
    pub package: String,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// What the installed QEMU offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuCapabilities {
    /// Its version.
    pub version: QemuVersion,
    /// The named CPU models (`-cpu help`), without `host`, `max` and `base`, which are not
    /// baselines a VM could keep on another host.
    pub cpu_models: BTreeSet<String>,
    /// The PC machine types (`-machine help`, `pc-i440fx-*` and `pc-q35-*`), each with the
    /// versioned type it stands for (aliases such as `q35` map to the newest).
    pub machines: BTreeMap<String, String>,
}

impl QemuCapabilities {
    /// Parses the output of `--version`, `-cpu help` and `-machine help`.
    pub fn parse(version: &str, cpu_help: &str, machine_help: &str) -> Option<QemuCapabilities> {
        Some(QemuCapabilities {
            version: parse_version(version)?,
            cpu_models: parse_cpu_models(cpu_help),
            machines: parse_machines(machine_help),
        })
    }

    /// Runs the binary to find out.
    pub async fn probe(binary: &Path) -> Result<QemuCapabilities, HostError> {
        let version = run_qemu(binary, &["--version"]).await?;
        let cpus = run_qemu(binary, &["-cpu", "help"]).await?;
        let machines = run_qemu(binary, &["-machine", "help"]).await?;
        let caps = QemuCapabilities::parse(&version, &cpus, &machines).ok_or_else(|| {
            HostError::QemuOutput {
                binary: binary.to_path_buf(),
                args: "--version".into(),
                output: version.chars().take(200).collect(),
            }
        })?;
        if caps.cpu_models.is_empty() || caps.machines.is_empty() {
            return Err(HostError::QemuOutput {
                binary: binary.to_path_buf(),
                args: "-cpu help / -machine help".into(),
                output: cpus.chars().take(200).collect(),
            });
        }
        Ok(caps)
    }
}

async fn run_qemu(binary: &Path, args: &[&str]) -> Result<String, HostError> {
    let out = tokio::process::Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| HostError::RunQemu {
            binary: binary.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(HostError::QemuFailed {
            binary: binary.to_path_buf(),
            args: args.join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_version(text: &str) -> Option<QemuVersion> {
    // "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
    let line = text.lines().next()?;
    let rest = line.strip_prefix("QEMU emulator version ")?;
    let (number, package) = match rest.split_once(' ') {
        Some((n, p)) => (n, p.trim().trim_start_matches('(').trim_end_matches(')')),
        None => (rest, ""),
    };
    let mut parts = number.split('.').map(|p| p.parse::<u32>().ok());
    Some(QemuVersion {
        major: parts.next()??,
        minor: parts.next()??,
        micro: parts.next().flatten().unwrap_or(0),
        package: package.to_string(),
    })
}

fn parse_cpu_models(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut in_list = false;
    for line in text.lines() {
        if line.starts_with("Available CPUs") {
            in_list = true;
            continue;
        }
        if !in_list {
            continue;
        }
        if !line.starts_with("  ") {
            if line.trim().is_empty() {
                break;
            }
            continue;
        }
        if let Some(name) = line.split_whitespace().next() {
            if !matches!(name, "host" | "max" | "base") {
                out.insert(name.to_string());
            }
        }
    }
    out
}

fn parse_machines(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let family = name.starts_with("pc-i440fx-") || name.starts_with("pc-q35-");
        let alias = line
            .rsplit_once("(alias of ")
            .and_then(|(_, rest)| rest.split(')').next())
            .filter(|target| target.starts_with("pc-i440fx-") || target.starts_with("pc-q35-"));
        if let Some(target) = alias {
            out.insert(name.to_string(), target.to_string());
        } else if family {
            out.insert(name.to_string(), name.to_string());
        }
    }
    out
}

/// The host as the backend sees it: configuration checked, QEMU probed.
#[derive(Clone, Debug)]
pub struct QemuHost {
    pub(crate) config: QemuHostConfig,
    pub(crate) qemu_binary: PathBuf,
    pub(crate) roots: StorageRoots,
    pub(crate) caps: QemuCapabilities,
    pub(crate) host_memory_mib: u64,
    pub(crate) scope: ScopeMode,
}

impl QemuHost {
    /// Checks the configuration, creates the runtime folder and probes QEMU.
    pub async fn new(config: QemuHostConfig) -> Result<QemuHost, HostError> {
        let roots = StorageRoots::new(&config.storage_roots).map_err(HostError::Roots)?;
        let mut names = BTreeSet::new();
        for s in &config.switches {
            let problem = |problem: &str| HostError::Switch {
                name: s.name.clone(),
                problem: problem.to_string(),
            };
            if !names.insert(s.name.as_str()) {
                return Err(problem("is defined twice"));
            }
            if s.bridge.is_empty()
                || s.bridge.len() > 15
                || s.bridge.contains(['/', ' ', ','])
                || s.bridge == "."
                || s.bridge == ".."
            {
                return Err(problem(
                    "the bridge must be a Linux interface name (1-15 characters, no '/', ' ' or ',')",
                ));
            }
            if let Some(ns) = &s.netns {
                if !super::paths::is_plain_name(std::ffi::OsStr::new(ns)) {
                    return Err(problem(
                        "the network namespace must be a name under /run/netns",
                    ));
                }
            }
        }
        let qemu_binary = find_binary(&config.qemu_binary).ok_or_else(|| HostError::RunQemu {
            binary: config.qemu_binary.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "not found (in PATH)"),
        })?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.run_dir)
            .and_then(|()| {
                std::fs::set_permissions(&config.run_dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| HostError::RunDir {
                path: config.run_dir.clone(),
                source,
            })?;
        let caps = QemuCapabilities::probe(&qemu_binary).await?;
        let scope = match &config.scope {
            ScopeMode::Auto if Path::new("/run/systemd/system").is_dir() => ScopeMode::Systemd {
                slice: DEFAULT_SLICE.to_string(),
            },
            ScopeMode::Auto => ScopeMode::Session,
            other => other.clone(),
        };
        Ok(QemuHost {
            qemu_binary,
            roots,
            caps,
            host_memory_mib: host_memory_mib().unwrap_or(u64::MAX),
            scope,
            config,
        })
    }

    /// What the installed QEMU offers.
    pub fn capabilities(&self) -> &QemuCapabilities {
        &self.caps
    }

    /// The storage roots (canonical).
    pub fn storage_roots(&self) -> &StorageRoots {
        &self.roots
    }

    /// The QEMU binary used (absolute).
    pub fn qemu_binary(&self) -> &Path {
        &self.qemu_binary
    }

    /// How QEMU processes are scoped (after [`ScopeMode::Auto`] was decided).
    pub fn scope(&self) -> &ScopeMode {
        &self.scope
    }

    /// The configuration.
    pub fn config(&self) -> &QemuHostConfig {
        &self.config
    }

    /// A switch by name.
    pub fn switch(&self, name: &str) -> Option<&VirtualSwitch> {
        self.config.switches.iter().find(|s| s.name == name)
    }

    /// The runtime folder of a VM.
    pub fn vm_run_dir(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(name)
    }
}

fn find_binary(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return binary.is_file().then(|| binary.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_HELP: &str = "Available CPUs:\n  486                   (alias configured by machine type)\n  Skylake-Server        (alias configured by machine type)\n  Skylake-Server-v1     Intel Xeon Processor (Skylake)\n  qemu64                (alias configured by machine type)\n  base                  base CPU model type with no features enabled\n  host                  processor with all supported host features \n  max                   Enables all features supported by the accelerator in the current host\n\nRecognized CPUID flags:\n  3dnow 3dnowext abm\n";
    const MACHINE_HELP: &str = "Supported machines are:\nmicrovm              microvm (i386)\npc-i440fx-9.2        Standard PC (i440FX + PIIX, 1996)\npc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\npc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)\nq35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\npc-q35-10.0          Standard PC (Q35 + ICH9, 2009)\nnone                 empty machine\n";

    #[test]
    fn capabilities_are_read_from_qemus_help() {
        let caps = QemuCapabilities::parse(
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025\n",
            CPU_HELP,
            MACHINE_HELP,
        )
        .unwrap();
        assert_eq!(
            (caps.version.major, caps.version.minor, caps.version.micro),
            (10, 0, 2)
        );
        assert_eq!(caps.version.package, "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1");
        assert_eq!(
            caps.version.to_string(),
            "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
        );
        let models: Vec<&str> = caps.cpu_models.iter().map(String::as_str).collect();
        assert_eq!(
            models,
            ["486", "Skylake-Server", "Skylake-Server-v1", "qemu64"]
        );
        assert_eq!(caps.machines.get("q35").unwrap(), "pc-q35-10.0");
        assert_eq!(caps.machines.get("pc").unwrap(), "pc-i440fx-10.0");
        assert_eq!(caps.machines.get("pc-i440fx-9.2").unwrap(), "pc-i440fx-9.2");
        assert!(!caps.machines.contains_key("microvm"));
        assert!(!caps.machines.contains_key("none"));
    }

    #[test]
    fn versions_order_numerically() {
        let v = |major, minor, micro| QemuVersion {
            major,
            minor,
            micro,
            package: String::new(),
        };
        assert!(v(10, 0, 2) > v(9, 2, 0));
        assert!(v(9, 10, 0) > v(9, 2, 3));
        assert_eq!(
            parse_version("QEMU emulator version 8.2\n").unwrap(),
            v(8, 2, 0)
        );
        assert!(parse_version("qemu 8").is_none());
    }
}
