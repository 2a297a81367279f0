//! The QEMU backend: a `microvm` machine booting the ELF vmlinux directly
//! (PVH), guest memory in a shared memfd so vhost-user devices can map it,
//! and the guest's virtio-vsock served by our `husk-vsock` vhost-user
//! backend (this also works on hosts without kernel vhost-vsock).

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::hypervisor::virtiofsd::{
    log_file, spawn_virtiofsd, wait_for_socket, BACKEND_READY_TIMEOUT,
};
use crate::hypervisor::{BackendKind, Hypervisor, Vm, VmExit, VmSpec};
use crate::process::{describe_status, inheritable_copies, OwnedChild};

/// How long QEMU gets to exit after its vsock backend did, before the
/// backend is blamed for the VM's end.
const BACKEND_EXIT_GRACE: Duration = Duration::from_millis(300);

/// QEMU acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware KVM.
    Kvm,
    /// Software emulation, multi-threaded.
    Tcg,
}

/// A typed QEMU command line for one husk VM.
#[derive(Debug, Clone)]
pub struct QemuCommand {
    /// Name shown in `ps` and QEMU's messages.
    pub name: String,
    /// Acceleration.
    pub accel: Accel,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// ELF vmlinux.
    pub kernel: PathBuf,
    /// initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub append: String,
    /// File that receives the guest serial console.
    pub console_log: PathBuf,
    /// vhost-user socket of the vsock backend.
    pub vsock_socket: PathBuf,
    /// vhost-user socket of virtiofsd, when the sandbox shares a directory.
    pub fs_socket: Option<PathBuf>,
    /// NICs: the fd number of an open tap in QEMU's process, and the guest MAC.
    pub nics: Vec<(i32, String)>,
}

impl QemuCommand {
    /// The argument vector (without the program).
    pub fn args(&self) -> Vec<String> {
        let p = |x: &Path| x.display().to_string();
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg,thread=multi", "max"),
        };
        let mut a: Vec<String> = Vec::new();
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        push("-name", format!("{},debug-threads=on", self.name));
        push(
            "-machine",
            "microvm,acpi=off,x-option-roms=off,isa-serial=on,memory-backend=mem".into(),
        );
        push("-accel", accel.into());
        push("-cpu", cpu.into());
        push("-smp", self.vcpus.to_string());
        push("-m", format!("{}M", self.memory_mib));
        // vhost-user backends map guest memory: it must be a shared memfd.
        push(
            "-object",
            format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                self.memory_mib
            ),
        );
        push("-kernel", p(&self.kernel));
        push("-initrd", p(&self.initrd));
        push("-append", self.append.clone());
        push(
            "-chardev",
            format!("file,id=con0,path={}", p(&self.console_log)),
        );
        push("-serial", "chardev:con0".into());
        push(
            "-chardev",
            format!("socket,id=vsock0,path={}", p(&self.vsock_socket)),
        );
        push("-device", "vhost-user-vsock-device,chardev=vsock0".into());
        if let Some(fs) = &self.fs_socket {
            push("-chardev", format!("socket,id=fs0,path={}", p(fs)));
            push(
                "-device",
                format!(
                    "vhost-user-fs-device,chardev=fs0,tag={}",
                    crate::hypervisor::SHARED_FS_TAG
                ),
            );
        }
        for (n, (fd, mac)) in self.nics.iter().enumerate() {
            push("-netdev", format!("tap,id=net{n},fd={fd}"));
            push(
                "-device",
                format!("virtio-net-device,netdev=net{n},mac={mac}"),
            );
        }
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            a.push(flag.into());
        }
        a.push("-display".into());
        a.push("none".into());
        a.push("-monitor".into());
        a.push("none".into());
        a
    }
}

