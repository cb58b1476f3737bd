//! The VMs a host runs, and moves started from it: creating a VM from its configuration, and
//! moving one live to another host with the credential of the user who asked ("logged on to
//! the source": the user's own ticket, no delegation needed).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vmgate_auth::channel::ClientSettings;
use vmgate_auth::krb::{AuthFacts, UserCredential};
use vmgate_auth::spn::Spn;
use vmgate_auth::tls::TlsContext;
use vmgate_migrate::engine::{CancelToken, MoveOptions, MoveStats, Progress, send_vm};
use vmgate_migrate::vm::{Vm, VmConfig, VmOptions};

use super::ChannelDialer;
use crate::daemon::local::VmSummary;

/// A VM this host runs.
#[derive(Debug)]
pub struct HostedVm {
    /// The VM (shared with a move in progress).
    pub vm: Arc<Vm>,
    /// How it came here, for `vm_list`.
    pub origin: String,
}

/// The VMs of this host, by unique name.
#[derive(Debug, Clone, Default)]
pub struct Vms(Arc<Mutex<Vec<HostedVm>>>);

impl Vms {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<HostedVm>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a VM; its name must be new here.
    pub fn add(&self, vm: Vm, origin: String) -> Result<(), String> {
        let mut list = self.lock();
        let name = vm.config().name.clone();
        if list.iter().any(|h| h.vm.config().name == name) {
            return Err(format!("a VM named \"{name}\" already runs on this host"));
        }
        list.push(HostedVm {
            vm: Arc::new(vm),
            origin,
        });
        Ok(())
    }

    /// The VM named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Vm>> {
        self.lock()
            .iter()
            .find(|h| h.vm.config().name == name)
            .map(|h| Arc::clone(&h.vm))
    }

    /// Forgets the VM named `name` (its threads end when the last user lets go).
    pub fn remove(&self, name: &str) {
        self.lock().retain(|h| h.vm.config().name != name);
    }

    /// What `vm_list` shows.
    pub fn list(&self) -> Vec<VmSummary> {
        self.lock()
            .iter()
            .map(|h| {
                let c = h.vm.config();
                VmSummary {
                    name: c.name.clone(),
                    state: if h.vm.running() { "running" } else { "paused" }.into(),
                    memory_mib: c.memory_mib,
                    vcpus: c.vcpus,
                    origin: h.origin.clone(),
                }
            })
            .collect()
    }

    /// Creates a VM from its configuration (TOML) and starts it.
    pub fn create(&self, config_toml: &str, console_dir: &Path) -> Result<String, String> {
        let config = VmConfig::from_toml(config_toml, None).map_err(|e| e.to_string())?;
        let name = config.name.clone();
        if self.get(&name).is_some() {
            return Err(format!("a VM named \"{name}\" already runs on this host"));
        }
        std::fs::create_dir_all(console_dir)
            .map_err(|e| format!("cannot create {}: {e}", console_dir.display()))?;
        let options = VmOptions {
            console_log: Some(console_dir.join(format!("{name}.console"))),
        };
        let vm = Vm::create(config, &options).map_err(|e| e.to_string())?;
        vm.resume().map_err(|e| e.to_string())?;
        self.add(vm, "created here".into())?;
        Ok(name)
    }
}

/// A move started on this host.
#[derive(Debug)]
pub struct MoveRequest<'a> {
    /// The VM.
    pub vm: &'a str,
    /// The destination's migration address.
    pub to: SocketAddr,
    /// The destination's migration SPN.
    pub spn: Spn,
    /// The user's credential cache (a forwarded TGT), written to a private file for the move.
    pub ccache: &'a [u8],
    /// Where that file goes (mode 0600, removed after the move).
    pub ccache_dir: PathBuf,
    /// The realm.
    pub realm: String,
    /// Channels, compression, cap, downtime target.
    pub options: MoveOptions,
}

/// How a move ended, with the user it ran as.
#[derive(Debug)]
pub struct MoveOutcome {
    /// The principal of the user's credential.
    pub user: String,
    /// The result.
    pub result: Result<MoveStats, String>,
}

/// Moves a VM of this host with the user's own ticket. On success the VM no longer runs here.
pub fn move_vm(
    vms: &Vms,
    req: &MoveRequest<'_>,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> MoveOutcome {
    let mut user = String::new();
    let result = run_move(vms, req, cancel, progress, &mut user);
    MoveOutcome { user, result }
}

fn run_move(
    vms: &Vms,
    req: &MoveRequest<'_>,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
    user: &mut String,
) -> Result<MoveStats, String> {
    let vm = vms
        .get(req.vm)
        .ok_or_else(|| format!("no VM named \"{}\" runs on this host", req.vm))?;
    let cc = PrivateCcache::write(&req.ccache_dir, req.ccache)?;
    let credential = UserCredential::from_ccache(&cc.0.display().to_string())
        .map_err(|e| format!("the forwarded credential cannot be used: {e}"))?;
    if let Ok(p) = credential.principal() {
        *user = p.to_string();
    }
    let settings = ClientSettings {
        tls: TlsContext::ephemeral().map_err(|e| e.to_string())?,
        realm: req.realm.clone(),
        handshake_timeout: Duration::from_secs(10),
        local_host: None,
    };
    let facts = AuthFacts {
        realm: Some(req.realm.clone()),
        target_spn: Some(req.spn.clone()),
        ..AuthFacts::default()
    };
    let mut dialer = ChannelDialer::new(settings, req.to, req.spn.clone(), credential, facts);
    let control = dialer.connect().map_err(|e| match e.diagnosis() {
        Some(d) => d.to_string(),
        None => e.to_string(),
    })?;
    let stats = send_vm(&vm, control, &mut dialer, &req.options, cancel, progress)
        .map_err(|e| e.to_string())?;
    vms.remove(req.vm);
    Ok(stats)
}

/// The user's credential cache as a private file, removed when dropped.
struct PrivateCcache(PathBuf);

impl PrivateCcache {
    fn write(dir: &Path, bytes: &[u8]) -> Result<PrivateCcache, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut id = [0u8; 8];
        let _ = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id));
        let name = id.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let path = dir.join(format!("move-{name}.ccache"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        f.write_all(bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(PrivateCcache(path))
    }
}

impl Drop for PrivateCcache {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
