//! The guest program's settings, from `vmgate.*` parameters on the kernel command line.
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `vmgate.mem_mib=N` | 16 | MiB of memory the writer rewrites, pass after pass (1..=65536) |
//! | `vmgate.mem_full=0\|1` | 0 | 1: every word of every page changes each pass (incompressible) |
//! | `vmgate.mem_pause_ms=N` | 5 | pause between memory passes (0: as fast as it can) |
//! | `vmgate.disk=DEV\|none` | `/dev/vda` | the block device the disk writer writes |
//! | `vmgate.disk_blocks=N` | 1024 | 4 KiB blocks it cycles over, from the start of the device |
//! | `vmgate.disk_pause_ms=N` | 20 | pause between durable block writes |
//! | `vmgate.echo_port=N` | 7 | TCP port of the echo service |
//! | `vmgate.ip=ADDR/LEN` | none | eth0's address (set by the initramfs' `/init`, not here) |
//!
//! Unknown `vmgate.*` parameters and invalid values are reported (and the default used), so
//! a typo shows on the console instead of silently changing the test.

/// Largest memory buffer, in MiB.
pub const MAX_MEM_MIB: u64 = 64 * 1024;
/// Most disk blocks.
pub const MAX_DISK_BLOCKS: u64 = 1 << 24;
/// Longest pause, in milliseconds.
pub const MAX_PAUSE_MS: u64 = 60_000;

/// The program's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Memory buffer size, MiB.
    pub mem_mib: u64,
    /// Full-content memory pattern.
    pub mem_full: bool,
    /// Pause between memory passes, ms.
    pub mem_pause_ms: u64,
    /// Block device to write, if any.
    pub disk: Option<String>,
    /// Blocks in the disk region.
    pub disk_blocks: u64,
    /// Pause between disk writes, ms.
    pub disk_pause_ms: u64,
    /// Echo port.
    pub echo_port: u16,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mem_mib: 16,
            mem_full: false,
            mem_pause_ms: 5,
            disk: Some("/dev/vda".to_string()),
            disk_blocks: 1024,
            disk_pause_ms: 20,
            echo_port: 7,
        }
    }
}

impl Config {
    /// Reads the `vmgate.*` parameters of a kernel command line. Returns the settings and a
    /// warning for each parameter that was ignored.
    pub fn from_cmdline(cmdline: &str) -> (Config, Vec<String>) {
        let mut c = Config::default();
        let mut warnings = Vec::new();
        for word in cmdline.split_ascii_whitespace() {
            let Some(param) = word.strip_prefix("vmgate.") else {
                continue;
            };
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let result = match key {
                "mem_mib" => number(value, 1, MAX_MEM_MIB).map(|v| c.mem_mib = v),
                "mem_full" => flag(value).map(|v| c.mem_full = v),
                "mem_pause_ms" => number(value, 0, MAX_PAUSE_MS).map(|v| c.mem_pause_ms = v),
                "disk" => {
                    c.disk = match value {
                        "none" => None,
                        v if v.starts_with("/dev/") && !v.contains("..") => Some(v.to_string()),
                        _ => {
                            warnings.push(format!(
                                "ignoring {word}: give a device under /dev/ or \"none\""
                            ));
                            continue;
                        }
                    };
                    Ok(())
                }
                "disk_blocks" => number(value, 2, MAX_DISK_BLOCKS).map(|v| c.disk_blocks = v),
                "disk_pause_ms" => number(value, 0, MAX_PAUSE_MS).map(|v| c.disk_pause_ms = v),
                "echo_port" => number(value, 1, u64::from(u16::MAX))
                    .and_then(|v| u16::try_from(v).map_err(|e| e.to_string()))
                    .map(|v| c.echo_port = v),
                "ip" => Ok(()),
                _ => Err("unknown parameter".to_string()),
            };
            if let Err(why) = result {
                warnings.push(format!("ignoring {word}: {why}"));
            }
        }
        (c, warnings)
    }
}

fn number(value: &str, min: u64, max: u64) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(format!("expected a number in {min}..={max}")),
    }
}

fn flag(value: &str) -> Result<bool, String> {
    match value {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err("expected 0 or 1".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_parameters() {
        let (c, w) = Config::from_cmdline("console=ttyS0 quiet");
        assert_eq!(c, Config::default());
        assert!(w.is_empty());
    }

    #[test]
    fn parameters_override_defaults() {
        let (c, w) = Config::from_cmdline(
            "console=ttyS0 vmgate.mem_mib=64 vmgate.mem_full=1 vmgate.mem_pause_ms=0 \
             vmgate.disk=none vmgate.disk_blocks=16 vmgate.echo_port=7777 vmgate.ip=10.0.0.2/24",
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.mem_mib, 64);
        assert!(c.mem_full);
        assert_eq!(c.mem_pause_ms, 0);
        assert_eq!(c.disk, None);
        assert_eq!(c.disk_blocks, 16);
        assert_eq!(c.echo_port, 7777);
    }

    #[test]
    fn bad_values_and_unknown_parameters_are_reported_and_ignored() {
        let (c, w) = Config::from_cmdline(
            "vmgate.mem_mib=0 vmgate.mem_full=yes vmgate.disk=/etc/passwd vmgate.echo_port=70000 vmgate.colour=red",
        );
        assert_eq!(c, Config::default());
        assert_eq!(w.len(), 5, "{w:?}");
        assert!(w[0].contains("vmgate.mem_mib=0"), "{w:?}");
        assert!(w[4].contains("unknown parameter"), "{w:?}");
    }
}
