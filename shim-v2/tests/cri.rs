//! Kubernetes' way in: the kubelet's API (CRI v1), served by containerd 1.6's own CRI plugin,
//! with `husk` as the pod's runtime handler (what a RuntimeClass names). The tests play the
//! kubelet: RunPodSandbox, CreateContainer and StartContainer for two containers, ExecSync,
//! ContainerStatus, StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox. The pause
//! container and both containers share one VM; their output reaches the CRI log files; exit
//! codes come back; a pod with a CNI network is reached over it from the host; afterwards
//! nothing is left (no shim, VM, virtiofsd, mount, run dir or bridge). Skips only when
//! containerd, ctr, umoci, QEMU or the CNI plugins are not installed.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{finish, husk_containerd, qemu_size, qemus};
use husk_tests::containerd::{
    skip_reason, Containerd, CNI_BIN_DIR, CRI_SUBNET6_PREFIX, CRI_SUBNET_PREFIX,
};
use husk_tests::cri::v1::{
    ContainerStatsRequest, DnsConfig, ExecSyncRequest, Int64Value, LinuxContainerConfig,
    LinuxContainerResources, LinuxContainerSecurityContext, ListPodSandboxRequest, Mount,
    NamespaceMode, PodSandboxState, PodSandboxStatusRequest, RemoveContainerRequest,
    StopContainerRequest, UInt64Value, UpdateContainerResourcesRequest, VersionRequest,
};
use husk_tests::cri::{container_config, pod_config, wait_for_log_line, Cri, RemovePodOnPanic};
use husk_tests::{cgroup_dirs, cgroups_of, cri_call, http_get};

/// The runtime handler (containerd's `runtimes.husk`, a RuntimeClass's `handler`).
const HANDLER: &str = "husk";

