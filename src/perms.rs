//! File permission checks made before the daemon starts: its secrets and its state must not be
//! readable by other users.
//!
//! * The keytab holds the computer account's keys: anyone who reads it can be the host. Any
//!   group or other permission bit is refused (`0600` or `0400` are fine), whoever owns it.
//! * The state folder holds jobs, VM definitions and forwarded-credential caches in transit: it
//!   must be a directory owned by root (uid 0; or by the daemon's own user when it does not run
//!   as root) with no group or other bits (`0700` or stricter). A missing state folder is created
//!   with mode 0700.
//!
//! Symbolic links are followed for the keytab (a common `/etc/krb5.keytab` layout) but the
//! target's mode is what counts. The state folder itself must not be a symbolic link.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors of the permission checks. Each says what is wrong and the command that fixes it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PermsError {
    /// The keytab cannot be examined.
    #[error("cannot examine the keytab {}", path.display())]
    KeytabUnreadable {
        /// The keytab.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The keytab is not a regular file.
    #[error("the keytab {} is not a regular file", path.display())]
    KeytabNotFile {
        /// The keytab.
        path: PathBuf,
    },
    /// The keytab has group or other permission bits.
    #[error(
        "the keytab {path} is readable by group/others (mode {mode:04o}); fix: chmod 600 {path}",
        path = path.display()
    )]
    KeytabExposed {
        /// The keytab.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The state folder cannot be examined or created.
    #[error("cannot examine or create the state folder {}", path.display())]
    StateUnreadable {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state folder is not a directory (or is a symbolic link).
    #[error("the state folder {} is not a directory (a symbolic link is not accepted)", path.display())]
    StateNotDirectory {
        /// The folder.
        path: PathBuf,
    },
    /// The state folder has group or other permission bits.
    #[error(
        "the state folder {path} is accessible by group/others (mode {mode:04o}); fix: chmod 700 {path}",
        path = path.display()
    )]
    StateExposed {
        /// The folder.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The state folder belongs to another user.
    #[error(
        "the state folder {path} is owned by uid {owner}, not by root; fix: chown root:root {path}",
        path = path.display()
    )]
    StateOwner {
        /// The folder.
        path: PathBuf,
        /// Its owner.
        owner: u32,
    },
}

/// The permission bits (without the file type).
fn mode_bits(meta: &std::fs::Metadata) -> u32 {
    meta.permissions().mode() & 0o7777
}

/// Refuses a keytab that group or others may read, write or execute.
pub fn check_keytab(path: &Path) -> Result<(), PermsError> {
    let meta = std::fs::metadata(path).map_err(|source| PermsError::KeytabUnreadable {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(PermsError::KeytabNotFile {
            path: path.to_owned(),
        });
    }
    let mode = mode_bits(&meta);
    if mode & 0o077 != 0 {
        return Err(PermsError::KeytabExposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Checks the state folder (creating it with mode 0700 when missing): a directory, not a
/// symbolic link, owned by `expected_owner` (root, or the daemon's own uid), mode 0700 or
/// stricter.
pub fn check_state_dir(path: &Path, expected_owner: u32) -> Result<(), PermsError> {
    let err = |source| PermsError::StateUnreadable {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(err)?;
            std::fs::symlink_metadata(path).map_err(err)?
        }
        Err(e) => return Err(err(e)),
    };
    if !meta.is_dir() {
        return Err(PermsError::StateNotDirectory {
            path: path.to_owned(),
        });
    }
    if meta.uid() != expected_owner {
        return Err(PermsError::StateOwner {
            path: path.to_owned(),
            owner: meta.uid(),
        });
    }
    let mode = mode_bits(&meta);
    if mode & 0o077 != 0 {
        return Err(PermsError::StateExposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The owner the state folder must have: root when the daemon runs as root, else its own uid
/// (a test or an unprivileged lab daemon).
pub fn expected_state_owner() -> u32 {
    nix::unistd::geteuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn keytab_with_group_or_other_bits_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let kt = dir.path().join("krb5.keytab");
        std::fs::write(&kt, b"\x05\x02").unwrap();
        chmod(&kt, 0o600);
        check_keytab(&kt).unwrap();
        chmod(&kt, 0o400);
        check_keytab(&kt).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o601] {
            chmod(&kt, mode);
            let e = check_keytab(&kt).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "the keytab {p} is readable by group/others (mode {mode:04o}); fix: chmod 600 {p}",
                    p = kt.display()
                )
            );
        }
        let missing = dir.path().join("none.keytab");
        assert!(matches!(
            check_keytab(&missing),
            Err(PermsError::KeytabUnreadable { .. })
        ));
        assert!(matches!(
            check_keytab(dir.path()),
            Err(PermsError::KeytabNotFile { .. })
        ));
    }

    #[test]
    fn keytab_mode_counts_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let kt = dir.path().join("real.keytab");
        std::fs::write(&kt, b"\x05\x02").unwrap();
        chmod(&kt, 0o644);
        let link = dir.path().join("krb5.keytab");
        std::os::unix::fs::symlink(&kt, &link).unwrap();
        assert!(matches!(
            check_keytab(&link),
            Err(PermsError::KeytabExposed { mode: 0o644, .. })
        ));
    }

    #[test]
    fn state_folder_must_be_private_and_ours() {
        let me = expected_state_owner();
        let dir = tempfile::tempdir().unwrap();
        // Created when missing, with mode 0700.
        let state = dir.path().join("lib/vmgate");
        check_state_dir(&state, me).unwrap();
        let meta = std::fs::metadata(&state).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        chmod(&state, 0o500);
        check_state_dir(&state, me).unwrap();
        for mode in [0o755, 0o750, 0o701, 0o710] {
            chmod(&state, mode);
            let e = check_state_dir(&state, me).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "the state folder {p} is accessible by group/others (mode {mode:04o}); fix: chmod 700 {p}",
                    p = state.display()
                )
            );
        }
        chmod(&state, 0o700);
        let e = check_state_dir(&state, me + 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the state folder {p} is owned by uid {me}, not by root; fix: chown root:root {p}",
                p = state.display()
            )
        );
        // A file, and a symbolic link to a good folder, are refused.
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            check_state_dir(&file, me),
            Err(PermsError::StateNotDirectory { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        assert!(matches!(
            check_state_dir(&link, me),
            Err(PermsError::StateNotDirectory { .. })
        ));
    }
}
