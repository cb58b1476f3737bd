//! Storage-only moves of a running QEMU VM (Move-VMStorage): each disk's active layer is
//! mirrored into a new file on the same parents while the guest runs, then the guest is
//! switched to it (`job-complete`), and the old file is removed unless kept.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qapi::qmp;

use super::{
    CancelToken, MoveError, Phase, Progress, active_node, chain, create_image, wait_jobs_gone,
};
use crate::qemu::cmdline::{layer_node, layer_nodes};
use crate::qemu::definition::QemuVmDefinition;
use crate::qemu::{QemuHost, QemuVm, ValidatedVm};

/// A finished storage-only move.
#[derive(Clone, Debug)]
pub struct StorageMoved {
    /// The VM's definition with its new disk paths (persist it).
    pub definition: QemuVmDefinition,
    /// The same, validated.
    pub validated: ValidatedVm,
    /// The old files removed (empty with `keep_source`).
    pub deleted: Vec<PathBuf>,
    /// The old files kept (with `keep_source`).
    pub kept: Vec<PathBuf>,
    /// Bytes the mirrors copied.
    pub bytes_copied: u64,
    /// How long it took, ms.
    pub total_ms: f64,
}

fn failed(phase: &'static str) -> impl Fn(String) -> MoveError {
    move |cause| MoveError::Failed { phase, cause }
}

