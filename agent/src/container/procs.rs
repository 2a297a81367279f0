//! What `ps -ef` shows of a container's processes, read from the guest's
//! /proc (the host cannot see them: they live in the VM).

use husk_protocols::agent::ProcessInfo;

/// Clock ticks per second of /proc/<pid>/stat times.
fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// Boot time of the guest in Unix seconds (`btime` of /proc/stat).
fn boot_time() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `ps`'s TTY column from stat's tty_nr.
fn tty_name(tty_nr: u64) -> String {
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    match major {
        0 => "?".into(),
        136..=143 => format!("pts/{}", (major - 136) * 256 + minor),
        4 => format!("tty{minor}"),
        _ => format!("{major}:{minor}"),
    }
}

/// Parses one /proc/<pid>/stat line (the command name may hold spaces and
/// parentheses: fields follow the last ')').
fn parse_stat(pid: i32, stat: &str, ticks: u64, btime: u64) -> Option<ProcessInfo> {
    let comm_start = stat.find('(')?;
    let comm_end = stat.rfind(')')?;
    let comm = stat.get(comm_start + 1..comm_end)?.to_string();
    let f: Vec<&str> = stat.get(comm_end + 2..)?.split_whitespace().collect();
    // f[0] is field 3 (state).
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let mut p = ProcessInfo::new();
    p.pid = pid;
    p.ppid = f.get(1)?.parse().ok()?;
    p.tty = tty_name(num(4)?);
    p.cpu_ms = (num(11)? + num(12)?) * 1000 / ticks;
    p.start_unix_secs = btime + num(19)? / ticks;
    p.cmd = format!("[{comm}]");
    Some(p)
}

/// Details of `pids`; processes that exit meanwhile are left out.
pub fn describe(pids: &[i32]) -> Vec<ProcessInfo> {
    let (ticks, btime) = (ticks_per_sec(), boot_time());
    pids.iter()
        .filter_map(|&pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let mut p = parse_stat(pid, &stat, ticks, btime)?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            p.uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                let args: Vec<String> = raw
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                if !args.is_empty() {
                    p.cmd = args.join(" ");
                }
            }
            Some(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_with_odd_command_names() {
        let stat =
            "42 (a (b) c) S 1 42 42 34816 42 4194560 100 0 0 0 150 50 0 0 20 0 1 0 500 1000 10";
        let p = parse_stat(42, stat, 100, 1_000_000).unwrap();
        assert_eq!((p.pid, p.ppid), (42, 1));
        assert_eq!(p.tty, "pts/0");
        assert_eq!(p.cpu_ms, 2000);
        assert_eq!(p.start_unix_secs, 1_000_005);
        assert_eq!(p.cmd, "[a (b) c]");
        assert!(parse_stat(1, "garbage", 100, 0).is_none());
    }

    #[test]
    fn tty_numbers_name_like_ps() {
        assert_eq!(tty_name(0), "?");
        assert_eq!(tty_name((136 << 8) | 3), "pts/3");
    }

    #[test]
    fn this_process_is_described() {
        let me = std::process::id() as i32;
        let d = describe(&[me, -5]);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].pid, me);
        assert!(!d[0].cmd.is_empty());
    }
}
