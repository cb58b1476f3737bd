//! vmgate-guest: the program of vmgate's Linux test guest (see the library's documentation).
//!
//! It runs as the last step of the initramfs' `/init`, with the serial console as its
//! standard output. Threads: the memory writer, the disk writer, the echo service (one thread
//! per connection), a watcher per power-button input device, and the agent on the main
//! thread.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use vmgate_guest::agent::{
    self, Answer, CheckReport, CheckResult, DiskStatus, EchoStatus, GuestStatus, MemoryStatus, Op,
    Request, Response,
};
use vmgate_guest::config::Config;
use vmgate_guest::disk::{self, BLOCK_SIZE, Block, RegionCheck};
use vmgate_guest::memory::{self, PAGE_WORDS, PageMismatch};

/// How long a check waits for the writers.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// Most simultaneous echo connections.
const MAX_ECHO_CONNECTIONS: u64 = 64;

/// Prints a line on the console as it is.
fn console(line: &str) {
    let mut out = io::stdout().lock();
    // The console is all we have: if it fails there is nowhere to report that.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints a message of this program on the console.
fn say(line: &str) {
    console(&format!("vmgate-guest: {line}"));
}

fn main() -> ExitCode {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (config, warnings) = Config::from_cmdline(&cmdline);
    for w in &warnings {
        say(w);
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    say(&format!(
        "starting (version {}, boot_id={boot_id})",
        env!("CARGO_PKG_VERSION")
    ));

    let mem = Arc::new(MemoryShared::new(&config));
    {
        let mem = Arc::clone(&mem);
        thread::spawn(move || memory_writer(&mem));
    }

    let disk = config
        .disk
        .as_ref()
        .and_then(|dev| match DiskWriter::open(dev, &config) {
            Ok((writer, shared)) => {
                thread::spawn(move || writer.run());
                Some(shared)
            }
            Err(e) => {
                say(&format!("disk writer not started: {dev}: {e}"));
                None
            }
        });
    let disk = Arc::new(disk);

    let echo = Arc::new(EchoShared {
        port: config.echo_port,
        connections: AtomicU64::new(0),
        open: AtomicU64::new(0),
    });
    {
        let echo = Arc::clone(&echo);
        thread::spawn(move || echo_server(&echo));
    }

    {
        let disk = Arc::clone(&disk);
        thread::spawn(move || power_button_watcher(&disk));
    }

    console(&format!("{} boot_id={boot_id}", agent::READY_MARKER));
    let ctx = AgentContext {
        boot_id,
        mem,
        disk,
        echo,
    };
    loop {
        match find_agent_port() {
            Some(port) => {
                if let Err(e) = serve_agent(&port, &ctx) {
                    say(&format!("agent port {}: {e}", port.display()));
                    thread::sleep(Duration::from_secs(1));
                }
            }
            None => thread::sleep(Duration::from_millis(500)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Memory

struct MemoryShared {
    size_mib: u64,
    full: bool,
    pause: Duration,
    passes: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<PageMismatch>>,
    /// Signalled at the end of each pass.
    pass_done: Condvar,
    pass_lock: Mutex<()>,
}

impl MemoryShared {
    fn new(config: &Config) -> MemoryShared {
        MemoryShared {
            size_mib: config.mem_mib,
            full: config.mem_full,
            pause: Duration::from_millis(config.mem_pause_ms),
            passes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            pass_done: Condvar::new(),
            pass_lock: Mutex::new(()),
        }
    }

    /// Waits until two more passes have completed (so every page has been checked after the
    /// call), then reports.
    fn check(&self) -> CheckResult {
        let start = self.passes.load(Ordering::Acquire);
        let deadline = std::time::Instant::now() + CHECK_TIMEOUT;
        let mut guard = self.pass_lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.passes.load(Ordering::Acquire) < start + 2 {
            let now = std::time::Instant::now();
            if now >= deadline {
                return CheckResult {
                    name: "memory".into(),
                    passed: false,
                    detail: format!(
                        "the memory writer made no full pass in {} s (pass {start})",
                        CHECK_TIMEOUT.as_secs()
                    ),
                };
            }
            guard = self
                .pass_done
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(guard);
        let passes = self.passes.load(Ordering::Acquire);
        let errors = self.errors.load(Ordering::Acquire);
        let first = self
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match first {
            None => CheckResult {
                name: "memory".into(),
                passed: true,
                detail: format!(
                    "{passes} passes over {} MiB, every page held the previous pass",
                    self.size_mib
                ),
            },
            Some(e) => CheckResult {
                name: "memory".into(),
                passed: false,
                detail: format!("{errors} pages held an unexpected content; first: {e}"),
            },
        }
    }

    fn status(&self) -> MemoryStatus {
        MemoryStatus {
            size_mib: self.size_mib,
            full_content: self.full,
            passes: self.passes.load(Ordering::Acquire),
            errors: self.errors.load(Ordering::Acquire),
        }
    }
}

fn memory_writer(shared: &MemoryShared) {
    let pages = usize::try_from(shared.size_mib * 256).unwrap_or(usize::MAX);
    // Zeroed memory (calloc: the kernel's zero pages until written).
    let mut buffer: Vec<[u64; PAGE_WORDS]> = vec![[0u64; PAGE_WORDS]; pages];
    let mut pass = 0u64;
    loop {
        pass += 1;
        for (i, page) in buffer.iter_mut().enumerate() {
            let index = i as u64;
            if let Err(e) = memory::check_page(page, index, pass - 1, shared.full) {
                if shared.errors.fetch_add(1, Ordering::AcqRel) == 0 {
                    say(&format!("MEMORY CHECK FAILED: {e}"));
                    *shared.first_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
            }
            memory::fill_page(page, index, pass, shared.full);
        }
        {
            let _g = shared.pass_lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.passes.store(pass, Ordering::Release);
            shared.pass_done.notify_all();
        }
        if !shared.pause.is_zero() {
            thread::sleep(shared.pause);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Disk

#[repr(C, align(4096))]
struct AlignedBlock([u8; BLOCK_SIZE]);

enum DiskRequest {
    /// Check the region now.
    Check(Sender<RegionCheck>),
    /// Make the last write durable and stop writing.
    Stop(Sender<()>),
}

struct DiskShared {
    device: String,
    blocks: u64,
    boot_seq: u64,
    boot_check: RegionCheck,
    durable: AtomicU64,
    errors: AtomicU64,
    requests: Mutex<Sender<DiskRequest>>,
}

impl DiskShared {
    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> DiskRequest) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(make(tx));
        sent.ok()?;
        rx.recv_timeout(CHECK_TIMEOUT).ok()
    }

    fn check(&self) -> CheckResult {
        let Some(now) = self.ask(DiskRequest::Check) else {
            return CheckResult {
                name: "disk".into(),
                passed: false,
                detail: format!(
                    "the disk writer did not answer within {} s",
                    CHECK_TIMEOUT.as_secs()
                ),
            };
        };
        let mut failures = Vec::new();
        if !self.boot_check.passed() {
            failures.push(format!("at boot: {}", describe_problems(&self.boot_check)));
        }
        if !now.passed() {
            failures.push(format!("now: {}", describe_problems(&now)));
        }
        if failures.is_empty() {
            CheckResult {
                name: "disk".into(),
                passed: true,
                detail: format!(
                    "{} blocks of {}: sequence intact up to {} (at boot: {})",
                    self.blocks, self.device, now.last, self.boot_seq
                ),
            }
        } else {
            CheckResult {
                name: "disk".into(),
                passed: false,
                detail: failures.join("; "),
            }
        }
    }

    fn status(&self) -> DiskStatus {
        DiskStatus {
            device: self.device.clone(),
            blocks: self.blocks,
            boot_seq: self.boot_seq,
            durable_seq: self.durable.load(Ordering::Acquire),
            errors: self.errors.load(Ordering::Acquire),
        }
    }
}

fn describe_problems(c: &RegionCheck) -> String {
    let listed: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
    format!("{} bad blocks: {}", c.problem_count, listed.join(", "))
}

struct DiskWriter {
    file: File,
    blocks: u64,
    pause: Duration,
    requests: Receiver<DiskRequest>,
    shared: Arc<DiskShared>,
    buf: Box<AlignedBlock>,
}

impl DiskWriter {
    /// Opens the device, checks what is on it, and prepares the writer.
    fn open(device: &str, config: &Config) -> io::Result<(DiskWriter, Arc<DiskShared>)> {
        // The device may appear a moment after the driver loaded.
        let mut tries = 0;
        while !Path::new(device).exists() && tries < 50 {
            thread::sleep(Duration::from_millis(100));
            tries += 1;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(device)?;
        let size = file.seek(SeekFrom::End(0))?;
        let fits = size / BLOCK_SIZE as u64;
        let blocks = config.disk_blocks.min(fits);
        if blocks < 2 {
            return Err(io::Error::other(format!(
                "the device has {size} bytes, too small for the disk writer"
            )));
        }
        if blocks < config.disk_blocks {
            say(&format!(
                "disk {device} holds only {blocks} blocks of the {} asked for",
                config.disk_blocks
            ));
        }
        let mut buf = Box::new(AlignedBlock([0; BLOCK_SIZE]));
        let found = read_region(&file, blocks, &mut buf)?;
        let boot_check = disk::check_region(&found, None);
        if boot_check.passed() {
            say(&format!(
                "disk {device}: {blocks} blocks, sequence intact up to {}",
                boot_check.last
            ));
        } else {
            say(&format!(
                "DISK CHECK FAILED at boot: {device}: {}",
                describe_problems(&boot_check)
            ));
        }
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(DiskShared {
            device: device.to_string(),
            blocks,
            boot_seq: boot_check.last,
            durable: AtomicU64::new(boot_check.last),
            errors: AtomicU64::new(boot_check.problem_count),
            boot_check,
            requests: Mutex::new(tx),
        });
        Ok((
            DiskWriter {
                file,
                blocks,
                pause: Duration::from_millis(config.disk_pause_ms),
                requests: rx,
                shared: Arc::clone(&shared),
                buf,
            },
            shared,
        ))
    }

    fn run(mut self) {
        let mut failed_writes = 0u64;
        loop {
            // Serve requests between writes; wait for them during the pause.
            let wait = if self.pause.is_zero() {
                Duration::from_millis(0)
            } else {
                self.pause
            };
            match self.requests.recv_timeout(wait) {
                Ok(DiskRequest::Check(reply)) => {
                    let result = self.check_now();
                    if !result.passed() {
                        self.shared
                            .errors
                            .fetch_add(result.problem_count, Ordering::AcqRel);
                    }
                    let _ = reply.send(result);
                    continue;
                }
                Ok(DiskRequest::Stop(reply)) => {
                    let _ = self.file.sync_all();
                    say(&format!(
                        "disk writer stopped at sequence {}",
                        self.shared.durable.load(Ordering::Acquire)
                    ));
                    let _ = reply.send(());
                    // Keep serving checks until the guest powers off.
                    while let Ok(req) = self.requests.recv() {
                        match req {
                            DiskRequest::Check(reply) => {
                                let _ = reply.send(self.check_now());
                            }
                            DiskRequest::Stop(reply) => {
                                let _ = reply.send(());
                            }
                        }
                    }
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let seq = self.shared.durable.load(Ordering::Acquire) + 1;
            let index = disk::index_of(seq, self.blocks);
            disk::encode(&mut self.buf.0, seq, index);
            let written = self
                .file
                .write_all_at(&self.buf.0, index * BLOCK_SIZE as u64)
                .and_then(|()| self.file.sync_data());
            match written {
                Ok(()) => self.shared.durable.store(seq, Ordering::Release),
                Err(e) => {
                    failed_writes += 1;
                    if failed_writes == 1 || failed_writes.is_power_of_two() {
                        say(&format!(
                            "disk write {seq} failed ({failed_writes} so far): {e}"
                        ));
                    }
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn check_now(&mut self) -> RegionCheck {
        let last = self.shared.durable.load(Ordering::Acquire);
        match read_region(&self.file, self.blocks, &mut self.buf) {
            Ok(found) => disk::check_region(&found, Some(last)),
            Err(e) => {
                say(&format!("disk check could not read the device: {e}"));
                RegionCheck {
                    last,
                    problems: Vec::new(),
                    problem_count: self.blocks,
                }
            }
        }
    }
}

fn read_region(file: &File, blocks: u64, buf: &mut AlignedBlock) -> io::Result<Vec<Block>> {
    (0..blocks)
        .map(|i| {
            file.read_exact_at(&mut buf.0, i * BLOCK_SIZE as u64)?;
            Ok(disk::decode(&buf.0))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Echo

struct EchoShared {
    port: u16,
    connections: AtomicU64,
    open: AtomicU64,
}

fn echo_server(shared: &Arc<EchoShared>) {
    let listener = loop {
        match TcpListener::bind(("0.0.0.0", shared.port)) {
            Ok(l) => break l,
            Err(e) => {
                say(&format!("echo: cannot listen on port {}: {e}", shared.port));
                thread::sleep(Duration::from_secs(1));
            }
        }
    };
    say(&format!("echo service on TCP port {}", shared.port));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if shared.open.fetch_add(1, Ordering::AcqRel) >= MAX_ECHO_CONNECTIONS {
            shared.open.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        shared.connections.fetch_add(1, Ordering::AcqRel);
        let shared = Arc::clone(shared);
        thread::spawn(move || {
            echo(stream);
            shared.open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Power button

/// `struct input_event` on x86_64: a timeval (16 bytes), type, code (u16), value (i32).
const INPUT_EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

fn power_button_watcher(disk: &Arc<Option<Arc<DiskShared>>>) {
    let mut devices = Vec::new();
    for _ in 0..30 {
        devices = power_button_devices();
        if !devices.is_empty() {
            break;
        }
        thread::sleep(Duration::from_secs(1));
    }
    if devices.is_empty() {
        say("no ACPI power button found: the guest will not react to an ACPI shutdown");
        return;
    }
    let (tx, rx) = mpsc::channel();
    for dev in devices {
        let tx = tx.clone();
        thread::spawn(move || {
            let Ok(mut f) = File::open(&dev) else { return };
            let mut ev = [0u8; INPUT_EVENT_SIZE];
            while f.read_exact(&mut ev).is_ok() {
                let kind = u16::from_ne_bytes([ev[16], ev[17]]);
                let code = u16::from_ne_bytes([ev[18], ev[19]]);
                let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
                if kind == EV_KEY && code == KEY_POWER && value == 1 {
                    let _ = tx.send(());
                }
            }
        });
    }
    if rx.recv().is_ok() {
        say("power button pressed: stopping the disk writer and powering off");
        if let Some(disk) = disk.as_ref() {
            disk.ask(DiskRequest::Stop);
        }
        // SAFETY: sync() takes no arguments and only flushes file system buffers.
        unsafe { libc::sync() };
        say("powering off");
        // SAFETY: reboot() with RB_POWER_OFF takes no pointers; it powers the machine off
        // (the disk writer has made its last write durable and sync() flushed the rest). If
        // it fails (no CAP_SYS_BOOT), it returns and nothing else happens.
        let r = unsafe { libc::reboot(libc::RB_POWER_OFF) };
        say(&format!(
            "power off failed: {r} {}",
            io::Error::last_os_error()
        ));
    }
}

/// The event devices of ACPI power buttons.
fn power_button_devices() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/class/input") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("event") {
            continue;
        }
        let label = fs::read_to_string(e.path().join("device/name")).unwrap_or_default();
        if label.trim() == "Power Button" {
            out.push(Path::new("/dev/input").join(name));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Agent

struct AgentContext {
    boot_id: String,
    mem: Arc<MemoryShared>,
    disk: Arc<Option<Arc<DiskShared>>>,
    echo: Arc<EchoShared>,
}

impl AgentContext {
    fn answer(&self, op: Op) -> Answer {
        match op {
            Op::Status => Answer::Status(GuestStatus {
                boot_id: self.boot_id.clone(),
                uptime_ms: uptime_ms(),
                program_version: env!("CARGO_PKG_VERSION").to_string(),
                memory: self.mem.status(),
                disk: self.disk.as_ref().as_ref().map(|d| d.status()),
                echo: EchoStatus {
                    port: self.echo.port,
                    connections: self.echo.connections.load(Ordering::Acquire),
                },
            }),
            Op::Check => {
                let mut checks = vec![self.mem.check()];
                if let Some(d) = self.disk.as_ref() {
                    checks.push(d.check());
                }
                Answer::Check(CheckReport { checks })
            }
        }
    }
}

fn uptime_ms() -> u64 {
    let text = fs::read_to_string("/proc/uptime").unwrap_or_default();
    let secs = text.split_whitespace().next().unwrap_or("0");
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, "0"));
    let whole: u64 = whole.parse().unwrap_or(0);
    let cents: u64 = frac.get(..2).unwrap_or("0").parse().unwrap_or(0);
    whole * 1000 + cents * 10
}

/// The device of the agent's virtio-serial port, once the port is there.
fn find_agent_port() -> Option<PathBuf> {
    for e in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == agent::PORT_NAME {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// Serves requests on the port until it fails. While the host is not connected the port
/// reports a hang-up: then it waits.
fn serve_agent(port: &Path, ctx: &AgentContext) -> io::Result<()> {
    let mut file = OpenOptions::new().read(true).write(true).open(port)?;
    let mut line: Vec<u8> = Vec::new();
    let mut overlong = false;
    let mut buf = [0u8; 4096];
    loop {
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd that lives across the call, and nfds is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, 1000) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue;
        }
        if pfd.revents & libc::POLLIN == 0 {
            // Host not connected (POLLHUP): nothing to read until it is.
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        let n = match file.read(&mut buf) {
            Ok(0) => {
                thread::sleep(Duration::from_millis(100));
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for &b in &buf[..n] {
            if b != b'\n' {
                if line.len() < agent::MAX_LINE {
                    line.push(b);
                } else {
                    overlong = true;
                }
                continue;
            }
            let request = std::mem::take(&mut line);
            if std::mem::take(&mut overlong) {
                write_response(&mut file, 0, Answer::Error("request too long".into()));
                continue;
            }
            if request.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Request>(&request) {
                Ok(req) => {
                    let answer = ctx.answer(req.op);
                    write_response(&mut file, req.id, answer);
                }
                Err(e) => write_response(&mut file, 0, Answer::Error(format!("bad request: {e}"))),
            }
        }
    }
}

fn write_response(file: &mut File, id: u64, result: Answer) {
    let Ok(mut text) = serde_json::to_vec(&Response { id, result }) else {
        return;
    };
    text.push(b'\n');
    // If the host went away, the answer is lost; it will ask again.
    let _ = file.write_all(&text);
}
