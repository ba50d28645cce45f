//! TLS on every link: `wss://` and HTTPS for clients and publishers, gRPC
//! TLS (optionally mutual) between gateways, publishers and brokers, TLS
//! and credentials to NATS, with certificates made by the test. Also the
//! refusals: no, an untrusted or an expired client certificate, wrong files,
//! and a secret that would cross the network in clear.

use std::sync::Arc;

use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::support::{Client, Herald, TempDir, curl, parse_greeting, tool, wait_until};

/// A self-signed certificate for 127.0.0.1, written as PEM files.
struct Certificate {
    dir: TempDir,
    pem: String,
}

impl Certificate {
    fn generate() -> Self {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let dir = TempDir::new("tls");
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), signing_key.serialize_pem()).unwrap();
        Certificate { dir, pem: cert.pem() }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A client trusting only this certificate.
    fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls_pki_types::CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

/// Connects over `wss://` and returns the stream and its greeting.
async fn wss_connect(
    certificate: &Certificate,
    addr: std::net::SocketAddr,
) -> (tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>, String) {
    use futures_util::StreamExt;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = certificate.connector().connect(ServerName::IpAddress(addr.ip().into()), tcp).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}/"), tls).await.unwrap();
    let greeting = ws.next().await.unwrap().unwrap().into_text().unwrap().to_string();
    (ws, greeting)
}

#[tokio::test]
async fn standalone_serves_wss_and_https_with_a_configured_certificate() {
    use futures_util::StreamExt;
    let certificate = Certificate::generate();
    let (cert, key) = (certificate.path("cert.pem"), certificate.path("key.pem"));
    let herald = Herald::standalone(&["--tls-cert", &cert, "--tls-key", &key]);
    let (mut ws, greeting) = wss_connect(&certificate, herald.addr("ws")).await;
    let (worker, connection) = parse_greeting(&greeting);

    let base = format!("https://{}", herald.addr("http"));
    let url = format!("{base}/?to_worker_id={worker}&to_connection_id={connection}&content=over+tls");
    let reply = curl(&["--cacert", &cert, &url]);
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
    assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap().as_str(), "over tls");

    let http2 = std::process::Command::new("curl")
        .args(["-sS", "--http2", "--cacert", &cert, "-o", "/dev/null", "-w", "%{http_version}"])
        .arg(format!("{base}/?content=h2"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&http2.stdout), "2", "HTTP/2 is negotiated over ALPN");

    // Without trusting the certificate, or without TLS, nothing gets through.
    assert_eq!(curl(&[&url]).status, 0, "curl refuses an untrusted certificate");
    assert_eq!(curl(&[&format!("http://{}/?content=plain", herald.addr("http"))]).status, 0);
    let plain = tokio_tungstenite::connect_async(format!("ws://{}/", herald.addr("ws"))).await;
    assert!(plain.is_err(), "a plain ws:// client cannot talk to a wss:// listener");
    wait_until("failed handshakes are counted", || herald.metric("herald_ws_handshakes_failed_total") >= 1.0);
}

#[tokio::test]
async fn a_ws_gateway_role_serves_wss_behind_a_plain_broker() {
    use futures_util::StreamExt;
    let certificate = Certificate::generate();
    let (cert, key) = (certificate.path("cert.pem"), certificate.path("key.pem"));
    let broker = Herald::broker(&[]);
    let gateway = Herald::ws(&broker.address("broker"), &["--tls-cert", &cert, "--tls-key", &key]);
    let http = Herald::http(&broker.address("broker"), &["--tls-cert", &cert, "--tls-key", &key]);
    let (mut ws, _) = wss_connect(&certificate, gateway.addr("ws")).await;
    let reply = curl(&["--cacert", &cert, &format!("https://{}/?content=hello+tls", http.addr("http"))]);
    assert_eq!(reply.body, "ok");
    assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap().as_str(), "hello tls");
}

#[test]
fn a_missing_key_file_stops_the_start_with_its_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["http", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TLS certificate /nonexistent/cert.pem"), "{stderr}");
}

