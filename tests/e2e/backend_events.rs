//! Backends, end to end, with clients nobody on this project wrote: Python
//! grpcio stubs consuming connection events in consumer groups while
//! `websockets` raw clients and headless Chromium come and go (on one
//! herald, and on a cluster losing a broker), a Python `http.server`
//! receiving and verifying webhooks, and one playing the connect hook (both
//! over HTTPS too, with certificates of a test CA).
//!
//! The checks live in the scripts (tests/python/backend_*.py, each
//! documented at its top); a test here starts the herald processes, plays
//! its part in the script's story, and asserts the script's verdict.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Client, Cluster, Herald, TempDir, curl_upgrade, repo_root, run_python, tool, wait_until};
use crate::tls::Pki;

/// The webhook's shared secret (32 characters).
const WEBHOOK_SECRET: &str = "e2e-webhook-secret-0123456789abc";

/// Whether Python can import `module`. When it cannot: fails under
/// `HERALD_TEST_REQUIRE_TOOLS=1`, otherwise says why and answers false, as
/// [`tool`] does.
fn python_module(module: &str) -> bool {
    let found =
        Command::new("python3").args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success());
    if !found {
        let msg = format!("the Python module {module} is not installed; scripts/test installs it");
        assert!(std::env::var("HERALD_TEST_REQUIRE_TOOLS").as_deref() != Ok("1"), "{msg}");
        eprintln!("SKIPPED: {msg}");
    }
    found
}

/// Python with grpcio stubs and `websockets`.
fn python_clients() -> bool {
    tool("python-grpc").is_some() && python_module("websockets")
}

/// A Python script from tests/python/ that tells its caller, on its
/// standard output, when it is the caller's turn (`<word> <rest>`), and is
/// answered on its standard input. Killed if dropped still running.
struct Script {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Every line it printed so far.
    printed: Vec<String>,
    dir: TempDir,
}

impl Script {
    fn start(name: &'static str, args: &[&str]) -> Script {
        let dir = TempDir::new("script");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("create a log file");
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/python").join(name))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Script { name, child, stdin, lines, printed: Vec::new(), dir }
    }

    /// Reads lines until one is `<word> <rest>`, within `within`; returns the rest.
    fn expect(&mut self, word: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                panic!("{} did not say {word:?} within {within:?}:\n{}", self.name, self.output());
            };
            self.printed.push(line.clone());
            if line == word {
                return String::new();
            }
            if let Some(rest) = line.strip_prefix(word).and_then(|r| r.strip_prefix(' ')) {
                return rest.to_owned();
            }
        }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the script's stdin is open");
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).unwrap_or_else(|e| panic!("tell {}: {e}", self.name));
    }

    /// Waits for the script to end, within `within`; asserts that it
    /// succeeded and printed `<verdict>`; returns everything it printed.
    fn finish(mut self, within: Duration, verdict: &str) -> String {
        drop(self.stdin.take());
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "{} still running after {within:?}:\n{}", self.name, self.output());
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends with the script's output.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.printed.push(line);
        }
        let output = self.output();
        assert!(status.success(), "{} failed ({status}):\n{output}", self.name);
        assert!(self.printed.iter().any(|l| l == verdict), "{} did not print {verdict:?}:\n{output}", self.name);
        self.printed.join("\n")
    }

    fn output(&self) -> String {
        let stderr = std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        format!("{}\n--- stderr ---\n{stderr}", self.printed.join("\n"))
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The number in a script's `- expected events: N per group` line.
fn expected_events(output: &str) -> f64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix("- expected events: ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no expected events line in:\n{output}"))
}

#[test]
fn every_group_gets_each_event_of_raw_and_browser_clients_exactly_once_and_instances_share_a_group() {
    let (Some(_), Some(chromium), Some(chromedriver)) =
        (tool("python-selenium"), tool("chromium"), tool("chromedriver"))
    else {
        return;
    };
    if !python_clients() {
        return;
    }
    let herald = Herald::standalone(&["--events", "all"]);
    let out = run_python(
        "backend_events.py",
        &[
            "standalone",
            "--broker",
            &herald.address("broker"),
            "--ws",
            &herald.ws_url(),
            "--chromium",
            &chromium.to_string_lossy(),
            "--chromedriver",
            &chromedriver.to_string_lossy(),
        ],
    );
    println!("{out}");
    assert!(out.contains("backend_events: all checks passed"), "{out}");
    assert_eq!(
        herald.metric("herald_events_reported_total"),
        expected_events(&out),
        "the broker stored each event once"
    );
}

