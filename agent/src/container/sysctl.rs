//! Network sysctls of containers that share the VM's network namespace.
//!
//! The host drops the network namespace from specs (the pod's network is
//! the VM's), so libcontainer would refuse `net.*` sysctls as "not allowed
//! in host network namespace". In a husk VM that namespace belongs to the
//! pod alone, so they are applied to it here, as runc applies them to the
//! container's own network namespace.

use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::{ContainerError, Result};

/// `/proc/sys` path of a sysctl key, refusing anything but a plain
/// dotted name.
fn proc_path(key: &str) -> Result<PathBuf> {
    let ok = !key.is_empty()
        && key.len() <= 256
        && key.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if !ok {
        return Err(ContainerError::InvalidArgument(format!(
            "invalid sysctl name {key:?}"
        )));
    }
    Ok(PathBuf::from("/proc/sys").join(key.replace('.', "/")))
}

/// Takes the `net.*` sysctls out of `spec` when it has no network
/// namespace of its own, and returns them as (path, value) to write.
pub fn take_shared_net_sysctls(spec: &mut Spec) -> Result<Vec<(PathBuf, String)>> {
    let Some(linux) = spec.linux_mut() else {
        return Ok(Vec::new());
    };
    let own_netns = linux
        .namespaces()
        .as_ref()
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::Network));
    let Some(mut sysctls) = linux.sysctl().clone() else {
        return Ok(Vec::new());
    };
    if own_netns {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = sysctls
        .keys()
        .filter(|k| k.starts_with("net."))
        .cloned()
        .collect();
    let mut out = Vec::new();
    for k in keys {
        let v = sysctls.remove(&k).unwrap_or_default();
        out.push((proc_path(&k)?, v));
    }
    linux.set_sysctl(Some(sysctls));
    Ok(out)
}

/// Writes the sysctls taken by [`take_shared_net_sysctls`].
pub fn apply(sysctls: &[(PathBuf, String)]) -> Result<()> {
    for (path, value) in sysctls {
        std::fs::write(path, value).map_err(|e| {
            ContainerError::InvalidArgument(format!("setting sysctl {}: {e}", path.display()))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn net_sysctls_move_out_only_without_a_network_namespace() {
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "pid"}],
                      "sysctl": {"net.ipv4.ping_group_range": "0 0", "kernel.shm_rmid_forced": "1"}}
        }));
        let taken = take_shared_net_sysctls(&mut s).unwrap();
        assert_eq!(
            taken,
            [(
                PathBuf::from("/proc/sys/net/ipv4/ping_group_range"),
                "0 0".to_string()
            )]
        );
        let left = s.linux().as_ref().unwrap().sysctl().clone().unwrap();
        assert_eq!(left.len(), 1);
        assert!(left.contains_key("kernel.shm_rmid_forced"));

        let mut own = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "network"}],
                      "sysctl": {"net.ipv4.ping_group_range": "0 0"}}
        }));
        assert!(take_shared_net_sysctls(&mut own).unwrap().is_empty());
    }

    #[test]
    fn sysctl_names_cannot_escape_proc_sys() {
        for bad in ["net/../../etc", "net..x", "", "net.a b", ".net"] {
            assert!(proc_path(bad).is_err(), "{bad:?}");
        }
    }
}