/// A test CA, the certificates it signs, and a second CA that nobody trusts.
pub struct Pki {
    dir: TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    stranger: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn generate() -> Pki {
        let authority = |name: &str| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("a key"))
                .expect("a self-signed CA")
        };
        let pki = Pki { dir: TempDir::new("pki"), ca: authority("herald test CA"), stranger: authority("stranger CA") };
        std::fs::write(pki.dir.path().join("ca.pem"), pki.ca.pem()).expect("write the CA");
        std::fs::write(pki.dir.path().join("stranger-ca.pem"), pki.stranger.pem()).expect("write the stranger CA");
        pki
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Issues `<name>.pem` and `<name>-key.pem` for 127.0.0.1, valid from
    /// `from` until `until` (years), signed by the trusted CA or the stranger.
    fn issue(&self, name: &str, trusted: bool, validity: (i32, i32)) -> (String, String) {
        self.issue_for(name, &["127.0.0.1", "localhost"], trusted, validity)
    }

    /// Issues `<name>.pem` and `<name>-key.pem` for the names and addresses
    /// `hosts`, valid from `from` until `until` (years), signed by the
    /// trusted CA or the stranger.
    pub fn issue_for(&self, name: &str, hosts: &[&str], trusted: bool, (from, until): (i32, i32)) -> (String, String) {
        let hosts = hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>();
        let mut params = rcgen::CertificateParams::new(hosts).expect("parameters");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let key = rcgen::KeyPair::generate().expect("a key");
        let issuer = if trusted { &self.ca } else { &self.stranger };
        let cert = params.signed_by(&key, issuer).expect("a signed certificate");
        let (cert_path, key_path) = (self.path(&format!("{name}.pem")), self.path(&format!("{name}-key.pem")));
        std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        (cert_path, key_path)
    }

    /// A certificate signed by the trusted CA, valid now.
    fn valid(&self, name: &str) -> (String, String) {
        self.issue(name, true, (2020, 2090))
    }
}

