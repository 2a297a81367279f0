//! The sandbox's shared directory: what virtiofsd exports to the guest.
//!
//! `<sandbox dir>/shared` is bind-mounted onto itself and made a *shared*
//! mount before virtiofsd starts, so bind mounts added under it later
//! (container rootfs, volumes) propagate into virtiofsd's private mount
//! namespace. Everything is unmounted (lazily, recursively) on teardown.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, Result};

/// Guest path where the agent mounts the share.
pub const GUEST_SHARED_DIR: &str = "/run/husk/shared";

fn mount_err(what: String) -> impl FnOnce(nix::Error) -> Error {
    move |e| Error::io(what, e.into())
}

/// The shared directory of one sandbox.
#[derive(Debug)]
pub struct SharedDir {
    path: PathBuf,
    mounted: bool,
}

impl SharedDir {
    /// Creates `path` as a shared self-bind mount.
    pub fn create(path: &Path) -> Result<SharedDir> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(format!("creating {path:?}"), e))?;
        let mut d = SharedDir {
            path: path.to_path_buf(),
            mounted: false,
        };
        mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(mount_err(format!(
            "bind-mounting {path:?} onto itself (husk must run as root)"
        )))?;
        d.mounted = true;
        mount(
            None::<&str>,
            path,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(mount_err(format!("making {path:?} a shared mount")))?;
        Ok(d)
    }

    /// The host path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts everything under the share and the share itself.
    pub fn teardown(&mut self) {
        if self.mounted {
            // MNT_DETACH takes the submounts too once they are unreachable.
            if let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH) {
                tracing::warn!("unmounting {:?}: {e}", self.path);
            }
            self.mounted = false;
        }
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A bind mount of a host path into the share, undone on drop.
#[derive(Debug)]
pub struct BindMount {
    target: PathBuf,
    mounted: bool,
}

impl BindMount {
    /// Bind-mounts `source` (file or directory) on `target`, creating the
    /// target; read-only when `readonly`.
    pub fn new(source: &Path, target: &Path, readonly: bool) -> Result<BindMount> {
        let meta = std::fs::metadata(source)
            .map_err(|e| Error::Config(format!("mount source {source:?}: {e}")))?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("creating {parent:?}"), e))?;
        }
        if meta.is_dir() {
            std::fs::create_dir_all(target)
        } else {
            std::fs::File::create(target).map(drop)
        }
        .map_err(|e| Error::io(format!("creating mount point {target:?}"), e))?;
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(mount_err(format!("bind-mounting {source:?} on {target:?}")))?;
        let m = BindMount {
            target: target.to_path_buf(),
            mounted: true,
        };
        if readonly {
            mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(mount_err(format!("making {target:?} read-only")))?;
        }
        Ok(m)
    }

    /// Unmounts it.
    pub fn unmount(&mut self) {
        if self.mounted {
            if let Err(e) = umount2(&self.target, MntFlags::MNT_DETACH) {
                tracing::warn!("unmounting {:?}: {e}", self.target);
            }
            self.mounted = false;
        }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Whether anything is mounted at or under `path` (for leak checks).
pub fn mounts_under(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == p || m.starts_with(&format!("{p}/")))
        .map(str::to_string)
        .collect()
}
