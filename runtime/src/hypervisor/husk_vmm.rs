//! The husk-vmm backend: our own KVM micro-VMM (`husk-vmm` binary from the vmm crate), the fast
//! path on hosts with hardware virtualization. One process per VM runs the vCPUs, the serial
//! console, virtio-rng and the vsock device in-process, so there is no separate vsock backend:
//! the VM's hybrid-vsock socket is husk-vmm's own `--vsock-uds`. A sandbox that shares a
//! directory also gets virtiofsd, started as for QEMU; husk-vmm is its vhost-user frontend
//! (`--fs-socket`, tag [`SHARED_FS_TAG`]) and virtiofsd exits when husk-vmm hangs up.
//!
//! husk-vmm exits 0 when the guest reboots (the agent's `reboot(2)` with `reboot=t` is a triple
//! fault) or when asked to stop (SIGTERM, or `shutdown` on its control socket); 3 on
//! KVM_EXIT_INTERNAL_ERROR (e.g. on a PVM host, which cannot run Linux ring 0), with the reason
//! in `husk-vmm.log`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::hypervisor::virtiofsd::{spawn_virtiofsd, LOG_NAME, SOCKET_NAME};
use crate::hypervisor::{BackendKind, Hypervisor, Vm, VmExit, VmSpec, SHARED_FS_TAG};
use crate::process::{describe_status, OwnedChild};

/// How long husk-vmm may take to build the VM and bind its vsock socket.
const SOCKET_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long husk-vmm gets to tear down after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// How long husk-vmm gets to exit after virtiofsd did, before virtiofsd is blamed for the VM's
/// end; and how long virtiofsd gets to exit by itself after husk-vmm did.
const HELPER_EXIT_GRACE: Duration = Duration::from_millis(300);

/// The husk-vmm hypervisor.
#[derive(Debug, Clone)]
pub struct HuskVmm {
    /// The `husk-vmm` binary.
    pub binary: PathBuf,
    /// virtiofsd, for sandboxes that share a directory.
    pub virtiofsd: Option<PathBuf>,
}

/// The husk-vmm command line for one VM; `fs_socket` is virtiofsd's socket when the sandbox
/// shares a directory.
pub fn husk_vmm_args(
    spec: &VmSpec,
    cmdline: &str,
    uds: &Path,
    api: &Path,
    fs_socket: Option<&Path>,
) -> Vec<String> {
    let p = |x: &Path| x.display().to_string();
    let mut a = vec![
        "--kernel".into(),
        p(&spec.kernel),
        "--initramfs".into(),
        p(&spec.initramfs),
        "--cmdline".into(),
        cmdline.into(),
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--memory-mib".into(),
        spec.memory_mib.to_string(),
        "--console-log".into(),
        p(&spec.console_log),
        "--vsock-uds".into(),
        p(uds),
        "--guest-cid".into(),
        spec.guest_cid.to_string(),
        "--api-socket".into(),
        p(api),
    ];
    if let Some(fs) = fs_socket {
        a.extend([
            "--fs-socket".into(),
            p(fs),
            "--fs-tag".into(),
            SHARED_FS_TAG.into(),
        ]);
    }
    a
}

