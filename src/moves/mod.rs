//! Moves: the daemon's entry points into the migration engine.
//!
//! * this module: live moves (and their dry run, `compare`) of a VM of this host, as the
//!   user who asked — with the user's own ticket handed over on the local socket ("logged on
//!   to the source": no delegation needed), or, for a remote caller, with its forwarded TGT,
//!   constrained delegation or protocol transition as the host's auth type allows, or as the
//!   host itself (auth type `host`);
//! * [`incoming`]: the destination's side — its checks of an arriving VM, the incoming job,
//!   the arrival;
//! * [`storage`]: storage-only moves of a running VM on this host.
//!
//! Every entry point takes the [`Caller`] (or, for an arriving move, the authorized link), so
//! the engine is reachable only with proof of authentication and authorization.

#![forbid(unsafe_code)]

pub mod incoming;
pub mod storage;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmgate_auth::Diagnosis;
use vmgate_auth::channel::{ActingMethod, ChannelError, ClientSettings, Target};
use vmgate_auth::delegation::AuthType as ActingAuth;
use vmgate_auth::krb::{AuthFacts, Credential, HostCredentials, KrbError, UserCredential};
use vmgate_auth::spn::{Spn, SpnError};
use vmgate_auth::tls::{TlsContext, TlsError};
use vmgate_control::api::moves::{MoveFailureKind, MoveMethod, MoveSpec};
use vmgate_control::api::{CcacheBlob, ErrorCode, ErrorReply, WireDiagnosis};
use vmgate_control::config::{AuthType, ListenError, Performance, parse_listen};
use vmgate_control::gateway::Attempt;
use vmgate_migrate::engine::{
    CancelToken, MoveError, MoveOptions, MoveStats, Progress, StorageOptions, StorageTarget,
    compare_vm, send_vm,
};
use vmgate_migrate::protocol::{Compression, ProtocolVersion};
use vmgate_migrate::storage::local::release_files;
use vmgate_migrate::storage::users::DiskUsers;

use crate::adapter::{ActingDialer, ChannelDialer};
use crate::caller::Caller;
use crate::inventory::{Instance, Inventory, VmError};
use crate::settings::HostSettings;

/// The time a channel handshake to a destination may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a `move` or `compare` request cannot be planned (the request's fault).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A destination address is not one.
    #[error(transparent)]
    Address(#[from] ListenError),
    /// No destination address.
    #[error("no destination address given")]
    NoAddress,
    /// The destination's SPN cannot be formed.
    #[error(transparent)]
    Spn(#[from] SpnError),
    /// A switch mapping is not `FROM=TO`.
    #[error(
        "\"{0}\" is not a switch mapping: use FROM=TO (the source's switch name, then this destination's)"
    )]
    SwitchMap(String),
    /// A disk mapping is not `SRC=DST`.
    #[error(
        "\"{0}\" is not a disk mapping: use SRC=DST (the disk's file here, its file at the destination)"
    )]
    DiskMap(String),
    /// Both a folder and disk mappings.
    #[error("give either a storage path or --disk SRC=DST, not both")]
    FolderAndDisks,
    /// keep-source without the storage.
    #[error("keep-source applies to moves with their storage")]
    KeepSourceWithoutStorage,
}

/// `FROM=TO` switch renames.
pub fn parse_switch_map(items: &[String]) -> Result<Vec<(String, String)>, PlanError> {
    items
        .iter()
        .map(|i| match i.split_once('=') {
            Some((a, b)) if !a.trim().is_empty() && !b.trim().is_empty() => {
                Ok((a.trim().to_owned(), b.trim().to_owned()))
            }
            _ => Err(PlanError::SwitchMap(i.clone())),
        })
        .collect()
}

