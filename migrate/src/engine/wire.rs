//! What the engine puts inside the protocol's opaque payloads: the VM configuration document,
//! the vCPU states and the device state. All are postcard, decoded from payloads the frame
//! layer already bounded (1 MiB, 1 MiB per vCPU, 16 MiB), and checked against each other.

use std::borrow::Cow;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use super::EngineError;
use crate::protocol::{self, Message};
use crate::vm::config::VmConfig;
use crate::vm::devices::DeviceState;
use crate::vm::state::{VcpuState, VmWideState};

/// The VmConfig message's document: the configuration (TOML, validated when parsed) and the
/// CPUID the guest sees, so the destination can check its CPU before it allocates anything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveDocument {
    /// The VM's configuration as TOML.
    pub config_toml: String,
    /// vCPU 0's CPUID.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The disks' contents come with the move (shared-nothing): the configuration's disk
    /// paths are where the destination is to create them.
    pub storage: bool,
}

impl MoveDocument {
    /// The VmConfig message for a VM.
    pub fn message(
        config: &VmConfig,
        cpuid: &[kvm_cpuid_entry2],
    ) -> Result<Message<'static>, EngineError> {
        MoveDocument::message_with_storage(config, cpuid, false)
    }

    /// The VmConfig message for a VM whose disks come with the move when `storage`.
    pub fn message_with_storage(
        config: &VmConfig,
        cpuid: &[kvm_cpuid_entry2],
        storage: bool,
    ) -> Result<Message<'static>, EngineError> {
        let doc = MoveDocument {
            config_toml: config.to_toml(),
            cpuid: cpuid.to_vec(),
            storage,
        };
        let bytes = postcard::to_stdvec(&doc).map_err(|e| {
            EngineError::Other(format!("the VM configuration could not be encoded: {e}"))
        })?;
        let disks = u32::try_from(config.disks.len())
            .map_err(|_| EngineError::Other("the VM has too many disks".into()))?;
        Ok(Message::VmConfig(protocol::VmConfig {
            name: Cow::Owned(config.name.clone()),
            memory_bytes: config.memory_mib.saturating_mul(1 << 20),
            vcpus: config.vcpus,
            disks,
            config: Cow::Owned(bytes),
        }))
    }

    /// Decodes the document of a VmConfig message and checks that it agrees with the
    /// message's typed fields.
    pub fn decode(
        msg: &protocol::VmConfig<'_>,
    ) -> Result<(VmConfig, Vec<kvm_cpuid_entry2>), String> {
        MoveDocument::decode_with_storage(msg).map(|(c, cpuid, _)| (c, cpuid))
    }

    /// [`MoveDocument::decode`], and whether the disks' contents come with the move.
    pub fn decode_with_storage(
        msg: &protocol::VmConfig<'_>,
    ) -> Result<(VmConfig, Vec<kvm_cpuid_entry2>, bool), String> {
        let doc: MoveDocument = postcard::from_bytes(&msg.config)
            .map_err(|e| format!("the VM configuration document does not decode: {e}"))?;
        let config = VmConfig::from_toml(&doc.config_toml, None)
            .map_err(|e| format!("the VM configuration is not valid here: {}", chain(&e)))?;
        let memory = config.memory_mib.saturating_mul(1 << 20);
        if memory != msg.memory_bytes
            || config.vcpus != msg.vcpus
            || config.disks.len() != usize::try_from(msg.disks).unwrap_or(usize::MAX)
            || config.name != msg.name
        {
            return Err(format!(
                "the VM configuration document (\"{}\", {} bytes, {} vCPUs, {} disks) disagrees with the message (\"{}\", {} bytes, {} vCPUs, {} disks)",
                config.name,
                memory,
                config.vcpus,
                config.disks.len(),
                msg.name,
                msg.memory_bytes,
                msg.vcpus,
                msg.disks
            ));
        }
        Ok((config, doc.cpuid, doc.storage))
    }
}

/// The text of an error and its sources.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        msg.push_str(": ");
        msg.push_str(&x.to_string());
        src = x.source();
    }
    msg
}

/// A vCPU's state for the VcpuState message.
pub(crate) fn encode_vcpu(v: &VcpuState) -> Result<Vec<u8>, EngineError> {
    postcard::to_stdvec(v).map_err(|e| {
        EngineError::Other(format!(
            "the state of vCPU {} could not be encoded: {e}",
            v.index
        ))
    })
}

/// Decodes a VcpuState payload and checks its index.
pub(crate) fn decode_vcpu(index: u32, bytes: &[u8]) -> Result<VcpuState, String> {
    let v: VcpuState = postcard::from_bytes(bytes)
        .map_err(|e| format!("the state of vCPU {index} does not decode: {e}"))?;
    if v.index != index {
        return Err(format!(
            "the state sent as vCPU {index} is the state of vCPU {}",
            v.index
        ));
    }
    Ok(v)
}

#[derive(Serialize, Deserialize)]
struct Devices {
    vm: VmWideState,
    devices: DeviceState,
}

/// The VM-wide KVM state and the devices for the DeviceState message.
pub(crate) fn encode_devices(
    vm: &VmWideState,
    devices: &DeviceState,
) -> Result<Vec<u8>, EngineError> {
    #[derive(Serialize)]
    struct DevicesRef<'a> {
        vm: &'a VmWideState,
        devices: &'a DeviceState,
    }
    postcard::to_stdvec(&DevicesRef { vm, devices })
        .map_err(|e| EngineError::Other(format!("the device state could not be encoded: {e}")))
}

/// Decodes a DeviceState payload.
pub(crate) fn decode_devices(bytes: &[u8]) -> Result<(VmWideState, DeviceState), String> {
    let d: Devices = postcard::from_bytes(bytes)
        .map_err(|e| format!("the device state does not decode: {e}"))?;
    Ok((d.vm, d.devices))
}
