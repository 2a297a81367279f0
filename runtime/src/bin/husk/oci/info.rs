//! ps, events, update, pause, resume, features, spec.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use husk_runtime::agent_client::AgentClient;
use oci_spec::runtime::LinuxResources;

use super::state::{Record, Root, Status, OCI_VERSION};
use super::Global;

fn running(g: &Global, id: &str) -> Result<(Root, Record)> {
    let root = Root::open(&g.root)?;
    let r = root.load(id)?;
    if matches!(r.current_status(), Status::Stopped | Status::Creating) {
        bail!("container {id} is not running");
    }
    Ok((root, r))
}

/// `husk ps`: the container's processes as guest pids (they live in the
/// VM, not on the host).
pub fn ps(g: &Global, id: &str, format: &str) -> Result<i32> {
    let (_, r) = running(g, id)?;
    let pids = AgentClient::dial(&r.vsock_uds)?.list_processes(id)?;
    match format {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            let procs = AgentClient::dial(&r.vsock_uds)?.process_details(id)?;
            let users = passwd_names(&r.rootfs.join("etc/passwd"));
            print!("{}", ps_table(&procs, &users, unix_now()));
        }
        f => bail!("invalid format option {f:?}: use table or json"),
    }
    Ok(0)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// uid → name from the container's /etc/passwd (the names `ps` inside it
/// would show).
fn passwd_names(path: &Path) -> std::collections::HashMap<u32, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.get(2)?.parse().ok()?, f.first()?.to_string()))
        })
        .collect()
}

/// `ps -ef`'s table (procps layout) of guest processes.
fn ps_table(
    procs: &[husk_protocols::agent::ProcessInfo],
    users: &std::collections::HashMap<u32, String>,
    now: u64,
) -> String {
    let mut out = format!(
        "{:<8} {:>5} {:>5} {:>2} {:>5} {:<8} {:>8} CMD\n",
        "UID", "PID", "PPID", "C", "STIME", "TTY", "TIME"
    );
    for p in procs {
        let user = users
            .get(&p.uid)
            .cloned()
            .unwrap_or_else(|| p.uid.to_string());
        let age = now.saturating_sub(p.start_unix_secs).max(1);
        let cpu = (p.cpu_ms / 10 / age).min(99);
        let day = p.start_unix_secs % 86_400;
        let stime = format!("{:02}:{:02}", day / 3600, day % 3600 / 60);
        let t = p.cpu_ms / 1000;
        let time = format!("{:02}:{:02}:{:02}", t / 3600, t % 3600 / 60, t % 60);
        out.push_str(&format!(
            "{user:<8} {:>5} {:>5} {cpu:>2} {stime:>5} {:<8} {time:>8} {}\n",
            p.pid, p.ppid, p.tty, p.cmd
        ));
    }
    out
}

fn stats_event(agent: &AgentClient, id: &str) -> Result<serde_json::Value> {
    let s = agent.stats_container(id)?;
    Ok(serde_json::json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {"usage": {"total": s.cpu_usage_usec * 1000}},
            "memory": {
                "usage": {"usage": s.memory_usage_bytes, "limit": s.memory_limit_bytes},
                "oom_kill": s.oom_kills,
            },
            "pids": {"current": s.pids_current},
        }
    }))
}

/// `husk events`: with `--stats` one stats event; otherwise a stats event
/// every `interval` (and an oom event per OOM kill) until the container
/// stops.
pub fn events(g: &Global, id: &str, stats: bool, interval: &str) -> Result<i32> {
    let (root, r) = running(g, id)?;
    let agent = AgentClient::dial(&r.vsock_uds)?;
    if stats {
        println!("{}", stats_event(&agent, id)?);
        return Ok(0);
    }
    let every = parse_duration(interval)?;
    let mut ooms = 0;
    loop {
        let r = root.load(id)?;
        if r.current_status() == Status::Stopped {
            return Ok(0);
        }
        let ev = match stats_event(&agent, id) {
            Ok(ev) => ev,
            // The VM went away with the container.
            Err(_) if root.load(id)?.current_status() == Status::Stopped => return Ok(0),
            Err(e) => return Err(e),
        };
        let now = ev["data"]["memory"]["oom_kill"].as_u64().unwrap_or(0);
        if now > ooms {
            println!("{}", serde_json::json!({"type": "oom", "id": id}));
            ooms = now;
        }
        println!("{ev}");
        std::thread::sleep(every);
    }
}

