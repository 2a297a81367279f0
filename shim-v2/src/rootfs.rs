//! containerd's rootfs mounts (the snapshot: overlay, or a bind) on
//! `<bundle>/rootfs`, done in this process with mount(2). (The
//! containerd-shim crate's helper forks and waits through its SIGCHLD
//! reaper, which the shim turns off: husk-runtime reaps its own children.)

use std::path::Path;

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Result, ShimError};

/// Splits mount options into flags and the data string, as mount(8).
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, f) = match o.as_str() {
            "ro" => (true, MsFlags::MS_RDONLY),
            "rw" => (false, MsFlags::MS_RDONLY),
            "bind" => (true, MsFlags::MS_BIND),
            "rbind" => (true, MsFlags::MS_BIND | MsFlags::MS_REC),
            "nosuid" => (true, MsFlags::MS_NOSUID),
            "suid" => (false, MsFlags::MS_NOSUID),
            "nodev" => (true, MsFlags::MS_NODEV),
            "dev" => (false, MsFlags::MS_NODEV),
            "noexec" => (true, MsFlags::MS_NOEXEC),
            "exec" => (false, MsFlags::MS_NOEXEC),
            "noatime" => (true, MsFlags::MS_NOATIME),
            "relatime" => (true, MsFlags::MS_RELATIME),
            "sync" => (true, MsFlags::MS_SYNCHRONOUS),
            "remount" => (true, MsFlags::MS_REMOUNT),
            "defaults" => (true, MsFlags::empty()),
            _ => {
                data.push(o.as_str());
                continue;
            }
        };
        if set {
            flags |= f;
        } else {
            flags &= !f;
        }
    }
    (flags, data.join(","))
}

/// Mounts `mounts` in order on `<bundle>/rootfs`; returns whether anything
/// was mounted. On failure, what was mounted is undone.
pub fn mount_all(bundle: &Path, mounts: &[Mount]) -> Result<bool> {
    if mounts.is_empty() {
        return Ok(false);
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target)
        .map_err(|e| ShimError::io(format!("creating {target:?}"), e))?;
    for m in mounts {
        let (flags, data) = parse_options(&m.options);
        let ty =
            (!m.type_.is_empty() && !flags.contains(MsFlags::MS_BIND)).then_some(m.type_.as_str());
        let res = mount(
            Some(m.source.as_str()),
            &target,
            ty,
            flags & !MsFlags::MS_RDONLY,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .and_then(|()| {
            // A read-only bind needs a remount to take.
            if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
                mount(
                    None::<&str>,
                    &target,
                    None::<&str>,
                    flags | MsFlags::MS_REMOUNT,
                    None::<&str>,
                )
            } else if flags.contains(MsFlags::MS_RDONLY) {
                mount(
                    None::<&str>,
                    &target,
                    None::<&str>,
                    MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
            } else {
                Ok(())
            }
        });
        if let Err(e) = res {
            unmount(bundle);
            return Err(ShimError::io(
                format!(
                    "mounting the rootfs ({} {}) on {target:?}",
                    m.type_, m.source
                ),
                e.into(),
            ));
        }
    }
    Ok(true)
}

/// Unmounts everything on `<bundle>/rootfs`.
pub fn unmount(bundle: &Path) {
    let target = bundle.join("rootfs");
    while umount2(&target, MntFlags::MNT_DETACH).is_ok() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (f, d) = parse_options(&o(&[
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/l",
        ]));
        assert!(f.is_empty());
        assert_eq!(d, "index=off,workdir=/w,upperdir=/u,lowerdir=/l");
        let (f, d) = parse_options(&o(&["rbind", "ro", "nosuid"]));
        assert_eq!(
            f,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID
        );
        assert_eq!(d, "");
        let (f, _) = parse_options(&o(&["ro", "rw"]));
        assert!(f.is_empty());
    }

    #[test]
    fn bind_mount_and_unmount() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP bind_mount_and_unmount: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        let bundle = d.path().join("bundle");
        let m = Mount {
            type_: "bind".into(),
            source: src.display().to_string(),
            options: vec!["rbind".into(), "ro".into()],
            ..Default::default()
        };
        assert!(mount_all(&bundle, std::slice::from_ref(&m)).unwrap());
        assert_eq!(
            std::fs::read_to_string(bundle.join("rootfs/f")).unwrap(),
            "x"
        );
        assert!(
            std::fs::write(bundle.join("rootfs/g"), "y").is_err(),
            "read-only"
        );
        unmount(&bundle);
        assert!(!bundle.join("rootfs/f").exists());
        assert!(!mount_all(&bundle, &[]).unwrap());
    }
}
