//! What tests and benchmarks read about processes from `/proc`: `/proc/PID/stat` (name,
//! parent, group, session, nice, CPU time) and numeric fields of `/proc/PID/status`.

use std::time::Duration;

/// The fields of one `/proc/PID/stat` line.
#[derive(Debug, Clone)]
pub struct Stat {
    pub pid: u32,
    /// The command name (`comm`), as `prctl(PR_SET_NAME)` set it.
    pub comm: String,
    /// The fields after `(comm)`: `fields[0]` is the state, `fields[1]` the parent's pid
    /// (man 5 proc numbers them from 3).
    fields: Vec<String>,
}

impl Stat {
    fn number(&self, index: usize) -> Option<i64> {
        self.fields.get(index)?.parse().ok()
    }

    pub fn ppid(&self) -> Option<u32> {
        self.number(1).map(|n| n as u32)
    }

    pub fn pgrp(&self) -> Option<u32> {
        self.number(2).map(|n| n as u32)
    }

    pub fn session(&self) -> Option<u32> {
        self.number(3).map(|n| n as u32)
    }

    pub fn nice(&self) -> Option<i64> {
        self.number(16)
    }

    /// User plus system CPU time so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let ticks = |i| self.number(i).unwrap_or(0).max(0) as u64;
        ticks(11) + ticks(12)
    }
}

/// `/proc/PID/stat`, if that process exists.
pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name may hold spaces and parentheses: it ends at the last ')'.
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    Some(Stat {
        pid,
        comm: text[open + 1..close].to_string(),
        fields: text
            .get(close + 2..)?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    })
}

/// Every live process's `/proc/PID/stat`.
pub fn all() -> Vec<Stat> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .collect()
}

/// CPU time (user + system) process `pid` has used so far (zero if it is gone).
pub fn cpu_time(pid: u32) -> Duration {
    let ticks = stat(pid).map(|s| s.cpu_ticks()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64(ticks as f64 / per_second)
}

/// A numeric field of `/proc/PID/status` (`VmRSS`, `voluntary_ctxt_switches`, ...): its
/// first number (kB for the memory fields).
pub fn status_field(pid: u32, name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A process's environment (`/proc/PID/environ`), `NAME=value` entries.
pub fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|bytes| {
            bytes
                .split(|&b| b == 0)
                .filter(|e| !e.is_empty())
                .map(|e| String::from_utf8_lossy(e).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The real, effective, saved and file-system uids from `/proc/PID/status`.
pub fn uids(pid: u32) -> Option<[u32; 4]> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let ids: Vec<u32> = line
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    ids.try_into().ok()
}
