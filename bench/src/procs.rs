//! herald under test: either processes the harness starts itself (on
//! 127.0.0.1, port 0, addresses read from their `herald: <kind> listening on
//! <addr>` lines) or a herald already running at given addresses.
//!
//! Started processes inherit the environment, so `HERALD_*` variables tune
//! them; their logs go to files in a temporary directory (level from
//! `HERALD_BENCH_LOG`, default `warn`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::endpoints::{self, WsUrl};
use crate::http1;
use crate::procfs::Watched;

/// How long a started process may take to announce its listeners and get ready.
const STARTUP: Duration = Duration::from_secs(15);

/// Which herald processes to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One broker, `gateways` WebSocket gateways sharing one port
    /// (SO_REUSEPORT), and an HTTP gateway when needed.
    Split { gateways: usize, http: bool },
    /// All roles in one `herald standalone` process.
    Standalone,
}

/// Where to find a running herald (every field optional but what the scenario uses).
#[derive(Debug, Clone, Default)]
pub struct External {
    pub ws_urls: Vec<WsUrl>,
    pub http: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub admin: Vec<SocketAddr>,
    /// Gateway process ids, for memory and CPU figures.
    pub gateway_pids: Vec<u32>,
    pub api_key: Option<String>,
}

/// The addresses and processes of the herald under test.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub ws_urls: Vec<WsUrl>,
    pub http: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    /// Processes holding WebSocket connections (their RSS is the memory figure).
    pub gateway_pids: Vec<u32>,
    /// Every herald process known, by role, for CPU figures.
    pub watched: Vec<Watched>,
    /// The key publishers present, if herald requires one.
    pub api_key: Option<String>,
}

impl Endpoints {
    pub fn http(&self) -> anyhow::Result<SocketAddr> {
        self.http.context("no HTTP gateway address (give --http-url)")
    }

    pub fn grpc(&self) -> anyhow::Result<SocketAddr> {
        self.grpc.context("no broker gRPC address (give --grpc-addr)")
    }
}

/// Stops the started processes in reverse order: clients of the broker first.
impl Drop for Herald {
    fn drop(&mut self) {
        while let Some(proc) = self.procs.pop() {
            drop(proc);
        }
    }
}

/// One started herald process, killed when dropped.
struct Proc {
    role: String,
    child: Child,
    addrs: HashMap<String, SocketAddr>,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Keep only logs that say something (and their directory while it holds one).
        if std::fs::metadata(&self.log).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&self.log);
            if let Some(dir) = self.log.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// A herald for one run: started processes (stopped when dropped) or an external one.
pub struct Herald {
    pub endpoints: Endpoints,
    procs: Vec<Proc>,
}

impl Herald {
    /// Starts `topology` from the binary at `bin` (requiring `api_key` when
    /// given) and waits until it is ready.
    pub async fn start(bin: &Path, topology: Topology, api_key: Option<&str>) -> anyhow::Result<Herald> {
        let logs = std::env::temp_dir().join(format!("herald-bench-{}", std::process::id()));
        std::fs::create_dir_all(&logs)?;
        let mut procs = Vec::new();
        let mut endpoints = Endpoints { api_key: api_key.map(str::to_owned), ..Endpoints::default() };
        let spawn = |role: &str, args: &[&str], expect: &[&str]| spawn(bin, &logs, role, args, expect, api_key);
        let any = "127.0.0.1:0";
        match topology {
            Topology::Standalone => {
                let args = ["--broker-listen", any, "--ws-listen", any, "--http-listen", any, "--admin-listen", any];
                let herald = spawn("standalone", &args, &["broker", "ws", "http", "admin"])?;
                wait_ready(herald.addrs["admin"]).await?;
                endpoints.ws_urls.push(ws_url(herald.addrs["ws"]));
                endpoints.http = Some(herald.addrs["http"]);
                endpoints.grpc = Some(herald.addrs["broker"]);
                endpoints.gateway_pids.push(herald.child.id());
                endpoints.watched.push(Watched { role: "herald".into(), pid: herald.child.id() });
                procs.push(herald);
            }
            Topology::Split { gateways, http } => {
                let broker = spawn("broker", &["--listen", any, "--admin-listen", any], &["broker", "admin"])?;
                let broker_addr = broker.addrs["broker"].to_string();
                endpoints.grpc = Some(broker.addrs["broker"]);
                endpoints.watched.push(Watched { role: "broker".into(), pid: broker.child.id() });
                procs.push(broker);
                let mut listen = any.to_owned();
                for i in 0..gateways.max(1) {
                    let worker_id = format!("gw{i}");
                    let mut args = vec![
                        "--listen",
                        &listen,
                        "--admin-listen",
                        any,
                        "--broker",
                        &broker_addr,
                        "--worker-id",
                        &worker_id,
                    ];
                    if gateways > 1 {
                        args.push("--reuse-port");
                    }
                    let gateway = spawn("ws", &args, &["ws", "admin"])?;
                    wait_ready(gateway.addrs["admin"]).await?;
                    if i == 0 {
                        listen = gateway.addrs["ws"].to_string();
                        endpoints.ws_urls.push(ws_url(gateway.addrs["ws"]));
                    }
                    endpoints.gateway_pids.push(gateway.child.id());
                    endpoints.watched.push(Watched { role: "gw".into(), pid: gateway.child.id() });
                    procs.push(gateway);
                }
                if http {
                    let args = ["--listen", any, "--admin-listen", any, "--broker", &broker_addr];
                    let gateway = spawn("http", &args, &["http", "admin"])?;
                    endpoints.http = Some(gateway.addrs["http"]);
                    endpoints.watched.push(Watched { role: "http".into(), pid: gateway.child.id() });
                    procs.push(gateway);
                }
            }
        }
        Ok(Herald { endpoints, procs })
    }