/// The storage part of a move: a folder for every disk, or `SRC=DST` per disk.
pub fn storage_options(spec: &MoveSpec) -> Result<Option<StorageOptions>, PlanError> {
    let target = match (&spec.storage_path, spec.disks.is_empty()) {
        (Some(_), false) => return Err(PlanError::FolderAndDisks),
        (Some(p), true) => StorageTarget::Folder(p.into()),
        (None, false) => StorageTarget::PerDisk(
            spec.disks
                .iter()
                .map(|d| match d.split_once('=') {
                    Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.into(), b.into())),
                    _ => Err(PlanError::DiskMap(d.clone())),
                })
                .collect::<Result<_, _>>()?,
        ),
        (None, true) if spec.keep_source => return Err(PlanError::KeepSourceWithoutStorage),
        (None, true) => return Ok(None),
    };
    Ok(Some(StorageOptions {
        target,
        keep_source: spec.keep_source,
        users: None,
    }))
}

/// A move (or a compare) started on this host, checked and ready to run.
#[derive(Debug)]
pub struct Plan {
    /// The VM.
    pub vm: String,
    /// The destination's migration addresses, by its priority: tried in order, the next one
    /// when a connection fails.
    pub to: Vec<SocketAddr>,
    /// The destination's migration SPN.
    pub spn: Spn,
    /// The destination's short name.
    pub destination: String,
    /// Channels, compression, cap, downtime target, switch map, storage.
    pub options: MoveOptions,
}

/// How this host authenticates to the destination for a move.
#[derive(Debug)]
pub enum MoveCredential<'a> {
    /// The caller's own forwardable TGT, handed over on the local socket ("logged on to the
    /// source"): no delegation needed, whatever the auth type.
    OwnTicket {
        /// The ccache file's bytes.
        ccache: &'a CcacheBlob,
    },
    /// Acting for a remote caller: its forwarded TGT, or constrained delegation (S4U2Proxy),
    /// or protocol transition, as the host's auth type allows.
    ActFor {
        /// What the caller's channel proved.
        acting: &'a vmgate_auth::channel::ActingFor,
        /// This host's keytab credentials.
        host: HostCredentials,
        /// `kerberos` or `credssp`.
        auth: ActingAuth,
    },
    /// This host's own identity (auth type `host`: the destination trusts the source host).
    Host {
        /// This host's keytab credentials.
        host: HostCredentials,
    },
}

