//! Container state under `--root`: one directory per container holding
//! `state.json`, written whole and renamed into place, so a crash of any
//! husk process leaves either the old or the new record, never half of one.
//! Liveness comes from the monitor process (pid plus its start time, so a
//! recycled pid is not mistaken for it), never from the record alone.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The OCI runtime-spec version husk reports.
pub const OCI_VERSION: &str = "1.1.0";

/// Lifecycle status, as runc names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The VM is booting and the container is being created.
    Creating,
    /// Created; its process waits for `start`.
    Created,
    /// Started.
    Running,
    /// Frozen by `pause`.
    Paused,
    /// Its process exited (or its monitor is gone).
    Stopped,
}

impl Status {
    /// runc's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// What husk keeps about one container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Container id.
    pub id: String,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// The rootfs as config.json names it, made absolute.
    pub rootfs: PathBuf,
    /// Creation time, RFC 3339 in UTC.
    pub created: String,
    /// User name of the creator.
    pub owner: String,
    /// config.json annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Host pid of the monitor (the pid callers are given); 0 before it runs.
    pub pid: i32,
    /// The monitor's start time (field 22 of /proc/<pid>/stat).
    pub pid_start: u64,
    /// Last status written by a husk process.
    pub status: Status,
    /// Exit status (code, or 128 + signal) once stopped.
    #[serde(default)]
    pub exit_status: Option<i32>,
    /// The sandbox's directory under the husk run dir (VM sockets, share).
    pub sandbox_dir: PathBuf,
    /// The VM's hybrid-vsock socket (the agent's address).
    #[serde(default)]
    pub vsock_uds: PathBuf,
}

/// runc's `state` JSON for one container.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState<'a> {
    oci_version: &'static str,
    id: &'a str,
    pid: i32,
    status: &'static str,
    bundle: &'a Path,
    rootfs: &'a Path,
    created: &'a str,
    owner: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

impl Record {
    /// The status as of now: a record whose monitor is gone is stopped.
    pub fn current_status(&self) -> Status {
        match self.status {
            Status::Stopped => Status::Stopped,
            _ if self.pid > 0 && !process_matches(self.pid, self.pid_start) => Status::Stopped,
            s => s,
        }
    }

    /// runc's view of this record.
    pub fn oci_state(&self) -> OciState<'_> {
        let status = self.current_status();
        OciState {
            oci_version: OCI_VERSION,
            id: &self.id,
            pid: if status == Status::Stopped {
                0
            } else {
                self.pid
            },
            status: status.as_str(),
            bundle: &self.bundle,
            rootfs: &self.rootfs,
            created: &self.created,
            owner: &self.owner,
            annotations: &self.annotations,
        }
    }

    /// Whether the monitor process is still this container's.
    pub fn monitor_alive(&self) -> bool {
        self.pid > 0 && process_matches(self.pid, self.pid_start)
    }
}

/// Start time of a process (clock ticks since boot), if it exists.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    let state = *fields.first()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn process_matches(pid: i32, start: u64) -> bool {
    process_start_time(pid) == Some(start)
}

/// The `--root` directory.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// Opens (creating if needed) the state root.
    pub fn open(dir: &Path) -> Result<Root> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state root {}", dir.display()))?;
        Ok(Root {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory of container `id`.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Reserves `id`: fails if a container of that id exists.
    pub fn reserve(&self, id: &str) -> Result<PathBuf> {
        validate_id(id)?;
        let d = self.container_dir(id);
        match std::fs::create_dir(&d) {
            Ok(()) => Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("container with id exists: {id}")
            }
            Err(e) => Err(e).with_context(|| format!("creating {}", d.display())),
        }
    }

    /// Loads the record of `id`.
    pub fn load(&self, id: &str) -> Result<Record> {
        validate_id(id)?;
        let p = self.container_dir(id).join("state.json");
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("container does not exist")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        serde_json::from_slice(&text).with_context(|| {
            format!(
                "{} is damaged; remove the container with `husk delete -f {id}`",
                p.display()
            )
        })
    }

    /// Writes `r` atomically.
    pub fn save(&self, r: &Record) -> Result<()> {
        let dir = self.container_dir(&r.id);
        let tmp = dir.join(format!(".state.json.{}", std::process::id()));
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec(r)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join("state.json"))
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        Ok(())
    }

    /// Reads, changes and writes back a record under the container's lock.
    pub fn update(&self, id: &str, change: impl FnOnce(&mut Record)) -> Result<Record> {
        let _lock = self.lock(id)?;
        let mut r = self.load(id)?;
        change(&mut r);
        self.save(&r)?;
        Ok(r)
    }

    /// An exclusive lock on the container's directory (released on drop).
    pub fn lock(&self, id: &str) -> Result<nix::fcntl::Flock<std::fs::File>> {
        let f = std::fs::File::open(self.container_dir(id))
            .with_context(|| format!("container {id} does not exist"))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking container {id}: {e}"))
    }

    /// Ids of every container, sorted.
    pub fn ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?
            .flatten()
            .filter(|e| e.path().join("state.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Removes the container's directory.
    pub fn remove(&self, id: &str) -> Result<()> {
        let d = self.container_dir(id);
        match std::fs::remove_dir_all(&d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", d.display()))
            }
            _ => Ok(()),
        }
    }
}

/// runc's rule for ids: letters, digits, `_`, `+`, `-`, `.`; not `.` or `..`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 1024
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'));
    if !ok {
        bail!("invalid container id format: {id}");
    }
    Ok(())
}

/// Now, RFC 3339 with nanoseconds in UTC (runc's `created` format).
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_419), (2025, 11, 27));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn ids_follow_runc() {
        assert!(validate_id("abc-1.2_x+y").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "../x"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_start_time_is_read_and_dead_pids_are_stopped() {
        let me = std::process::id() as i32;
        let start = process_start_time(me).unwrap();
        let mut r = Record {
            id: "x".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: now_rfc3339(),
            owner: String::new(),
            annotations: BTreeMap::new(),
            pid: me,
            pid_start: start,
            status: Status::Running,
            exit_status: None,
            sandbox_dir: "/nonexistent".into(),
            vsock_uds: "/nonexistent/vsock.sock".into(),
        };
        assert_eq!(r.current_status(), Status::Running);
        r.pid_start += 1;
        assert_eq!(r.current_status(), Status::Stopped);
        assert_eq!(r.oci_state().pid, 0);
    }
}
