//! Storage moves: path policy, backing-chain plans, disk mirroring (local and for the engine).
//!
//! - [`paths`]: the host's storage roots, held open, and the one confinement API every disk
//!   path goes through ([`paths::StorageRoots::open_beneath`], `create_beneath`,
//!   `create_folders`, `folder`: `openat2` beneath the root, see [`beneath`]); Move-VM's
//!   storage options (one folder, or a file per disk); refuses relative paths, `..`, and
//!   symbolic-link escapes before anything is written.
//! - [`reserve`]: the destination names moves are working on, so that two moves never write,
//!   rename or delete each other's files.
//! - [`users`]: which files the host's VMs still need ([`users::DiskUsers`], from the
//!   caller's inventory), and the one place old files are deleted.
//! - [`plan`]: a disk's backing chain as the source describes it (parents base first, with
//!   checksums) and as the destination lays it out (paths, rewritten backing references,
//!   reuse of identical parents by checksum), plus the steps that create the layers and a
//!   [`plan::Cleanup`] that removes them on failure.
//! - [`mirror`]: the copy of an active layer while the guest writes (bulk, dirty rounds, a
//!   final pass with the VM paused) into any [`mirror::BlockSink`]: a file here, the wire
//!   for the engine.
//! - [`local`]: the storage-only move of a running VM's disks on one host (Move-VMStorage).
//!
//! ## A shared-nothing move with these pieces
//!
//! ```text
//! source                                              destination
//! describe_chain(disk.layers())  -- DiskLayer per layer, base first -->
//!   (size: file length for a parent,                  SourceLayer from it (path: any folder +
//!    virtual size for the active layer)               the file name, taken from the backing
//!                                                     reference of the layer above, or the
//!                                                     VM config for the active layer)
//!                                                     plan_destination(.., roots, ..): paths,
//!                                                     references, Reuse/Copy; check_space
//!                         <-- DiskLayerAnswer(reuse) --
//! parents not reused: copy_file(path, wire sink)       begin_file + FileSink, finish_parent
//! active: Mirror::bulk, ::converge (wire sink)         create_active + DiskSink
//! (memory pre-copy, pause)
//! Mirror::finish (last blocks, flush = send)           DiskSink flush, commit_file,
//!                                                      open_layer under the final name
//! after the destination's acknowledgement: delete the source files unless kept
//! on failure: nothing changes at the source           Cleanup removes everything created
//! ```
//!
//! Blocks are 64 KiB ([`mirror::BLOCK_SIZE`] = the protocol's `DISK_BLOCK_SIZE`); for a parent,
//! block `n` is bytes `n * 64 KiB..` of the file (a byte-for-byte copy keeps its checksum),
//! for the active layer offset `n * 64 KiB` of the virtual disk.

pub mod beneath;
pub mod local;
pub mod mirror;
pub mod paths;
pub mod plan;
pub mod reserve;
pub mod users;