/// The QEMU hypervisor.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// The `husk-vsock` vhost-user backend binary.
    pub vsock_backend: PathBuf,
    /// virtiofsd, for sandboxes that share a directory.
    pub virtiofsd: Option<PathBuf>,
    /// KVM or TCG.
    pub accel: Accel,
    /// TSC frequency for `tsc_early_khz=` (microvm cannot calibrate).
    pub tsc_khz: Option<u64>,
}

impl Qemu {
    /// Adds the words QEMU microvm guests need to the command line.
    fn guest_cmdline(&self, spec: &VmSpec) -> Result<String> {
        let mut c = spec.cmdline.clone();
        if let Some(khz) = self.tsc_khz {
            if !c.has("tsc_early_khz") {
                c.set("tsc_early_khz", khz)?;
            }
        }
        if self.accel == Accel::Tcg && spec.vcpus == 1 && !c.has("noapictimer") {
            // Skips ~200 ms of LAPIC timer calibration under emulation.
            c.flag("noapictimer")?;
        }
        c.render()
    }
}

impl Hypervisor for Qemu {
    fn kind(&self) -> BackendKind {
        match self.accel {
            Accel::Kvm => BackendKind::QemuKvm,
            Accel::Tcg => BackendKind::QemuTcg,
        }
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        spec.validate()?;
        let append = self.guest_cmdline(spec)?;
        let vhost_sock = spec.run_dir.join("vhost-vsock.sock");
        let uds = spec.run_dir.join("vsock.sock");

        let mut backend_cmd = Command::new(&self.vsock_backend);
        backend_cmd
            .arg("--socket")
            .arg(&vhost_sock)
            .arg("--uds")
            .arg(&uds)
            .arg("--guest-cid")
            .arg(spec.guest_cid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&spec.run_dir.join("vsock.log"))?);
        let mut backend = OwnedChild::spawn("vsock backend", backend_cmd)?;
        wait_for_socket(&mut backend, &vhost_sock, BACKEND_READY_TIMEOUT)?;
        let (virtiofsd, fs_socket) = match &spec.shared_dir {
            Some(dir) => {
                let sock = spec.run_dir.join(super::virtiofsd::SOCKET_NAME);
                let child = spawn_virtiofsd(self.virtiofsd.as_deref(), dir, &sock, &spec.run_dir)?;
                (Some(child), Some(sock))
            }
            None => (None, None),
        };

        // QEMU inherits its taps; the copies close once it is spawned.
        let taps: Vec<RawFd> = spec.nics.iter().map(|(fd, _)| *fd).collect();
        let taps = inheritable_copies(&taps)
            .map_err(|e| crate::error::Error::io("passing the pod's taps to QEMU", e))?;
        let cmd = QemuCommand {
            name: format!("husk-{}", spec.id),
            accel: self.accel,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel.clone(),
            initrd: spec.initramfs.clone(),
            append,
            console_log: spec.console_log.clone(),
            vsock_socket: vhost_sock,
            fs_socket,
            nics: taps
                .iter()
                .zip(&spec.nics)
                .map(|(copy, (_, mac))| (copy.as_raw_fd(), mac.clone()))
                .collect(),
        };
        let mut qemu_cmd = Command::new(&self.binary);
        qemu_cmd
            .args(cmd.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&spec.run_dir.join("qemu.log"))?);
        tracing::debug!(args = ?cmd.args(), "starting QEMU");
        let qemu = OwnedChild::spawn("QEMU", qemu_cmd)?;
        drop(taps);
        Ok(Box::new(QemuVm {
            qemu,
            backend,
            virtiofsd,
            uds,
            run_dir: spec.run_dir.clone(),
        }))
    }
}

/// A QEMU VM and its vsock backend.
#[derive(Debug)]
struct QemuVm {
    qemu: OwnedChild,
    backend: OwnedChild,
    virtiofsd: Option<OwnedChild>,
    uds: PathBuf,
    run_dir: PathBuf,
}

impl QemuVm {
    /// The tail of a helper's log, for error messages.
    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.run_dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("; ")
    }
}