/// Why a move could not be carried out. Every kind but [`MoveFailureKind::InDoubt`] and
/// [`MoveFailureKind::DisksHeld`] leaves the VM running here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoveFailure {
    /// The VM cannot be moved (unknown, off, already moving).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The channel to the destination failed (Kerberos, authorization, the network).
    #[error("{}", channel_text(.0))]
    Channel(ChannelError),
    /// No migration address of the destination answered.
    #[error("the destination could not be reached on any of its migration addresses:{0}")]
    Unreachable(Tried),
    /// The engine ended the move.
    #[error(transparent)]
    Engine(MoveError),
    /// A local move needs the caller's ticket, and none was handed over.
    #[error(
        "a move started on this host runs with your own Kerberos ticket, and none was handed over; fix: kinit (a forwardable ticket), then run vmgate again"
    )]
    NoTicket,
    /// This host has no keytab credential to act with.
    #[error("this host has no keytab credential")]
    NoHostCredential,
    /// The handed-over ticket cannot be kept for the move.
    #[error("cannot keep the handed-over credential in {}", path.display())]
    Ccache {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The handed-over ticket cannot be used.
    #[error("the handed-over credential cannot be used")]
    OwnCredential(#[source] KrbError),
    /// This host's own credential cannot be used.
    #[error("this host's own credential")]
    HostCredential(#[source] KrbError),
    /// TLS cannot be set up.
    #[error("cannot set up TLS")]
    Tls(#[source] TlsError),
}

/// The addresses a move tried, each with why it failed (one a line).
#[derive(Debug)]
pub struct Tried(pub Vec<Attempt>);

impl std::fmt::Display for Tried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for a in &self.0 {
            write!(f, "\n  {}: {}", a.addr, channel_text(&a.error))?;
        }
        Ok(())
    }
}

fn channel_text(e: &ChannelError) -> String {
    match e.diagnosis() {
        Some(d) => d.to_string(),
        None => vmgate_control::error::chain(e),
    }
}

impl MoveFailure {
    /// What kind of failure, for the control protocol and the CLI's advice.
    pub fn kind(&self) -> MoveFailureKind {
        match self {
            MoveFailure::Vm(VmError::NotFound(_)) => MoveFailureKind::NotFound,
            MoveFailure::Vm(_) => MoveFailureKind::VmBusy,
            MoveFailure::Channel(
                ChannelError::Auth { .. }
                | ChannelError::Refused { .. }
                | ChannelError::Denied { .. },
            )
            | MoveFailure::NoTicket => MoveFailureKind::Denied,
            MoveFailure::Channel(
                ChannelError::Connect { .. }
                | ChannelError::TimedOut { .. }
                | ChannelError::Filtered { .. },
            )
            | MoveFailure::Unreachable(_) => MoveFailureKind::Unreachable,
            MoveFailure::Engine(e) => match e {
                MoveError::VersionRefused { .. } => MoveFailureKind::VersionRefused,
                MoveError::Incompatible { .. } => MoveFailureKind::Incompatible,
                MoveError::Cancelled { .. } => MoveFailureKind::Cancelled,
                MoveError::NotConverging { .. } => MoveFailureKind::NotConverging,
                MoveError::InDoubt { .. } => MoveFailureKind::InDoubt,
                MoveError::DisksHeld { .. } => MoveFailureKind::DisksHeld,
                MoveError::Failed { .. } => MoveFailureKind::Failed,
            },
            MoveFailure::Channel(_)
            | MoveFailure::NoHostCredential
            | MoveFailure::Ccache { .. }
            | MoveFailure::OwnCredential(_)
            | MoveFailure::HostCredential(_)
            | MoveFailure::Tls(_) => MoveFailureKind::Failed,
        }
    }

    /// The Windows diagnosis of an authentication or authorization failure.
    pub fn diagnosis(&self) -> Option<Diagnosis> {
        match self {
            MoveFailure::Channel(e) => e.diagnosis(),
            _ => None,
        }
    }

    /// The error answer (its text prefixed with `prefix`, such as `job j3: `).
    pub fn reply(&self, prefix: &str) -> ErrorReply {
        let kind = self.kind();
        let code = match kind {
            MoveFailureKind::NotFound => ErrorCode::NotFound,
            MoveFailureKind::Denied => ErrorCode::Denied,
            MoveFailureKind::Unreachable => ErrorCode::Unreachable,
            MoveFailureKind::VmBusy
            | MoveFailureKind::VersionRefused
            | MoveFailureKind::Incompatible => ErrorCode::Refused,
            MoveFailureKind::Cancelled => ErrorCode::Cancelled,
            _ => ErrorCode::Failed,
        };
        let diagnosis = self.diagnosis();
        ErrorReply {
            code,
            message: format!("{prefix}{}", vmgate_control::error::chain(self)),
            win_code: diagnosis.as_ref().map(|d| d.code.hex()),
            diagnosis: diagnosis.as_ref().map(WireDiagnosis::from),
            move_failure: Some(kind),
        }
    }
}

/// How a move ended, with the user it ran as.
#[derive(Debug)]
pub struct MoveOutcome {
    /// The principal of the user (or host) it ran as.
    pub user: String,
    /// How this host authenticated.
    pub method: Option<MoveMethod>,
    /// The address that was used.
    pub address: String,
    /// The result.
    pub result: Result<MoveStats, MoveFailure>,
}

/// What to do once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveMode {
    /// Move the VM.
    Move,
    /// Only ask the destination for its compatibility report.
    Compare,
}

/// What a compare found: each incompatibility's id and message.
pub type CompareReport = Vec<(u32, String)>;

/// The live moves of this host: its settings, its VMs, and its keytab credential for acting
/// for remote callers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Moves {
    settings: HostSettings,
    inventory: Inventory,
    host: Option<HostCredentials>,
}

impl Moves {
    /// The moves of a host.
    pub fn new(
        settings: HostSettings,
        inventory: Inventory,
        host: Option<HostCredentials>,
    ) -> Moves {
        Moves {
            settings,
            inventory,
            host,
        }
    }

