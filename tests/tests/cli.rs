//! The `husk` binary: `check` reports the host and ends with a verdict,
//! `--boot` boots a sandbox and prints the agent's Version.

use std::process::Command;

#[test]
fn check_boot_prints_agent_version_and_ok_verdict() {
    if husk_tests::qemu_or_skip("check_boot_prints_agent_version_and_ok_verdict").is_none() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let cfg = husk_tests::e2e_config(run.path());
    let work = tempfile::tempdir().unwrap();
    let bundle = husk_tests::busybox_bundle(
        work.path(),
        "demo",
        &["sh", "-c", "echo hello from the guest; exit 3"],
        false,
        |_| {},
    );
    let out = Command::new(husk_tests::bin("husk"))
        .args(["check", "--boot", "--bundle"])
        .arg(&bundle)
        .env("HUSK_KERNEL", &cfg.kernel)
        .env("HUSK_INITRAMFS", &cfg.initramfs)
        .env("HUSK_RUN_DIR", run.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "agent:         husk-agent {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{stdout}"
    );
    assert!(stdout.contains("guest kernel:  6.1."), "{stdout}");
    assert!(stdout.contains("hello from the guest\n"), "{stdout}");
    assert!(stdout.contains(" exited 3 in "), "{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("verdict: OK: husk can run sandboxes here with qemu-"),
        "{last}"
    );
    husk_tests::assert_nothing_left(run.path());
}

#[test]
fn check_without_artifacts_says_not_ready_and_fails() {
    let run = tempfile::tempdir().unwrap();
    let out = Command::new(husk_tests::bin("husk"))
        .args(["check"])
        .env("HUSK_KERNEL", run.path().join("nope"))
        .env("HUSK_RUN_DIR", run.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stderr.contains("kernel missing: run guest-kernel/build.sh"),
        "{stderr}"
    );
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("verdict: NOT READY"),
        "{stdout}"
    );
}

#[test]
fn unknown_flags_are_refused() {
    let out = Command::new(husk_tests::bin("husk"))
        .args(["check", "--frobnicate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));
}
