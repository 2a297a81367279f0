//! From an OCI bundle on the host to a spec the guest can run: the rootfs
//! and bind-mount volumes are bind-mounted into the sandbox's shared
//! directory (exported by virtiofsd) and the spec's paths are rewritten to
//! where the guest sees them. Namespaces that name host paths or would cut
//! the container off the pod network are adjusted.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::error::{Error, Result};
use crate::shared_fs::{BindMount, GUEST_SHARED_DIR};

/// One host path to expose in the share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    /// Host path (file or directory).
    pub source: PathBuf,
    /// Path relative to the share root.
    pub share_path: PathBuf,
    /// Mount it read-only.
    pub readonly: bool,
}

/// What a bundle needs from the host, and its rewritten spec.
#[derive(Debug)]
pub struct Plan {
    /// The spec with guest paths.
    pub spec: Spec,
    /// Rootfs first, then volumes.
    pub exposures: Vec<Exposure>,
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Reads `<bundle>/config.json`.
pub fn load_spec(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    if !path.is_file() {
        return Err(Error::Config(format!(
            "bundle {bundle:?} has no config.json (is this an OCI bundle?)"
        )));
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io(format!("reading {path:?}"), e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Config(format!("invalid {path:?}: {e}")))
}

/// Plans the host side of a container: which host paths go into the share
/// and the spec rewritten to guest paths. Pure (reads only metadata).
pub fn plan(mut spec: Spec, bundle: &Path, container_id: &str) -> Result<Plan> {
    let root = spec
        .root()
        .clone()
        .ok_or_else(|| Error::Config("config.json has no root".into()))?;
    let host_root = if root.path().is_absolute() {
        root.path().clone()
    } else {
        bundle.join(root.path())
    };
    if !host_root.is_dir() {
        return Err(Error::Config(format!(
            "container rootfs {host_root:?} is missing or not a directory"
        )));
    }
    if spec.process().is_none() {
        return Err(Error::Config("config.json has no process".into()));
    }
    let share = PathBuf::from(container_id);
    let guest = |rel: &Path| Path::new(GUEST_SHARED_DIR).join(rel);
    let mut exposures = vec![Exposure {
        source: host_root,
        share_path: share.join("rootfs"),
        readonly: root.readonly().unwrap_or(false),
    }];
    let mut new_root = root.clone();
    new_root.set_path(guest(&share.join("rootfs")));
    spec.set_root(Some(new_root));

    if let Some(mounts) = spec.mounts().clone() {
        let mut out = Vec::with_capacity(mounts.len());
        for (i, mut m) in mounts.into_iter().enumerate() {
            if is_bind(&m) {
                let src = m.source().clone().ok_or_else(|| {
                    Error::Config(format!("bind mount to {:?} has no source", m.destination()))
                })?;
                if !src.is_absolute() {
                    return Err(Error::Config(format!(
                        "bind mount source {src:?} must be absolute"
                    )));
                }
                if !src.exists() {
                    return Err(Error::Config(format!(
                        "bind mount source {src:?} does not exist"
                    )));
                }
                let name = src
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let rel = share.join("volumes").join(format!("{i}-{name}"));
                let readonly = m
                    .options()
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|x| x == "ro"));
                exposures.push(Exposure {
                    source: src,
                    share_path: rel.clone(),
                    readonly,
                });
                m.set_source(Some(guest(&rel)));
            }
            out.push(m);
        }
        spec.set_mounts(Some(out));
    }

    if let Some(linux) = spec.linux_mut() {
        if let Some(ns) = linux.namespaces().clone() {
            let ns = ns
                .into_iter()
                // The pod's network is the VM's: containers share it.
                .filter(|n| n.typ() != LinuxNamespaceType::Network)
                .map(|mut n| {
                    // Host namespace paths mean nothing in the guest.
                    n.set_path(None);
                    n
                })
                .collect();
            linux.set_namespaces(Some(ns));
        }
    }
    Ok(Plan { spec, exposures })
}

/// Bind-mounts a plan's exposures under `share_root`; undone when the
/// returned guards drop.
pub fn expose(share_root: &Path, exposures: &[Exposure]) -> Result<Vec<BindMount>> {
    exposures
        .iter()
        .map(|e| BindMount::new(&e.source, &share_root.join(&e.share_path), e.readonly))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("rootfs")).unwrap();
        std::fs::write(d.path().join("config.json"), config).unwrap();
        d
    }

    const SPEC: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "terminal": false, "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs", "readonly": true},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "SRC", "options": ["rbind", "ro"]}
        ],
        "linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"},
            {"type": "mount"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}
        ]}
    }"#;

    #[test]
    fn rootfs_and_volumes_move_into_the_share() {
        let vol = tempfile::tempdir().unwrap();
        let d = bundle(&SPEC.replace("SRC", &vol.path().display().to_string()));
        let p = plan(load_spec(d.path()).unwrap(), d.path(), "c1").unwrap();
        let root = p.spec.root().as_ref().unwrap();
        assert_eq!(root.path(), Path::new("/run/husk/shared/c1/rootfs"));
        assert_eq!(p.exposures[0].source, d.path().join("rootfs"));
        assert!(p.exposures[0].readonly);
        let mounts = p.spec.mounts().as_ref().unwrap();
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        let vol_name = vol.path().file_name().unwrap().to_string_lossy();
        let guest_vol = format!("/run/husk/shared/c1/volumes/1-{vol_name}");
        assert_eq!(mounts[1].source().as_deref(), Some(Path::new(&guest_vol)));
        assert_eq!(p.exposures[1].source, vol.path());
        assert!(p.exposures[1].readonly);
        let ns = p
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap();
        let kinds: Vec<_> = ns.iter().map(|n| n.typ()).collect();
        assert_eq!(
            kinds,
            [
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Mount,
                LinuxNamespaceType::Ipc
            ]
        );
        assert!(ns.iter().all(|n| n.path().is_none()));
    }

    #[test]
    fn broken_bundles_are_refused_with_a_reason() {
        let d = tempfile::tempdir().unwrap();
        let e = load_spec(d.path()).unwrap_err().to_string();
        assert!(e.contains("has no config.json"), "{e}");
        std::fs::write(d.path().join("config.json"), "{not json").unwrap();
        let e = load_spec(d.path()).unwrap_err().to_string();
        assert!(e.contains("invalid"), "{e}");
        // Missing rootfs.
        std::fs::write(d.path().join("config.json"), SPEC.replace("SRC", "/")).unwrap();
        let e = plan(load_spec(d.path()).unwrap(), d.path(), "c1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rootfs") && e.contains("missing"), "{e}");
        // Missing volume source.
        let d = bundle(&SPEC.replace("SRC", "/nonexistent/vol"));
        let e = plan(load_spec(d.path()).unwrap(), d.path(), "c1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let d = bundle(&SPEC.replace("SRC", "relative/vol"));
        let e = plan(load_spec(d.path()).unwrap(), d.path(), "c1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be absolute"), "{e}");
    }
}
