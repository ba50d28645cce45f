//! Numbers: latency histograms, the measurement of one run, the median of
//! several runs, and the markdown table they are printed as.

use hdrhistogram::Histogram;

/// Latencies in microseconds, from 1 µs to one hour at 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

const MAX_US: u64 = 3_600_000_000;

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self(Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us);
    }

    pub fn merge(&mut self, other: &Latency) {
        for v in other.0.iter_recorded() {
            self.record_n(v.value_iterated_to(), v.count_at_value());
        }
    }

    /// What was recorded after `earlier`, a copy of this histogram taken
    /// before (a later histogram holds at least its counts).
    pub fn since(&self, earlier: &Latency) -> Latency {
        let mut between = self.clone();
        if between.0.subtract(&earlier.0).is_err() {
            // Not an earlier copy of this one: nothing sensible to subtract.
            return self.clone();
        }
        between
    }

    fn record_n(&mut self, us: u64, count: u64) {
        // Values come from a histogram with the same bounds: always in range.
        let _ = self.0.record_n(us.min(MAX_US), count);
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// `(value_us, count)` pairs, to send to another process.
    pub fn to_pairs(&self) -> Vec<(u64, u64)> {
        self.0.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
    }

    pub fn from_pairs(pairs: &[(u64, u64)]) -> Self {
        let mut latency = Self::new();
        for &(us, count) in pairs {
            latency.record_n(us, count);
        }
        latency
    }

    /// p50, p90, p99, p99.9 and max, in milliseconds; `None` when empty.
    pub fn percentiles(&self) -> Option<Percentiles> {
        if self.0.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Percentiles {
            p50: ms(self.0.value_at_quantile(0.5)),
            p90: ms(self.0.value_at_quantile(0.9)),
            p99: ms(self.0.value_at_quantile(0.99)),
            p999: ms(self.0.value_at_quantile(0.999)),
            max: ms(self.0.max()),
        })
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// What one run measured. Rates are per second; CPU is percent of one core
/// per role (several processes of one role add up).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measurement {
    pub connections: u64,
    pub publish_rate: f64,
    pub delivery_rate: f64,
    pub publish_errors: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub misdelivered: u64,
    pub reordered: u64,
    /// Clients whose connection ended during the run.
    pub closed: u64,
    pub latency: Option<Percentiles>,
    /// WebSocket handshakes, from the TCP connect to the greeting.
    pub handshake: Option<Percentiles>,
    pub rss_per_connection_kib: Option<f64>,
    /// The same for the brokers, which keep a copy of the gateways' directories.
    pub broker_rss_per_connection_kib: Option<f64>,
    /// Requests (queries, controls, publishes) answered per second.
    pub ops_rate: f64,
    /// Answers that were not what they should have been (a wrong count, a
    /// user said offline while connected, a missing gateway, …).
    pub wrong: u64,
    /// This row's main figure over its baseline's, measured in the same run.
    pub ratio: Option<f64>,
    /// Events or requests the load generators sent (events, rpc).
    pub sent: u64,
    /// Distinct events a consumer received, or events expected (connects: two per connection).
    pub received: u64,
    pub expected: u64,
    /// Deliveries of an event that were not its first (delivery count above 1).
    pub redelivered: u64,
    /// Events herald dropped on purpose, by its own count (a full gateway queue, a group past its retention).
    pub dropped: u64,
    /// WebSocket gateway processes.
    pub gateways: u64,
    /// Resident memory of every gateway process together, in MiB.
    pub gateway_rss_mib: Option<f64>,
    /// Resident memory of the load-generator processes over their clients, in KiB.
    pub loadgen_rss_per_client_kib: Option<f64>,
    /// Growth of the whole machine's memory in use (MemTotal − MemAvailable) over the run, in MiB.
    pub machine_used_mib: Option<f64>,
    /// Growth of the kernel's TCP socket buffers over the run, in MiB.
    pub socket_mem_mib: Option<f64>,
    /// The machine's TCP sockets in use.
    pub tcp_inuse: Option<u64>,
    pub cpu: Vec<(String, f64)>,
}

