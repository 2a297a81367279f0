//! The host cgroup of a sandbox: the VM's host processes (the shim, the
//! VMM and its helpers) join the cgroup that the sandbox container's OCI
//! spec names in `linux.cgroupsPath`, in every mounted hierarchy, as runc
//! places a container's processes. Under Kubernetes that cgroup lies in the
//! kubelet's pod cgroup, so the pod's limits and accounting (and the node's
//! allocatable) cover the whole VM, not only what runs inside it.
//!
//! Nothing is limited here: the leaf is created empty of settings (the
//! pause container's own tiny CPU shares would starve the VM); the limits
//! are the parents'. The leaf is removed when the sandbox ends.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    /// Where it is mounted.
    mount: PathBuf,
    /// Its controllers (v1; `name=...` for a named hierarchy); empty for
    /// the unified (v2) hierarchy.
    controllers: BTreeSet<String>,
}

/// The cgroups mounted on this host, from `/proc/self/mountinfo` text: one
/// entry per hierarchy (the first mount of each).
fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(dev), Some(mount), Some(fstype)) = (left.get(2), left.get(4), right.first())
        else {
            continue;
        };
        let controllers = match *fstype {
            "cgroup2" => BTreeSet::new(),
            "cgroup" => right
                .get(2)
                .unwrap_or(&"")
                .split(',')
                .filter(|o| is_controller_option(o))
                .map(str::to_string)
                .collect(),
            _ => continue,
        };
        if seen.insert(dev.to_string()) {
            out.push(Hierarchy {
                mount: PathBuf::from(unescape_mount(mount)),
                controllers,
            });
        }
    }
    out
}

/// Whether a v1 cgroup super option names a controller (or a named
/// hierarchy) rather than a mount flag.
fn is_controller_option(o: &str) -> bool {
    !o.is_empty()
        && !matches!(
            o,
            "rw" | "ro"
                | "noprefix"
                | "clone_children"
                | "xattr"
                | "cpuset_v2_mode"
                | "favordynmods"
        )
        && !o.starts_with("release_agent=")
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// This process's cgroup in each hierarchy, from `/proc/self/cgroup` text:
/// (controllers, path); controllers empty for v2's `0::` line.
fn own_cgroups(proc_cgroup: &str) -> Vec<(BTreeSet<String>, String)> {
    proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            let set = ctrls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((set, path.to_string()))
        })
        .collect()
}

/// An OCI `cgroupsPath` as a path below a hierarchy's root: cgroupfs form
/// (`/kubepods/pod1/abc`, or relative to `own`, this process's cgroup), or
/// systemd form (`slice:prefix:name`, e.g.
/// `kubepods-besteffort-pod1.slice:cri-containerd:abc`, which is
/// `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope`).
/// `..` and empty components are refused.
pub fn resolve(cgroups_path: &str, own: &str) -> Result<PathBuf> {
    let bad = |why: &str| {
        Error::Config(format!(
            "linux.cgroupsPath {cgroups_path:?}: {why}; give a cgroupfs path (/parent/name) \
             or a systemd one (slice:prefix:name)"
        ))
    };
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    let path = if parts.len() == 3 && !cgroups_path.starts_with('/') {
        let (slice, prefix, name) = (parts[0], parts[1], parts[2]);
        let slice = if slice.is_empty() {
            "system.slice"
        } else {
            slice
        };
        if name.is_empty() || name.contains('/') || prefix.contains('/') {
            return Err(bad("the systemd unit name is empty or has a /"));
        }
        let unit = if name.ends_with(".slice") {
            name.to_string()
        } else if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        expand_slice(slice)
            .ok_or_else(|| bad("not a systemd slice name"))?
            .join(unit)
    } else if cgroups_path.contains(':') {
        return Err(bad("a : outside the systemd form"));
    } else if cgroups_path.starts_with('/') {
        PathBuf::from(cgroups_path)
    } else {
        Path::new("/").join(own).join(cgroups_path)
    };
    let clean = path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !clean || path == Path::new("/") {
        return Err(bad("it must name a cgroup below the root, without .."));
    }
    Ok(path)
}

