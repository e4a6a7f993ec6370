//! Measurement helpers: latency percentiles, CPU and RSS of process trees from `/proc`, and a
//! one-line JSON writer for results.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// Latency samples in microseconds.
#[derive(Debug, Default)]
pub struct Latencies {
    samples: Vec<u32>,
}

impl Latencies {
    /// Adds one sample (saturating at `u32::MAX` µs, about 71 minutes).
    pub fn push_us(&mut self, us: u64) {
        self.samples.push(u32::try_from(us).unwrap_or(u32::MAX));
    }

    /// Moves `other`'s samples into `self`.
    pub fn merge(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
    }

    /// Sorts the samples; call before [`Latencies::percentile_ms`].
    pub fn sort(&mut self) {
        self.samples.sort_unstable();
    }

    /// The `p`-th percentile (0..=100) in milliseconds, nearest rank; `None` without samples.
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        if self.samples.is_empty() {
            return None;
        }
        let n = self.samples.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        let idx = rank.clamp(1, n) - 1;
        self.samples.get(idx).map(|&us| f64::from(us) / 1000.0)
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `(ppid, utime + stime + cutime + cstime in ticks)` of one process, from `/proc/<pid>/stat`.
fn read_stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    let ppid = f.get(1)?.parse().ok()?;
    let mut cpu = 0u64;
    for i in 11..=14 {
        cpu += f.get(i)?.parse::<u64>().ok()?;
    }
    Some((ppid, cpu))
}

fn read_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The processes `roots` and all their descendants that exist now.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, _)) = read_stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut seen: HashSet<u32> = HashSet::new();
    let mut stack: Vec<u32> = roots.to_vec();
    let mut out = Vec::new();
    // Bounded: each pid is visited once, and /proc lists finitely many.
    while let Some(p) = stack.pop() {
        if !seen.insert(p) {
            continue;
        }
        out.push(p);
        if let Some(c) = children.get(&p) {
            stack.extend(c);
        }
    }
    out
}

/// CPU time and memory of a set of processes at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// utime + stime (+ reaped children) of every process, in microseconds.
    pub cpu_us: f64,
    /// Sum of VmRSS in KiB.
    pub rss_kib: u64,
    /// Number of processes found.
    pub procs: usize,
}

/// Samples the process trees under `roots` (the roots included).
pub fn sample(roots: &[u32]) -> Usage {
    let tick_us = 1e6 / clock_ticks();
    let mut u = Usage::default();
    for pid in tree(roots) {
        if let Some((_, ticks)) = read_stat(pid) {
            u.cpu_us += ticks as f64 * tick_us;
            u.rss_kib += read_rss_kib(pid).unwrap_or(0);
            u.procs += 1;
        }
    }
    u
}

/// This process's CPU time in microseconds.
pub fn self_cpu_us() -> f64 {
    read_stat(std::process::id()).map_or(0.0, |(_, t)| t as f64 * 1e6 / clock_ticks())
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// A flat JSON object written field by field.
#[derive(Debug, Default)]
pub struct Json {
    out: String,
}

impl Json {
    /// An empty object.
    pub fn new() -> Self {
        Self::default()
    }

    fn key(&mut self, k: &str) {
        self.out.push(if self.out.is_empty() { '{' } else { ',' });
        let _ = write!(self.out, "\"{k}\":");
    }

    /// A string field (escaped).
    pub fn str(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        self.out.push('"');
        for c in v.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.out, "\\u{:04x}", c as u32);
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
        self
    }

    /// A number field; NaN and infinities become `null`.
    pub fn num(mut self, k: &str, v: f64) -> Self {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.out, "{}", (v * 1000.0).round() / 1000.0);
        } else {
            self.out.push_str("null");
        }
        self
    }

    /// An optional number field (`null` when absent).
    pub fn opt(self, k: &str, v: Option<f64>) -> Self {
        self.num(k, v.unwrap_or(f64::NAN))
    }

    /// A raw JSON value (an array or object built elsewhere).
    pub fn raw(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        self.out.push_str(v);
        self
    }

    /// The finished object.
    pub fn end(mut self) -> String {
        if self.out.is_empty() {
            self.out.push('{');
        }
        self.out.push('}');
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut l = Latencies::default();
        for us in (1..=100).rev() {
            l.push_us(us * 1000);
        }
        l.sort();
        assert_eq!(l.percentile_ms(50.0), Some(50.0));
        assert_eq!(l.percentile_ms(99.0), Some(99.0));
        assert_eq!(l.percentile_ms(100.0), Some(100.0));
        assert_eq!(l.percentile_ms(0.0), Some(1.0));
        assert_eq!(Latencies::default().percentile_ms(50.0), None);
    }

    #[test]
    fn self_sample_sees_this_process() {
        let u = sample(&[std::process::id()]);
        assert!(u.procs >= 1);
        assert!(u.rss_kib > 0);
    }

    #[test]
    fn json_escapes_and_nulls() {
        let j = Json::new().str("a", "x\"y").num("b", f64::NAN).num("c", 1.5).end();
        assert_eq!(j, r#"{"a":"x\"y","b":null,"c":1.5}"#);
    }
}