impl Measurement {
    /// The median of each rate, latency, memory and CPU figure over `runs`,
    /// and the worst (largest) of each error count.
    pub fn summarize(runs: &[Measurement]) -> Measurement {
        let med = |f: &dyn Fn(&Measurement) -> Option<f64>| median(runs.iter().filter_map(f).collect());
        let worst = |f: &dyn Fn(&Measurement) -> u64| runs.iter().map(f).max().unwrap_or(0);
        let percentiles = |of: &dyn Fn(&Measurement) -> Option<Percentiles>| {
            runs.iter().any(|r| of(r).is_some()).then(|| Percentiles {
                p50: med(&|r| of(r).map(|l| l.p50)).unwrap_or_default(),
                p90: med(&|r| of(r).map(|l| l.p90)).unwrap_or_default(),
                p99: med(&|r| of(r).map(|l| l.p99)).unwrap_or_default(),
                p999: med(&|r| of(r).map(|l| l.p999)).unwrap_or_default(),
                max: med(&|r| of(r).map(|l| l.max)).unwrap_or_default(),
            })
        };
        let latency = percentiles(&|r| r.latency);
        let handshake = percentiles(&|r| r.handshake);
        let mut roles: Vec<&str> = Vec::new();
        for (role, _) in runs.iter().flat_map(|r| &r.cpu) {
            if !roles.contains(&role.as_str()) {
                roles.push(role);
            }
        }
        let cpu = roles
            .into_iter()
            .map(|role| {
                let value = med(&|r| r.cpu.iter().find(|(name, _)| name == role).map(|(_, pct)| *pct));
                (role.to_owned(), value.unwrap_or_default())
            })
            .collect();
        Measurement {
            connections: med(&|r| Some(r.connections as f64)).unwrap_or_default() as u64,
            publish_rate: med(&|r| Some(r.publish_rate)).unwrap_or_default(),
            delivery_rate: med(&|r| Some(r.delivery_rate)).unwrap_or_default(),
            publish_errors: worst(&|r| r.publish_errors),
            lost: worst(&|r| r.lost),
            duplicated: worst(&|r| r.duplicated),
            misdelivered: worst(&|r| r.misdelivered),
            reordered: worst(&|r| r.reordered),
            closed: worst(&|r| r.closed),
            latency,
            handshake,
            rss_per_connection_kib: med(&|r| r.rss_per_connection_kib),
            broker_rss_per_connection_kib: med(&|r| r.broker_rss_per_connection_kib),
            ops_rate: med(&|r| Some(r.ops_rate)).unwrap_or_default(),
            wrong: worst(&|r| r.wrong),
            ratio: med(&|r| r.ratio),
            sent: med(&|r| Some(r.sent as f64)).unwrap_or_default() as u64,
            received: med(&|r| Some(r.received as f64)).unwrap_or_default() as u64,
            expected: med(&|r| Some(r.expected as f64)).unwrap_or_default() as u64,
            redelivered: worst(&|r| r.redelivered),
            dropped: worst(&|r| r.dropped),
            gateways: med(&|r| Some(r.gateways as f64)).unwrap_or_default() as u64,
            gateway_rss_mib: med(&|r| r.gateway_rss_mib),
            loadgen_rss_per_client_kib: med(&|r| r.loadgen_rss_per_client_kib),
            machine_used_mib: med(&|r| r.machine_used_mib),
            socket_mem_mib: med(&|r| r.socket_mem_mib),
            tcp_inuse: med(&|r| r.tcp_inuse.map(|n| n as f64)).map(|n| n as u64),
            cpu,
        }
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 })
}

