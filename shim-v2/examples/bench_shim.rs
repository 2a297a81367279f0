//! containerd benchmark, one table from one run: `ctr run --rm busybox
//! true` through a private containerd 1.6 with husk's shim
//! (`io.containerd.husk.v2`), runc's (`io.containerd.runc.v2`) and, where
//! installed, gVisor's runsc (its own shim `io.containerd.runsc.v1`, or
//! else runc's shim driving `runsc --network=none`, as Debian ships no
//! runsc shim): median and p90 wall
//! time and the ratio to runc; husk's time split into VM boot (spawn to
//! agent ready), VM stop, and the rest (ctr, containerd, shim start,
//! rootfs, container create/start/exit/delete), from the shim's own log
//! lines. Run by `bench/shim [runs]` (release build).

use std::time::Instant;

use husk_runtime::host::which;
use husk_tests::containerd::{Containerd, IMAGE};

mod bench_common;
use bench_common::{ms, runs_arg, start_with_release_shim, stats};

/// The number in the shim's log line `sandbox <id> <what> in <n> ms`.
fn shim_ms(log: &str, id: &str, what: &str) -> Option<f64> {
    let needle = format!("sandbox {id} {what} in ");
    log.lines().rev().find_map(|l| {
        let rest = &l[l.find(&needle)? + needle.len()..];
        rest.split(' ').next()?.parse().ok()
    })
}

struct Runtime {
    name: &'static str,
    flags: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let runs = runs_arg()?;
    let b = Containerd::builder();
    // gVisor's netstack needs a network the private containerd does not
    // set up: no network, through its shim's config or a wrapper.
    let runsc_config = b.dir().join("runsc.toml");
    std::fs::write(&runsc_config, "[runsc_config]\n  network = \"none\"\n")?;
    let runsc_wrapper = b.dir().join("runsc-none");
    let runsc_root = b.dir().join("runsc-root");
    let cd = start_with_release_shim(b)?;

    let mut runtimes = vec![
        Runtime {
            name: "runc",
            flags: vec!["--runtime".into(), "io.containerd.runc.v2".into()],
        },
        Runtime {
            name: "husk",
            flags: vec!["--runtime".into(), "io.containerd.husk.v2".into()],
        },
    ];
    let runsc = which("runsc");
    match (&runsc, which("containerd-shim-runsc-v1")) {
        (Some(_), Some(_)) => runtimes.push(Runtime {
            name: "runsc",
            flags: vec![
                "--runtime".into(),
                "io.containerd.runsc.v1".into(),
                "--runtime-config-path".into(),
                runsc_config.display().to_string(),
            ],
        }),
        (Some(bin), None) => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(
                &runsc_wrapper,
                format!("#!/bin/sh\nexec {} --network=none \"$@\"\n", bin.display()),
            )?;
            std::fs::set_permissions(&runsc_wrapper, std::fs::Permissions::from_mode(0o755))?;
            runtimes.push(Runtime {
                name: "runsc (runc shim)",
                flags: vec![
                    "--runtime".into(),
                    "io.containerd.runc.v2".into(),
                    "--runc-binary".into(),
                    runsc_wrapper.display().to_string(),
                    "--runc-root".into(),
                    runsc_root.display().to_string(),
                ],
            })
        }
        _ => {}
    }

    let mut results = Vec::new();
    let (mut boot, mut stop, mut rest) = (Vec::new(), Vec::new(), Vec::new());
    for rt in &runtimes {
        let mut times = Vec::new();
        for i in 0..=runs {
            let id = format!("{}{i}", rt.name.split(' ').next().unwrap_or("x"));
            let mut args = vec!["run", "--rm"];
            args.extend(rt.flags.iter().map(String::as_str));
            args.extend([IMAGE, id.as_str(), "true"]);
            let t0 = Instant::now();
            let (code, _, err) = cd.with_stdin(&args, b"");
            let t = ms(t0.elapsed());
            anyhow::ensure!(code == 0, "{}: ctr run exited {code}: {err}", rt.name);
            if i == 0 {
                continue; // warm-up
            }
            times.push(t);
            if rt.name == "husk" {
                let log = cd.log();
                let b = shim_ms(&log, &id, "ready").unwrap_or(f64::NAN);
                let s = shim_ms(&log, &id, "stopped").unwrap_or(f64::NAN);
                boot.push(b);
                stop.push(s);
                rest.push(t - b - s);
            }
        }
        results.push((rt.name, stats(&times)));
    }

    let runc = results
        .iter()
        .find(|(n, _)| *n == "runc")
        .map(|(_, s)| s.0)
        .unwrap_or(f64::NAN);
    println!("`ctr run --rm busybox true`, {runs} runs each (after one warm-up), containerd 1.6");
    println!("{:<34} {:>9} {:>9} {:>8}", "", "median", "p90", "/ runc");
    for (name, (med, p90)) in &results {
        println!(
            "{:<34} {:>6.0} ms {:>6.0} ms {:>7.1}x",
            name,
            med,
            p90,
            med / runc
        );
    }
    if runsc.is_none() {
        println!("{:<34} not installed", "runsc");
    }
    for (what, v) in [
        ("husk: VM boot (spawn to agent)", &boot),
        ("husk: VM stop", &stop),
        ("husk: rest (ctr, containerd, shim)", &rest),
    ] {
        let (med, p90) = stats(v);
        println!("{what:<34} {med:>6.0} ms {p90:>6.0} ms");
    }
    let left = cd.wait_for_no_processes();
    anyhow::ensure!(left.is_empty(), "processes left behind: {left:?}");
    cd.stop_and_check();
    Ok(())
}