/// Go-style durations as runc takes them: `5s`, `500ms`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n
        .parse()
        .with_context(|| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("invalid duration {s:?}: use e.g. 5s, 500ms, 1m"),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        bail!("duration must be greater than 0");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `update` flags (runc's common subset; `-r` takes them all as JSON).
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// LinuxResources JSON file (`-` for stdin).
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long)]
    pub memory: Option<i64>,
    /// CPU shares.
    #[arg(long)]
    pub cpu_shares: Option<u64>,
    /// CPU CFS quota (µs per period).
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    /// CPU CFS period (µs).
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// CPUs the container may use.
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    /// Maximum number of pids.
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Container id.
    pub id: String,
}

/// `husk update`.
pub fn update(g: &Global, a: UpdateArgs) -> Result<i32> {
    let (_, r) = running(g, &a.id)?;
    let mut res: LinuxResources = match &a.resources {
        Some(p) if p == Path::new("-") => serde_json::from_reader(std::io::stdin())
            .context("reading LinuxResources JSON from stdin")?,
        Some(p) => serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{} is not LinuxResources JSON", p.display()))?,
        None => LinuxResources::default(),
    };
    if a.memory.is_some() {
        let mut m = res.memory().unwrap_or_default();
        m.set_limit(a.memory);
        res.set_memory(Some(m));
    }
    if a.cpu_shares.is_some()
        || a.cpu_quota.is_some()
        || a.cpu_period.is_some()
        || a.cpuset_cpus.is_some()
    {
        let mut c = res.cpu().clone().unwrap_or_default();
        if a.cpu_shares.is_some() {
            c.set_shares(a.cpu_shares);
        }
        if a.cpu_quota.is_some() {
            c.set_quota(a.cpu_quota);
        }
        if a.cpu_period.is_some() {
            c.set_period(a.cpu_period);
        }
        if a.cpuset_cpus.is_some() {
            c.set_cpus(a.cpuset_cpus.clone());
        }
        res.set_cpu(Some(c));
    }
    if let Some(l) = a.pids_limit {
        let mut p = res.pids().unwrap_or_default();
        p.set_limit(l);
        res.set_pids(Some(p));
    }
    AgentClient::dial(&r.vsock_uds)?.update_container(&a.id, serde_json::to_vec(&res)?)?;
    Ok(0)
}

/// `husk pause` / `husk resume`.
pub fn set_paused(g: &Global, id: &str, paused: bool) -> Result<i32> {
    let root = Root::open(&g.root)?;
    let r = root.load(id)?;
    match (r.current_status(), paused) {
        (Status::Running, true) | (Status::Paused, false) => {}
        (_, true) => bail!("container not running"),
        (_, false) => bail!("container not paused"),
    }
    let _lock = root.lock(id)?;
    AgentClient::dial(&r.vsock_uds)?.set_paused(id, paused)?;
    let mut r = root.load(id)?;
    r.status = if paused {
        Status::Paused
    } else {
        Status::Running
    };
    root.save(&r)?;
    Ok(0)
}

/// `husk features`: the OCI runtime features document.
pub fn features() -> Result<i32> {
    let caps: Vec<String> = caps_names();
    let doc = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": [],
        "mountOptions": [
            "async", "atime", "bind", "defaults", "dev", "diratime", "exec", "noatime",
            "nodev", "nodiratime", "noexec", "nosuid", "private", "rbind", "relatime",
            "remount", "ro", "rprivate", "rshared", "rslave", "rw", "shared", "slave",
            "strictatime", "suid", "sync"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": caps,
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                            "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG",
                            "SCMP_ACT_TRAP", "SCMP_ACT_TRACE"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE",
                              "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                "archs": ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.github.husk.version": env!("CARGO_PKG_VERSION"),
            "io.github.husk.isolation": "vm"
        }
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(0)
}

fn caps_names() -> Vec<String> {
    let names = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    names.iter().map(|n| format!("CAP_{n}")).collect()
}

/// `husk spec`: writes a default config.json into the bundle.
pub fn spec(bundle: &Path) -> Result<i32> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let spec = oci_spec::runtime::Spec::default();
    spec.save(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_table_has_procps_layout() {
        let mut p = husk_protocols::agent::ProcessInfo::new();
        p.pid = 1;
        p.uid = 0;
        p.start_unix_secs = 3600 * 14 + 60 * 51;
        p.tty = "?".into();
        p.cpu_ms = 49_000;
        p.cmd = "sleep 1000".into();
        let users = [(0, "root".to_string())].into_iter().collect();
        let t = ps_table(&[p], &users, 3600 * 15);
        let want = "UID        PID  PPID  C STIME TTY          TIME CMD\n\
                    root         1     0  9 14:51 ?        00:00:49 sleep 1000\n";
        assert_eq!(t, want);
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn capabilities_are_listed_with_their_prefix() {
        let caps = caps_names();
        assert_eq!(caps.len(), 41);
        assert!(caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
    }
}
