//! WebSocket conformance: the Autobahn TestSuite's fuzzingclient cases, run
//! by kosoku (its Python 3 port, from the test venv), against the gateway of
//! a `herald standalone`, with an echo backend built on the event stream and
//! the publish API (`tests/python/conformance_echo.py`): each frame a client
//! sends comes back to it as a `message` event, is published to its
//! connection, and is written back by the gateway.
//!
//! Cases 1–7, 9 and 10 run: framing, pings and pongs, reserved bits and
//! opcodes, fragmentation, UTF-8, close handling, large messages and
//! round-trip series. 12.* and 13.* (permessage-deflate) do not: the gateway
//! does not negotiate compression. Every case must pass: OK, NON-STRICT or
//! INFORMATIONAL.
//!
//! The gateway sends nothing on its own: no greeting (`--greeting none`) and
//! no keep-alive pings (`--ping-interval 0s`). An Autobahn case records every
//! frame it receives and compares the list with what it expects, so an
//! unsolicited frame fails it (a ping during 9.7.x ends the series early:
//! the case closes as soon as anything but the next echo arrives).
//!
//! `HERALD_CONFORMANCE_REPORTS=DIR` keeps kosoku's reports (index.html, one
//! page per case) in DIR.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Herald, PATIENCE, TempDir, repo_root, tool};

/// The case groups run: every one but the compression cases (12.*, 13.*).
const GROUPS: [&str; 9] = ["1", "2", "3", "4", "5", "6", "7", "9", "10"];

/// Cases run at once; the echo backend echoes as many connections in parallel.
const PARALLELISM: &str = "4";

/// The longest a whole run may take before it counts as hung (it takes about
/// 25 s; 9.7.x and 9.8.x alone are series of 1000 round trips each).
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The largest message of the suite (9.1.6, 9.2.6): 16 MiB.
const LARGEST: &str = "16777216";

/// What the suite counts as a pass.
const PASSING: [&str; 3] = ["OK", "NON-STRICT", "INFORMATIONAL"];

/// The order behaviors are shown in.
const BEHAVIORS: [&str; 6] = ["OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED", "ERROR"];

