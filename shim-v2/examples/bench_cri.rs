//! CRI benchmark, one table from one run: a Kubernetes pod's life as the kubelet drives it
//! through containerd 1.6's CRI plugin, with the runtime handlers `runc` and `husk`:
//! RunPodSandbox on a CNI bridge network, CreateContainer and StartContainer of busybox
//! `true`, until ContainerStatus says it exited ("pod up, container ran"); then StopPodSandbox
//! and RemovePodSandbox ("whole cycle"). Median and p90 wall time, and the ratio to runc. Run
//! by `bench/cri [runs]` (release build).

use std::time::{Duration, Instant};

use husk_tests::containerd::Containerd;
use husk_tests::cri::v1::NamespaceMode;
use husk_tests::cri::{container_config, pod_config, Cri};

mod bench_common;
use bench_common::{ms, runs_arg, start_with_release_shim, stats};

/// One pod: (to the container's exit, whole cycle), ms.
fn one_pod(
    cri: &mut Cri,
    logs: &std::path::Path,
    handler: &str,
    name: &str,
) -> anyhow::Result<(f64, f64)> {
    let dir = logs.join(name);
    std::fs::create_dir_all(&dir)?;
    let pod = pod_config(name, &dir, NamespaceMode::Pod);
    let t0 = Instant::now();
    let pod_id = cri.run_pod(&pod, handler).map_err(anyhow::Error::msg)?;
    let id = cri
        .create_and_start(&pod_id, &pod, container_config("c", "true"))
        .map_err(anyhow::Error::msg)?;
    let status = cri.wait_exited(&id, Duration::from_secs(120));
    anyhow::ensure!(status.exit_code == 0, "{handler}: `true` exited {status:?}");
    let up = ms(t0.elapsed());
    cri.stop_and_remove_pod(&pod_id)
        .map_err(anyhow::Error::msg)?;
    Ok((up, ms(t0.elapsed())))
}

fn main() -> anyhow::Result<()> {
    let runs = runs_arg()?;
    let cd = start_with_release_shim(Containerd::builder().cri())?;
    let mut cri = Cri::connect(cd.address());
    let logs = cd.dir().join("pod-logs");

    let mut results = Vec::new();
    for handler in ["runc", "husk"] {
        let (mut up, mut cycle) = (Vec::new(), Vec::new());
        for i in 0..=runs {
            let (u, c) = one_pod(&mut cri, &logs, handler, &format!("{handler}{i}"))?;
            if i > 0 {
                // The first is a warm-up.
                up.push(u);
                cycle.push(c);
            }
        }
        results.push((handler, stats(&up), stats(&cycle)));
    }
    let runc = results[0].1 .0;
    let runc_cycle = results[0].2 .0;
    println!(
        "CRI pods (containerd 1.6, CNI bridge network, busybox `true`), {runs} runs each after one warm-up"
    );
    println!(
        "{:<8} {:>28} {:>8} {:>28} {:>8}",
        "handler", "pod up, container ran: med/p90", "/ runc", "whole cycle: med/p90", "/ runc"
    );
    for (handler, (um, up90), (cm, cp90)) in &results {
        println!(
            "{handler:<8} {:>17.0} ms / {:>5.0} ms {:>7.1}x {:>17.0} ms / {:>5.0} ms {:>7.1}x",
            um,
            up90,
            um / runc,
            cm,
            cp90,
            cm / runc_cycle
        );
    }
    let left = cd.wait_for_no_processes();
    anyhow::ensure!(left.is_empty(), "processes left behind: {left:?}");
    cd.stop_and_check();
    Ok(())
}