impl Hypervisor for HuskVmm {
    fn kind(&self) -> BackendKind {
        BackendKind::HuskVmm
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        spec.validate()?;
        if !spec.nics.is_empty() {
            return Err(Error::Config(
                "the pod has network interfaces, and husk-vmm has no virtio-net device yet: \
                 use a QEMU backend (backend = \"qemu-kvm\") for pods with a network"
                    .into(),
            ));
        }
        let cmdline = spec.cmdline.render()?;
        let uds = spec.run_dir.join("vsock.sock");
        let api = spec.run_dir.join("husk-vmm.sock");
        let log_path = spec.run_dir.join("husk-vmm.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Error::io(format!("creating {log_path:?}"), e))?;
        // virtiofsd first: husk-vmm connects to it while building the VM. If anything below
        // fails, dropping it kills it.
        let (virtiofsd, fs_socket) = match &spec.shared_dir {
            Some(dir) => {
                let sock = spec.run_dir.join(SOCKET_NAME);
                let child = spawn_virtiofsd(self.virtiofsd.as_deref(), dir, &sock, &spec.run_dir)?;
                (Some(child), Some(sock))
            }
            None => (None, None),
        };
        let args = husk_vmm_args(spec, &cmdline, &uds, &api, fs_socket.as_deref());
        let mut cmd = Command::new(&self.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        tracing::debug!(?args, "starting husk-vmm");
        let mut vmm = OwnedChild::spawn("husk-vmm", cmd)?;
        let deadline = Instant::now() + SOCKET_READY_TIMEOUT;
        while !uds.exists() {
            if let Some(s) = vmm.try_wait()? {
                return Err(Error::ProcessExited {
                    what: vmm.what(),
                    status: format!("{}: {}", describe_status(s), log_tail(&log_path)),
                    console_tail: String::new(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Io {
                    context: format!(
                        "husk-vmm did not create {uds:?} within {SOCKET_READY_TIMEOUT:?}"
                    ),
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Box::new(HuskVmmVm {
            vmm,
            virtiofsd,
            uds,
            log_path,
        }))
    }
}

/// The last lines of a log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("; ")
}

/// A VM run by one husk-vmm process (and virtiofsd, when it shares a directory).
#[derive(Debug)]
struct HuskVmmVm {
    vmm: OwnedChild,
    virtiofsd: Option<OwnedChild>,
    uds: PathBuf,
    log_path: PathBuf,
}

impl HuskVmmVm {
    /// How husk-vmm ended, with its log's tail.
    fn vmm_exit(&self, s: std::process::ExitStatus) -> VmExit {
        let mut reason = format!("husk-vmm exited ({})", describe_status(s));
        let log = log_tail(&self.log_path);
        if !log.is_empty() {
            reason.push_str(&format!(": {log}"));
        }
        VmExit {
            reason,
            status: Some(s),
        }
    }

    /// Reap virtiofsd after husk-vmm ended: it exits by itself on the hang-up.
    fn reap_virtiofsd(&mut self) -> Result<()> {
        if let Some(fs) = self.virtiofsd.as_mut() {
            if fs.wait_timeout(HELPER_EXIT_GRACE)?.is_none() {
                fs.kill()?;
            }
        }
        Ok(())
    }
}

impl Vm for HuskVmmVm {
    fn vsock_uds(&self) -> PathBuf {
        self.uds.clone()
    }

    fn try_exit(&mut self) -> Result<Option<VmExit>> {
        if let Some(s) = self.vmm.try_wait()? {
            self.reap_virtiofsd()?;
            return Ok(Some(self.vmm_exit(s)));
        }
        let Some(fs) = self.virtiofsd.as_mut() else {
            return Ok(None);
        };
        let Some(fs_status) = fs.try_wait()? else {
            return Ok(None);
        };
        // The guest's shared directory is gone. If husk-vmm is ending anyway, it is the cause.
        if let Some(s) = self.vmm.wait_timeout(HELPER_EXIT_GRACE)? {
            return Ok(Some(self.vmm_exit(s)));
        }
        let log = self
            .log_path
            .parent()
            .map(|d| log_tail(&d.join(LOG_NAME)))
            .unwrap_or_default();
        Ok(Some(VmExit {
            reason: format!("virtiofsd exited ({}): {log}", describe_status(fs_status)),
            status: None,
        }))
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<VmExit>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_exit()? {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Wakes at once when husk-vmm exits; looks at virtiofsd every 50 ms.
            self.vmm.wait_timeout(left.min(Duration::from_millis(50)))?;
        }
    }

    fn kill(&mut self) -> Result<VmExit> {
        let exit = self.try_exit()?;
        let exit = match exit {
            Some(e) => e,
            None => {
                // SIGTERM lets husk-vmm stop its vCPUs and remove its sockets; SIGKILL after
                // the grace.
                let s = self.vmm.terminate(STOP_GRACE)?;
                VmExit {
                    reason: format!("husk-vmm stopped ({})", describe_status(s)),
                    status: Some(s),
                }
            }
        };
        if self.vmm.try_wait()?.is_none() {
            self.vmm.terminate(STOP_GRACE)?;
        }
        self.reap_virtiofsd()?;
        Ok(exit)
    }

    fn pids(&self) -> Vec<u32> {
        let mut p = vec![self.vmm.pid()];
        p.extend(self.virtiofsd.as_ref().map(OwnedChild::pid));
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_cmdline::KernelCmdline;

    fn spec() -> VmSpec {
        VmSpec {
            id: "t".into(),
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            cmdline: KernelCmdline::new(),
            vcpus: 2,
            memory_mib: 256,
            guest_cid: 3,
            run_dir: "/run/x".into(),
            console_log: "/run/x/console.log".into(),
            shared_dir: None,
            nics: Vec::new(),
        }
    }

    fn value<'a>(a: &'a [String], flag: &str) -> Option<&'a str> {
        let i = a.iter().position(|x| x == flag)?;
        a.get(i + 1).map(String::as_str)
    }

    #[test]
    fn command_line_names_every_resource() {
        let a = husk_vmm_args(
            &spec(),
            "console=ttyS0",
            Path::new("/run/x/vsock.sock"),
            Path::new("/run/x/api.sock"),
            None,
        );
        let v = |flag: &str| value(&a, flag).unwrap().to_string();
        assert_eq!(v("--kernel"), "/k/vmlinux");
        assert_eq!(v("--initramfs"), "/k/initramfs.cpio");
        assert_eq!(v("--cmdline"), "console=ttyS0");
        assert_eq!(v("--vcpus"), "2");
        assert_eq!(v("--memory-mib"), "256");
        assert_eq!(v("--console-log"), "/run/x/console.log");
        assert_eq!(v("--vsock-uds"), "/run/x/vsock.sock");
        assert_eq!(v("--guest-cid"), "3");
        assert_eq!(v("--api-socket"), "/run/x/api.sock");
        assert_eq!(value(&a, "--fs-socket"), None, "no share, no virtio-fs");
    }

    #[test]
    fn shared_directory_becomes_a_virtio_fs_device() {
        let a = husk_vmm_args(
            &spec(),
            "console=ttyS0",
            Path::new("/run/x/vsock.sock"),
            Path::new("/run/x/api.sock"),
            Some(Path::new("/run/x/virtiofs.sock")),
        );
        assert_eq!(value(&a, "--fs-socket"), Some("/run/x/virtiofs.sock"));
        assert_eq!(value(&a, "--fs-tag"), Some(SHARED_FS_TAG));
    }

    /// A spec whose kernel and initramfs exist, in a fresh run dir.
    fn runnable(dir: &Path) -> VmSpec {
        let (k, i) = (dir.join("k"), dir.join("i"));
        std::fs::write(&k, b"x").unwrap();
        std::fs::write(&i, b"x").unwrap();
        let mut s = spec();
        s.kernel = k;
        s.initramfs = i;
        s.run_dir = dir.into();
        s.console_log = dir.join("console.log");
        s
    }

    #[test]
    fn missing_artifacts_are_refused_before_spawning() {
        let hv = HuskVmm {
            binary: "/nonexistent/husk-vmm".into(),
            virtiofsd: None,
        };
        let e = hv.start(&spec()).unwrap_err();
        assert!(e.to_string().contains("guest kernel"), "{e}");
        // A share needs virtiofsd.
        let dir = tempfile::tempdir().unwrap();
        let mut s = runnable(dir.path());
        s.shared_dir = Some(dir.path().into());
        let e = hv.start(&s).unwrap_err();
        assert!(e.to_string().contains("virtiofsd"), "{e}");
    }

    /// virtiofsd is started before husk-vmm; when husk-vmm cannot start, it is not left behind.
    #[test]
    fn failed_start_leaves_no_virtiofsd() {
        let Some(virtiofsd) = crate::config::RuntimeConfig::from_env()
            .ok()
            .and_then(|c| c.virtiofsd())
        else {
            eprintln!("SKIP failed_start_leaves_no_virtiofsd: virtiofsd is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let mut s = runnable(dir.path());
        s.shared_dir = Some(shared);
        let hv = HuskVmm {
            binary: "/nonexistent/husk-vmm".into(),
            virtiofsd: Some(virtiofsd),
        };
        let e = hv.start(&s).unwrap_err();
        assert!(e.to_string().contains("husk-vmm"), "{e}");
        let run_dir = dir.path().to_string_lossy().to_string();
        let left = || -> Vec<String> {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .filter(|c| c.contains("virtiofsd") && c.contains(&run_dir))
                .collect()
        };
        // The leader is reaped on drop; its killed sandbox child may take a moment to vanish.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !left().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(left().is_empty(), "virtiofsd left behind: {:?}", left());
    }
}
