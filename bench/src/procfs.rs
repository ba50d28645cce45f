//! Resource use read from `/proc`: a process's resident memory (VmRSS), open
//! descriptors (and their limit) and CPU time, and the whole machine's busy
//! time, turned into CPU percentages over a measured interval; the whole
//! machine's memory in use and the kernel's TCP sockets and their buffers.

use std::time::Instant;

use anyhow::Context;

/// Resident memory of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// The part of [`rss_kib`] that is anonymous memory (the heap, stacks), in
/// KiB: without the pages of files mapped, such as the binary, which
/// processes running the same binary share.
pub fn rss_anon_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "RssAnon")
}

/// The field `name` (in kB) of `/proc/<pid>/status`.
fn status_kib(pid: u32, name: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    kib_field(&status, name).with_context(|| format!("no {name} for process {pid}"))
}

/// The value of a `Name:   123 kB` line, as `/proc/<pid>/status` and
/// `/proc/meminfo` write them.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let value = text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Open descriptors of `pid`: the entries of `/proc/<pid>/fd`.
pub fn open_fds(pid: u32) -> anyhow::Result<u64> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).with_context(|| format!("process {pid}"))?;
    Ok(entries.count() as u64)
}

/// The soft limit on open files of `pid` (`Max open files` in `/proc/<pid>/limits`).
pub fn open_files_limit(pid: u32) -> anyhow::Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).with_context(|| format!("process {pid}"))?;
    let limit = herald_common::net::parse_open_files(&limits)
        .with_context(|| format!("no open-files limit for process {pid}"))?;
    Ok(u64::try_from(limit).unwrap_or(u64::MAX))
}

/// Memory the whole machine uses, in KiB: `MemTotal` − `MemAvailable` of
/// `/proc/meminfo` (what the kernel could not hand to a new process without
/// swapping: processes, the kernel's own, socket buffers; not the page cache).
pub fn machine_used_kib() -> anyhow::Result<u64> {
    used_kib(&std::fs::read_to_string("/proc/meminfo")?).context("no MemTotal or MemAvailable in /proc/meminfo")
}

fn used_kib(meminfo: &str) -> Option<u64> {
    Some(kib_field(meminfo, "MemTotal")?.saturating_sub(kib_field(meminfo, "MemAvailable")?))
}

/// The machine's TCP sockets, from `/proc/net/sockstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSockets {
    /// Sockets in use (established, listening, connecting; not TIME_WAIT).
    pub inuse: u64,
    /// Bytes of socket buffers the kernel holds for all of them (`mem`, in pages).
    pub mem_bytes: u64,
}

pub fn tcp_sockets() -> anyhow::Result<TcpSockets> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat")?;
    let page = rustix::param::page_size() as u64;
    tcp_line(&sockstat, page).context("no TCP line in /proc/net/sockstat")
}

/// The `TCP: inuse N orphan N tw N alloc N mem N` line of `sockstat`.
fn tcp_line(sockstat: &str, page: u64) -> Option<TcpSockets> {
    let fields: Vec<&str> = sockstat.lines().find_map(|line| line.strip_prefix("TCP:"))?.split_whitespace().collect();
    let value = |name: &str| -> Option<u64> {
        let at = fields.iter().position(|field| *field == name)?;
        fields.get(at + 1)?.parse().ok()
    };
    Some(TcpSockets { inuse: value("inuse")?, mem_bytes: value("mem")?.saturating_mul(page) })
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Busy and total ticks of the whole machine (all cores).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4)?;
    Some((total - idle, total))
}

/// A process to watch, under the name of its role.
#[derive(Debug, Clone)]
pub struct Watched {
    pub role: String,
    pub pid: u32,
}

/// CPU use of watched processes over an interval, started by [`CpuMeter::start`].
pub struct CpuMeter {
    watched: Vec<(Watched, Option<u64>)>,
    machine: Option<(u64, u64)>,
    started: Instant,
}

impl CpuMeter {
    pub fn start(watched: &[Watched]) -> Self {
        Self {
            watched: watched.iter().map(|w| (w.clone(), cpu_ticks(w.pid))).collect(),
            machine: machine_ticks(),
            started: Instant::now(),
        }
    }

    /// Percent of one core used by each role since the start (processes of
    /// one role added up), then the whole machine's busy percentage (100% per
    /// core) under the role `machine`.
    pub fn finish(&self) -> Vec<(String, f64)> {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        let tick = rustix::param::clock_ticks_per_second() as f64;
        let mut out: Vec<(String, f64)> = Vec::new();
        for (w, before) in &self.watched {
            let (Some(before), Some(now)) = (*before, cpu_ticks(w.pid)) else { continue };
            let pct = now.saturating_sub(before) as f64 / tick / seconds * 100.0;
            match out.iter_mut().find(|(role, _)| *role == w.role) {
                Some((_, sum)) => *sum += pct,
                None => out.push((w.role.clone(), pct)),
            }
        }
        if let (Some((busy0, total0)), Some((busy1, total1))) = (self.machine, machine_ticks()) {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let total = total1.saturating_sub(total0).max(1) as f64;
            out.push(("machine".into(), busy1.saturating_sub(busy0) as f64 / total * 100.0 * cores));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_cpu_time() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() >= rss_anon_kib(me).unwrap());
        assert!(cpu_ticks(me).is_some());
        let meter = CpuMeter::start(&[Watched { role: "self".into(), pid: me }]);
        let spin = Instant::now();
        while spin.elapsed().as_millis() < 50 {
            std::hint::black_box(spin.elapsed());
        }
        let cpu = meter.finish();
        assert_eq!(cpu[0].0, "self");
        assert_eq!(cpu.last().unwrap().0, "machine");
        assert!(open_files_limit(me).unwrap() > open_fds(me).unwrap());
        assert!(machine_used_kib().unwrap() > 0);
        assert!(tcp_sockets().is_ok());
    }

    #[test]
    fn machine_figures_parse() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:        1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(used_kib(meminfo), Some(4_576_000));
        assert_eq!(used_kib("MemTotal: 5 kB\n"), None);
        let sockstat = "sockets: used 40\nTCP: inuse 17 orphan 0 tw 2 alloc 20 mem 54\nUDP: inuse 0 mem 0\n";
        assert_eq!(tcp_line(sockstat, 4096), Some(TcpSockets { inuse: 17, mem_bytes: 54 * 4096 }));
        assert_eq!(tcp_line("UDP: inuse 0 mem 0\n", 4096), None);
    }
}
