//! The husk-vmm backend: our own KVM micro-VMM (`husk-vmm` binary from the vmm crate), the fast
//! path on hosts with hardware virtualization. One process per VM runs the vCPUs, the serial
//! console, virtio-rng and the vsock device in-process, so there is no separate vsock backend:
//! the VM's hybrid-vsock socket is husk-vmm's own `--vsock-uds`.
//!
//! husk-vmm exits 0 when the guest reboots (the agent's `reboot(2)` with `reboot=t` is a triple
//! fault) or when asked to stop (SIGTERM, or `shutdown` on its control socket); 3 on
//! KVM_EXIT_INTERNAL_ERROR (e.g. on a PVM host, which cannot run Linux ring 0), with the reason
//! in `husk-vmm.log`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::hypervisor::{BackendKind, Hypervisor, Vm, VmExit, VmSpec};
use crate::process::{describe_status, OwnedChild};

/// How long husk-vmm may take to build the VM and bind its vsock socket.
const SOCKET_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long husk-vmm gets to tear down after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// The husk-vmm hypervisor.
#[derive(Debug, Clone)]
pub struct HuskVmm {
    /// The `husk-vmm` binary.
    pub binary: PathBuf,
}

/// The husk-vmm command line for one VM.
pub fn husk_vmm_args(spec: &VmSpec, cmdline: &str, uds: &Path, api: &Path) -> Vec<String> {
    let p = |x: &Path| x.display().to_string();
    vec![
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
    ]
}

impl Hypervisor for HuskVmm {
    fn kind(&self) -> BackendKind {
        BackendKind::HuskVmm
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        spec.validate()?;
        if spec.shared_dir.is_some() {
            return Err(Error::BackendUnavailable {
                backend: "husk-vmm",
                reason: "it has no virtio-fs device yet; use a QEMU backend for containers".into(),
            });
        }
        let cmdline = spec.cmdline.render()?;
        let uds = spec.run_dir.join("vsock.sock");
        let api = spec.run_dir.join("husk-vmm.sock");
        let log_path = spec.run_dir.join("husk-vmm.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Error::io(format!("creating {log_path:?}"), e))?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(husk_vmm_args(spec, &cmdline, &uds, &api))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        tracing::debug!(args = ?husk_vmm_args(spec, &cmdline, &uds, &api), "starting husk-vmm");
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
        Ok(Box::new(HuskVmmVm { vmm, uds, log_path }))
    }
}

/// The last lines of husk-vmm's log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("; ")
}

/// A VM run by one husk-vmm process.
#[derive(Debug)]
struct HuskVmmVm {
    vmm: OwnedChild,
    uds: PathBuf,
    log_path: PathBuf,
}

impl Vm for HuskVmmVm {
    fn vsock_uds(&self) -> PathBuf {
        self.uds.clone()
    }

    fn try_exit(&mut self) -> Result<Option<VmExit>> {
        let Some(s) = self.vmm.try_wait()? else {
            return Ok(None);
        };
        let mut reason = format!("husk-vmm exited ({})", describe_status(s));
        let log = log_tail(&self.log_path);
        if !log.is_empty() {
            reason.push_str(&format!(": {log}"));
        }
        Ok(Some(VmExit {
            reason,
            status: Some(s),
        }))
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<VmExit>> {
        if self.vmm.wait_timeout(timeout)?.is_none() {
            return Ok(None);
        }
        self.try_exit()
    }

    fn kill(&mut self) -> Result<VmExit> {
        if let Some(e) = self.try_exit()? {
            return Ok(e);
        }
        // SIGTERM lets husk-vmm stop its vCPUs and remove its sockets; SIGKILL after the grace.
        let s = self.vmm.terminate(STOP_GRACE)?;
        Ok(VmExit {
            reason: format!("husk-vmm stopped ({})", describe_status(s)),
            status: Some(s),
        })
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.vmm.pid()]
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
        }
    }

    #[test]
    fn command_line_names_every_resource() {
        let a = husk_vmm_args(
            &spec(),
            "console=ttyS0",
            Path::new("/run/x/vsock.sock"),
            Path::new("/run/x/api.sock"),
        );
        let v = |flag: &str| {
            let i = a.iter().position(|x| x == flag).unwrap();
            a[i + 1].clone()
        };
        assert_eq!(v("--kernel"), "/k/vmlinux");
        assert_eq!(v("--initramfs"), "/k/initramfs.cpio");
        assert_eq!(v("--cmdline"), "console=ttyS0");
        assert_eq!(v("--vcpus"), "2");
        assert_eq!(v("--memory-mib"), "256");
        assert_eq!(v("--console-log"), "/run/x/console.log");
        assert_eq!(v("--vsock-uds"), "/run/x/vsock.sock");
        assert_eq!(v("--guest-cid"), "3");
        assert_eq!(v("--api-socket"), "/run/x/api.sock");
    }

    #[test]
    fn missing_artifacts_and_shared_dirs_are_refused_before_spawning() {
        let hv = HuskVmm {
            binary: "/nonexistent/husk-vmm".into(),
        };
        let e = hv.start(&spec()).unwrap_err();
        assert!(e.to_string().contains("guest kernel"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = (dir.path().join("k"), dir.path().join("i"));
        std::fs::write(&k, b"x").unwrap();
        std::fs::write(&i, b"x").unwrap();
        let mut s = spec();
        s.kernel = k;
        s.initramfs = i;
        s.run_dir = dir.path().into();
        s.shared_dir = Some(dir.path().into());
        let e = hv.start(&s).unwrap_err();
        assert!(e.to_string().contains("virtio-fs"), "{e}");
    }
}
