//! `scripts/install.sh` (what `make install` runs). Staged under a
//! temporary DESTDIR with stand-in binaries and guest artifacts: it
//! installs binaries, kernel and initramfs where the README says, writes a
//! config file the shim parses (and keeps an existing one), prints the
//! containerd stanza, and refuses with what to run when a build is
//! missing. Installed for real (this build, into a temporary prefix): a
//! containerd whose only husk configuration is the printed stanza runs a
//! Kubernetes pod (CRI) on the installed shim, kernel and initramfs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{finish, qemus};
use husk_shim::config::ConfigFile;
use husk_tests::containerd::{skip_reason, Containerd};
use husk_tests::cri::v1::NamespaceMode;
use husk_tests::cri::{container_config, pod_config, wait_for_log_line, Cri, RemovePodOnPanic};
use husk_tests::{busybox_layout, e2e_config, target_dir, workspace_root};

fn install(dest: &Path, bins: &Path, artifacts: &Path) -> Output {
    Command::new("bash")
        .arg(workspace_root().join("scripts/install.sh"))
        .env("DESTDIR", dest)
        .env("HUSK_BIN_DIR", bins)
        .env("HUSK_KERNEL", artifacts.join("vmlinux"))
        .env("HUSK_INITRAMFS", artifacts.join("initramfs.cpio"))
        .env_remove("PREFIX")
        .env_remove("HUSK_DATA_DIR")
        .env_remove("HUSK_CONF_DIR")
        .output()
        .expect("running bash")
}

#[test]
fn install_script_stages_binaries_artifacts_config_and_prints_the_stanza() {
    let d = tempfile::tempdir().unwrap();
    let (bins, artifacts, dest) = (
        d.path().join("bins"),
        d.path().join("art"),
        d.path().join("dest"),
    );
    std::fs::create_dir_all(&bins).unwrap();
    std::fs::create_dir_all(&artifacts).unwrap();
    for b in ["husk", "containerd-shim-husk-v2", "husk-vsock"] {
        let p = bins.join(b);
        std::fs::write(&p, format!("#!/bin/sh\necho {b}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(artifacts.join("vmlinux"), "kernel").unwrap();
    std::fs::write(artifacts.join("initramfs.cpio"), "initramfs").unwrap();

    let out = install(&dest, &bins, &artifacts);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "install.sh: {out:?}");
    for b in ["husk", "containerd-shim-husk-v2", "husk-vsock"] {
        let p = dest.join("usr/local/bin").join(b);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o755, 0o755, "{p:?}");
    }
    assert!(
        !dest.join("usr/local/bin/husk-vmm").exists(),
        "not built, not installed"
    );
    let data = dest.join("usr/share/husk");
    assert_eq!(
        std::fs::read_to_string(data.join("vmlinux")).unwrap(),
        "kernel"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("initramfs.cpio")).unwrap(),
        "initramfs"
    );
    let conf = dest.join("etc/husk/config.toml");
    let text = std::fs::read_to_string(&conf).unwrap();
    let parsed = ConfigFile::parse(&text, &conf).unwrap();
    assert_eq!(
        parsed.kernel.as_deref(),
        Some(Path::new("/usr/share/husk/vmlinux"))
    );
    assert_eq!(
        parsed.initramfs.as_deref(),
        Some(Path::new("/usr/share/husk/initramfs.cpio"))
    );
    assert_eq!(parsed.backend.as_deref(), Some("auto"));
    assert_eq!(
        (parsed.default_vcpus, parsed.default_memory_mib),
        (Some(1), Some(256))
    );
    assert!(
        stdout.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk]")
            && stdout.contains("runtime_type = \"io.containerd.husk.v2\"")
            && stdout.contains("ConfigPath = \"/etc/husk/config.toml\""),
        "stanza: {stdout}"
    );

    // An existing config is kept.
    std::fs::write(&conf, "default_vcpus = 4\n").unwrap();
    let out = install(&dest, &bins, &artifacts);
    assert!(out.status.success(), "second install.sh: {out:?}");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "default_vcpus = 4\n"
    );

    // Nothing built: a refusal that says what to run.
    let out = install(&dest, &d.path().join("nothing"), &artifacts);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("run `make`"), "{err}");
    std::fs::remove_file(artifacts.join("vmlinux")).unwrap();
    let out = install(&dest, &bins, &artifacts);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("guest kernel"),
        "{err}"
    );
}

