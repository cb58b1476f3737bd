//! The host's own checks on an incoming VM that need the daemon's configuration: its virtual
//! switches. The daemon runs them as the engine's [`HostCheck`] next to the engine's own
//! checks (memory, processor), so a move or a comparison reports every reason at once.
//!
//! [`HostCheck`]: vmgate_migrate::engine::HostCheck

#![forbid(unsafe_code)]

use vmgate_migrate::engine::incompatibility;
use vmgate_migrate::protocol::Incompatibility;
use vmgate_migrate::vm::VmConfig;

use vmgate_control::config::SwitchSettings;

/// One entry ([`incompatibility::SWITCH`]) per NIC of `vm` connected to a switch that this
/// host (`host_name`, whose switches are `host_switches`) does not have. Switch names are
/// compared without case, as Hyper-V does. Empty: every NIC can be connected here.
pub fn switch_check(
    host_switches: &[SwitchSettings],
    host_name: &str,
    vm: &VmConfig,
) -> Vec<Incompatibility<'static>> {
    let have = if host_switches.is_empty() {
        "none".to_owned()
    } else {
        host_switches
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    vm.nics
        .iter()
        .enumerate()
        .filter(|(_, nic)| find(host_switches, &nic.switch).is_none())
        .map(|(i, nic)| {
            let fix = match host_switches.first() {
                Some(existing) => format!(
                    "map it: vmgate move {} --to {host_name} --switch-map {}, or create the switch on {host_name}",
                    arg(&vm.name),
                    arg(&format!("{}={}", nic.switch, existing.name)),
                ),
                None => format!("create the switch on {host_name}"),
            };
            Incompatibility {
                id: incompatibility::SWITCH,
                message: format!(
                    "NIC {i} (MAC {}) is connected to virtual switch \"{}\", which {host_name} does not have (its switches: {have}); {fix}",
                    nic.mac, nic.switch
                )
                .into(),
            }
        })
        .collect()
}

/// The Linux interface of switch `switch` (compared without case), where gratuitous ARP for
/// a VM connected to it goes out; `None` if this host has no such switch.
pub fn interface_for<'a>(host_switches: &'a [SwitchSettings], switch: &str) -> Option<&'a str> {
    find(host_switches, switch).map(|s| s.interface.as_str())
}

fn find<'a>(host_switches: &'a [SwitchSettings], switch: &str) -> Option<&'a SwitchSettings> {
    host_switches
        .iter()
        .find(|s| s.name.trim().eq_ignore_ascii_case(switch.trim()))
}

/// A command-line argument as a user would type it: quoted when it has spaces or quotes.
fn arg(text: &str) -> String {
    if text
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\'')
    {
        format!("\"{}\"", text.replace('"', "\\\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switches() -> Vec<SwitchSettings> {
        vec![
            SwitchSettings {
                name: "External".into(),
                interface: "br0".into(),
            },
            SwitchSettings {
                name: "Lab".into(),
                interface: "br-lab".into(),
            },
        ]
    }

    fn vm(nics: &[(&str, &str)]) -> VmConfig {
        let mut toml = String::from("name = \"web1\"\nmemory_mib = 64\nvcpus = 1\n");
        for (mac, switch) in nics {
            toml.push_str(&format!(
                "[[nic]]\nmac = \"{mac}\"\nswitch = \"{switch}\"\n"
            ));
        }
        VmConfig::from_toml(&toml, None).unwrap()
    }

    #[test]
    fn every_nic_on_a_missing_switch_is_reported_with_the_fix() {
        let config = vm(&[
            ("52:54:00:00:00:01", "external"),
            ("52:54:00:00:00:02", "Private"),
            ("52:54:00:00:00:03", "DMZ Net"),
        ]);
        let report = switch_check(&switches(), "hv2", &config);
        assert_eq!(report.len(), 2, "{report:?}");
        assert!(report.iter().all(|i| i.id == 1005));
        assert_eq!(
            report[0].message,
            "NIC 1 (MAC 52:54:00:00:00:02) is connected to virtual switch \"Private\", which hv2 does not have (its switches: External, Lab); map it: vmgate move web1 --to hv2 --switch-map Private=External, or create the switch on hv2"
        );
        assert_eq!(
            report[1].message,
            "NIC 2 (MAC 52:54:00:00:00:03) is connected to virtual switch \"DMZ Net\", which hv2 does not have (its switches: External, Lab); map it: vmgate move web1 --to hv2 --switch-map \"DMZ Net=External\", or create the switch on hv2"
        );
    }

    #[test]
    fn a_host_without_switches_can_only_create_one() {
        let config = vm(&[("52:54:00:00:00:01", "External")]);
        let report = switch_check(&[], "hv3", &config);
        assert_eq!(report.len(), 1);
        assert_eq!(
            report[0].message,
            "NIC 0 (MAC 52:54:00:00:00:01) is connected to virtual switch \"External\", which hv3 does not have (its switches: none); create the switch on hv3"
        );
    }

    #[test]
    fn a_vm_whose_switches_exist_passes() {
        let config = vm(&[
            ("52:54:00:00:00:01", "LAB"),
            ("52:54:00:00:00:02", "External"),
        ]);
        assert!(switch_check(&switches(), "hv2", &config).is_empty());
        assert!(switch_check(&[], "hv2", &vm(&[])).is_empty());
    }

    #[test]
    fn the_interface_is_found_without_case() {
        assert_eq!(interface_for(&switches(), "lab"), Some("br-lab"));
        assert_eq!(interface_for(&switches(), "EXTERNAL"), Some("br0"));
        assert_eq!(interface_for(&switches(), "Private"), None);
    }
}