/// ExecSync of `sh -c script` in container `id`: (exit code, stdout, stderr).
fn exec_sync(cri: &mut Cri, id: &str, script: &str, cd: &Containerd) -> (i32, String, String) {
    let r = cri_call!(
        cri,
        exec_sync,
        ExecSyncRequest {
            container_id: id.to_string(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 60,
        }
    )
    .unwrap_or_else(|e| panic!("ExecSync {script:?}: {e}\n{}", cd.log()));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (r.exit_code, text(&r.stdout), text(&r.stderr))
}

/// [`wait_for_log_line`], panicking with containerd's log.
fn wait_for_log(path: &Path, stream: &str, text: &str, cd: &Containerd) -> String {
    wait_for_log_line(path, stream, text).unwrap_or_else(|e| panic!("{e}\n{}", cd.log()))
}

/// A pod with its own network (CNI's bridge plugin: a veth `eth0` with an address from
/// host-local, a default route): the VM takes over `eth0` (tap + tc redirect, virtio-net with
/// its MAC, the guest agent sets address and routes). The test reaches the pod's HTTP server
/// from the host at the IP CRI reports, and the container sees that IP on its `eth0`.
#[test]
fn cri_pod_network_reaches_the_vm() {
    pod_with_two_containers("cri_pod_network_reaches_the_vm", NamespaceMode::Pod);
}

/// A pod on the node's network (`hostNetwork: true`: no CNI, no hostname): the VM's own.
#[test]
fn cri_host_network_pod_with_two_containers_runs_in_one_vm() {
    pod_with_two_containers(
        "cri_host_network_pod_with_two_containers_runs_in_one_vm",
        NamespaceMode::Node,
    );
}

fn pod_with_two_containers(test: &str, network: NamespaceMode) {
    if let Some(why) = skip_reason(&["qemu-system-x86_64", "umoci"]) {
        eprintln!("SKIP {test}: {why}");
        return;
    }
    if network == NamespaceMode::Pod && !Path::new(CNI_BIN_DIR).join("bridge").exists() {
        eprintln!("SKIP {test}: no CNI bridge plugin in {CNI_BIN_DIR} (scripts/deps.sh installs containernetworking-plugins)");
        return;
    }
    let cd = husk_containerd(|b| b.cri());
    let mut cri = Cri::connect(cd.address());
    let v = cri_call!(cri, version, VersionRequest::default())
        .unwrap_or_else(|e| panic!("CRI Version: {e}\n{}", cd.log()));
    assert_eq!(v.runtime_name, "containerd", "{v:?}");

    let logs = cd.dir().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut pod = pod_config("husk-pod", &logs, network);
    let pod_net = network == NamespaceMode::Pod;
    // The pod's DNS as the kubelet sets it (cluster DNS server, search domains): containerd
    // writes the pod's resolv.conf on the host and bind-mounts it into each container.
    pod.dns_config = Some(DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["default.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    // The host-network pod has limits: the kubelet passes the sum of its containers' limits
    // (1.5 CPUs, 128 MiB) in the pod's config, containerd annotates the sandbox container with
    // them, and the VM is sized to hold them.
    let limits = !pod_net;
    // The kubelet's pod cgroup (cgroupfs driver): containerd puts the sandbox container at
    // <parent>/<pod id>, and husk puts the VM's host processes there.
    let cgroup_parent = format!(
        "/husk-test-pods/{}",
        cd.dir()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches('.')
    );
    pod.linux.as_mut().unwrap().cgroup_parent = cgroup_parent.clone();
    if limits {
        pod.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 150_000,
            memory_limit_in_bytes: 128 << 20,
            ..Default::default()
        });
    }
    let pod_id = cri
        .run_pod(&pod, HANDLER)
        .unwrap_or_else(|e| panic!("{e}\n{}", cd.log()));
    let _cleanup = RemovePodOnPanic {
        sock: cd.address().to_path_buf(),
        id: pod_id.clone(),
    };
    let status = cri_call!(
        cri,
        pod_sandbox_status,
        PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.clone(),
            verbose: false,
        }
    )
    .unwrap()
    .status
    .unwrap();
    assert_eq!(status.state, PodSandboxState::SandboxReady as i32);
    assert_eq!(status.runtime_handler, HANDLER);
    let network_status = status.network.unwrap_or_default();
    let pod_ip = network_status.ip.clone();
    let pod_ip6 = network_status
        .additional_ips
        .first()
        .map(|i| i.ip.clone())
        .unwrap_or_default();
    if pod_net {
        assert!(pod_ip.starts_with(CRI_SUBNET_PREFIX), "pod IP {pod_ip:?}");
        assert!(
            pod_ip6.starts_with(CRI_SUBNET6_PREFIX),
            "pod IPv6 {network_status:?}"
        );
    }

    // Volumes as the kubelet mounts them: an emptyDir (a host directory) in both containers,
    // and a read-only configMap file in c1.
    let empty_dir = cd.dir().join("empty-dir");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let config_file = cd.dir().join("app.conf");
    std::fs::write(&config_file, "answer=42\n").unwrap();
    let volume = |container_path: &str, host_path: &Path, readonly: bool| Mount {
        container_path: container_path.into(),
        host_path: host_path.display().to_string(),
        readonly,
        ..Default::default()
    };
    let mut create_and_start = |name: &str, script: &str, mounts: Vec<Mount>| -> String {
        let mut config = container_config(name, script);
        config.mounts = mounts;
        if name == "c2" {
            // runAsUser / runAsGroup.
            config.linux = Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    run_as_user: Some(Int64Value { value: 1000 }),
                    run_as_group: Some(Int64Value { value: 1000 }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        cri.create_and_start(&pod_id, &pod, config)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", cd.log()))
    };
    // c1 serves its /etc over HTTP on port 8080 (on the pod's address when it has one), after
    // leaving a note in the shared volume.
    let c1 = create_and_start(
        "c1",
        "echo hello-from-c1; echo to-stderr >&2; echo note-from-c1 > /data/note; \
         exec httpd -f -p 8080 -h /etc",
        vec![
            volume("/data", &empty_dir, false),
            volume("/etc/app/app.conf", &config_file, true),
        ],
    );
    // c2, as user 1000 and group 1000, reads c1's note through the shared volume.
    let c2 = create_and_start(
        "c2",
        "until [ -s /data/note ]; do sleep 0.1; done; cat /data/note; \
         echo user=$(id -u):$(id -g); echo c2 on $(hostname); exit 3",
        vec![volume("/data", &empty_dir, false)],
    );
    wait_for_log(&logs.join("c1.log"), "stdout", "hello-from-c1", &cd);
    wait_for_log(&logs.join("c1.log"), "stderr", "to-stderr", &cd);
    wait_for_log(&logs.join("c2.log"), "stdout", "note-from-c1", &cd);
    wait_for_log(&logs.join("c2.log"), "stdout", "user=1000:1000", &cd);
    assert_eq!(
        std::fs::read_to_string(empty_dir.join("note")).unwrap(),
        "note-from-c1\n",
        "the volume on the host"
    );
    if pod_net {
        wait_for_log(&logs.join("c2.log"), "stdout", "c2 on husk-pod", &cd);
    }

    // The pause container and both containers: one VM, in the pod's cgroup.
    let vms = qemus(&cd);
    assert_eq!(vms.len(), 1, "one VM for the pod: {vms:?}");
    let pod_cgroup = format!("{cgroup_parent}/{pod_id}");
    let cgroups = cgroups_of(vms[0].0);
    assert!(
        !cgroups.is_empty() && cgroups.iter().all(|c| c.ends_with(&pod_cgroup)),
        "QEMU's cgroups {cgroups:?}, not {pod_cgroup}"
    );
    let expected = if limits { ("2", "384M") } else { ("1", "256M") };
    assert_eq!(
        qemu_size(&vms[0].1),
        (expected.0.into(), expected.1.into()),
        "VM size (default: 1 vCPU, 256 MiB)"
    );

    // c2 ended with its own exit code.
    let c2_status = cri.wait_exited(&c2, Duration::from_secs(60));
    assert_eq!(c2_status.exit_code, 3, "{c2_status:?}");
    // The kubelet restarts it (restartPolicy: Always): a new container of the same name,
    // attempt 1, in the same pod and VM.
    let mut again = container_config("c2", "echo restarted");
    again.metadata.as_mut().unwrap().attempt = 1;
    again.log_path = "c2-1.log".into();
    let c2_again = cri
        .create_and_start(&pod_id, &pod, again)
        .unwrap_or_else(|e| panic!("c2 attempt 1: {e}\n{}", cd.log()));
    wait_for_log(&logs.join("c2-1.log"), "stdout", "restarted", &cd);
    let again_status = cri.wait_exited(&c2_again, Duration::from_secs(60));
    assert_eq!(again_status.exit_code, 0, "{again_status:?}");
    assert_eq!(qemus(&cd).len(), 1, "still one VM");

    // ExecSync: the kubelet's exec probes and `kubectl exec` without a tty.
    assert_eq!(
        exec_sync(
            &mut cri,
            &c1,
            "echo exec-out; echo exec-err >&2; exit 4",
            &cd
        ),
        (4, "exec-out\n".into(), "exec-err\n".into())
    );

    // The files CRI bind-mounts into every container (resolv.conf, hosts, hostname) come
    // through from the host.
    let (code, out, err) = exec_sync(
        &mut cri,
        &c1,
        "cat /etc/resolv.conf; echo ---; cat /etc/hosts; echo ---; cat /etc/hostname",
        &cd,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("nameserver 10.96.0.10")
            && out.contains("search default.svc.cluster.local")
            && out.contains("options ndots:5"),
        "pod resolv.conf: {out}"
    );
    assert!(out.contains("localhost"), "pod /etc/hosts: {out}");
    if pod_net {
        assert!(out.trim_end().ends_with("husk-pod"), "pod hostname: {out}");
    }

    // c1 runs with CRI's default capabilities (the bounding set runc gets from containerd:
    // no CAP_SYS_ADMIN, CAP_NET_ADMIN, ...), not all of them.
    let (_, out, _) = exec_sync(&mut cri, &c1, "grep CapBnd /proc/self/status", &cd);
    assert_eq!(out.trim(), "CapBnd:\t00000000a80425fb", "c1's capabilities");

    // The configMap file: readable, not writable.
    let (code, out, err) = exec_sync(
        &mut cri,
        &c1,
        "cat /etc/app/app.conf; echo changed > /etc/app/app.conf",
        &cd,
    );
    assert_eq!(out, "answer=42\n", "{err}");
    assert_ne!(code, 0, "a read-only volume was written: {err}");
    assert_eq!(
        std::fs::read_to_string(&config_file).unwrap(),
        "answer=42\n"
    );

    // ContainerStats (what `kubectl top` and the kubelet's eviction read): the cgroup v2
    // metrics from inside the VM, decoded by containerd's CRI plugin.
    let stats = cri_call!(
        cri,
        container_stats,
        ContainerStatsRequest {
            container_id: c1.clone()
        }
    )
    .unwrap_or_else(|e| panic!("ContainerStats: {e}\n{}", cd.log()))
    .stats
    .expect("container stats");
    let value = |v: Option<UInt64Value>| v.map(|v| v.value).unwrap_or(0);
    let memory = stats.memory.expect("memory stats");
    let working_set = value(memory.working_set_bytes);
    assert!(
        working_set > 0 && working_set < 512 << 20,
        "working set {working_set} B: {memory:?}"
    );
    let cpu = value(stats.cpu.expect("cpu stats").usage_core_nano_seconds);
    assert!(cpu > 0, "cpu usage {cpu} ns");

    if limits {
        // A container over its memory limit is killed in the VM, and containerd's CRI marks
        // it OOMKilled from the shim's TaskOOM event (what `kubectl describe pod` shows).
        let mut config = container_config("c3", "tail /dev/zero");
        config.linux = Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: 32 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
        let c3 = cri
            .create_and_start(&pod_id, &pod, config)
            .unwrap_or_else(|e| panic!("c3: {e}\n{}", cd.log()));
        let st = cri.wait_exited(&c3, Duration::from_secs(60));
        assert_eq!(
            (st.exit_code, st.reason.as_str()),
            (137, "OOMKilled"),
            "{st:?}"
        );
        // UpdateContainerResources (in-place pod resize): the new limit reaches the
        // container's cgroup in the VM.
        let memory_max = "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max";
        let (_, before, _) = exec_sync(&mut cri, &c1, memory_max, &cd);
        assert_eq!(before.trim(), "max", "c1 has no memory limit yet");
        cri_call!(
            cri,
            update_container_resources,
            UpdateContainerResourcesRequest {
                container_id: c1.clone(),
                linux: Some(LinuxContainerResources {
                    memory_limit_in_bytes: 200 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            }
        )
        .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", cd.log()));
        let (_, after, _) = exec_sync(&mut cri, &c1, memory_max, &cd);
        assert_eq!(after.trim(), (200u64 << 20).to_string(), "c1's memory.max");
    }

    if limits {
        // The guest sees the vCPUs.
        let (_, out, _) = exec_sync(&mut cri, &c1, "grep -c ^processor /proc/cpuinfo", &cd);
        assert_eq!(out.trim(), "2", "vCPUs in the guest");
    }

    if pod_net {
        // The container has the pod's addresses on eth0, and the pod's default routes.
        let (_, out, _) = exec_sync(
            &mut cri,
            &c1,
            "ip -o addr show eth0; ip route; ip -6 route",
            &cd,
        );
        assert!(out.contains(&format!("inet {pod_ip}/24")), "{out}");
        assert!(out.contains(&format!("inet6 {pod_ip6}/64")), "{out}");
        assert!(
            out.contains(&format!("default via {CRI_SUBNET_PREFIX}1 dev eth0")),
            "{out}"
        );
        assert!(
            out.contains(&format!("default via {CRI_SUBNET6_PREFIX}1 dev eth0")),
            "{out}"
        );
        // The host reaches the pod's server at the pod's IPs, through the bridge, the veth,
        // the tap and the VM's virtio-net device.
        for ip in [&pod_ip, &pod_ip6] {
            let page = http_get(ip, 8080, "/passwd");
            assert!(page.contains("root:x:0:0"), "{ip}: {page}");
        }
    }

    // The kubelet's teardown.
    cri_call!(
        cri,
        stop_container,
        StopContainerRequest {
            container_id: c1.clone(),
            timeout: 5,
        }
    )
    .unwrap_or_else(|e| panic!("StopContainer: {e}\n{}", cd.log()));
    for id in [&c1, &c2] {
        cri_call!(
            cri,
            remove_container,
            RemoveContainerRequest {
                container_id: id.clone(),
            }
        )
        .unwrap_or_else(|e| panic!("RemoveContainer: {e}\n{}", cd.log()));
    }
    cri.stop_and_remove_pod(&pod_id)
        .unwrap_or_else(|e| panic!("{e}\n{}", cd.log()));
    let left = cgroup_dirs(&pod_cgroup);
    assert!(left.is_empty(), "the pod's cgroups are left: {left:?}");
    // The pod cgroups themselves are the kubelet's to remove.
    for dir in cgroup_dirs(&cgroup_parent) {
        std::fs::remove_dir(&dir).unwrap_or_else(|e| panic!("removing {dir:?}: {e}"));
    }
    for dir in cgroup_dirs("/husk-test-pods") {
        let _ = std::fs::remove_dir(&dir); // another test's pod may still be in it
    }
    let pods = cri_call!(cri, list_pod_sandbox, ListPodSandboxRequest::default())
        .unwrap()
        .items;
    assert!(pods.is_empty(), "{pods:?}");

    finish(cd);
}
