//! The host's settings in force: the configuration file, with the migration settings that
//! `host set` / `host enable` / `host disable` changed at run time (Hyper-V: `Set-VMHost`,
//! `Enable-VMMigration`), kept across restarts in `<state_dir>/migration-settings.json`.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use vmgate_auth::netfilter::NetworkFilter;
use vmgate_control::api::host::HostChanges;
use vmgate_control::config::{ChangeError, Config, ConfigProblem, MigrationSettings};

/// The file in the state folder that keeps `host set` changes.
pub const SETTINGS_FILE: &str = "migration-settings.json";

/// Errors of the run-time settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The saved settings cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The saved settings are not valid JSON of the settings.
    #[error(
        "{} is not valid; remove it to go back to the configuration file's settings",
        path.display()
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The saved settings are not allowed with this configuration.
    #[error(
        "{}: {problem}; remove it to go back to the configuration file's settings",
        path.display()
    )]
    Check {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: ConfigProblem,
    },
    /// A change is not a valid value.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// The changed settings are not allowed together.
    #[error(transparent)]
    Invalidated(#[from] ConfigProblem),
    /// The settings cannot be encoded.
    #[error("cannot encode the settings")]
    Encode(#[source] serde_json::Error),
    /// The settings cannot be saved.
    #[error("cannot save the settings to {}", path.display())]
    Save {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl SettingsError {
    /// Whether the request was at fault (a bad value), not the host.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            SettingsError::Change(_) | SettingsError::Invalidated(_)
        )
    }
}

/// The settings in force. Cheap to clone; shared by the dispatch, the gateway (its migration
/// network filter) and the jobs (their limits).
#[derive(Debug, Clone)]
pub struct HostSettings {
    file: Arc<Config>,
    migration: Arc<RwLock<MigrationSettings>>,
    filter: Arc<RwLock<NetworkFilter>>,
}

impl HostSettings {
    /// The configuration, with the saved `host set` changes (in its state folder) in force.
    pub fn load(config: Config) -> Result<HostSettings, SettingsError> {
        let mut config = config;
        let saved = config.state_dir.join(SETTINGS_FILE);
        match std::fs::read(&saved) {
            Ok(bytes) => {
                let m: MigrationSettings =
                    serde_json::from_slice(&bytes).map_err(|source| SettingsError::Invalid {
                        path: saved.clone(),
                        source,
                    })?;
                config.migration = m;
                config.check().map_err(|problem| SettingsError::Check {
                    path: saved.clone(),
                    problem,
                })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SettingsError::Read {
                    path: saved,
                    source,
                });
            }
        }
        Ok(HostSettings {
            migration: Arc::new(RwLock::new(config.migration.clone())),
            filter: Arc::new(RwLock::new(config.migration.network_filter())),
            file: Arc::new(config),
        })
    }

    /// The configuration as loaded (its migration settings may have changed since: see
    /// [`HostSettings::config`]).
    pub fn file(&self) -> &Config {
        &self.file
    }

    /// The configuration with the migration settings in force.
    pub fn config(&self) -> Config {
        let mut c = (*self.file).clone();
        c.migration = self.migration();
        c
    }

    /// The migration settings in force.
    pub fn migration(&self) -> MigrationSettings {
        self.migration
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The incoming-network filter for migration channels (changes with `host set`).
    pub fn migration_filter(&self) -> Arc<RwLock<NetworkFilter>> {
        Arc::clone(&self.filter)
    }

    /// Applies `host set` changes: checked with the whole configuration, saved, then in force.
    pub fn set(&self, changes: &HostChanges) -> Result<(), SettingsError> {
        let mut c = self.config();
        c.migration.apply(changes)?;
        c.check()?;
        let path = self.file.state_dir.join(SETTINGS_FILE);
        let json = serde_json::to_vec_pretty(&c.migration).map_err(SettingsError::Encode)?;
        let tmp = path.with_extension("json.new");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| SettingsError::Save { path, source })?;
        *self.filter.write().unwrap_or_else(PoisonError::into_inner) = c.migration.network_filter();
        *self
            .migration
            .write()
            .unwrap_or_else(PoisonError::into_inner) = c.migration;
        Ok(())
    }
}