/// systemd's slice nesting: `a-b-c.slice` is `/a.slice/a-b.slice/a-b-c.slice`,
/// `-.slice` the root. None for a name that is not a slice.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let base = slice.strip_suffix(".slice")?;
    if base == "-" {
        return Some(PathBuf::from("/"));
    }
    if base.is_empty()
        || base.contains('/')
        || base.contains("--")
        || base.starts_with('-')
        || base.ends_with('-')
    {
        return None;
    }
    let mut path = PathBuf::from("/");
    let mut prefix = String::new();
    for part in base.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

/// The leaf cgroups (one per hierarchy) that this process, and so the
/// sandbox's host processes it spawns afterwards, joined; see the module
/// doc. Dropping it moves this process back and removes the leaves: drop
/// it once the VM's processes are gone.
#[derive(Debug)]
pub struct HostCgroup {
    /// The leaf directories, one per hierarchy.
    leaves: Vec<PathBuf>,
    /// Where this process was before, per hierarchy (same order).
    before: Vec<PathBuf>,
}

impl HostCgroup {
    /// Creates the cgroup `cgroups_path` (an OCI `linux.cgroupsPath`, see
    /// [`resolve`]) in every mounted hierarchy and moves this process (with
    /// its threads) into it; the VMM and helpers it spawns afterwards start
    /// there. On failure the process is moved back and what was created is
    /// removed.
    pub fn join(cgroups_path: &str) -> Result<HostCgroup> {
        let pid = std::process::id();
        let mut cg = HostCgroup {
            leaves: Vec::new(),
            before: Vec::new(),
        };
        for p in placements(cgroups_path)? {
            let joined = create(&p.hierarchy, &p.leaf)
                .and_then(|()| write_pid(&p.leaf, pid))
                .map_err(|source| Error::Io {
                    context: format!("joining cgroup {:?} (linux.cgroupsPath)", p.leaf),
                    source,
                });
            if let Err(e) = joined {
                let _ = std::fs::remove_dir(&p.leaf);
                return Err(e); // dropping `cg` leaves what was joined
            }
            cg.leaves.push(p.leaf);
            cg.before.push(p.before);
        }
        Ok(cg)
    }

    /// The leaf directories joined, one per hierarchy.
    pub fn leaves(&self) -> &[PathBuf] {
        &self.leaves
    }

    /// Removes the leaves of `cgroups_path` in every hierarchy, for a
    /// sandbox whose processes are gone (after a crash: `delete`).
    pub fn remove(cgroups_path: &str) {
        for p in placements(cgroups_path).unwrap_or_default() {
            remove_leaf(&p.leaf);
        }
    }
}

/// Where `cgroups_path` puts this process in one hierarchy.
struct Placement {
    hierarchy: Hierarchy,
    /// The leaf cgroup's directory.
    leaf: PathBuf,
    /// This process's cgroup there now.
    before: PathBuf,
}

/// The placements of `cgroups_path` in every mounted hierarchy this
/// process is in (from `/proc/self/mountinfo` and `/proc/self/cgroup`).
fn placements(cgroups_path: &str) -> Result<Vec<Placement>> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("reading {path}"),
            source,
        })
    };
    let own = own_cgroups(&read("/proc/self/cgroup")?);
    let mut out = Vec::new();
    for h in hierarchies(&read("/proc/self/mountinfo")?) {
        let Some((_, own_path)) = own.iter().find(|(c, _)| *c == h.controllers) else {
            continue; // not a hierarchy of this process's view
        };
        let rel = resolve(cgroups_path, own_path)?;
        out.push(Placement {
            leaf: h.mount.join(rel.strip_prefix("/").unwrap_or(&rel)),
            before: h.mount.join(own_path.trim_start_matches('/')),
            hierarchy: h,
        });
    }
    Ok(out)
}

