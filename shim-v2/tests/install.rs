//! `scripts/install.sh` (what `make install` runs), staged under a
//! temporary DESTDIR with stand-in binaries and guest artifacts: it
//! installs binaries, kernel and initramfs where the README says, writes a
//! config file the shim parses (and keeps an existing one), prints the
//! containerd stanza, and refuses with what to run when a build is
//! missing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use husk_shim::config::ConfigFile;
use husk_tests::workspace_root;

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