/// A column of a results table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Connections,
    PublishRate,
    DeliveryRate,
    PublishErrors,
    Lost,
    Duplicated,
    Misdelivered,
    Reordered,
    Closed,
    /// p50, p99, p99.9 and max latency.
    Latency,
    RssPerConnection,
    BrokerRssPerConnection,
    OpsRate,
    Wrong,
    /// The row's main figure over its baseline's (the table's title says which figure).
    Ratio,
    /// One column per role that has a CPU figure.
    Cpu,
    /// p50, p90, p99 and max latency.
    LatencyP90,
    /// p50 and p99 of the WebSocket handshakes.
    Handshake,
    /// Events sent per second (the publish rate).
    SendRate,
    /// Events received per second (the delivery rate).
    EventRate,
    /// Connections opened per second (the ops rate).
    ConnectRate,
    /// Requests answered per second (the ops rate).
    RequestRate,
    Sent,
    Expected,
    Received,
    Redelivered,
    Dropped,
    /// WebSocket gateway processes.
    Gateways,
    /// All gateways' resident memory together, MiB.
    GatewayRss,
    /// Load-generator resident memory per client, KiB.
    LoadgenRssPerClient,
    /// Machine memory in use, growth over the run, MiB.
    MachineUsed,
    /// Kernel TCP socket buffers, growth over the run, MiB.
    SocketMemory,
    /// TCP sockets in use on the machine.
    TcpInuse,
}

/// One labelled row of a results table.
pub struct Row {
    pub label: String,
    pub measurement: Measurement,
}

/// Renders `rows` as a markdown table whose first column is headed `label`.
pub fn table(label: &str, columns: &[Column], rows: &[Row]) -> String {
    let mut roles: Vec<&str> = Vec::new();
    for (role, _) in rows.iter().flat_map(|r| &r.measurement.cpu) {
        if !roles.contains(&role.as_str()) {
            roles.push(role);
        }
    }
    let mut header = vec![label.to_owned()];
    header.extend(titles(columns, &roles));
    let mut out = String::new();
    push_row(&mut out, &header);
    let align: Vec<String> = (0..header.len()).map(|i| if i == 0 { "---" } else { "---:" }.into()).collect();
    push_row(&mut out, &align);
    for row in rows {
        let mut cells = vec![row.label.clone()];
        cells.extend(cells_of(columns, &roles, &row.measurement));
        push_row(&mut out, &cells);
    }
    out
}

/// One measurement on one line: `title value` pairs for `columns`.
pub fn inline(columns: &[Column], m: &Measurement) -> String {
    let roles: Vec<&str> = m.cpu.iter().map(|(role, _)| role.as_str()).collect();
    let titles = titles(columns, &roles);
    let cells = cells_of(columns, &roles, m);
    titles.iter().zip(&cells).map(|(title, cell)| format!("{title} {cell}")).collect::<Vec<_>>().join(", ")
}

fn titles(columns: &[Column], roles: &[&str]) -> Vec<String> {
    let mut titles = Vec::new();
    for column in columns {
        match column {
            Column::Latency => titles.extend(["p50 ms", "p99 ms", "p99.9 ms", "max ms"].map(String::from)),
            Column::LatencyP90 => titles.extend(["p50 ms", "p90 ms", "p99 ms", "max ms"].map(String::from)),
            Column::Handshake => titles.extend(["handshake p50 ms", "handshake p99 ms"].map(String::from)),
            Column::Cpu => titles.extend(roles.iter().map(|role| format!("{role} CPU"))),
            other => titles.push(other.title().to_owned()),
        }
    }
    titles
}

fn cells_of(columns: &[Column], roles: &[&str], m: &Measurement) -> Vec<String> {
    let mut cells = Vec::new();
    for column in columns {
        match column {
            Column::Latency => cells.extend(percentile_cells(m.latency, |l| [l.p50, l.p99, l.p999, l.max])),
            Column::LatencyP90 => cells.extend(percentile_cells(m.latency, |l| [l.p50, l.p90, l.p99, l.max])),
            Column::Handshake => cells.extend(percentile_cells(m.handshake, |l| [l.p50, l.p99])),
            Column::Cpu => cells.extend(roles.iter().map(|role| {
                m.cpu.iter().find(|(name, _)| name == role).map_or("–".into(), |(_, pct)| format!("{pct:.0}%"))
            })),
            other => cells.push(other.cell(m)),
        }
    }
    cells
}

