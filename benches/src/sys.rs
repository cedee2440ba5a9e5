//! What the benchmark reads from `/proc` and sets on processes: CPU time, resident memory,
//! and which core a process may run on.
//!
//! CPU time per request is the figure to trust on a shared 2-core machine: requests per second
//! move with whatever else runs, the CPU a process spent per answer much less.

use std::path::Path;

use anyhow::Context;
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// User plus system CPU time of process `pid` (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("unexpected /proc/pid/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = fields
        .get(11)
        .zip(fields.get(12))
        .map(|(u, s)| -> anyhow::Result<u64> { Ok(u.parse::<u64>()? + s.parse::<u64>()?) })
        .context("short /proc/pid/stat")??;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 on Linux.
fn clock_ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// Resident set size of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS in /proc/pid/status")?
        .parse::<u64>()?;
    Ok(kib * 1024)
}

/// Lets every thread of process `pid` run only on `cpu` (threads it creates later inherit it).
/// Returns whether it did: not on a machine where this process may use fewer than two cores,
/// nor when `cpu` is not one of them.
pub fn pin_process(pid: u32, cpu: usize) -> bool {
    let Some(set) = single(cpu) else {
        return false;
    };
    let tasks = Path::new("/proc").join(pid.to_string()).join("task");
    let Ok(listing) = std::fs::read_dir(&tasks) else {
        return false;
    };
    for task in listing.flatten() {
        if let Ok(tid) = task.file_name().to_string_lossy().parse::<i32>() {
            // A thread may have exited since the listing.
            let _ = sched_setaffinity(Pid::from_raw(tid), &set);
        }
    }
    true
}

/// Lets the calling thread run only on `cpu`; returns whether it did (as [`pin_process`]).
pub fn pin_current_thread(cpu: usize) -> bool {
    single(cpu).is_some_and(|set| sched_setaffinity(Pid::from_raw(0), &set).is_ok())
}

/// The cores this process may run on (the benchmark pins to the first two of them).
pub fn allowed_cores() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// A set of only `cpu`, when it is allowed and there is another core to keep apart from it.
fn single(cpu: usize) -> Option<CpuSet> {
    let allowed = allowed_cores();
    if allowed.len() < 2 || !allowed.contains(&cpu) {
        return None;
    }
    let mut set = CpuSet::new();
    set.set(cpu).ok()?;
    Some(set)
}

/// Cores of the machine (not only those this thread may use: the benchmark pins itself).
pub fn cores() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(1)
        .max(1)
}

/// One line describing the machine: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {} cores, {mem_gib:.0} GiB, Linux {}",
        cores(),
        kernel.trim()
    )
}
