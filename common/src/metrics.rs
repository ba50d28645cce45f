//! Lock-free metric primitives and a Prometheus text-format writer.
//!
//! Each role keeps its metrics in a plain struct of these primitives (no
//! global registry) and renders them on its admin port's `/metrics`. Updates
//! are single relaxed atomic operations, so they are cheap on hot paths.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds, in seconds, of the latency histogram buckets: 50 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A fixed-bucket histogram of durations in seconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(buckets: &'static [f64]) -> Self {
        Self {
            buckets,
            counts: buckets.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn latency() -> Self {
        Self::new(&LATENCY_BUCKETS)
    }

    pub fn observe_seconds(&self, seconds: f64) {
        if let Some(i) = self.buckets.iter().position(|&le| seconds <= le) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Writes metric families in the Prometheus text exposition format.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: &Counter) {
        self.counter_family(name, help, &[(&[], value)]);
    }

    /// A counter family whose samples differ by labels.
    pub fn counter_family(&mut self, name: &str, help: &str, samples: &[(&[(&str, &str)], &Counter)]) {
        self.header(name, "counter", help);
        for (labels, c) in samples {
            self.sample(name, labels, c.get());
        }
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.header(name, "gauge", help);
        self.sample(name, &[], value);
    }

    /// An info metric: a gauge of value 1 whose labels carry the facts.
    pub fn info(&mut self, name: &str, help: &str, labels: &[(&str, &str)]) {
        self.header(name, "gauge", help);
        self.sample(name, labels, 1);
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (le, c) in h.buckets.iter().zip(&h.counts) {
            cumulative += c.load(Ordering::Relaxed);
            self.sample(&bucket, &[("le", &le.to_string())], cumulative);
        }
        let count = h.count.load(Ordering::Relaxed);
        self.sample(&bucket, &[("le", "+Inf")], count);
        let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], count);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let sent = Counter::default();
        sent.add(3);
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe_seconds(0.0005);
        h.observe_seconds(0.005);
        h.observe_seconds(5.0);
        let mut e = Exposition::new();
        e.counter_family("x_total", "Things.", &[(&[("kind", "a\"b")], &sent)]);
        e.gauge("y", "Level.", -2);
        e.histogram("z_seconds", "Time.", &h);
        let text = e.finish();
        assert!(text.contains("# TYPE x_total counter\nx_total{kind=\"a\\\"b\"} 3\n"));
        assert!(text.contains("y -2\n"));
        assert!(text.contains("z_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("z_seconds_bucket{le=\"0.01\"} 2\n"));
        assert!(text.contains("z_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("z_seconds_count 3\n"));
    }
}