#[test]
fn every_group_gets_each_event_exactly_once_across_a_broker_killed_under_its_consumers_and_a_gateway() {
    if !python_clients() {
        return;
    }
    let Some(mut cluster) = Cluster::start(3, &["--event-ack-wait", "3s"]) else { return };
    let [b1, b2, b3] = [0, 1, 2].map(|i| cluster.address(i));
    // Each lists every broker, in its own order: the first is where it starts.
    let g1 = Herald::ws(&format!("{b1},{b2},{b3}"), &["--events", "all"]);
    let g2 = Herald::ws(&format!("{b2},{b3},{b1}"), &["--events", "all"]);
    let (billing_1, billing_2, audit) =
        (format!("billing={b1},{b2},{b3}"), format!("billing={b2},{b3},{b1}"), format!("audit={b1},{b3},{b2}"));
    let mut script = Script::start(
        "backend_events.py",
        &[
            "cluster",
            "--consumer",
            &billing_1,
            "--consumer",
            &billing_2,
            "--consumer",
            &audit,
            "--ws",
            &g1.ws_url(),
            "--ws",
            &g2.ws_url(),
            "--killed",
            &b1,
        ],
    );
    script.expect("kill", Duration::from_secs(30));
    // b1 holds g1's session, billing-1 and audit-1.
    cluster.brokers[0].kill();
    script.say("killed");
    let out = script.finish(Duration::from_secs(60), "backend_events: all checks passed");
    println!("{out}");
    let g1_log = g1.log_text();
    assert!(
        [&b2, &b3].iter().any(|b| g1_log.contains(&format!("linked to broker broker={b}"))),
        "g1 failed over from {b1} to another broker:\n{g1_log}"
    );
}

/// A standalone herald's options for the webhook script at `url`, and
/// `extra`. Two attempts per batch and a short ack wait: three refusals in
/// a row make a batch wait for the ack wait before it is POSTed again.
fn webhook_args<'a>(url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--events",
        "all",
        "--webhook-url",
        url,
        "--webhook-secret",
        WEBHOOK_SECRET,
        "--webhook-batch",
        "10",
        "--webhook-attempts",
        "2",
        "--event-ack-wait",
        "2s",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn webhooks_arrive_signed_once_each_and_survive_an_endpoint_that_fails() {
    if !python_clients() {
        return;
    }
    let mut script =
        Script::start("backend_webhook.py", &["--secret", WEBHOOK_SECRET, "--batch", "10", "--refuse", "3"]);
    let url = script.expect("listening", Duration::from_secs(30));
    let herald = Herald::standalone(&webhook_args(&url, &[]));
    script.say(&format!("go {}", herald.ws_url()));
    let out = script.finish(Duration::from_secs(60), "backend_webhook: all checks passed");
    println!("{out}");
    assert_eq!(herald.metric("herald_webhook_requests_total{outcome=\"refused\"}"), 3.0);
    assert_eq!(herald.metric("herald_webhook_requests_total{outcome=\"failed\"}"), 0.0);
    assert!(herald.metric("herald_webhook_batches_deferred_total") >= 1.0, "a batch waited for the ack wait");
    assert_eq!(herald.metric("herald_webhook_events_total"), herald.metric("herald_events_reported_total"));
}

/// The endpoint's certificate (`<name>.pem`, `<name>-key.pem`) for
/// 127.0.0.1, signed by the test CA or by a stranger nobody trusts, as the
/// script's `--tls-cert`/`--tls-key`.
fn endpoint_certificate(pki: &Pki, name: &str, trusted: bool) -> [String; 4] {
    let (cert, key) = pki.issue_for(name, &["127.0.0.1"], trusted, (2020, 2090));
    ["--tls-cert".to_owned(), cert, "--tls-key".to_owned(), key]
}