/// The cells of the percentiles `pick` chooses, dashes when there are none.
fn percentile_cells<const N: usize>(
    percentiles: Option<Percentiles>,
    pick: impl Fn(Percentiles) -> [f64; N],
) -> [String; N] {
    match percentiles {
        Some(p) => pick(p).map(millis),
        None => std::array::from_fn(|_| "–".to_owned()),
    }
}

fn push_row(out: &mut String, cells: &[String]) {
    out.push_str("| ");
    out.push_str(&cells.join(" | "));
    out.push_str(" |\n");
}

impl Column {
    fn title(self) -> &'static str {
        match self {
            Self::Connections => "conns",
            Self::PublishRate => "publishes/s",
            Self::DeliveryRate => "deliveries/s",
            Self::PublishErrors => "errors",
            Self::Lost => "lost",
            Self::Duplicated => "dup",
            Self::Misdelivered => "misdelivered",
            Self::Reordered => "reordered",
            Self::Closed => "closed",
            Self::RssPerConnection => "RSS/conn KiB",
            Self::BrokerRssPerConnection => "broker RSS/conn KiB",
            Self::OpsRate => "ops/s",
            Self::Wrong => "wrong",
            Self::Ratio => "vs baseline",
            Self::SendRate => "sent/s",
            Self::EventRate => "events/s",
            Self::ConnectRate => "connects/s",
            Self::RequestRate => "requests/s",
            Self::Sent => "sent",
            Self::Expected => "expected",
            Self::Received => "received",
            Self::Redelivered => "redelivered",
            Self::Dropped => "dropped",
            Self::Gateways => "gateways",
            Self::GatewayRss => "gw RSS MiB",
            Self::LoadgenRssPerClient => "loadgen RSS/client KiB",
            Self::MachineUsed => "machine MiB",
            Self::SocketMemory => "TCP mem MiB",
            Self::TcpInuse => "TCP inuse",
            Self::Latency | Self::LatencyP90 | Self::Handshake | Self::Cpu => "",
        }
    }

    fn cell(self, m: &Measurement) -> String {
        match self {
            Self::Connections => thousands(m.connections),
            Self::PublishRate => thousands(m.publish_rate.round() as u64),
            Self::DeliveryRate => thousands(m.delivery_rate.round() as u64),
            Self::PublishErrors => thousands(m.publish_errors),
            Self::Lost => thousands(m.lost),
            Self::Duplicated => thousands(m.duplicated),
            Self::Misdelivered => thousands(m.misdelivered),
            Self::Reordered => thousands(m.reordered),
            Self::Closed => thousands(m.closed),
            Self::RssPerConnection => m.rss_per_connection_kib.map_or("–".into(), |kib| format!("{kib:.1}")),
            Self::BrokerRssPerConnection => {
                m.broker_rss_per_connection_kib.map_or("–".into(), |kib| format!("{kib:.1}"))
            }
            Self::OpsRate => thousands(m.ops_rate.round() as u64),
            Self::Wrong => thousands(m.wrong),
            Self::Ratio => m.ratio.filter(|r| r.is_finite()).map_or("–".into(), |r| format!("{r:.2}")),
            Self::SendRate => thousands(m.publish_rate.round() as u64),
            Self::EventRate => thousands(m.delivery_rate.round() as u64),
            Self::ConnectRate | Self::RequestRate => thousands(m.ops_rate.round() as u64),
            Self::Sent => thousands(m.sent),
            Self::Expected => thousands(m.expected),
            Self::Received => thousands(m.received),
            Self::Redelivered => thousands(m.redelivered),
            Self::Dropped => thousands(m.dropped),
            Self::Gateways => thousands(m.gateways),
            Self::GatewayRss => m.gateway_rss_mib.map_or("–".into(), |mib| thousands(mib.round() as u64)),
            Self::LoadgenRssPerClient => m.loadgen_rss_per_client_kib.map_or("–".into(), |kib| format!("{kib:.2}")),
            Self::MachineUsed => m.machine_used_mib.map_or("–".into(), signed_mib),
            Self::SocketMemory => m.socket_mem_mib.map_or("–".into(), signed_mib),
            Self::TcpInuse => m.tcp_inuse.map_or("–".into(), thousands),
            Self::Latency | Self::LatencyP90 | Self::Handshake | Self::Cpu => String::new(),
        }
    }
}