impl Vm for QemuVm {
    fn vsock_uds(&self) -> PathBuf {
        self.uds.clone()
    }

    fn try_exit(&mut self) -> Result<Option<VmExit>> {
        if let Some(s) = self.qemu.try_wait()? {
            let log = self.log_tail("qemu.log");
            let mut reason = format!("QEMU exited ({})", describe_status(s));
            if !log.is_empty() {
                reason.push_str(&format!(": {log}"));
            }
            return Ok(Some(VmExit {
                reason,
                status: Some(s),
            }));
        }
        if let Some(s) = self.backend.try_wait()? {
            // The backend exits when QEMU hangs up, which QEMU does just
            // before it is reaped: if QEMU ends right after, it is the cause.
            if self.qemu.wait_timeout(BACKEND_EXIT_GRACE)?.is_some() {
                return self.try_exit();
            }
            let log = self.log_tail("vsock.log");
            return Ok(Some(VmExit {
                reason: format!("vsock backend exited ({}): {log}", describe_status(s)),
                status: None,
            }));
        }
        if let Some(fs) = self.virtiofsd.as_mut() {
            if let Some(s) = fs.try_wait()? {
                if self.qemu.wait_timeout(BACKEND_EXIT_GRACE)?.is_some() {
                    return self.try_exit();
                }
                let log = self.log_tail(super::virtiofsd::LOG_NAME);
                return Ok(Some(VmExit {
                    reason: format!("virtiofsd exited ({}): {log}", describe_status(s)),
                    status: None,
                }));
            }
        }
        Ok(None)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<VmExit>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_exit()? {
                return Ok(Some(e));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill(&mut self) -> Result<VmExit> {
        let exit = self.try_exit()?;
        let qs = self.qemu.kill()?;
        // The backend exits by itself once QEMU hangs up; give it a moment
        // to remove its sockets, then make sure.
        if self
            .backend
            .wait_timeout(Duration::from_millis(500))?
            .is_none()
        {
            self.backend.kill()?;
        }
        Ok(exit.unwrap_or(VmExit {
            reason: format!("QEMU stopped ({})", describe_status(qs)),
            status: Some(qs),
        }))
    }

    fn pids(&self) -> Vec<u32> {
        let mut p = vec![self.qemu.pid(), self.backend.pid()];
        p.extend(self.virtiofsd.as_ref().map(OwnedChild::pid));
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_cmdline::KernelCmdline;

    fn cmd(accel: Accel) -> QemuCommand {
        QemuCommand {
            name: "husk-t".into(),
            accel,
            vcpus: 2,
            memory_mib: 256,
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initramfs.cpio".into(),
            append: "console=ttyS0 quiet".into(),
            console_log: "/run/x/console.log".into(),
            vsock_socket: "/run/x/vhost-vsock.sock".into(),
            fs_socket: None,
            nics: Vec::new(),
        }
    }

    #[test]
    fn each_nic_is_a_tap_netdev_and_a_virtio_net_device_with_its_mac() {
        let mut c = cmd(Accel::Tcg);
        c.nics = vec![
            (7, "0a:58:0a:58:4d:02".into()),
            (8, "0a:58:0a:58:4d:03".into()),
        ];
        let a = c.args();
        assert_eq!(
            value_of(&a, "-netdev"),
            ["tap,id=net0,fd=7", "tap,id=net1,fd=8"]
        );
        let devices = value_of(&a, "-device");
        assert!(devices.contains(&"virtio-net-device,netdev=net0,mac=0a:58:0a:58:4d:02"));
        assert!(devices.contains(&"virtio-net-device,netdev=net1,mac=0a:58:0a:58:4d:03"));
        assert!(value_of(&cmd(Accel::Tcg).args(), "-netdev").is_empty());
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn microvm_with_shared_memfd_memory_for_vhost_user() {
        let a = cmd(Accel::Tcg).args();
        let machine = value_of(&a, "-machine")[0];
        assert!(machine.starts_with("microvm,"));
        assert!(machine.contains("memory-backend=mem"));
        assert_eq!(
            value_of(&a, "-object"),
            ["memory-backend-memfd,id=mem,size=256M,share=on"]
        );
        assert_eq!(value_of(&a, "-m"), ["256M"]);
        assert_eq!(value_of(&a, "-smp"), ["2"]);
        assert_eq!(value_of(&a, "-append"), ["console=ttyS0 quiet"]);
        assert!(a.iter().any(|x| x == "-no-reboot"));
        assert!(a.iter().any(|x| x == "-nodefaults"));
        assert_eq!(
            value_of(&a, "-device"),
            ["vhost-user-vsock-device,chardev=vsock0"]
        );
        assert!(value_of(&a, "-chardev").contains(&"socket,id=vsock0,path=/run/x/vhost-vsock.sock"));
        assert!(value_of(&a, "-chardev").contains(&"file,id=con0,path=/run/x/console.log"));
    }

    #[test]
    fn shared_directory_becomes_a_vhost_user_fs_device() {
        let mut c = cmd(Accel::Tcg);
        c.fs_socket = Some("/run/x/virtiofs.sock".into());
        let a = c.args();
        assert!(value_of(&a, "-chardev").contains(&"socket,id=fs0,path=/run/x/virtiofs.sock"));
        assert!(value_of(&a, "-device").contains(&"vhost-user-fs-device,chardev=fs0,tag=husk"));
    }

    #[test]
    fn accel_and_cpu_model_follow_the_backend() {
        let a = cmd(Accel::Tcg).args();
        assert_eq!(value_of(&a, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(value_of(&a, "-cpu"), ["max"]);
        let a = cmd(Accel::Kvm).args();
        assert_eq!(value_of(&a, "-accel"), ["kvm"]);
        assert_eq!(value_of(&a, "-cpu"), ["host"]);
    }

    fn spec(vcpus: u8) -> VmSpec {
        VmSpec {
            id: "t".into(),
            kernel: "/nonexistent/vmlinux".into(),
            initramfs: "/nonexistent/initramfs".into(),
            cmdline: KernelCmdline::husk_default(),
            vcpus,
            memory_mib: 256,
            guest_cid: 3,
            run_dir: "/nonexistent".into(),
            console_log: "/nonexistent/console.log".into(),
            shared_dir: None,
            nics: Vec::new(),
        }
    }

    #[test]
    fn guest_cmdline_gets_tsc_and_skips_apic_calibration_under_tcg() {
        let q = Qemu {
            binary: "qemu".into(),
            vsock_backend: "husk-vsock".into(),
            virtiofsd: None,
            accel: Accel::Tcg,
            tsc_khz: Some(2_600_000),
        };
        let line = q.guest_cmdline(&spec(1)).unwrap();
        assert!(line.contains("tsc_early_khz=2600000"));
        assert!(line.contains("noapictimer"));
        let line = q.guest_cmdline(&spec(2)).unwrap();
        assert!(!line.contains("noapictimer"));
        let kvm = Qemu {
            accel: Accel::Kvm,
            tsc_khz: None,
            ..q
        };
        let line = kvm.guest_cmdline(&spec(1)).unwrap();
        assert!(!line.contains("noapictimer") && !line.contains("tsc_early_khz"));
    }

    #[test]
    fn missing_kernel_is_reported_before_anything_starts() {
        let q = Qemu {
            binary: "/nonexistent/qemu".into(),
            vsock_backend: "/nonexistent/husk-vsock".into(),
            virtiofsd: None,
            accel: Accel::Tcg,
            tsc_khz: None,
        };
        let e = q.start(&spec(1)).unwrap_err();
        assert!(e.to_string().contains("guest kernel"), "{e}");
        assert!(e.to_string().contains("guest-kernel/build.sh"), "{e}");
    }
}
