//! Container benchmark, one table from one run: `true` in a fresh sandbox
//! and in a running one (beside `runc run` of the same bundle), exec
//! latency, stdout throughput, virtio-fs sequential read against the
//! host's read of the same file. Run by `bench/containers`.

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use husk_runtime::host::HostProbe;
use husk_runtime::{Sandbox, Stdio};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run_to_exit(sb: &Sandbox, id: &str, bundle: &Path, out: Option<File>) -> anyhow::Result<i32> {
    sb.create_container(
        id,
        bundle,
        Stdio {
            stdout: out,
            ..Default::default()
        },
    )?;
    sb.start_container(id)?;
    let st = sb.wait(id, "")?;
    sb.delete_container(id)?;
    Ok(st)
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10);
    let run = tempfile::tempdir()?;
    let work = tempfile::tempdir()?;
    let host = HostProbe::detect();
    let cfg = husk_tests::e2e_config(run.path());
    let t_bundle = husk_tests::busybox_bundle(work.path(), "true", &["true"], false, |_| {});
    let mut rows: Vec<(String, String)> = Vec::new();

    // `true` in a fresh sandbox: boot + container.
    let mut fresh = Vec::new();
    for i in 0..runs.min(5) {
        let t0 = Instant::now();
        let sb = Sandbox::start(&cfg, &host, &format!("fresh{i}"))?;
        run_to_exit(&sb, "t", &t_bundle, None)?;
        fresh.push(ms(t0.elapsed()));
        sb.stop()?;
    }
    let fresh = median(fresh);

    // runc, same bundle, same host.
    let mut runc = Vec::new();
    if husk_runtime::host::which("runc").is_some() {
        for i in 0..runs {
            let t0 = Instant::now();
            let st = Command::new("runc")
                .args(["--root", &work.path().join("runc").display().to_string()])
                .args(["run", "-b"])
                .arg(&t_bundle)
                .arg(format!("bench{i}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()?;
            if st.success() {
                runc.push(ms(t0.elapsed()));
            }
        }
    }

    let sb = Sandbox::start(&cfg, &host, "bench")?;
    let mut warm = Vec::new();
    for i in 0..runs {
        let t0 = Instant::now();
        run_to_exit(&sb, &format!("w{i}"), &t_bundle, None)?;
        warm.push(ms(t0.elapsed()));
    }
    let warm = median(warm);
    rows.push((
        "true, fresh sandbox (boot + run)".into(),
        format!("{fresh:.0} ms"),
    ));
    rows.push(("true, running sandbox".into(), format!("{warm:.0} ms")));
    if !runc.is_empty() {
        let r = median(runc);
        rows.push(("true, runc run".into(), format!("{r:.0} ms")));
        rows.push((
            "husk/runc, running sandbox".into(),
            format!("{:.1}x", warm / r),
        ));
        rows.push((
            "husk/runc, fresh sandbox".into(),
            format!("{:.1}x", fresh / r),
        ));
    } else {
        rows.push(("true, runc run".into(), "runc not installed".into()));
    }

    // Exec latency.
    let long = husk_tests::busybox_bundle(work.path(), "long", &["sleep", "100000"], false, |_| {});
    sb.create_container("long", &long, Stdio::default())?;
    sb.start_container("long")?;
    let process: oci_spec::runtime::Process = serde_json::from_value(serde_json::json!({
        "args": ["true"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    }))?;
    let mut exec = Vec::new();
    for i in 0..runs {
        let t0 = Instant::now();
        sb.exec("long", &format!("e{i}"), &process, Stdio::default())?;
        sb.wait("long", &format!("e{i}"))?;
        exec.push(ms(t0.elapsed()));
    }
    rows.push((
        "exec true, latency".into(),
        format!("{:.0} ms", median(exec)),
    ));

    // stdout throughput.
    let mib = 64u64;
    let dd = husk_tests::busybox_bundle(
        work.path(),
        "dd",
        &[
            "dd",
            "if=/dev/zero",
            "bs=64k",
            &format!("count={}", mib * 16),
        ],
        false,
        |_| {},
    );
    let t0 = Instant::now();
    run_to_exit(
        &sb,
        "dd",
        &dd,
        Some(File::create(work.path().join("dd.out"))?),
    )?;
    let secs = t0.elapsed().as_secs_f64();
    rows.push((
        "stdout, 64 MiB".into(),
        format!("{:.1} MB/s", (mib << 20) as f64 / secs / 1e6),
    ));

    // virtio-fs sequential read vs the host, both cold.
    let vol = work.path().join("vol");
    std::fs::create_dir(&vol)?;
    let data: Vec<u8> = (0..(mib << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(vol.join("big"), &data)?;
    drop_caches();
    let t0 = Instant::now();
    let n = std::fs::read(vol.join("big"))?.len();
    let host_mbs = n as f64 / t0.elapsed().as_secs_f64() / 1e6;
    let rd = husk_tests::busybox_bundle(
        work.path(),
        "rd",
        &["sh", "-c", "cat /v/big > /dev/null"],
        false,
        |c| {
            c["mounts"].as_array_mut().unwrap().push(
            serde_json::json!({"destination": "/v", "type": "bind", "source": vol, "options": ["rbind", "ro"]}),
        );
        },
    );
    drop_caches();
    let t0 = Instant::now();
    run_to_exit(&sb, "rd", &rd, None)?;
    // Container start/exit overhead is subtracted with the `true` median.
    let guest_secs = (t0.elapsed().as_secs_f64() - warm / 1e3).max(1e-3);
    let guest_mbs = n as f64 / guest_secs / 1e6;
    rows.push((
        "virtio-fs read, 64 MiB cold".into(),
        format!("{guest_mbs:.0} MB/s"),
    ));
    rows.push((
        "host read, same file cold".into(),
        format!("{host_mbs:.0} MB/s"),
    ));
    rows.push((
        "virtio-fs / host".into(),
        format!("{:.2}", guest_mbs / host_mbs),
    ));
    sb.kill("long", "", 9, false)?;
    sb.wait("long", "")?;
    sb.stop()?;

    println!(
        "backend: {} ({}), {runs} runs per median",
        cfg.backend_choice(&host, false)?.kind.name(),
        host.kvm.describe()
    );
    for (k, v) in rows {
        println!("{k:<36} {v:>18}");
    }
    Ok(())
}
