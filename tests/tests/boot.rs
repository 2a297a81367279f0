//! End to end: a sandbox VM on the QEMU backend (TCG on hosts without
//! hardware KVM) boots the guest kernel to husk-agent, which answers over
//! the husk vsock backend; then it stops, leaving nothing behind.

use std::time::Duration;

use husk_runtime::host::HostProbe;
use husk_runtime::Sandbox;
use husk_tests::{alive, assert_nothing_left, e2e_config, qemu_or_skip};

#[test]
fn sandbox_boots_to_agent_version_and_stops_clean() {
    if qemu_or_skip("sandbox_boots_to_agent_version_and_stops_clean").is_none() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let cfg = e2e_config(run.path());
    let host = HostProbe::detect();
    let sb = Sandbox::start(&cfg, &host, "boot1").unwrap();
    let v = sb.version().unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(v.kernel_release.starts_with("6.1."), "{}", v.kernel_release);
    assert_eq!(v.machine, "x86_64");
    let names: Vec<&str> = v.boot_stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["agent-start", "mounts-done", "agent-listening"]);
    let ns: Vec<u64> = v.boot_stages.iter().map(|s| s.boottime_ns).collect();
    assert!(ns.windows(2).all(|w| w[0] <= w[1]), "{ns:?}");
    assert!(v.boottime_ns >= ns[2]);
    assert!(sb.agent().check(Duration::from_secs(5)).unwrap());
    let pids = sb.pids();
    // auto: QEMU + husk-vsock + virtiofsd, or on hardware KVM with husk-vmm
    // found (HUSK_VMM), husk-vmm + virtiofsd.
    let expected = if sb.backend() == husk_runtime::hypervisor::BackendKind::HuskVmm {
        2
    } else {
        3
    };
    assert_eq!(pids.len(), expected, "{:?}: {pids:?}", sb.backend());
    let dir = sb.dir().to_path_buf();
    assert!(dir.join("console.log").exists());
    let exit = sb.stop().unwrap();
    // The guest powered itself off through the agent: QEMU exited 0.
    assert_eq!(exit.status.and_then(|s| s.code()), Some(0), "{exit:?}");
    assert!(!dir.exists());
    for p in pids {
        assert!(!alive(p), "pid {p} survived stop");
    }
    assert_nothing_left(run.path());
}

#[test]
fn dropping_a_sandbox_kills_its_vm() {
    if qemu_or_skip("dropping_a_sandbox_kills_its_vm").is_none() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let cfg = e2e_config(run.path());
    let sb = Sandbox::start(&cfg, &HostProbe::detect(), "dropped").unwrap();
    let pids = sb.pids();
    drop(sb);
    for p in pids {
        assert!(!alive(p), "pid {p} survived drop");
    }
    assert_nothing_left(run.path());
}

/// The same boot on the husk-vmm backend, wherever the host has hardware
/// KVM (vmx/svm), without a shared directory (husk-vmm alone).
#[test]
fn husk_vmm_sandbox_boots_to_agent_and_stops_clean_on_hardware_kvm() {
    let host = HostProbe::detect();
    if !host.kvm.runs_linux() {
        eprintln!(
            "SKIP husk_vmm_sandbox_boots_to_agent_and_stops_clean_on_hardware_kvm: {} \
             (vmm/tests/kvm_linux_boot.rs covers husk-vmm's clean failure there)",
            host.kvm.describe()
        );
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let mut cfg = e2e_config(run.path());
    cfg.backend =
        husk_runtime::config::BackendSetting::Fixed(husk_runtime::hypervisor::BackendKind::HuskVmm);
    cfg.shared_fs = false;
    if cfg.husk_vmm.is_none() {
        cfg.husk_vmm = Some(husk_tests::bin("husk-vmm"));
    }
    let sb = Sandbox::start(&cfg, &host, "vmmboot").unwrap();
    eprintln!("husk-vmm: agent ready {:?} after spawn", sb.ready_after());
    let v = sb.version().unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(v.kernel_release.starts_with("6.1."), "{}", v.kernel_release);
    assert!(sb.agent().check(Duration::from_secs(5)).unwrap());
    let pids = sb.pids();
    assert_eq!(pids.len(), 1, "husk-vmm alone: {pids:?}");
    let dir = sb.dir().to_path_buf();
    let exit = sb.stop().unwrap();
    assert_eq!(exit.status.and_then(|s| s.code()), Some(0), "{exit:?}");
    assert!(!dir.exists());
    assert!(!alive(pids[0]), "husk-vmm survived stop");
    assert_nothing_left(run.path());

    // Dropping the sandbox kills husk-vmm too.
    let sb = Sandbox::start(&cfg, &host, "vmmdrop").unwrap();
    let pids = sb.pids();
    drop(sb);
    assert!(!alive(pids[0]), "husk-vmm survived drop");
    assert_nothing_left(run.path());
}

/// husk-vmm with the sandbox's shared directory, on hardware KVM: virtiofsd
/// runs beside husk-vmm, whose virtio-fs device the agent mounts (tag
/// `husk`, in CreateSandbox: a failed mount fails the start); stop and drop
/// leave neither process behind. vmm/tests/kvm_virtio_fs.rs covers the
/// device with a tiny guest on any /dev/kvm.
#[test]
fn husk_vmm_sandbox_mounts_its_shared_dir_over_virtio_fs_on_hardware_kvm() {
    let test = "husk_vmm_sandbox_mounts_its_shared_dir_over_virtio_fs_on_hardware_kvm";
    let host = HostProbe::detect();
    if !host.kvm.runs_linux() {
        eprintln!("SKIP {test}: {}", host.kvm.describe());
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let mut cfg = e2e_config(run.path());
    cfg.backend =
        husk_runtime::config::BackendSetting::Fixed(husk_runtime::hypervisor::BackendKind::HuskVmm);
    cfg.shared_fs = true;
    if cfg.husk_vmm.is_none() {
        cfg.husk_vmm = Some(husk_tests::bin("husk-vmm"));
    }
    if cfg.virtiofsd().is_none() {
        eprintln!("SKIP {test}: virtiofsd is not installed");
        return;
    }
    let sb = Sandbox::start(&cfg, &host, "vmmfs").unwrap();
    eprintln!(
        "husk-vmm + virtio-fs: agent ready {:?} after spawn",
        sb.ready_after()
    );
    assert!(sb.shared_dir().is_some());
    let pids = sb.pids();
    assert_eq!(pids.len(), 2, "husk-vmm and virtiofsd: {pids:?}");
    let exit = sb.stop().unwrap();
    assert_eq!(exit.status.and_then(|s| s.code()), Some(0), "{exit:?}");
    for p in pids {
        assert!(!alive(p), "pid {p} survived stop");
    }
    assert_nothing_left(run.path());

    let sb = Sandbox::start(&cfg, &host, "vmmfsdrop").unwrap();
    let pids = sb.pids();
    drop(sb);
    for p in pids {
        assert!(!alive(p), "pid {p} survived drop");
    }
    assert_nothing_left(run.path());
}
