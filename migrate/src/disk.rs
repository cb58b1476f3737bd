//! Disk images (raw, qcow2 with backing chains) and the block device backend.
