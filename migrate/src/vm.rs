//! The KVM micro-VM: memory, vCPUs, devices, guest programs, state save/restore, checkers.
