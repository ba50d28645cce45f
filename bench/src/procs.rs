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
use crate::nats::Nats;
use crate::procfs::Watched;

/// How long a started process may take to announce its listeners and get ready.
const STARTUP: Duration = Duration::from_secs(15);

/// Where started processes listen: loopback, a port of the kernel's choosing.
const ANY: &str = "127.0.0.1:0";

/// Which herald processes to start.
#[derive(Debug, Clone)]
pub enum Topology {
    /// One broker, `gateways` WebSocket gateways sharing one port
    /// (SO_REUSEPORT), and an HTTP gateway when needed.
    Split { gateways: usize, http: bool },
    /// A `nats-server` (the binary at `nats_server`), `brokers` brokers
    /// joined through it, and `gateways` WebSocket gateways on a port each,
    /// gateway `i` attached to broker `i mod brokers` with the others as
    /// failover; an HTTP gateway when needed.
    Cluster { brokers: usize, gateways: usize, http: bool, nats_server: PathBuf },
    /// All roles in one `herald standalone` process.
    Standalone,
}

/// Where to find a running herald (every field optional but what the scenario uses).
#[derive(Debug, Clone, Default)]
pub struct External {
    pub ws_urls: Vec<WsUrl>,
    pub http: Option<SocketAddr>,
    pub grpc: Vec<SocketAddr>,
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
    /// Broker gRPC addresses; publisher lane `i` uses `grpc[i % len]`.
    pub grpc: Vec<SocketAddr>,
    /// Processes holding WebSocket connections (their RSS is the memory figure).
    pub gateway_pids: Vec<u32>,
    /// Every herald process known, by role, for CPU figures.
    pub watched: Vec<Watched>,
    /// The key publishers present, if herald requires one.
    pub api_key: Option<String>,
    /// Admin endpoints (`/metrics`) of every herald process known.
    pub admin: Vec<SocketAddr>,
}

impl Endpoints {
    pub fn http(&self) -> anyhow::Result<SocketAddr> {
        self.http.context("no HTTP gateway address (give --http-url)")
    }

    pub fn grpc(&self) -> anyhow::Result<&[SocketAddr]> {
        if self.grpc.is_empty() {
            bail!("no broker gRPC address (give --grpc-addr)");
        }
        Ok(&self.grpc)
    }
}

/// Stops the started processes in reverse order: gateways before their
/// brokers, brokers before the NATS server they are joined through.
impl Drop for Herald {
    fn drop(&mut self) {
        while let Some(proc) = self.procs.pop() {
            drop(proc);
        }
        drop(self.nats.take());
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
    nats: Option<Nats>,
}

/// How to start herald processes.
struct Launcher<'a> {
    bin: &'a Path,
    logs: PathBuf,
    api_key: Option<&'a str>,
    /// With client auth: the HS256 secret the WebSocket gateways check tokens with.
    jwt_secret: Option<&'a str>,
    /// Variables set for every started process (e.g. `HERALD_EVENTS`).
    env: &'a [(String, String)],
}

/// The client channel namespaces of every herald the bench starts: `bench:`
/// keeps no history, `hist:` keeps the last 1,000 publications of each
/// channel (brokers read it for the history, gateways for the rules).
pub const BENCH_NAMESPACES: &str = "bench:subscribe=anyone,publish=subscribers;\
                                    hist:subscribe=anyone,publish=subscribers,history=1000,history_ttl=10m";

/// The roles that hold WebSocket connections, and so check client tokens.
const CLIENT_ROLES: [&str; 2] = ["ws", "standalone"];

