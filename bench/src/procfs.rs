//! Resource use read from `/proc`: a process's resident memory (VmRSS), open
//! descriptors and CPU time, and the whole machine's busy time, turned into CPU percentages
//! over a measured interval.

use std::time::Instant;

use anyhow::Context;

/// Resident memory of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS for process {pid}"))
}

/// Open descriptors of `pid`: the entries of `/proc/<pid>/fd`.
pub fn open_fds(pid: u32) -> anyhow::Result<u64> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).with_context(|| format!("process {pid}"))?;
    Ok(entries.count() as u64)
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
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_ticks(me).is_some());
        let meter = CpuMeter::start(&[Watched { role: "self".into(), pid: me }]);
        let spin = Instant::now();
        while spin.elapsed().as_millis() < 50 {
            std::hint::black_box(spin.elapsed());
        }
        let cpu = meter.finish();
        assert_eq!(cpu[0].0, "self");
        assert_eq!(cpu.last().unwrap().0, "machine");
    }
}