#[test]
fn autobahn_fuzzingclient_cases_pass_through_an_event_stream_echo_backend() {
    let Some(kosoku) = tool("kosoku") else { return };
    if tool("python-grpc").is_none() {
        return;
    }
    let herald = Herald::standalone(&[
        "--greeting",
        "none",
        // Each frame a client sends is a message event; a disconnect event
        // tells the echo backend a connection is gone.
        "--events",
        "message,disconnect",
        "--ping-interval",
        "0s",
        "--max-client-message-bytes",
        LARGEST,
        "--max-content-bytes",
        LARGEST,
        // A 16 MiB echo is queued whole for its connection.
        "--outbox-limit-bytes",
        "67108864",
    ]);
    let work = TempDir::new("conformance");
    let echo = EchoBackend::start(&herald.address("broker"), work.path());

    let outdir =
        std::env::var_os("HERALD_CONFORMANCE_REPORTS").map_or_else(|| work.path().join("reports"), PathBuf::from);
    let mut args = vec![herald.addr("ws").to_string(), "-p".into(), PARALLELISM.into(), "-o".into()];
    args.push(outdir.display().to_string());
    for group in GROUPS {
        args.extend(["-i".into(), format!("{group}.*")]);
    }
    let started = Instant::now();
    let run = run_within(Command::new(&kosoku).args(&args), work.path(), RUN_LIMIT);
    let elapsed = started.elapsed();
    let echo_summary = echo.stop();
    eprintln!("kosoku {} ({}): {:.1} s, exit {}", args.join(" "), kosoku.display(), elapsed.as_secs_f64(), run.status);
    eprintln!("echo backend: {echo_summary}");

    let index = outdir.join("index.json");
    let index: Value = match std::fs::read_to_string(&index) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON ({e})", index.display())),
        Err(e) => panic!("kosoku wrote no {} ({e}); it said:\n{}", index.display(), run.output),
    };
    let agents = index.as_object().expect("index.json maps agents to cases");
    assert_eq!(agents.len(), 1, "one server was tested: {:?}", agents.keys().collect::<Vec<_>>());
    let (agent, cases) = agents.iter().next().expect("one agent");
    let cases = cases.as_object().expect("the agent maps case ids to results");

    let mut table: BTreeMap<u32, BTreeMap<String, usize>> = BTreeMap::new();
    let mut failing = Vec::new();
    for (id, result) in cases {
        let behavior = result["behavior"].as_str().unwrap_or("?").to_owned();
        let group = case_key(id)[0];
        *table.entry(group).or_default().entry(behavior.clone()).or_default() += 1;
        if !PASSING.contains(&behavior.as_str()) {
            failing.push((case_key(id), id.clone(), result.clone()));
        }
    }
    eprintln!("{}", summary_table(agent, &table));
    for behavior in ["NON-STRICT", "INFORMATIONAL"] {
        let mut ids: Vec<&String> = cases.iter().filter(|(_, r)| r["behavior"] == behavior).map(|(id, _)| id).collect();
        ids.sort_by_key(|id| case_key(id));
        eprintln!("{behavior}: {}", ids.iter().map(|id| id.as_str()).collect::<Vec<_>>().join(", "));
    }
    failing.sort_by(|a, b| a.0.cmp(&b.0));
    let details: Vec<String> = failing.iter().map(|(_, id, result)| failure(&outdir, id, result)).collect();

    let ran: Vec<u32> = table.keys().copied().collect();
    let wanted: Vec<u32> = GROUPS.iter().map(|g| g.parse().expect("a number")).collect();
    assert_eq!(ran, wanted, "the case groups that ran; kosoku said:\n{}", run.output);
    // Autobahn's counts for these groups: 16 + 11 + 7 + 10 + 20 + 145 + 37 + 54 + 1.
    assert_eq!(cases.len(), 301, "cases run; kosoku said:\n{}", run.output);
    if !failing.is_empty() {
        // Keep the reports (HTML and JSON per case) to look at.
        std::mem::forget(work);
    }
    assert!(
        failing.is_empty(),
        "{} of {} cases failed (reports in {}):\n{}\nkosoku said:\n{}",
        failing.len(),
        cases.len(),
        outdir.display(),
        details.join("\n"),
        run.output
    );
    assert!(run.status.success(), "every case passed, yet kosoku exited {}:\n{}", run.status, run.output);
    // It says nothing but its summary unless something went wrong (a
    // refused publish other than to a connection already gone, a failed
    // ack, a broken stream).
    let trouble: Vec<&str> = echo_summary.lines().filter(|l| !l.starts_with("conformance_echo: done after")).collect();
    assert!(trouble.is_empty(), "the echo backend had trouble:\n{}", trouble.join("\n"));
}

/// `1.10.2` as `[1, 10, 2]`, to sort case ids as numbers.
fn case_key(id: &str) -> Vec<u32> {
    id.split('.').map(|n| n.parse().unwrap_or(u32::MAX)).collect()
}

/// A markdown table: one row per case group, one column per behavior.
fn summary_table(agent: &str, table: &BTreeMap<u32, BTreeMap<String, usize>>) -> String {
    let mut columns: Vec<&str> = BEHAVIORS.to_vec();
    for behavior in table.values().flat_map(BTreeMap::keys) {
        if !columns.contains(&behavior.as_str()) {
            columns.push(behavior);
        }
    }
    let mut out = format!("Autobahn fuzzingclient cases against {agent}:\n\n| group | cases |");
    for column in &columns {
        out.push_str(&format!(" {column} |"));
    }
    out.push_str(&format!("\n|---|---:|{}\n", "---:|".repeat(columns.len())));
    let mut totals = vec![0; columns.len()];
    for (group, counts) in table {
        out.push_str(&format!("| {group}.* | {} |", counts.values().sum::<usize>()));
        for (i, column) in columns.iter().enumerate() {
            let n = counts.get(*column).copied().unwrap_or(0);
            totals[i] += n;
            out.push_str(&format!(" {n} |"));
        }
        out.push('\n');
    }
    out.push_str(&format!("| all | {} |", totals.iter().sum::<usize>()));
    for n in totals {
        out.push_str(&format!(" {n} |"));
    }
    out
}