impl Herald {
    /// Starts `topology` from the binary at `bin` (requiring `api_key` when
    /// given, and a JWT signed with `jwt_secret` from every WebSocket client
    /// when given; every process with the variables `env` set) and waits
    /// until it is ready. Whatever was started is stopped again if that fails.
    pub async fn start(
        bin: &Path,
        topology: &Topology,
        api_key: Option<&str>,
        jwt_secret: Option<&str>,
        env: &[(String, String)],
    ) -> anyhow::Result<Herald> {
        let logs = std::env::temp_dir().join(format!("herald-bench-{}", std::process::id()));
        std::fs::create_dir_all(&logs)?;
        let endpoints = Endpoints { api_key: api_key.map(str::to_owned), ..Endpoints::default() };
        let mut herald = Herald { endpoints, procs: Vec::new(), nats: None };
        let launcher = Launcher { bin, logs, api_key, jwt_secret, env };
        match topology {
            Topology::Standalone => {
                let args = ["--broker-listen", ANY, "--ws-listen", ANY, "--http-listen", ANY, "--admin-listen", ANY];
                let standalone = launcher.spawn("standalone", &args, &["broker", "ws", "http", "admin"])?;
                let (pid, addrs) = herald.keep("herald", standalone);
                herald.endpoints.gateway_pids.push(pid);
                wait_ready(addrs["admin"]).await?;
                herald.endpoints.admin.push(addrs["admin"]);
                herald.endpoints.ws_urls.push(ws_url(addrs["ws"]));
                herald.endpoints.http = Some(addrs["http"]);
                herald.endpoints.grpc.push(addrs["broker"]);
            }
            Topology::Split { gateways, http } => herald.split(&launcher, None, 1, *gateways, *http).await?,
            Topology::Cluster { brokers, gateways, http, nats_server } => {
                let nats = Nats::start(nats_server, &launcher.logs, STARTUP)?;
                let url = nats.url();
                herald.endpoints.watched.push(Watched { role: "nats".into(), pid: nats.pid() });
                herald.nats = Some(nats);
                herald.split(&launcher, Some(&url), *brokers, *gateways, *http).await?;
            }
        }
        Ok(herald)
    }

    /// Starts `brokers` brokers (joined through `nats` when given), then the
    /// WebSocket gateways spread over them, then the HTTP gateway if `http`.
    async fn split(
        &mut self,
        launcher: &Launcher<'_>,
        nats: Option<&str>,
        brokers: usize,
        gateways: usize,
        http: bool,
    ) -> anyhow::Result<()> {
        for _ in 0..brokers.max(1) {
            let mut args = vec!["--listen", ANY, "--admin-listen", ANY];
            if let Some(url) = nats {
                args.extend(["--nats", url]);
            }
            let (_, addrs) = self.keep("broker", launcher.spawn("broker", &args, &["broker", "admin"])?);
            wait_ready(addrs["admin"]).await?;
            self.endpoints.admin.push(addrs["admin"]);
            self.endpoints.grpc.push(addrs["broker"]);
        }
        // One broker: gateways share a port (the kernel spreads connections
        // evenly). Several: a port each, so clients spread over brokers too.
        let reuse_port = self.endpoints.grpc.len() == 1 && gateways > 1;
        let mut listen = ANY.to_owned();
        for i in 0..gateways.max(1) {
            let worker_id = format!("gw{i}");
            let broker_list = self.broker_list(i);
            let mut args =
                vec!["--listen", &listen, "--admin-listen", ANY, "--broker", &broker_list, "--worker-id", &worker_id];
            if reuse_port {
                args.push("--reuse-port");
            }
            let (pid, addrs) = self.keep("gw", launcher.spawn("ws", &args, &["ws", "admin"])?);
            self.endpoints.gateway_pids.push(pid);
            wait_ready(addrs["admin"]).await?;
            self.endpoints.admin.push(addrs["admin"]);
            if !reuse_port || i == 0 {
                self.endpoints.ws_urls.push(ws_url(addrs["ws"]));
            }
            if reuse_port {
                listen = addrs["ws"].to_string();
            }
        }
        if http {
            let broker_list = self.broker_list(0);
            let args = ["--listen", ANY, "--admin-listen", ANY, "--broker", &broker_list];
            let (_, addrs) = self.keep("http", launcher.spawn("http", &args, &["http", "admin"])?);
            self.endpoints.http = Some(addrs["http"]);
            self.endpoints.admin.push(addrs["admin"]);
        }
        Ok(())
    }