    /// A herald that is already running; waits until its admin endpoints say ready.
    pub async fn external(external: &External) -> anyhow::Result<Herald> {
        for &admin in &external.admin {
            wait_ready(admin).await?;
        }
        let watched = external.gateway_pids.iter().map(|&pid| Watched { role: "gw".into(), pid }).collect();
        let endpoints = Endpoints {
            ws_urls: external.ws_urls.clone(),
            http: external.http,
            grpc: external.grpc,
            gateway_pids: external.gateway_pids.clone(),
            watched,
            api_key: external.api_key.clone(),
        };
        Ok(Herald { endpoints, procs: Vec::new() })
    }

    /// Describes every started process that has exited (it should not have).
    pub fn exited(&mut self) -> Vec<String> {
        self.procs
            .iter_mut()
            .filter_map(|proc| {
                let status = proc.child.try_wait().ok()??;
                Some(format!("herald {} exited during the run ({status}); log: {}", proc.role, proc.log.display()))
            })
            .collect()
    }
}

fn ws_url(addr: SocketAddr) -> WsUrl {
    WsUrl { addr, path: "/".into() }
}

/// Starts `herald <role> <args>` and waits for the listeners named in `expect`.
fn spawn(
    bin: &Path,
    logs: &Path,
    role: &str,
    args: &[&str],
    expect: &[&str],
    api_key: Option<&str>,
) -> anyhow::Result<Proc> {
    let log_path: PathBuf = logs.join(format!("{role}-{}.log", unique()));
    let log = std::fs::File::create(&log_path)?;
    let mut command = Command::new(bin);
    if let Some(key) = api_key {
        command.env("HERALD_API_KEY", key);
    }
    let mut child = command
        .arg(role)
        .args(args)
        .env("RUST_LOG", std::env::var("HERALD_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} (build it with `cargo build --release -p herald`)", bin.display()))?;
    let stdout = child.stdout.take().context("herald stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    // Keeps reading so the process never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut proc = Proc { role: role.to_owned(), child, addrs: HashMap::new(), log: log_path.clone() };
    let deadline = Instant::now() + STARTUP;
    while !expect.iter().all(|kind| proc.addrs.contains_key(*kind)) {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).map_err(|_| {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            anyhow::anyhow!("herald {role} did not announce {expect:?}; its log ({}):\n{log}", log_path.display())
        })?;
        if let Some((kind, addr)) = line.strip_prefix("herald: ").and_then(|rest| rest.split_once(" listening on ")) {
            proc.addrs.insert(kind.to_owned(), endpoints::loopback(addr.trim())?);
        }
    }
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Ok(proc)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Waits until `GET /readyz` on `admin` answers 200.
async fn wait_ready(admin: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP;
    let mut last = String::new();
    while Instant::now() < deadline {
        match probe(admin).await {
            Ok(()) => return Ok(()),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("herald at {admin} not ready: {last}")
}

async fn probe(admin: SocketAddr) -> anyhow::Result<()> {
    let (status, body) = http1::Conn::connect(admin, None).await?.get("/readyz").await?;
    if status != 200 {
        bail!("/readyz answered {status}: {}", String::from_utf8_lossy(&body).trim());
    }
    Ok(())
}