/// What a failing case expected and got, from its report.
fn failure(outdir: &Path, id: &str, summary: &Value) -> String {
    let mut text = format!(
        "- {id}: {} / close {} (remote close code {})",
        summary["behavior"].as_str().unwrap_or("?"),
        summary["behaviorClose"].as_str().unwrap_or("?"),
        summary["remoteCloseCode"]
    );
    let report = summary["reportfile"].as_str().map(|f| outdir.join(f));
    let Some(report) = report.and_then(|f| std::fs::read_to_string(f).ok()) else {
        return text + "\n    (no report file)";
    };
    let Ok(report) = serde_json::from_str::<Value>(&report) else {
        return text + "\n    (report is not JSON)";
    };
    for field in ["description", "expectation", "result", "resultClose"] {
        if let Some(value) = report[field].as_str() {
            text.push_str(&format!("\n    {field}: {value}"));
        }
    }
    for field in ["expected", "received", "expectedClose", "rxFrameStats", "txFrameStats", "wirelog"] {
        text.push_str(&format!("\n    {field}: {}", shorten(&report[field].to_string(), 600)));
    }
    text
}

/// At most `max` bytes of `s`, cut at a character, marked when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// How a command ended, and what it printed (stdout and stderr together).
struct Run {
    status: std::process::ExitStatus,
    output: String,
}

/// Runs `command` with its output in a file under `dir`; kills it past `limit`.
fn run_within(command: &mut Command, dir: &Path, limit: Duration) -> Run {
    let path = dir.join("kosoku.log");
    let log = std::fs::File::create(&path).expect("create the kosoku log");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log file"))
        .stderr(log)
        .spawn()
        .expect("spawn kosoku");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait kosoku") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let output = std::fs::read_to_string(&path).unwrap_or_default();
            panic!("kosoku still running after {limit:?}; it said:\n{output}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Run { status, output: std::fs::read_to_string(&path).unwrap_or_default() }
}

/// `tests/python/conformance_echo.py`, consuming the broker's events. Killed
/// when dropped; [`EchoBackend::stop`] ends it in order, for its summary.
struct EchoBackend {
    child: Child,
    log: PathBuf,
}

impl EchoBackend {
    /// Starts it and waits until its event stream is open.
    fn start(broker: &str, dir: &Path) -> EchoBackend {
        let log = dir.join("echo.log");
        let stderr = std::fs::File::create(&log).expect("create the echo log");
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/python/conformance_echo.py"))
            .args(["--broker", broker])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn python3 conformance_echo.py");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut echo = EchoBackend { child, log };
        // Stub generation (protoc) comes first: allow it some more time.
        let deadline = Instant::now() + PATIENCE * 3;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == "conformance_echo: consuming" => return echo,
                Ok(_) => {}
                Err(_) => {
                    echo.kill();
                    panic!("the echo backend did not start consuming; it said:\n{}", echo.log_text());
                }
            }
        }
    }

    /// Ends it with SIGTERM (killing it if it lingers); returns what it said.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on a child we own; no memory is shared.
        unsafe {
            libc::kill(i32::try_from(self.child.id()).expect("pid fits i32"), libc::SIGTERM);
        }
        let deadline = Instant::now() + PATIENCE;
        while self.child.try_wait().expect("try_wait the echo backend").is_none() {
            if Instant::now() > deadline {
                self.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.log_text().trim().to_owned()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- echo backend log -----\n{}", self.log_text());
        }
    }
}