/// A growth in MiB, which a busy shared machine may make negative: whole
/// MiB, with a sign when below zero.
fn signed_mib(mib: f64) -> String {
    let whole = thousands(mib.abs().round() as u64);
    if mib <= -0.5 { format!("-{whole}") } else { whole }
}

fn millis(ms: f64) -> String {
    if !ms.is_finite() {
        "–".into()
    } else if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.1}")
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_survives_a_trip_between_processes() {
        let mut latency = Latency::new();
        for us in [100, 200, 300, 5000] {
            latency.record(us);
        }
        let copy = Latency::from_pairs(&latency.to_pairs());
        assert_eq!(copy.count(), 4);
        let mut later = copy.clone();
        later.record(7000);
        assert_eq!(later.since(&copy).count(), 1);
        assert!((later.since(&copy).percentiles().unwrap().p50 - 7.0).abs() < 0.01);
        let p = copy.percentiles().unwrap();
        assert!((p.p50 - 0.2).abs() < 0.001, "{p:?}");
        assert!((p.max - 5.0).abs() < 0.01, "{p:?}");
        assert_eq!(Latency::new().percentiles(), None);
    }

    #[test]
    fn a_summary_takes_medians_of_rates_and_the_worst_error_counts() {
        let run = |rate: f64, lost: u64| Measurement {
            delivery_rate: rate,
            lost,
            cpu: vec![("gw".into(), rate / 10.0)],
            ..Measurement::default()
        };
        let summary = Measurement::summarize(&[run(100.0, 0), run(300.0, 5), run(200.0, 1)]);
        assert_eq!(summary.delivery_rate, 200.0);
        assert_eq!(summary.lost, 5);
        assert_eq!(summary.cpu, vec![("gw".to_owned(), 20.0)]);
        assert_eq!(median(vec![1.0, 4.0]), Some(2.5));
        let ratios =
            [Some(0.9), None, Some(1.1)].map(|ratio| Measurement { ratio, wrong: 1, ..Measurement::default() });
        let summary = Measurement::summarize(&ratios);
        assert_eq!((summary.ratio, summary.wrong), (Some(1.0), 1));
    }

    #[test]
    fn new_columns_show_ops_wrong_answers_and_ratios() {
        let m = Measurement {
            ops_rate: 51_234.6,
            wrong: 2,
            ratio: Some(0.956),
            broker_rss_per_connection_kib: Some(3.04),
            ..Measurement::default()
        };
        let columns = [Column::OpsRate, Column::Wrong, Column::Ratio, Column::BrokerRssPerConnection];
        assert_eq!(inline(&columns, &m), "ops/s 51,235, wrong 2, vs baseline 0.96, broker RSS/conn KiB 3.0");
        let none = Measurement { ratio: Some(f64::NAN), ..Measurement::default() };
        assert_eq!(inline(&[Column::Ratio], &none), "vs baseline –");
    }

    #[test]
    fn event_columns_show_counts_rates_and_p90() {
        let m = Measurement {
            publish_rate: 150_000.4,
            delivery_rate: 99_999.6,
            ops_rate: 4_999.5,
            sent: 1_000_000,
            expected: 20,
            received: 999_990,
            redelivered: 3,
            dropped: 10,
            latency: Some(Percentiles { p50: 0.25, p90: 0.5, p99: 2.0, p999: 3.0, max: 12.0 }),
            ..Measurement::default()
        };
        let columns = [
            Column::SendRate,
            Column::EventRate,
            Column::ConnectRate,
            Column::Sent,
            Column::Expected,
            Column::Received,
            Column::Redelivered,
            Column::Dropped,
            Column::LatencyP90,
        ];
        assert_eq!(
            inline(&columns, &m),
            "sent/s 150,000, events/s 100,000, connects/s 5,000, sent 1,000,000, expected 20, received 999,990, \
             redelivered 3, dropped 10, p50 ms 0.25, p90 ms 0.50, p99 ms 2.00, max ms 12.0"
        );
        let runs = [m.clone(), Measurement { redelivered: 7, sent: 3, ..m.clone() }, m];
        let summary = Measurement::summarize(&runs);
        assert_eq!((summary.sent, summary.redelivered), (1_000_000, 7), "counts: medians; errors: the worst");
        assert_eq!(summary.latency.map(|l| l.p90), Some(0.5));
    }

    #[test]
    fn machine_columns_show_memory_and_sockets() {
        let m = Measurement {
            gateways: 17,
            gateway_rss_mib: Some(1234.4),
            loadgen_rss_per_client_kib: Some(0.8449),
            machine_used_mib: Some(5120.2),
            socket_mem_mib: Some(-3.0),
            tcp_inuse: Some(500_034),
            ..Measurement::default()
        };
        let columns = [
            Column::Gateways,
            Column::GatewayRss,
            Column::LoadgenRssPerClient,
            Column::MachineUsed,
            Column::SocketMemory,
            Column::TcpInuse,
        ];
        assert_eq!(
            inline(&columns, &m),
            "gateways 17, gw RSS MiB 1,234, loadgen RSS/client KiB 0.84, machine MiB 5,120, TCP mem MiB -3, \
             TCP inuse 500,034"
        );
        let runs = [m.clone(), Measurement { tcp_inuse: Some(2), gateways: 15, ..m.clone() }, m];
        let summary = Measurement::summarize(&runs);
        assert_eq!((summary.gateways, summary.tcp_inuse, summary.socket_mem_mib), (17, Some(500_034), Some(-3.0)));
        assert_eq!(inline(&[Column::MachineUsed], &Measurement::default()), "machine MiB –");
    }

    #[test]
    fn tables_are_markdown_with_one_column_per_cpu_role() {
        let m = Measurement {
            connections: 10_000,
            delivery_rate: 1_234_567.4,
            latency: Some(Percentiles { p50: 0.5, p90: 5.0, p99: 12.34, p999: 20.0, max: 30.0 }),
            cpu: vec![("gw".into(), 95.4), ("clients".into(), 80.0)],
            ..Measurement::default()
        };
        let text = table(
            "run",
            &[Column::Connections, Column::DeliveryRate, Column::Latency, Column::Cpu],
            &[Row { label: "a".into(), measurement: m }],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "| run | conns | deliveries/s | p50 ms | p99 ms | p99.9 ms | max ms | gw CPU | clients CPU |"
        );
        assert_eq!(lines[1], "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        assert_eq!(lines[2], "| a | 10,000 | 1,234,567 | 0.50 | 12.3 | 20.0 | 30.0 | 95% | 80% |");
        let m = Measurement { connections: 5, cpu: vec![("gw".into(), 1.0)], ..Measurement::default() };
        assert_eq!(
            inline(&[Column::Connections, Column::Latency, Column::Cpu], &m),
            "conns 5, p50 ms –, p99 ms –, p99.9 ms –, max ms –, gw CPU 1%"
        );
    }
}