/// Webhooks to an `https://` endpoint: verified against `--webhook-ca`,
/// they arrive as over plain HTTP; an endpoint whose certificate that CA
/// did not sign is sent nothing, and the failures say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_over_https_reach_only_an_endpoint_the_ca_vouches_for() {
    if !python_clients() {
        return;
    }
    let pki = Pki::generate();
    let tls = endpoint_certificate(&pki, "webhook", true);
    let args: Vec<&str> = ["--secret", WEBHOOK_SECRET, "--batch", "10", "--refuse", "3"]
        .into_iter()
        .chain(tls.iter().map(String::as_str))
        .collect();
    let mut script = Script::start("backend_webhook.py", &args);
    let url = script.expect("listening", Duration::from_secs(30));
    assert!(url.starts_with("https://"), "{url}");
    let webhook = |ca: &str| Herald::standalone(&webhook_args(&url, &["--webhook-ca", &pki.path(ca)]));
    let deceived = webhook("stranger-ca.pem");
    let _client = Client::connect(&deceived.ws_url()).await;
    tokio::task::block_in_place(|| {
        wait_until("the deceived herald's webhook POSTs fail", || {
            deceived.metric("herald_webhook_requests_total{outcome=\"failed\"}") >= 1.0
        });
    });
    let log = deceived.log_text();
    assert!(log.contains("webhook POST failed") && log.contains("UnknownIssuer"), "says why:\n{log}");

    let herald = webhook("ca.pem");
    script.say(&format!("go {}", herald.ws_url()));
    let out =
        tokio::task::block_in_place(|| script.finish(Duration::from_secs(60), "backend_webhook: all checks passed"));
    println!("{out}");
    assert_eq!(herald.metric("herald_webhook_requests_total{outcome=\"failed\"}"), 0.0);
    assert_eq!(herald.metric("herald_webhook_events_total"), herald.metric("herald_events_reported_total"));
    assert_eq!(deceived.metric("herald_webhook_requests_total{outcome=\"ok\"}"), 0.0, "nothing reached the receiver");
}

/// The connect hook's whole story, over HTTPS: the hook's certificate is
/// verified against `--connect-hook-ca`. (Plain HTTP takes the same path
/// past the connection; the webhooks' scenario covers it.) A hook whose
/// certificate that CA did not sign counts as down.
#[test]
fn a_connect_hook_decides_who_gets_in_as_whom_and_its_absence_follows_the_down_policy() {
    if !python_clients() {
        return;
    }
    let pki = Pki::generate();
    let tls = endpoint_certificate(&pki, "hook", true);
    let mut script = Script::start("backend_hook.py", &tls.iter().map(String::as_str).collect::<Vec<_>>());
    let hook = script.expect("listening", Duration::from_secs(30));
    assert!(hook.starts_with("https://"), "{hook}");
    let untrusting = Herald::standalone(&["--connect-hook", &hook, "--connect-hook-ca", &pki.path("stranger-ca.pem")]);
    let refused = curl_upgrade(&format!("http://{}/", untrusting.addr("ws")), &[]);
    assert_eq!(refused.status, 503, "a hook nobody vouches for is down: {}", refused.body);
    let log = untrusting.log_text();
    assert!(log.contains("connect hook down") && log.contains("UnknownIssuer"), "says why:\n{log}");
    let ca = pki.path("ca.pem");
    let asking = [
        "--connect-hook",
        hook.as_str(),
        "--connect-hook-ca",
        &ca,
        "--connect-hook-timeout",
        "500ms",
        "--greeting",
        "json",
    ];
    let refusing = Herald::standalone(&[&asking[..], &["--events", "all", "--event-headers", "user-agent"]].concat());
    let letting_in = Herald::standalone(&[&asking[..], &["--connect-hook-down", "anonymous"]].concat());
    let urls = json!({
        "a_ws": refusing.ws_url(),
        "a_http": refusing.http_url(),
        "a_broker": refusing.address("broker"),
        "b_ws": letting_in.ws_url(),
    });
    script.say(&format!("go {urls}"));
    let out = script.finish(Duration::from_secs(60), "backend_hook: all checks passed");
    println!("{out}");
}
