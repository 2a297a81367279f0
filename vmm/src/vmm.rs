//! The running VMM: vCPU threads, the event loop on the main thread, and teardown.
//!
//! The event loop polls: the exit eventfd (a vCPU thread ended with a reason), the i8042 reset
//! eventfd, a signalfd for SIGTERM/SIGINT/SIGHUP, the vsock muxer's epoll fd, the ioeventfds of
//! the virtio queues (guest queue notifications that did not exit), and the control socket with
//! its clients. The first reason to end wins; then every vCPU thread is stopped
//! (a flag plus a real-time signal that kicks it out of `KVM_RUN`) and joined, and dropping the
//! [`Vmm`] closes the devices, which removes the vsock and API socket files.
//!
//! The vCPU threads are created parked before the loop starts; then the seccomp filter (if
//! [`Vmm::set_seccomp`] gave one) is installed on every thread, and only then do the vCPUs run
//! (at once, or on the API's `start`). No thread is created after the filter.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::api::{ApiRequest, ApiServer};
use crate::builder::Devices;
use crate::devices::bus::lock;
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::mmio::{MmioTransport, QueueNotifier};
use crate::devices::virtio::vsock::virtio_mmio::VsockShared;
use crate::seccomp::Jail;
use crate::vstate::vcpu::{Vcpu, VcpuContext, VcpuStop};
use crate::vstate::vm::Vm;

/// Exit status: the guest powered off, rebooted, halted, or the VM was asked to stop.
pub const EXIT_OK: i32 = 0;
/// Exit status: the VMM failed (set-up, I/O, KVM).
pub const EXIT_VMM_ERROR: i32 = 1;
/// Exit status: bad command line (clap's own code).
pub const EXIT_USAGE: i32 = 2;
/// Exit status: `KVM_EXIT_INTERNAL_ERROR` (e.g. the emulator could not run a guest instruction).
pub const EXIT_INTERNAL_ERROR: i32 = 3;
/// Exit status: another fatal vCPU exit (entry failure, unhandled exit, KVM_RUN error).
pub const EXIT_VCPU_FAILURE: i32 = 4;

/// Vcpu kick signal: interrupts `KVM_RUN` (the handler does nothing).
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Block SIGTERM, SIGINT and SIGHUP in the calling thread (and the threads it starts later), so
/// that they wait for the event loop's signalfd instead of killing the process half set up.
/// Call it first thing in `main`; [`Vmm::run`] calls it again.
pub fn block_stop_signals() -> nix::Result<SigSet> {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    mask.thread_block()?;
    Ok(mask)
}

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest shut itself down (triple fault with `reboot=t`, i8042 reset, power-off, halt).
    Guest(String),
    /// Asked to stop (API `shutdown`, SIGTERM/SIGINT/SIGHUP).
    Requested(String),
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError(String),
    /// Another fatal vCPU exit.
    VcpuFailure(String),
    /// The VMM itself failed.
    VmmError(String),
}

impl VmEnd {
    /// The process exit status for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmEnd::Guest(_) | VmEnd::Requested(_) => EXIT_OK,
            VmEnd::InternalError(_) => EXIT_INTERNAL_ERROR,
            VmEnd::VcpuFailure(_) => EXIT_VCPU_FAILURE,
            VmEnd::VmmError(_) => EXIT_VMM_ERROR,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        match self {
            VmEnd::Guest(m)
            | VmEnd::Requested(m)
            | VmEnd::InternalError(m)
            | VmEnd::VcpuFailure(m)
            | VmEnd::VmmError(m) => m,
        }
    }

    fn from_vcpu(id: u8, stop: &VcpuStop) -> VmEnd {
        let msg = stop.describe(id);
        match stop {
            VcpuStop::Stopped => VmEnd::Requested(msg),
            VcpuStop::Shutdown | VcpuStop::SystemEvent(_) | VcpuStop::Halted => VmEnd::Guest(msg),
            VcpuStop::InternalError(_) => VmEnd::InternalError(msg),
            VcpuStop::FailEntry { .. } | VcpuStop::Unhandled(_) | VcpuStop::RunFailed(_) => {
                VmEnd::VcpuFailure(msg)
            }
        }
    }
}

/// Lifecycle state, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Built, vCPUs not started.
    Created,
    /// vCPUs running.
    Running,
}

impl VmState {
    fn name(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
        }
    }
}

const TOKEN_EXIT: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_SIGNAL: u64 = 3;
const TOKEN_VSOCK: u64 = 4;
const TOKEN_API: u64 = 5;
const TOKEN_API_CONN: u64 = 1 << 32;
const TOKEN_NOTIFY: u64 = 1 << 33;

