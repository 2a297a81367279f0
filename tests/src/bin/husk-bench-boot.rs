//! Boot benchmark: process spawn to agent ready, per backend available on
//! this host, with the host PSS of the VM's processes. Run by `bench/boot`.

use std::time::Duration;

use husk_runtime::config::BackendSetting;
use husk_runtime::host::HostProbe;
use husk_runtime::hypervisor::BackendKind;
use husk_runtime::Sandbox;

/// Proportional set size of a process in KiB, from smaps_rollup.
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// PSS in KiB of a process's mappings other than guest RAM (memfd-backed
/// mappings): the VMM's own overhead.
fn pss_without_guest_ram_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut guest = false;
    let mut total = 0;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            guest = line.contains("/memfd:");
        } else if let Some(v) = line.strip_prefix("Pss:") {
            if !guest {
                total += v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Row {
    backend: &'static str,
    ready_ms: Vec<f64>,
    guest_ms: Vec<f64>,
    pss_mib: Vec<f64>,
    overhead_mib: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10);
    let run = tempfile::tempdir()?;
    let host = HostProbe::detect();
    let mut backends = vec![BackendKind::QemuTcg];
    if host.kvm.runs_linux() {
        backends.insert(0, BackendKind::QemuKvm);
        // husk-vmm has no virtio-fs yet: its rows boot without the share.
        backends.insert(0, BackendKind::HuskVmm);
    } else {
        eprintln!(
            "husk-vmm: no row: {} cannot boot Linux",
            host.kvm.describe()
        );
    }
    // HUSK_BENCH_BACKENDS=husk-vmm,qemu-kvm limits the rows (e.g. on a
    // machine without QEMU).
    if let Ok(only) = std::env::var("HUSK_BENCH_BACKENDS") {
        let only: Vec<&str> = only.split(',').map(str::trim).collect();
        backends.retain(|b| only.contains(&b.name()));
    }
    eprintln!("host: {}; {runs} runs per backend", host.kvm.describe());
    let mut rows = Vec::new();
    for b in backends {
        let mut cfg = husk_tests::e2e_config(run.path());
        cfg.backend = BackendSetting::Fixed(b);
        cfg.shared_fs = b != BackendKind::HuskVmm;
        if b == BackendKind::HuskVmm {
            cfg.husk_vmm = Some(husk_tests::target_dir().join("husk-vmm"));
        }
        let mut row = Row {
            backend: b.name(),
            ready_ms: vec![],
            guest_ms: vec![],
            pss_mib: vec![],
            overhead_mib: vec![],
        };
        // One unmeasured warm-up boot (page cache, first-exec costs).
        Sandbox::start(&cfg, &host, "warmup")?.stop()?;
        for i in 0..runs {
            let sb = Sandbox::start(&cfg, &host, &format!("bench{i}"))?;
            row.ready_ms.push(sb.ready_after().as_secs_f64() * 1e3);
            let v = sb.version()?;
            if let Some(s) = v.boot_stages.iter().find(|s| s.name == "agent-listening") {
                row.guest_ms.push(s.boottime_ns as f64 / 1e6);
            }
            // Let the guest settle so PSS is of an idle, booted VM.
            std::thread::sleep(Duration::from_millis(200));
            let pss: u64 = sb.pids().iter().filter_map(|p| pss_kib(*p)).sum();
            row.pss_mib.push(pss as f64 / 1024.0);
            let overhead: u64 = sb
                .pids()
                .iter()
                .filter_map(|p| pss_without_guest_ram_kib(*p))
                .sum();
            row.overhead_mib.push(overhead as f64 / 1024.0);
            sb.stop()?;
        }
        rows.push(row);
    }
    println!(
        "{:<10} {:>5} {:>14} {:>11} {:>22} {:>15} {:>20}",
        "backend",
        "runs",
        "ready median",
        "ready p90",
        "guest kernel→agent med",
        "VM PSS median",
        "PSS w/o guest RAM med"
    );
    for r in &mut rows {
        for v in [
            &mut r.ready_ms,
            &mut r.guest_ms,
            &mut r.pss_mib,
            &mut r.overhead_mib,
        ] {
            v.sort_by(|a, b| a.total_cmp(b));
        }
        println!(
            "{:<10} {:>5} {:>11.0} ms {:>8.0} ms {:>19.0} ms {:>11.1} MiB {:>16.1} MiB",
            r.backend,
            r.ready_ms.len(),
            percentile(&r.ready_ms, 0.5),
            percentile(&r.ready_ms, 0.9),
            if r.guest_ms.is_empty() {
                f64::NAN
            } else {
                percentile(&r.guest_ms, 0.5)
            },
            percentile(&r.pss_mib, 0.5),
            percentile(&r.overhead_mib, 0.5),
        );
    }
    Ok(())
}
