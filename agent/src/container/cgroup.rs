//! Reading and writing a container's cgroup v2 files in the guest: stats,
//! resource updates, OOM kills.

use std::path::{Path, PathBuf};

use husk_protocols::agent::StatsContainerResponse;
use oci_spec::runtime::LinuxResources;

/// Where the guest's cgroup2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup directory of a container, from its spec's cgroupsPath.
pub fn cgroup_dir(cgroups_path: &Path) -> PathBuf {
    let rel = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    Path::new(CGROUP_ROOT).join(rel)
}

fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// A `key value` line's value from a flat-keyed cgroup file.
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The container's OOM-kill count (memory.events `oom_kill`).
pub fn oom_kills(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("memory.events"))
        .ok()
        .and_then(|t| keyed(&t, "oom_kill"))
        .unwrap_or(0)
}

/// Pids in the container's cgroup.
pub fn pids(dir: &Path) -> std::io::Result<Vec<i32>> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Reads the container's resource usage.
pub fn stats(dir: &Path) -> StatsContainerResponse {
    let mut r = StatsContainerResponse::new();
    r.memory_usage_bytes = read_u64(dir, "memory.current").unwrap_or(0);
    // "max" (no limit) does not parse and reads as 0.
    r.memory_limit_bytes = read_u64(dir, "memory.max").unwrap_or(0);
    r.cpu_usage_usec = std::fs::read_to_string(dir.join("cpu.stat"))
        .ok()
        .and_then(|t| keyed(&t, "usage_usec"))
        .unwrap_or(0);
    r.pids_current = read_u64(dir, "pids.current").unwrap_or(0);
    r.oom_kills = oom_kills(dir);
    r
}

/// The cgroup v2 file writes that apply `res` (memory, cpu, pids).
pub fn update_writes(res: &LinuxResources) -> Vec<(&'static str, String)> {
    let mut w = Vec::new();
    if let Some(m) = res.memory() {
        if let Some(limit) = m.limit() {
            w.push((
                "memory.max",
                if limit < 0 {
                    "max".into()
                } else {
                    limit.to_string()
                },
            ));
        }
        if let Some(swap) = m.swap() {
            // OCI swap is memory+swap; v2 swap.max is swap alone.
            let v = match (swap, m.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l >= 0 => s.saturating_sub(l).max(0).to_string(),
                (s, _) => s.to_string(),
            };
            w.push(("memory.swap.max", v));
        }
    }
    if let Some(c) = res.cpu() {
        if c.quota().is_some() || c.period().is_some() {
            let quota = match c.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            w.push((
                "cpu.max",
                format!("{quota} {}", c.period().unwrap_or(100_000)),
            ));
        }
        if let Some(shares) = c.shares() {
            // The runc conversion from cgroup v1 shares to v2 weight.
            let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
            w.push(("cpu.weight", weight.to_string()));
        }
    }
    if let Some(p) = res.pids() {
        let l = p.limit();
        w.push((
            "pids.max",
            if l <= 0 { "max".into() } else { l.to_string() },
        ));
    }
    w
}

/// Applies `res` to the container's cgroup.
pub fn update(dir: &Path, res: &LinuxResources) -> std::io::Result<()> {
    for (file, value) in update_writes(res) {
        std::fs::write(dir.join(file), &value).map_err(|e| {
            std::io::Error::new(e.kind(), format!("writing {value:?} to {file}: {e}"))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_keyed_files() {
        assert_eq!(
            cgroup_dir(Path::new("/husk/c1")),
            Path::new("/sys/fs/cgroup/husk/c1")
        );
        assert_eq!(
            cgroup_dir(Path::new("husk/c1")),
            Path::new("/sys/fs/cgroup/husk/c1")
        );
        let ev = "low 0\nhigh 0\nmax 4\noom 1\noom_kill 2\n";
        assert_eq!(keyed(ev, "oom_kill"), Some(2));
        assert_eq!(keyed(ev, "oom"), Some(1));
        assert_eq!(keyed(ev, "nope"), None);
    }

    #[test]
    fn stats_from_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.path().join("memory.max"), "max\n").unwrap();
        std::fs::write(
            d.path().join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\n",
        )
        .unwrap();
        std::fs::write(d.path().join("pids.current"), "3\n").unwrap();
        std::fs::write(d.path().join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        let s = stats(d.path());
        assert_eq!(
            (
                s.memory_usage_bytes,
                s.memory_limit_bytes,
                s.cpu_usage_usec,
                s.pids_current,
                s.oom_kills
            ),
            (4096, 0, 1500, 3, 1)
        );
    }

    #[test]
    fn resource_updates_map_to_v2_files() {
        let res: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":67108864,"swap":134217728},"cpu":{"quota":50000,"period":100000,"shares":1024},"pids":{"limit":64}}"#,
        )
        .unwrap();
        let w = update_writes(&res);
        assert!(w.contains(&("memory.max", "67108864".into())));
        assert!(w.contains(&("memory.swap.max", "67108864".into())));
        assert!(w.contains(&("cpu.max", "50000 100000".into())));
        assert!(w.contains(&("cpu.weight", "39".into())));
        assert!(w.contains(&("pids.max", "64".into())));
        let unlimited: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":-1},"pids":{"limit":0}}"#).unwrap();
        let w = update_writes(&unlimited);
        assert_eq!(
            w,
            vec![("memory.max", "max".into()), ("pids.max", "max".into())]
        );
    }
}
