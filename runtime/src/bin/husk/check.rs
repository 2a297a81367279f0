//! `husk check`: probe the host, say which backend husk would use and why,
//! optionally boot a sandbox and print the agent's Version.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use husk_runtime::config::RuntimeConfig;
use husk_runtime::host::{which, CgroupLayout, HostProbe};
use husk_runtime::Sandbox;

/// Arguments of `husk check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Also boot a sandbox VM and print the guest agent's Version.
    #[arg(long)]
    boot: bool,
    /// With --boot: also run the OCI bundle at this path as a container in
    /// the VM, its output on this terminal.
    #[arg(long, requires = "boot")]
    bundle: Option<std::path::PathBuf>,
}

/// Runs `bundle` as container "check" in `sb`, stdout/stderr to ours;
/// returns its exit status.
fn run_bundle(sb: &Sandbox, bundle: &Path) -> husk_runtime::Result<i32> {
    let dup = |fd: i32| -> husk_runtime::Result<std::fs::File> {
        nix::unistd::dup(fd)
            .map(|fd| {
                // SAFETY: dup(2) returned a new fd that nothing else owns.
                unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
            })
            .map_err(|e| husk_runtime::Error::io("duplicating stdout", e.into()))
    };
    let stdio = husk_runtime::Stdio {
        stdin: None,
        stdout: Some(dup(1)?),
        stderr: Some(dup(2)?),
        terminal: false,
    };
    sb.create_container("check", bundle, stdio)?;
    sb.start_container("check")?;
    let status = sb.wait("check", "")?;
    sb.delete_container("check")?;
    Ok(status)
}

fn file_line(p: &Path) -> (bool, String) {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() && m.len() > 0 => (
            true,
            format!("{} ({:.1} MB)", p.display(), m.len() as f64 / 1e6),
        ),
        Ok(_) => (false, format!("{} (not a non-empty file)", p.display())),
        Err(e) => (false, format!("{} ({e})", p.display())),
    }
}

fn qemu_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "version unknown".into())
}

/// Runs the check; returns the exit code (0: husk can run sandboxes here).
pub fn run(args: CheckArgs) -> anyhow::Result<i32> {
    let cfg = RuntimeConfig::from_env()?;
    let host = HostProbe::detect();
    let mut problems: Vec<String> = Vec::new();
    let row = |k: &str, v: &str| println!("{k:<15}{v}");

    row("kvm:", &host.kvm.describe());
    row(
        "vhost-vsock:",
        if host.vhost_vsock {
            "present (/dev/vhost-vsock)"
        } else {
            "absent (husk serves vsock with its own husk-vsock backend)"
        },
    );
    match cfg.qemu_binary() {
        Ok(q) => row("qemu:", &format!("{} ({})", q.display(), qemu_version(&q))),
        Err(e) => {
            row("qemu:", "missing");
            problems.push(e.to_string());
        }
    }
    row(
        "husk-vmm:",
        &match cfg.husk_vmm() {
            Ok(p) if host.kvm.runs_linux() => format!("{} (usable: hardware KVM)", p.display()),
            Ok(p) => format!(
                "{} (not used: {} cannot boot Linux)",
                p.display(),
                host.kvm.describe()
            ),
            Err(_) => "not installed".into(),
        },
    );
    match cfg.vsock_backend() {
        Ok(b) => row("vsock backend:", &b.display().to_string()),
        Err(e) => {
            row("vsock backend:", "missing");
            problems.push(e.to_string());
        }
    }
    row(
        "virtiofsd:",
        &which("virtiofsd")
            .or_else(|| {
                let p = Path::new("/usr/libexec/virtiofsd");
                p.exists().then(|| p.to_path_buf())
            })
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "not found (needed for containers: cargo install virtiofsd)".into()),
    );
    row(
        "cgroups:",
        match host.cgroups {
            CgroupLayout::V2 => "v2 (unified)",
            CgroupLayout::Hybrid => "hybrid v1/v2",
            CgroupLayout::V1 => "v1 only",
            CgroupLayout::None => "not mounted",
        },
    );
    for (name, path, hint) in [
        ("kernel:", &cfg.kernel, "run guest-kernel/build.sh"),
        ("initramfs:", &cfg.initramfs, "run rootfs/build.sh"),
    ] {
        let (ok, line) = file_line(path);
        row(name, &line);
        if !ok {
            problems.push(format!("{} missing: {hint}", name.trim_end_matches(':')));
        }
    }
    let choice = match cfg.backend_choice(&host, false) {
        Ok(c) => {
            row("backend:", &format!("{} ({})", c.kind.name(), c.reason));
            Some(c)
        }
        Err(e) => {
            row("backend:", "none");
            problems.push(e.to_string());
            None
        }
    };

    if args.boot && problems.is_empty() {
        let id = format!("check-{}", std::process::id());
        let t0 = Instant::now();
        match Sandbox::start(&cfg, &host, &id) {
            Ok(sb) => {
                let ready = t0.elapsed();
                match sb.version() {
                    Ok(v) => {
                        row(
                            "boot:",
                            &format!(
                                "agent ready in {:.2} s on {}",
                                ready.as_secs_f64(),
                                sb.backend().name()
                            ),
                        );
                        row(
                            "agent:",
                            &format!("husk-agent {} (API {})", v.agent_version, v.api_version),
                        );
                        row(
                            "guest kernel:",
                            &format!("{} {} {}", v.kernel_release, v.machine, v.kernel_version),
                        );
                        let stages: Vec<String> = v
                            .boot_stages
                            .iter()
                            .map(|s| format!("{} {:.0} ms", s.name, s.boottime_ns as f64 / 1e6))
                            .collect();
                        row("guest stages:", &stages.join(", "));
                    }
                    Err(e) => problems.push(format!("agent Version failed: {e}")),
                }
                if let Some(bundle) = &args.bundle {
                    let t0 = Instant::now();
                    match run_bundle(&sb, bundle) {
                        Ok(status) => row(
                            "container:",
                            &format!(
                                "{} exited {status} in {:.2} s",
                                bundle.display(),
                                t0.elapsed().as_secs_f64()
                            ),
                        ),
                        Err(e) => problems.push(format!("running {}: {e}", bundle.display())),
                    }
                }
                if let Err(e) = sb.stop() {
                    problems.push(format!("stopping the sandbox failed: {e}"));
                }
            }
            Err(e) => problems.push(format!("booting a sandbox failed: {e}")),
        }
    }

    if problems.is_empty() {
        let c = choice.expect("no problems means a backend was chosen");
        let slow = if c.degraded {
            " (slow: software emulation)"
        } else {
            ""
        };
        println!(
            "verdict: OK: husk can run sandboxes here with {}{slow}",
            c.kind.name()
        );
        Ok(0)
    } else {
        for p in &problems {
            eprintln!("problem: {p}");
        }
        println!(
            "verdict: NOT READY: {} problem(s), see above",
            problems.len()
        );
        Ok(1)
    }
}