/// Creates `leaf` and its missing parents; in a v1 cpuset hierarchy each new
/// cgroup gets its parent's CPUs and memory nodes (a new cpuset is empty,
/// and a process cannot join an empty one).
fn create(h: &Hierarchy, leaf: &Path) -> std::io::Result<()> {
    let cpuset = h.controllers.contains("cpuset");
    let mut missing = Vec::new();
    let mut p = leaf;
    while !p.exists() && p.starts_with(&h.mount) && p != h.mount {
        missing.push(p.to_path_buf());
        p = p.parent().unwrap_or(&h.mount);
    }
    for dir in missing.iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if cpuset {
            let parent = dir.parent().unwrap_or(&h.mount);
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let mine = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
                if mine.trim().is_empty() {
                    let theirs = std::fs::read_to_string(parent.join(file))?;
                    std::fs::write(dir.join(file), theirs.trim())?;
                }
            }
        }
    }
    Ok(())
}

fn write_pid(dir: &Path, pid: u32) -> std::io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}

/// Removes an empty leaf cgroup, retrying while its last processes exit.
fn remove_leaf(leaf: &Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(leaf) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                tracing::warn!("removing cgroup {leaf:?}: {e}");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Drop for HostCgroup {
    /// Moves this process back where it was and removes the leaves (waiting
    /// up to 2 s each for processes still leaving them: the VM's, just
    /// killed). Errors are logged: this runs on the way out.
    fn drop(&mut self) {
        let pid = std::process::id();
        for (leaf, before) in self.leaves.iter().zip(&self.before) {
            if let Err(e) = write_pid(before, pid) {
                tracing::warn!("moving pid {pid} back to {before:?}: {e}");
            }
            remove_leaf(leaf);
        }
    }
}

/// The `linux.cgroupsPath` of an OCI spec; None when unset or empty.
pub fn cgroups_path_of(spec: &oci_spec::runtime::Spec) -> Option<String> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.display().to_string())
        .filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset,clone_children
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
42 31 0:38 / /mnt/again rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn hierarchies_come_from_mountinfo_once_each() {
        let h = hierarchies(HYBRID);
        let found: Vec<(String, Vec<String>)> = h
            .iter()
            .map(|h| {
                (
                    h.mount.display().to_string(),
                    h.controllers.iter().cloned().collect(),
                )
            })
            .collect();
        assert_eq!(
            found,
            vec![
                (
                    "/sys/fs/cgroup/cpu,cpuacct".into(),
                    vec!["cpu".into(), "cpuacct".into()]
                ),
                ("/sys/fs/cgroup/cpuset".into(), vec!["cpuset".into()]),
                ("/sys/fs/cgroup/systemd".into(), vec!["name=systemd".into()]),
                ("/sys/fs/cgroup/unified".into(), vec![]),
            ]
        );
    }

    #[test]
    fn own_cgroups_match_hierarchies_by_controllers() {
        let own = own_cgroups("4:memory:/process_api/x\n1:cpu,cpuacct:/\n0::/user.slice\n");
        let cpu: BTreeSet<String> = ["cpuacct", "cpu"].iter().map(|s| s.to_string()).collect();
        assert!(own.contains(&(cpu, "/".into())));
        assert!(own.contains(&(BTreeSet::new(), "/user.slice".into())));
    }

    #[test]
    fn cgroups_paths_resolve_in_both_forms() {
        let r = |p: &str| resolve(p, "/own").map(|p| p.display().to_string());
        assert_eq!(r("/kubepods/pod1/abc").unwrap(), "/kubepods/pod1/abc");
        assert_eq!(r("husk/abc").unwrap(), "/own/husk/abc");
        assert_eq!(
            r("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
        );
        assert_eq!(r(":libpod:abc").unwrap(), "/system.slice/libpod-abc.scope");
        assert_eq!(r("-.slice::abc").unwrap(), "/abc.scope");
        for bad in [
            "/",
            "/a/../../etc",
            "../x",
            "a-.slice:p:n",
            "notaslice:p:n",
            "s.slice:p:",
            "s.slice:p:a/b",
            "/a:b",
        ] {
            let e = resolve(bad, "/own").unwrap_err().to_string();
            assert!(e.contains("cgroupsPath"), "{bad}: {e}");
        }
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }
}