/// `make install` of this build into a temporary prefix (no DESTDIR, so the
/// paths in the config and stanza are the real ones), then a containerd
/// with the CRI plugin whose husk runtime is configured by the printed
/// stanza alone, its shim found on PATH in the installed bin directory and
/// no `HUSK_*` variable in its environment but the run directory (so the
/// test can check that nothing is left there). A pod with the handler
/// `husk` runs a container, whose output reaches the CRI log; its VM boots
/// the installed kernel, named by the installed config file.
#[test]
fn installed_husk_runs_a_pod_through_the_printed_stanza() {
    let test = "installed_husk_runs_a_pod_through_the_printed_stanza";
    if let Some(why) = skip_reason(&["qemu-system-x86_64", "umoci"]) {
        eprintln!("SKIP {test}: {why}");
        return;
    }
    let mut b = Containerd::builder();
    let d = b.dir().to_path_buf();
    let (prefix, data, conf, run) = (
        d.join("usr"),
        d.join("share/husk"),
        d.join("etc/husk"),
        d.join("run"),
    );
    let guest = e2e_config(&run);
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/install.sh"))
        .env("PREFIX", &prefix)
        .env("HUSK_DATA_DIR", &data)
        .env("HUSK_CONF_DIR", &conf)
        .env("HUSK_BIN_DIR", target_dir())
        .env("HUSK_KERNEL", &guest.kernel)
        .env("HUSK_INITRAMFS", &guest.initramfs)
        .env_remove("DESTDIR")
        .output()
        .expect("running bash");
    assert!(out.status.success(), "install.sh: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stanza: String = stdout
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = conf.join("config.toml");
    assert!(
        stanza.contains(&format!("ConfigPath = \"{}\"", config.display())),
        "stanza: {stanza}"
    );
    let version = Command::new(prefix.join("bin/husk"))
        .arg("--version")
        .output()
        .expect("running the installed husk");
    assert!(version.status.success(), "husk --version: {version:?}");

    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HUSK_") {
            b = b.env_remove(key);
        }
    }
    let cd = b
        .cri()
        .husk_stanza(stanza)
        .shim(prefix.join("bin/containerd-shim-husk-v2"))
        .env("HUSK_RUN_DIR", &run)
        .start();
    cd.import_busybox(&busybox_layout());

    let mut cri = Cri::connect(cd.address());
    let logs = d.join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = pod_config("installed", &logs, NamespaceMode::Node);
    let pod_id = cri
        .run_pod(&pod, "husk")
        .unwrap_or_else(|e| panic!("{e}\n{}", cd.log()));
    let _cleanup = RemovePodOnPanic {
        sock: cd.address().to_path_buf(),
        id: pod_id.clone(),
    };
    let id = cri
        .create_and_start(
            &pod_id,
            &pod,
            container_config("c", "echo from-installed-husk"),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", cd.log()));
    wait_for_log_line(&logs.join("c.log"), "stdout", "from-installed-husk")
        .unwrap_or_else(|e| panic!("{e}\n{}", cd.log()));
    assert_eq!(cri.wait_exited(&id, Duration::from_secs(60)).exit_code, 0);
    let vms = qemus(&cd);
    let kernel = data.join("vmlinux").display().to_string();
    assert!(
        vms.len() == 1 && vms[0].1.contains(&kernel),
        "one VM booting {kernel}: {vms:?}"
    );
    cri.stop_and_remove_pod(&pod_id)
        .unwrap_or_else(|e| panic!("{e}\n{}", cd.log()));
    finish(cd);
}