    /// The engine's options from the settings in force.
    pub fn options(&self, switch_map: &[(String, String)]) -> MoveOptions {
        let m = self.settings.migration();
        MoveOptions {
            channels: m.effective_channels(),
            compression: match m.performance {
                Performance::Compression => Compression::Lz4,
                Performance::Tcpip | Performance::Multichannel => Compression::None,
            },
            bandwidth_limit: m.bandwidth_limit.map(|b| b.bytes_per_second()),
            downtime_target: Duration::from_millis(u64::from(m.downtime_target_ms)),
            auto_converge: true,
            switch_map: switch_map.to_vec(),
            version: protocol_version(self.settings.file()),
            ..MoveOptions::default()
        }
    }

    /// Checks a `move` or `compare` request.
    pub fn plan(&self, spec: &MoveSpec) -> Result<Plan, PlanError> {
        let to = spec
            .to
            .iter()
            .map(|a| parse_listen(a))
            .collect::<Result<Vec<_>, _>>()?;
        if to.is_empty() {
            return Err(PlanError::NoAddress);
        }
        let spn = Spn::new(&self.settings.file().spn_class, &spec.destination)?;
        let switch_map = parse_switch_map(&spec.switch_map)?;
        // The inventory keeps files other VMs need from being deleted after the move.
        let storage = storage_options(spec)?.map(|s| StorageOptions {
            users: Some(Arc::new(self.inventory.clone()) as Arc<dyn DiskUsers>),
            ..s
        });
        let mut options = self.options(&switch_map);
        options.storage = storage;
        Ok(Plan {
            vm: spec.vm.clone(),
            to,
            spn,
            destination: spec
                .destination
                .split('.')
                .next()
                .unwrap_or(&spec.destination)
                .to_owned(),
            options,
        })
    }

    fn host_credentials(&self) -> Result<HostCredentials, MoveFailure> {
        self.host.clone().ok_or(MoveFailure::NoHostCredential)
    }