/// Moves the active layer of each disk of a running VM to `targets` (one per disk, as the
/// user wrote them: relative paths are relative to the first storage root; each must be
/// beneath the roots, in an existing folder, and not exist). Parents stay where they are and
/// are shared by the new files. On an error or a cancel the guest runs on its old files and
/// the new ones are gone.
pub async fn move_storage(
    host: &QemuHost,
    vm: &QemuVm,
    validated: &ValidatedVm,
    targets: &[String],
    keep_source: bool,
    cancel: &CancelToken,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<StorageMoved, MoveError> {
    let started = Instant::now();
    let disks = validated.disks();
    if targets.len() != disks.len() {
        return Err(failed("checking the destination")(format!(
            "the VM has {} disks and the move names {} new paths",
            disks.len(),
            targets.len()
        )));
    }
    let mut new_paths = Vec::new();
    for (i, (t, d)) in targets.iter().zip(disks).enumerate() {
        let p = host
            .resolve_new_file(t)
            .map_err(|e| failed("checking the destination")(format!("disk[{i}]: {}", chain(&e))))?;
        if std::fs::symlink_metadata(&p).is_ok() {
            return Err(failed("checking the destination")(format!(
                "disk[{i}]: {} already exists",
                p.display()
            )));
        }
        if d.read_only {
            return Err(failed("checking the destination")(format!(
                "disk[{i}] is read-only for the guest; move it while the VM is off"
            )));
        }
        new_paths.push(p);
    }
    let tag = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let qmp = vm.qmp();
    let mut created: Vec<PathBuf> = Vec::new();
    let mut added: Vec<String> = Vec::new();
    let mut jobs: Vec<String> = Vec::new();
    let mut old_nodes: Vec<String> = Vec::new();
    let mut new_nodes: Vec<String> = Vec::new();

    let result: Result<u64, (&'static str, String)> = async {
        for (i, (d, path)) in disks.iter().zip(&new_paths).enumerate() {
            let top = d
                .layers
                .first()
                .ok_or(("preparing", "a disk without files".to_string()))?;
            let parent = d.layers.get(1).map(|l| (l.path.as_path(), l.format));
            create_image(host, path, top.format, d.virtual_size, parent)
                .await
                .map_err(|e| ("creating the new files", e))?;
            created.push(path.clone());
            let node = format!("disk{i}-m{tag:x}");
            let backing = parent.map(|_| layer_node(i, 1));
            let [file, format] = layer_nodes(&node, path, top.format, false, backing);
            qmp.execute(qmp::blockdev_add(file))
                .await
                .map_err(|e| ("opening the new files", chain(&e)))?;
            added.push(format!("{node}-file"));
            qmp.execute(qmp::blockdev_add(format))
                .await
                .map_err(|e| ("opening the new files", chain(&e)))?;
            added.push(node.clone());
            let source = active_node(qmp, i)
                .await
                .map_err(|e| ("starting the copy", chain(&e)))?;
            let job = format!("vmgate-sm{i}");
            qmp.execute(qmp::blockdev_mirror {
                auto_dismiss: Some(true),
                auto_finalize: None,
                buf_size: None,
                copy_mode: Some(qmp::MirrorCopyMode::write_blocking),
                filter_node_name: None,
                granularity: None,
                job_id: Some(job.clone()),
                on_source_error: None,
                on_target_error: None,
                replaces: None,
                speed: None,
                device: source.clone(),
                sync: if parent.is_some() {
                    qmp::MirrorSyncMode::top
                } else {
                    qmp::MirrorSyncMode::full
                },
                target: node.clone(),
            })
            .await
            .map_err(|e| ("starting the copy", chain(&e)))?;
            jobs.push(job);
            old_nodes.push(source);
            new_nodes.push(node);
        }
        let copied = loop {
            if cancel.is_cancelled() {
                return Err(("copying", format!("cancelled: {}", cancel.reason())));
            }
            let listed = qmp
                .execute(qmp::query_block_jobs {})
                .await
                .map_err(|e| ("copying", chain(&e)))?;
            let (mut done, mut total, mut ready) = (0u64, 0u64, 0usize);
            for id in &jobs {
                let job = listed.iter().find_map(|j| match j {
                    qmp::BlockJobInfo::mirror { base, .. } if &base.device == id => Some(base),
                    _ => None,
                });
                let Some(job) = job else {
                    return Err((
                        "copying",
                        format!("the mirror {id} ended before it was in sync"),
                    ));
                };
                if let Some(e) = &job.error {
                    return Err(("copying", e.clone()));
                }
                done += u64::try_from(job.offset).unwrap_or(0);
                total += u64::try_from(job.len).unwrap_or(0);
                ready += usize::from(job.ready);
            }
            progress(&Progress {
                phase: Phase::PreCopy,
                round: 0,
                bytes_sent: done,
                bytes_remaining: total.saturating_sub(done),
                rate_bytes_s: done as f64 / started.elapsed().as_secs_f64().max(1e-3),
                dirty_rate_bytes_s: 0.0,
                expected_downtime_ms: 0.0,
                throttle_percent: 0,
                converging: true,
            });
            if ready == jobs.len() {
                break done;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The switch: from here the guest writes the new files.
        for id in &jobs {
            qmp.execute(qmp::job_complete { id: id.clone() })
                .await
                .map_err(|e| ("switching to the new files", chain(&e)))?;
        }
        wait_jobs_gone(qmp, &jobs, Duration::from_secs(120))
            .await
            .map_err(|e| ("switching to the new files", e))?;
        Ok(copied)
    }
    .await;

    let bytes_copied = match result {
        Ok(b) => b,
        Err((phase, cause)) => {
            // Back to the old files (the guest never left them unless a switch happened).
            for id in &jobs {
                let _ = qmp
                    .execute(qmp::block_job_cancel {
                        force: Some(true),
                        device: id.clone(),
                    })
                    .await;
            }
            let _ = wait_jobs_gone(qmp, &jobs, Duration::from_secs(60)).await;
            let mut switched = false;
            for (i, n) in new_nodes.iter().enumerate() {
                if active_node(qmp, i).await.ok().as_ref() == Some(n) {
                    switched = true;
                }
            }
            if switched {
                // Some disk already runs on its new file: nothing may be removed.
                return Err(MoveError::Failed {
                    phase,
                    cause: format!(
                        "{cause}; some disks already use their new files, which are kept: check `vm show` and move again"
                    ),
                });
            }
            for n in added.iter().rev() {
                let _ = qmp
                    .execute(qmp::blockdev_del {
                        node_name: n.clone(),
                    })
                    .await;
            }
            for f in &created {
                let _ = std::fs::remove_file(f);
            }
            return Err(if cancel.is_cancelled() {
                MoveError::Cancelled {
                    reason: cancel.reason(),
                }
            } else {
                MoveError::Failed { phase, cause }
            });
        }
    };
    // The old active layers are no longer used by the guest.
    let mut deleted = Vec::new();
    let mut kept = Vec::new();
    for (old, d) in old_nodes.iter().zip(disks) {
        for n in [old.clone(), format!("{old}-file")] {
            if let Err(e) = qmp
                .execute(qmp::blockdev_del {
                    node_name: n.clone(),
                })
                .await
            {
                tracing::warn!(vm = %vm.name(), node = %n, error = %chain(&e), "an old node could not be closed");
            }
        }
        if let Some(top) = d.layers.first() {
            if keep_source {
                kept.push(top.path.clone());
            } else {
                match std::fs::remove_file(&top.path) {
                    Ok(()) => deleted.push(top.path.clone()),
                    Err(e) => {
                        tracing::warn!(path = %top.path.display(), error = %e, "an old file could not be removed")
                    }
                }
            }
        }
    }
    let mut definition = validated.definition().clone();
    for (d, t) in definition.disks.iter_mut().zip(targets) {
        d.path.clone_from(t);
    }
    let new_validated = host
        .validate(&definition)
        .map_err(|e| failed("checking the moved VM")(chain(&e)))?;
    Ok(StorageMoved {
        definition,
        validated: new_validated,
        deleted,
        kept,
        bytes_copied,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}
