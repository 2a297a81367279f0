//! The private containerd the shim's end-to-end tests share.

use husk_tests::containerd::{Builder, Containerd, NS};
use husk_tests::{busybox_layout, e2e_config, processes_mentioning, target_dir};

/// The runtime name `ctr run --runtime` asks for.
pub const RUNTIME: &str = "io.containerd.husk.v2";

/// A private containerd (see `husk_tests::containerd`) whose shims find
/// this build's `containerd-shim-husk-v2` first in PATH and inherit the
/// guest artifacts, a private run root (`<dir>/run`) and an empty config
/// file (`<dir>/husk.toml`, so the host's /etc/husk/config.toml plays no
/// part); the busybox image is imported. The shim and husk-vsock (found
/// beside the shim) are copies in `<dir>/husk-bin`, so a rebuild of the
/// shared target directory during a test cannot pull them away.
#[allow(dead_code)] // not every test binary uses it
pub fn containerd_with_busybox() -> Containerd {
    husk_containerd(|b| b)
}

/// [`containerd_with_busybox`], with `extra` applied to the builder
/// before containerd starts (e.g. [`Builder::cri`]).
#[allow(dead_code)] // not every test binary uses it
pub fn husk_containerd(extra: impl FnOnce(Builder) -> Builder) -> Containerd {
    let layout = busybox_layout();
    let b = Containerd::builder();
    let run = b.dir().join("run");
    let cfg = e2e_config(&run);
    let own = b.dir().join("husk-bin");
    std::fs::create_dir_all(&own).unwrap();
    for name in ["containerd-shim-husk-v2", "husk-vsock"] {
        std::fs::copy(target_dir().join(name), own.join(name)).unwrap_or_else(|e| {
            panic!("copying {name}: {e} (run `cargo build --workspace --bins`)")
        });
    }
    let config = b.dir().join("husk.toml");
    std::fs::write(&config, "# the test's husk config: defaults\n").unwrap();
    let cd = extra(b)
        .shim(own.join("containerd-shim-husk-v2"))
        .env("HUSK_CONFIG", config)
        .env("HUSK_RUN_DIR", run)
        .env("HUSK_KERNEL", cfg.kernel)
        .env("HUSK_INITRAMFS", cfg.initramfs)
        .runtime(&["--runtime", RUNTIME])
        .start();
    cd.import_busybox(&layout);
    cd
}

/// The socket of the shim serving sandbox (grouping) `id`, as
/// containerd-shim derives it from containerd's address and namespace.
#[allow(dead_code)] // not every test binary uses it
pub fn shim_socket(cd: &Containerd, id: &str) -> std::path::PathBuf {
    let addr = containerd_shim::socket_address(&cd.address().display().to_string(), NS, id);
    addr.trim_start_matches("unix://").into()
}

/// No task or container is left in containerd, no process (shim, VM,
/// helpers) mentions its directory, the husk run root is empty, and once
/// containerd is stopped, nothing of it is left either.
#[allow(dead_code)] // not every test binary uses it
pub fn finish(cd: Containerd) {
    for what in ["tasks", "containers"] {
        let out = cd.ctr(&[what, "ls", "-q"]);
        assert!(out.status.success(), "ctr {what} ls: {out:?}");
        let left = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(left.is_empty(), "{what} left: {left}");
    }
    let left = cd.wait_for_no_processes();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let run = cd.dir().join("run");
    let entries: Vec<_> = std::fs::read_dir(&run)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "left in {run:?}: {entries:?}");
    cd.stop_and_check();
}

#[allow(dead_code)] // not every test binary uses it
/// QEMU processes of this containerd's sandboxes (their command lines
/// name the run root under its directory).
pub fn qemus(cd: &Containerd) -> Vec<(u32, String)> {
    processes_mentioning(&cd.dir().display().to_string())
        .into_iter()
        .filter(|(_, cmd)| {
            cmd.split(' ')
                .next()
                .is_some_and(|p| p.ends_with("qemu-system-x86_64"))
        })
        .collect()
}

/// The `-smp` and `-m` arguments of a QEMU command line (as [`qemus`]
/// gives them): the VM's vCPUs and memory.
#[allow(dead_code)] // not every test binary uses it
pub fn qemu_size(cmdline: &str) -> (String, String) {
    let args: Vec<&str> = cmdline.split(' ').collect();
    let after = |flag: &str| {
        let i = args
            .iter()
            .position(|a| *a == flag)
            .unwrap_or_else(|| panic!("no {flag} in {cmdline}"));
        args.get(i + 1).unwrap_or(&"").to_string()
    };
    (after("-smp"), after("-m"))
}