    /// How this host authenticates as `caller` (whose handed-over ticket is `ccache`).
    pub fn credential<'a>(
        &self,
        caller: &'a Caller,
        ccache: Option<&'a CcacheBlob>,
    ) -> Result<MoveCredential<'a>, MoveFailure> {
        match caller {
            Caller::Local { .. } => match ccache {
                Some(ccache) => Ok(MoveCredential::OwnTicket { ccache }),
                None => match self.settings.migration().auth {
                    AuthType::Host => Ok(MoveCredential::Host {
                        host: self.host_credentials()?,
                    }),
                    _ => Err(MoveFailure::NoTicket),
                },
            },
            Caller::Remote { peer, .. } => {
                let host = self.host_credentials()?;
                let auth = match self.settings.migration().auth {
                    AuthType::Host => return Ok(MoveCredential::Host { host }),
                    AuthType::Kerberos => ActingAuth::Kerberos,
                    AuthType::Credssp => ActingAuth::Credssp,
                };
                Ok(MoveCredential::ActFor {
                    acting: &peer.acting,
                    host,
                    auth,
                })
            }
        }
    }

    /// Moves (or compares) a VM of this host for `caller`. On a successful move the VM no
    /// longer runs here; on any failure it runs here as before (or, in doubt, stays paused).
    pub fn run(
        &self,
        _caller: &Caller,
        plan: &Plan,
        credential: &MoveCredential<'_>,
        mode: MoveMode,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(&Progress),
    ) -> (MoveOutcome, Option<CompareReport>) {
        let mut outcome = MoveOutcome {
            user: String::new(),
            method: None,
            address: String::new(),
            result: Ok(MoveStats::default()),
        };
        let instance = match mode {
            MoveMode::Move => self.inventory.begin_move(&plan.vm, "a live move"),
            MoveMode::Compare => self.inventory.instance(&plan.vm).map_err(|e| match e {
                VmError::Off(_) => VmError::NotFound(plan.vm.clone()),
                other => other,
            }),
        };
        let instance = match instance {
            Ok(i) => i,
            Err(e) => {
                outcome.result = Err(MoveFailure::Vm(e));
                return (outcome, None);
            }
        };
        let mut report = None;
        let result = match &instance {
            Instance::Microvm(vm) => self.run_microvm(
                vm,
                plan,
                credential,
                mode,
                cancel,
                progress,
                &mut outcome,
                &mut report,
            ),
        };
        if mode == MoveMode::Move {
            self.inventory.end_move(&plan.vm, result.is_ok());
        }
        if let (Ok(stats), Some(storage)) = (&result, &plan.options.storage) {
            // The engine deleted the active layers; the read-only parents stay open until this
            // VM is gone, and may be shared with other VMs (those are kept).
            let Instance::Microvm(vm) = instance;
            crate::inventory::microvm::stop(vm);
            release_files(
                &stats.source_parents,
                storage.keep_source,
                &plan.vm,
                &self.inventory,
            );
        }
        outcome.result = result;
        (outcome, report)
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one move's parts, passed through once"
    )]
    fn run_microvm(
        &self,
        vm: &vmgate_migrate::vm::Vm,
        plan: &Plan,
        credential: &MoveCredential<'_>,
        mode: MoveMode,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(&Progress),
        outcome: &mut MoveOutcome,
        report: &mut Option<CompareReport>,
    ) -> Result<MoveStats, MoveFailure> {
        let config = self.settings.file();
        let realm = config.realm.clone();
        let local_host = config.host_name.clone();
        let sources: Vec<IpAddr> = config.listen.iter().map(SocketAddr::ip).collect();
        let settings = ClientSettings {
            source: None,
            tls: TlsContext::ephemeral().map_err(MoveFailure::Tls)?,
            realm: realm.clone(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            local_host: Some(local_host.clone()),
        };
        // Kept alive for the whole move: the credentials live in these caches.
        let mut _own_cc: Option<PrivateCcache> = None;
        let mut _host_cc = None;
        let own: Option<(Credential, MoveMethod)> = match credential {
            MoveCredential::OwnTicket { ccache } => {
                let cc = PrivateCcache::write(&config.state_dir.join("ccache"), ccache.expose())?;
                let c = UserCredential::from_ccache(&cc.0.display().to_string())
                    .map_err(MoveFailure::OwnCredential)?;
                _own_cc = Some(cc);
                Some((c, MoveMethod::OwnTicket))
            }
            MoveCredential::Host { host } => {
                let (c, cc) = host.initiator().map_err(MoveFailure::HostCredential)?;
                _host_cc = Some(cc);
                Some((c, MoveMethod::Host))
            }
            MoveCredential::ActFor { acting, .. } => {
                outcome.user = acting.user().to_string();
                None
            }
        };
        if let Some((c, _)) = &own
            && let Ok(p) = c.principal()
        {
            outcome.user = p.to_string();
        }
        let mut tried = Vec::new();
        for addr in &plan.to {
            let mut settings = settings.clone();
            settings.source = sources
                .iter()
                .copied()
                .find(|ip| ip.is_ipv4() == addr.is_ipv4() && !ip.is_unspecified());
            let connected = match (&own, credential) {
                (Some((c, method)), _) => {
                    let dialer = ChannelDialer::new(
                        settings,
                        *addr,
                        plan.spn.clone(),
                        c.clone(),
                        AuthFacts {
                            realm: Some(realm.clone()),
                            target_spn: Some(plan.spn.clone()),
                            local_host: Some(local_host.clone()),
                            ..AuthFacts::default()
                        },
                    );
                    dialer
                        .connect()
                        .map(|link| (Dialing::Own(dialer), link, *method))
                }
                (None, MoveCredential::ActFor { acting, host, auth }) => {
                    let dialer = ActingDialer {
                        settings,
                        host: host.clone(),
                        acting: (*acting).clone(),
                        auth: *auth,
                        target: Target {
                            addr: *addr,
                            spn: plan.spn.clone(),
                        },
                    };
                    dialer
                        .connect()
                        .map(|(link, m)| (Dialing::Acting(dialer), link, acting_method(m)))
                }
                (None, _) => return Err(MoveFailure::NoHostCredential),
            };
            let (mut dialer, control, method) = match connected {
                Ok(x) => x,
                Err(error @ (ChannelError::Connect { .. } | ChannelError::TimedOut { .. })) => {
                    tried.push(Attempt { addr: *addr, error });
                    continue;
                }
                Err(e) => return Err(MoveFailure::Channel(e)),
            };
            outcome.address = addr.to_string();
            outcome.method = Some(method);
            return match mode {
                MoveMode::Move => {
                    let dialer: &mut dyn vmgate_migrate::engine::Dialer = match &mut dialer {
                        Dialing::Own(d) => d,
                        Dialing::Acting(d) => d,
                    };
                    send_vm(vm, control, dialer, &plan.options, cancel, progress)
                        .map_err(MoveFailure::Engine)
                }
                MoveMode::Compare => {
                    let r = compare_vm(vm, control, &plan.options).map_err(MoveFailure::Engine)?;
                    *report = Some(r);
                    Ok(MoveStats::default())
                }
            };
        }
        Err(MoveFailure::Unreachable(Tried(tried)))
    }
}