    /// Every broker address, comma-separated, starting with broker `i mod brokers`.
    fn broker_list(&self, i: usize) -> String {
        let brokers = &self.endpoints.grpc;
        let first = i % brokers.len().max(1);
        brokers[first..].iter().chain(&brokers[..first]).map(ToString::to_string).collect::<Vec<_>>().join(",")
    }

    /// Keeps `proc` (to stop it with the rest) and watches its CPU under
    /// `role`; returns its process id and announced addresses.
    fn keep(&mut self, role: &str, proc: Proc) -> (u32, HashMap<String, SocketAddr>) {
        let (pid, addrs) = (proc.child.id(), proc.addrs.clone());
        self.endpoints.watched.push(Watched { role: role.into(), pid });
        self.procs.push(proc);
        (pid, addrs)
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
            grpc: external.grpc.clone(),
            gateway_pids: external.gateway_pids.clone(),
            watched,
            api_key: external.api_key.clone(),
            admin: external.admin.clone(),
        };
        Ok(Herald { endpoints, procs: Vec::new(), nats: None })
    }

    /// Describes every started process that has exited (it should not have).
    pub fn exited(&mut self) -> Vec<String> {
        let mut exited: Vec<String> = self
            .procs
            .iter_mut()
            .filter_map(|proc| {
                let status = proc.child.try_wait().ok()??;
                Some(format!("herald {} exited during the run ({status}); log: {}", proc.role, proc.log.display()))
            })
            .collect();
        exited.extend(self.nats.as_mut().and_then(Nats::exited));
        exited
    }
}

fn ws_url(addr: SocketAddr) -> WsUrl {
    WsUrl { addr, path: "/".into() }
}

impl Launcher<'_> {
    /// Starts `herald <role> <args>` and waits for the listeners named in `expect`.
    fn spawn(&self, role: &str, args: &[&str], expect: &[&str]) -> anyhow::Result<Proc> {
        let log_path: PathBuf = self.logs.join(format!("{role}-{}.log", unique()));
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(self.bin);
        if let Some(key) = self.api_key {
            command.env("HERALD_API_KEY", key);
        }
        // In the environment rather than the arguments, so that `ps` does not show the secret.
        if let Some(secret) = self.jwt_secret.filter(|_| CLIENT_ROLES.contains(&role)) {
            command.env("HERALD_CLIENT_AUTH", "jwt").env("HERALD_JWT_SECRET", secret);
        }
        // The namespaces of the channel scenarios; an older herald ignores them.
        command.env("HERALD_NAMESPACES", BENCH_NAMESPACES);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = command
            .arg(role)
            .args(args)
            .env("RUST_LOG", std::env::var("HERALD_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!("starting {} (build it with `cargo build --release -p herald`)", self.bin.display())
            })?;
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
            if let Some((kind, addr)) = line.strip_prefix("herald: ").and_then(|rest| rest.split_once(" listening on "))
            {
                proc.addrs.insert(kind.to_owned(), endpoints::loopback(addr.trim())?);
            }
        }
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Ok(proc)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_gateway_lists_its_own_broker_first_then_the_others() {
        let grpc = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"].map(|a| a.parse().unwrap()).to_vec();
        let herald = Herald { endpoints: Endpoints { grpc, ..Endpoints::default() }, procs: Vec::new(), nats: None };
        assert_eq!(herald.broker_list(0), "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3");
        assert_eq!(herald.broker_list(1), "127.0.0.1:2,127.0.0.1:3,127.0.0.1:1");
        assert_eq!(herald.broker_list(5), "127.0.0.1:3,127.0.0.1:1,127.0.0.1:2");
    }
}
