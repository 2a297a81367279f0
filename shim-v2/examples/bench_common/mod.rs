//! What the containerd benchmarks share: statistics and the private containerd running this
//! build's release shim.

use std::time::Duration;

use husk_tests::containerd::{Builder, Containerd};

/// (median, p90) of `v`, ms.
pub fn stats(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let p90 = ((v.len() as f64 * 0.9).ceil() as usize).clamp(1, v.len()) - 1;
    (v[v.len() / 2], v[p90])
}

/// The number of runs: the first argument, default 10, at least 1.
pub fn runs_arg() -> anyhow::Result<usize> {
    Ok(std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10)
        .max(1))
}

/// `d` in ms.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Starts the private containerd of `b` with `target/release/containerd-shim-husk-v2`, a
/// default husk config, a run root in its directory and the guest artifacts of
/// `HUSK_KERNEL` / `HUSK_INITRAMFS`; imports busybox.
pub fn start_with_release_shim(b: Builder) -> anyhow::Result<Containerd> {
    let release = husk_tests::workspace_root().join("target/release");
    let layout = husk_tests::busybox_layout();
    let config = b.dir().join("husk.toml");
    std::fs::write(&config, "# defaults\n")?;
    let run = b.dir().join("run");
    let mut b = b
        .shim(release.join("containerd-shim-husk-v2"))
        .env("HUSK_CONFIG", &config)
        .env("HUSK_RUN_DIR", &run);
    for var in ["HUSK_KERNEL", "HUSK_INITRAMFS"] {
        if let Some(v) = std::env::var_os(var) {
            b = b.env(var, v);
        }
    }
    let cd = b.start();
    cd.import_busybox(&layout);
    Ok(cd)
}