/// The dialer of one move, as the credential decides.
#[allow(
    clippy::large_enum_variant,
    reason = "one per move attempt, on the stack briefly"
)]
enum Dialing {
    Own(ChannelDialer),
    Acting(ActingDialer),
}

fn acting_method(m: ActingMethod) -> MoveMethod {
    match m {
        ActingMethod::ForwardedTgt => MoveMethod::ForwardedTgt,
        ActingMethod::ConstrainedDelegation => MoveMethod::ConstrainedDelegation,
        ActingMethod::ProtocolTransition => MoveMethod::ProtocolTransition,
    }
}

/// The protocol version this host announces as a source (`[testing] protocol_version` plays a
/// newer build).
pub fn protocol_version(config: &vmgate_control::config::Config) -> ProtocolVersion {
    config
        .testing
        .protocol_version
        .and_then(ProtocolVersion::new)
        .unwrap_or(ProtocolVersion::CURRENT)
}

/// The user's credential cache as a private file, removed when dropped.
struct PrivateCcache(PathBuf);

impl PrivateCcache {
    fn write(dir: &Path, bytes: &[u8]) -> Result<PrivateCcache, MoveFailure> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).map_err(|source| MoveFailure::Ccache {
            path: dir.to_owned(),
            source,
        })?;
        let mut id = [0u8; 8];
        let _ = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id));
        let name = id.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let path = dir.join(format!("move-{name}.ccache"));
        let failed = |source| MoveFailure::Ccache {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(failed)?;
        f.write_all(bytes).map_err(failed)?;
        Ok(PrivateCcache(path))
    }
}

impl Drop for PrivateCcache {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_maps_need_both_names() {
        assert_eq!(
            parse_switch_map(&["Lab = Lab2".into()]).unwrap(),
            [("Lab".to_owned(), "Lab2".to_owned())]
        );
        assert!(
            parse_switch_map(&["Lab".into()])
                .unwrap_err()
                .to_string()
                .contains("FROM=TO")
        );
        assert!(parse_switch_map(&["=Lab2".into()]).is_err());
    }

    #[test]
    fn the_engine_and_the_control_api_agree_on_protocol_versions() {
        assert_eq!(
            ProtocolVersion::CURRENT.get(),
            vmgate_control::api::host::PROTOCOL_VERSION
        );
        assert_eq!(
            ProtocolVersion::MIN_SUPPORTED.get(),
            vmgate_control::api::host::MIN_PROTOCOL_VERSION
        );
    }

    #[test]
    fn failures_carry_their_kind_and_code() {
        let f = MoveFailure::Engine(MoveError::InDoubt {
            cause: "link lost".into(),
        });
        let r = f.reply("job j1: ");
        assert_eq!(r.move_failure, Some(MoveFailureKind::InDoubt));
        assert_eq!(r.code, ErrorCode::Failed);
        assert!(r.message.starts_with("job j1: "), "{}", r.message);
        let f = MoveFailure::Vm(VmError::NotFound("web".into()));
        assert_eq!(f.reply("").code, ErrorCode::NotFound);
        let f = MoveFailure::Channel(ChannelError::Denied {
            peer: "carol".into(),
            diagnosis: Diagnosis::new(vmgate_auth::WinCode::AccessDenied, "carol is not allowed"),
        });
        let r = f.reply("");
        assert_eq!(r.code, ErrorCode::Denied);
        assert_eq!(r.win_code.as_deref(), Some("0x80070005"));
        assert_eq!(r.diagnosis.unwrap().cause, "carol is not allowed");
    }
}