/// A built VM and everything that runs it.
pub struct Vmm {
    // Field order is drop order: threads are joined in `stop_vcpus` before anything drops.
    threads: Vec<(u8, JoinHandle<()>)>,
    /// One per parked vCPU thread: a message runs it, dropping it ends it.
    starters: Vec<Sender<()>>,
    pending: Vec<Vcpu>,
    jail: Option<Jail>,
    ctx: VcpuContext,
    first_stop: Arc<Mutex<Option<(u8, VcpuStop)>>>,
    exit_evt: Arc<EventFd>,
    reset_evt: EventFdTrigger,
    vsock: Option<VsockShared>,
    transports: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
    notifiers: Vec<QueueNotifier>,
    api: Option<ApiServer>,
    state: VmState,
    wait_for_start: bool,
    vm: Vm,
}

impl Vmm {
    /// Assemble a VMM from what [`crate::builder::build`] made.
    pub fn new(
        vm: Vm,
        vcpus: Vec<Vcpu>,
        devices: Devices,
        api: Option<ApiServer>,
        wait_for_start: bool,
    ) -> std::io::Result<Vmm> {
        let ctx = VcpuContext {
            pio: devices.pio,
            mmio: devices.mmio,
            mem: vm.memory().clone(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        Ok(Vmm {
            threads: Vec::new(),
            starters: Vec::new(),
            pending: vcpus,
            jail: None,
            ctx,
            first_stop: Arc::new(Mutex::new(None)),
            exit_evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            reset_evt: devices.reset_evt,
            vsock: devices.vsock,
            transports: devices.transports,
            notifiers: devices.notifiers,
            api,
            state: VmState::Created,
            wait_for_start,
            vm,
        })
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The lifecycle state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Install `jail` on every thread of the process once the vCPU threads exist, before the
    /// guest runs ([`run`](Self::run)).
    pub fn set_seccomp(&mut self, jail: Jail) {
        self.jail = Some(jail);
    }

    /// Create the vCPU threads, parked until [`start_vcpus`](Self::start_vcpus). Returns once
    /// every thread is parked: past its start-up system calls (rseq, robust list, signal stack,
    /// name), which the seccomp filter does not allow.
    fn spawn_vcpus(&mut self) -> Result<(), String> {
        let (ready_tx, ready) = channel::<()>();
        let mut spawned = 0;
        for vcpu in self.pending.drain(..) {
            let id = vcpu.id();
            let ctx = self.ctx.clone();
            let first = self.first_stop.clone();
            let exit_evt = self.exit_evt.clone();
            let (starter, go) = channel::<()>();
            let ready_tx = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let _ = ready_tx.send(());
                    drop(ready_tx);
                    if go.recv().is_err() {
                        return;
                    }
                    let stop = vcpu.run(&ctx);
                    if stop != VcpuStop::Stopped {
                        let mut f = lock(&first);
                        if f.is_none() {
                            *f = Some((id, stop));
                        }
                        drop(f);
                        let _ = exit_evt.write(1);
                    }
                })
                .map_err(|e| format!("cannot start the thread of vCPU {id}: {e}"))?;
            self.threads.push((id, handle));
            self.starters.push(starter);
            spawned += 1;
        }
        for _ in 0..spawned {
            ready
                .recv()
                .map_err(|_| "a vCPU thread ended before it was parked".to_string())?;
        }
        Ok(())
    }

    /// Run the parked vCPU threads.
    fn start_vcpus(&mut self) {
        if self.state == VmState::Running {
            return;
        }
        for s in self.starters.drain(..) {
            let _ = s.send(());
        }
        self.state = VmState::Running;
    }

    /// Stop and join every vCPU thread (signals them until they leave `KVM_RUN`).
    fn stop_vcpus(&mut self) {
        // Parked threads end when their starter goes.
        self.starters.clear();
        self.ctx.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(5);
        for (id, handle) in self.threads.drain(..) {
            while !handle.is_finished() {
                if Instant::now() > deadline {
                    tracing::warn!("vCPU {id} does not stop; leaving it");
                    break;
                }
                let _ = handle.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }

    /// Run the VM until it ends; tears the vCPUs down before returning.
    pub fn run(&mut self) -> VmEnd {
        let end = self.event_loop();
        self.stop_vcpus();
        end
    }

    fn event_loop(&mut self) -> VmEnd {
        // The handler does nothing (it only makes KVM_RUN return EINTR): async-signal-safe.
        if let Err(e) = register_signal_handler(kick_signal(), noop_handler) {
            return VmEnd::VmmError(format!("cannot install the vCPU kick signal handler: {e}"));
        }
        // Block the stop signals before vCPU threads exist, so they inherit the mask and the
        // signalfd gets them (a signal that arrived since `block_stop_signals` is pending).
        let mask = match block_stop_signals() {
            Ok(m) => m,
            Err(e) => return VmEnd::VmmError(format!("cannot block signals: {e}")),
        };
        let sigfd =
            match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
                Ok(s) => s,
                Err(e) => return VmEnd::VmmError(format!("cannot create a signalfd: {e}")),
            };
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => return VmEnd::VmmError(format!("cannot create an epoll fd: {e}")),
        };
        let mut watch = vec![
            (self.exit_evt.as_raw_fd(), TOKEN_EXIT, EventSet::IN),
            (self.reset_evt.0.as_raw_fd(), TOKEN_RESET, EventSet::IN),
            (sigfd.as_raw_fd(), TOKEN_SIGNAL, EventSet::IN),
        ];
        if let Some(v) = &self.vsock {
            let s = lock(v);
            watch.push((s.backend_fd(), TOKEN_VSOCK, s.backend_evset()));
        }
        if let Some(api) = &self.api {
            watch.push((api.listener_fd(), TOKEN_API, EventSet::IN));
        }
        for (i, n) in self.notifiers.iter().enumerate() {
            watch.push((n.fd(), TOKEN_NOTIFY | i as u64, EventSet::IN));
        }
        for (fd, token, ev) in watch {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, token)) {
                return VmEnd::VmmError(format!("cannot poll fd {fd}: {e}"));
            }
        }
        if let Err(e) = self.spawn_vcpus() {
            return VmEnd::VmmError(e);
        }
        if let Some(jail) = self.jail.take() {
            if let Err(e) = jail.install() {
                return VmEnd::VmmError(e.to_string());
            }
        }
        if !self.wait_for_start {
            self.start_vcpus();
        }
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return VmEnd::VmmError(format!("epoll_wait failed: {e}")),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {
                        let _ = self.exit_evt.read();
                        if let Some((id, stop)) = lock(&self.first_stop).take() {
                            return VmEnd::from_vcpu(id, &stop);
                        }
                    }
                    TOKEN_RESET => {
                        let _ = self.reset_evt.0.read();
                        return VmEnd::Guest(
                            "guest reset the machine through the i8042 controller".into(),
                        );
                    }
                    TOKEN_SIGNAL => {
                        if let Ok(Some(info)) = sigfd.read_signal() {
                            return VmEnd::Requested(format!(
                                "stopped by signal {}",
                                info.ssi_signo
                            ));
                        }
                    }
                    TOKEN_VSOCK => {
                        if let Some(v) = &self.vsock {
                            lock(v).handle_backend_event(ev.event_set());
                        }
                    }
                    TOKEN_API => {
                        if let Some(api) = self.api.as_mut() {
                            for fd in api.accept() {
                                let token = TOKEN_API_CONN | fd as u64;
                                let _ = epoll.ctl(
                                    ControlOperation::Add,
                                    fd,
                                    EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, token),
                                );
                            }
                        }
                    }
                    t if t & TOKEN_NOTIFY != 0 => {
                        if let Some(n) = self.notifiers.get((t & 0xffff_ffff) as usize) {
                            n.handle();
                        }
                    }
                    t if t & TOKEN_API_CONN != 0 => {
                        if let Some(end) = self.api_request((t & 0xffff_ffff) as RawFd) {
                            return end;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Per virtio-mmio device: where it is and how its queue notifications arrived.
    fn virtio_stats(&self) -> serde_json::Value {
        let devices: Vec<serde_json::Value> = self
            .transports
            .iter()
            .map(|(base, t)| {
                let t = lock(t);
                let s = t.notify_stats();
                serde_json::json!({
                    "base": format!("{base:#x}"),
                    "device_id": t.device().device_type(),
                    "queues": t.num_queues(),
                    "ioeventfd_queues": s.ioeventfd_queues,
                    "notify_ioeventfd": s.via_ioeventfd,
                    "notify_exit": s.via_exit,
                    "status": t.status(),
                    "activated": t.is_activated(),
                })
            })
            .collect();
        devices.into()
    }

    fn api_request(&mut self, fd: RawFd) -> Option<VmEnd> {
        let state = self.state;
        let stats = self.virtio_stats();
        let api = self.api.as_mut()?;
        let (seen, _closed) = api.handle(fd, |req| {
            let state = match req {
                ApiRequest::State | ApiRequest::Stats => state.name(),
                ApiRequest::Start => "running",
                ApiRequest::Shutdown => "stopping",
            };
            Ok(match req {
                ApiRequest::Stats => serde_json::json!({"state": state, "virtio": stats}),
                _ => serde_json::json!({ "state": state }),
            })
        });
        for req in seen {
            match req {
                ApiRequest::Start => self.start_vcpus(),
                ApiRequest::Shutdown => {
                    return Some(VmEnd::Requested(
                        "shutdown requested on the API socket".into(),
                    ))
                }
                ApiRequest::State | ApiRequest::Stats => {}
            }
        }
        None
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