/// The broker's TLS options: its certificate, and the CA of its callers.
fn mutual_tls_broker(pki: &Pki) -> Herald {
    let (cert, key) = pki.valid("broker");
    Herald::broker(&["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &pki.path("ca.pem")])
}

/// `--broker-ca`, `--broker-cert`, `--broker-key` of a gateway presenting `identity`.
fn link_args(pki: &Pki, identity: &(String, String)) -> Vec<String> {
    ["--broker-ca", &pki.path("ca.pem"), "--broker-cert", &identity.0, "--broker-key", &identity.1]
        .map(str::to_owned)
        .to_vec()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `grpcurl` over TLS trusting the test CA, presenting `identity` if any.
fn grpcurl_tls(pki: &Pki, identity: Option<&(String, String)>, broker: &str, request: &str) -> (bool, String) {
    let grpcurl = tool("grpcurl").expect("grpcurl");
    let mut command = std::process::Command::new(grpcurl);
    command.args(["-max-time", "10", "-cacert", &pki.path("ca.pem")]);
    if let Some((cert, key)) = identity {
        command.args(["-cert", cert, "-key", key]);
    }
    let out = command.args(["-d", request, broker, "herald.v1.BrokerService/Publish"]).output().expect("run grpcurl");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
async fn gateways_and_publishers_with_trusted_certificates_reach_a_mutual_tls_broker() {
    if tool("grpcurl").is_none() {
        return;
    }
    let pki = Pki::generate();
    let broker = mutual_tls_broker(&pki);
    let brokers = broker.address("broker");
    let gateway = Herald::ws(&brokers, &strs(&link_args(&pki, &pki.valid("gateway"))));
    let http = Herald::http(&brokers, &strs(&link_args(&pki, &pki.valid("http"))));
    let mut client = Client::connect(&gateway.ws_url()).await;
    let reply = curl(&[&format!("{}/?content=over+mutual+tls", http.http_url())]);
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
    assert_eq!(client.recv_text().await, "over mutual tls");

    // A third-party gRPC client with its own certificate publishes too.
    let request = r#"{"target":{"broadcast":{}},"content":{"text":"from grpcurl"}}"#;
    let (ok, output) = grpcurl_tls(&pki, Some(&pki.valid("publisher")), &brokers, request);
    assert!(ok, "{output}");
    assert_eq!(client.recv_text().await, "from grpcurl");
    assert_eq!(broker.metric("herald_broker_tls_handshake_failures_total"), 0.0);
}

#[tokio::test]
async fn a_mutual_tls_broker_refuses_callers_without_a_trusted_and_current_certificate() {
    if tool("grpcurl").is_none() {
        return;
    }
    let pki = Pki::generate();
    let broker = mutual_tls_broker(&pki);
    let brokers = broker.address("broker");
    let request = r#"{"target":{"broadcast":{}},"content":{"text":"refused"}}"#;
    let untrusted = pki.issue("untrusted", false, (2020, 2090));
    let expired = pki.issue("expired", true, (2020, 2021));
    let refusals =
        [("no certificate", None), ("a stranger's certificate", Some(&untrusted)), ("an expired one", Some(&expired))];
    for (what, identity) in refusals {
        let (ok, output) = grpcurl_tls(&pki, identity, &brokers, request);
        assert!(!ok, "a caller with {what} is refused: {output}");
    }
    let plaintext = crate::support::grpcurl(
        &tool("grpcurl").expect("grpcurl"),
        &["-d", request, &brokers, "herald.v1.BrokerService/Publish"],
    );
    assert!(!plaintext.success, "a plaintext caller is refused: {}", plaintext.stdout);
    wait_until("the four refusals are counted", || broker.metric("herald_broker_tls_handshake_failures_total") >= 4.0);
    let log = broker.log_text();
    // A stranger's certificate is not even offered: the broker names the
    // CAs it trusts, and the client has no certificate from one.
    for reason in ["peer sent no certificates", "certificate expired", "corrupt message"] {
        assert!(
            log.contains("gRPC TLS handshake failed") && log.contains(reason),
            "the log says why ({reason}):\n{log}"
        );
    }
    assert_eq!(broker.metric("herald_broker_published_bytes_total"), 0.0, "nothing was published");
}

/// Under TLS 1.3 a client learns that its certificate was refused only as
/// a closed connection; the broker's log and metrics say why.
#[tokio::test]
async fn a_gateway_with_an_untrusted_or_expired_certificate_never_links_and_the_broker_says_why() {
    let pki = Pki::generate();
    let broker = mutual_tls_broker(&pki);
    let cases =
        [("stranger", false, (2020, 2090), "UnknownIssuer"), ("expired", true, (2020, 2021), "certificate expired")];
    for (name, trusted, validity, reason) in cases {
        let identity = pki.issue(name, trusted, validity);
        let brokers = broker.address("broker");
        let link = link_args(&pki, &identity);
        let mut args = vec!["ws", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--broker", &brokers];
        args.extend(strs(&link));
        let gateway = Herald::start(&args, &["admin"]);
        wait_until("the gateway reports its failed link", || gateway.log_text().contains("no broker session"));
        wait_until("the broker logs the reason", || broker.log_text().contains(reason));
        assert_eq!(gateway.metric("herald_ws_broker_linked"), 0.0);
    }
    assert!(broker.metric("herald_broker_tls_handshake_failures_total") >= 2.0);
    assert_eq!(broker.metric("herald_broker_sessions"), 0.0);
}

/// The other way round: a gateway that does not trust the CA of the
/// broker's certificate refuses the broker, and says so itself.
#[tokio::test]
async fn a_gateway_refuses_a_broker_whose_certificate_its_ca_did_not_sign() {
    let pki = Pki::generate();
    let broker = mutual_tls_broker(&pki);
    let (cert, key) = pki.valid("gateway");
    let brokers = broker.address("broker");
    let stranger_ca = pki.path("stranger-ca.pem");
    let link = ["--broker-ca", &stranger_ca, "--broker-cert", &cert, "--broker-key", &key];
    let mut args = vec!["ws", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--broker", &brokers];
    args.extend(link);
    let gateway = Herald::start(&args, &["admin"]);
    wait_until("the gateway says why it has no broker", || gateway.log_text().contains("UnknownIssuer"));
    assert_eq!(gateway.metric("herald_ws_broker_linked"), 0.0);
    assert_eq!(broker.metric("herald_broker_sessions"), 0.0);
}

/// Runs `herald <args>` expecting it to refuse to start; returns its stderr.
fn refused_start(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald")).args(args).output().expect("run herald");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "herald {args:?} should refuse to start:\n{stderr}");
    stderr
}

#[test]
fn wrong_tls_files_stop_the_start_naming_the_file_and_the_fault() {
    let pki = Pki::generate();
    let (cert, key) = pki.valid("broker");
    let (_, other_key) = pki.valid("other");
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let broker = |extra: &[&str]| {
        let mut args = vec!["broker", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        refused_start(&args)
    };
    let stderr = broker(&["--tls-cert", &cert, "--tls-key", &other_key]);
    assert!(stderr.contains(&format!("TLS private key {other_key}: is not the key of the certificate")), "{stderr}");
    let stderr = broker(&["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &garbage]);
    assert!(stderr.contains(&format!("TLS CA certificate {garbage}: no certificate")), "{stderr}");
    let stderr = broker(&["--tls-cert", &garbage, "--tls-key", &key]);
    assert!(stderr.contains(&format!("TLS certificate {garbage}: no certificate")), "{stderr}");
    let stderr = broker(&["--tls-client-ca", &pki.path("ca.pem")]);
    assert!(stderr.contains("--tls-cert"), "mutual TLS needs the broker's own certificate: {stderr}");

    let ws = |extra: &[&str]| {
        let mut args = vec!["ws", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        refused_start(&args)
    };
    let stderr = ws(&["--broker-ca", "/nonexistent/ca.pem"]);
    assert!(stderr.contains("TLS CA certificate /nonexistent/ca.pem"), "{stderr}");
    let stderr = ws(&["--broker-ca", &pki.path("ca.pem"), "--broker-cert", &cert, "--broker-key", &other_key]);
    assert!(stderr.contains("is not the key of the certificate"), "{stderr}");
    let stderr = ws(&["--broker-ca", &pki.path("ca.pem"), "--broker", "http://127.0.0.1:2206"]);
    assert!(stderr.contains("is plaintext (http://) but TLS to brokers is configured"), "{stderr}");
    let stderr = ws(&["--broker", "https://127.0.0.1:2206"]);
    assert!(stderr.contains("no CA is configured"), "{stderr}");
}

/// The refusals happen before any connection is made: nothing is sent to
/// the (unrouted, never contacted) addresses below.
#[test]
fn a_secret_is_never_sent_in_clear_off_this_machine_unless_allowed() {
    let key = "a-test-api-key-0123456789";
    for role in ["ws", "http"] {
        let mut args = vec![role, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
        args.extend(["--api-key", key, "--broker", "127.0.0.1:2206,192.0.2.10:2206"]);
        let stderr = refused_start(&args);
        assert!(stderr.contains("refusing to send the API key in clear to broker 192.0.2.10:2206"), "{stderr}");
        assert!(
            stderr.lines().filter(|l| l.contains("Error") || l.contains("error")).count() <= 1,
            "one line: {stderr}"
        );
    }
    let nats =
        ["broker", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--nats", "nats://192.0.2.10:4222"];
    let stderr = refused_start(&[&nats[..], &["--nats-token", "secret-token"]].concat());
    assert!(stderr.contains("refusing to send the NATS password or token in clear to 192.0.2.10:4222"), "{stderr}");
    let stderr = refused_start(&[&nats[..5], &["--nats", "nats://user:pass@192.0.2.10:4222"]].concat());
    assert!(stderr.contains("refusing to send the NATS password or token in clear"), "{stderr}");
    let creds = TempDir::new("creds");
    let bad_creds = creds.path().join("bad.creds");
    std::fs::write(&bad_creds, "this is not a creds file").expect("write");
    let stderr = refused_start(&[&nats[..], &["--nats-creds", bad_creds.to_str().expect("a path")]].concat());
    assert!(stderr.contains("NATS credentials"), "{stderr}");
}

/// A `nats-server` with JetStream requiring TLS, verified client
/// certificates and a password, on a loopback port of its own.
struct TlsNats {
    child: std::process::Child,
    port: u16,
    _store: TempDir,
}

impl TlsNats {
    fn start(pki: &Pki) -> Option<TlsNats> {
        let binary = tool("nats-server")?;
        let (cert, key) = pki.valid("nats");
        let config = pki.path("nats.conf");
        let conf = format!(
            "tls {{\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n  ca_file: \"{ca}\"\n  verify: true\n}}\n\
             authorization {{\n  user: herald\n  password: \"s3cret-pass\"\n}}\n",
            ca = pki.path("ca.pem")
        );
        std::fs::write(&config, conf).expect("write the NATS config");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let store = TempDir::new("tls-nats");
        let child = std::process::Command::new(binary)
            .args(["-c", &config, "-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        let addr = format!("127.0.0.1:{port}");
        wait_until("nats-server accepts connections", || std::net::TcpStream::connect(&addr).is_ok());
        Some(TlsNats { child, port, _store: store })
    }

    fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_reach_nats_over_mutual_tls_with_a_password_and_not_without() {
    let pki = Pki::generate();
    let Some(nats) = TlsNats::start(&pki) else { return };
    let url = nats.url();
    let (cert, key) = pki.valid("broker-to-nats");
    let ca = pki.path("ca.pem");
    let access = ["--nats-ca", &ca, "--nats-cert", &cert, "--nats-key", &key, "--nats-user", "herald"];
    let good = Herald::broker(&[&["--nats", &url], &access[..], &["--nats-password", "s3cret-pass"]].concat());
    good.wait_ready();
    let gateway = Herald::ws(&good.address("broker"), &[]);
    let mut client = Client::connect(&gateway.ws_url()).await;
    let mut grpc = crate::support::grpc_client(&good.address("broker")).await;
    grpc.publish(crate::support::broadcast("through a TLS-linked cluster")).await.expect("publish");
    assert_eq!(client.recv_text().await, "through a TLS-linked cluster");

    // Without a client certificate, or with a wrong password, a broker is
    // never ready: it says why and refuses publishes.
    let attempts: [Vec<&str>; 2] = [
        vec!["--nats", &url, "--nats-ca", &ca, "--nats-user", "herald", "--nats-password", "s3cret-pass"],
        [&["--nats", &url], &access[..], &["--nats-password", "wrong-pass"]].concat(),
    ];
    for args in attempts {
        let broker = Herald::broker(&args);
        std::thread::sleep(std::time::Duration::from_secs(2));
        let ready = curl(&[&format!("http://{}/readyz", broker.addr("admin"))]);
        assert_eq!(ready.status, 503, "{args:?}: {}", ready.body);
        assert!(ready.body.contains("NATS"), "{}", ready.body);
        assert!(broker.log_text().contains("NATS"), "the log says what is wrong:\n{}", broker.log_text());
    }
}
