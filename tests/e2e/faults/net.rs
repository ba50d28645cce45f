//! Test hosts: network namespaces joined by a bridge, each a host with its
//! own address, and the faults the network between them can have.
//!
//! A [`Network`] is a bridge in the test's own (root) namespace holding
//! `10.211.K.1/24`, so the test process reaches every host directly, and one
//! namespace per host, linked to the bridge by a veth pair and addressed
//! `10.211.K.2`, `.3`, ... Faults are set in the hosts' kernels: an nftables
//! table in each host drops what comes from the hosts it is partitioned
//! from, and a share of every packet it receives (random loss); `tbf` caps a
//! host's bandwidth both ways; a host's link can be taken down. (This kernel
//! has no `netem`: added latency comes from [`super::proxy`].)
//!
//! Every name carries the test process's id and a counter, and each network
//! holds an advisory lock on its subnet, so tests running in parallel, in
//! one process or several, never share a name or a subnet. Dropping the
//! network removes everything, also when the test panics; what a killed
//! test process left behind is removed by the next network made.

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::support::{Herald, Nats, tool};

/// The first two octets of every test network: `10.211.K.0/24`.
const PREFIX: [u8; 2] = [10, 211];
/// Names of our namespaces start with this, then the process id in hex and `-`.
const NETNS_PREFIX: &str = "herald-";
/// Names of our links (the bridge, the veths' root ends) start with this,
/// then the process id in hex and `-`: 15 characters at most in all.
const LINK_PREFIX: &str = "hf";
/// The nftables table each host's faults live in.
const TABLE: &str = "herald_faults";

/// Whether this machine can run the harness: root, with `ip`, `nft` and
/// `tc`. When it cannot, says why, and fails under
/// `HERALD_TEST_REQUIRE_TOOLS=1`.
pub fn available() -> bool {
    // SAFETY: geteuid(2) only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        let msg = "the network-fault harness needs root (ip netns, nftables)";
        assert!(std::env::var("HERALD_TEST_REQUIRE_TOOLS").as_deref() != Ok("1"), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return false;
    }
    ["ip", "nft", "tc"].iter().all(|name| tool(name).is_some())
}

/// One host of a [`Network`]: a namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The root end of the host's veth pair, on the bridge.
    veth: String,
}

/// Hosts on one bridge; everything is removed when dropped.
pub struct Network {
    bridge: String,
    /// The bridge's address: where the test process is seen from the hosts.
    pub harness_ip: Ipv4Addr,
    hosts: Vec<Host>,
    /// Held while the network lives, so no other network takes its subnet.
    _subnet_lock: File,
}

impl Network {
    /// A network of hosts with these names, or `None` (after saying why)
    /// when the harness cannot run here.
    pub fn new(names: &[&str]) -> Option<Network> {
        if !available() {
            return None;
        }
        remove_leftovers();
        let pid = std::process::id();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let serial = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(serial < 1000 && names.len() < 100, "link names must fit in 15 characters");
        let (subnet, lock) = claim_subnet(pid, serial);
        let bridge = format!("{LINK_PREFIX}{pid:x}-{serial}");
        let harness_ip = Ipv4Addr::new(PREFIX[0], PREFIX[1], subnet, 1);
        // Made field by field so that Drop removes whatever was made when a
        // step fails half-way.
        let mut network = Network { bridge: bridge.clone(), harness_ip, hosts: Vec::new(), _subnet_lock: lock };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{harness_ip}/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for (i, name) in names.iter().enumerate() {
            let host = Host {
                name: (*name).to_owned(),
                netns: format!("{NETNS_PREFIX}{pid:x}-{serial}-{name}"),
                ip: Ipv4Addr::new(PREFIX[0], PREFIX[1], subnet, u8::try_from(i + 2).expect("fewer than 100 hosts")),
                veth: format!("{bridge}.{i}"),
            };
            network.hosts.push(host.clone());
            host.build(&bridge);
        }
        Some(network)
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name:?} in this network"))
    }

    /// From now on nothing passes between `a` and `b`, either way
    /// (established connections stall, new ones time out).
    pub fn partition(&self, a: &str, b: &str) {
        let (a, b) = (self.host(a), self.host(b));
        a.nft(&["add", "element", "inet", TABLE, "cut", &format!("{{ {} }}", b.ip)]);
        b.nft(&["add", "element", "inet", TABLE, "cut", &format!("{{ {} }}", a.ip)]);
    }

    /// Ends a [`partition`](Self::partition) between `a` and `b`.
    pub fn heal(&self, a: &str, b: &str) {
        let (a, b) = (self.host(a), self.host(b));
        a.nft(&["delete", "element", "inet", TABLE, "cut", &format!("{{ {} }}", b.ip)]);
        b.nft(&["delete", "element", "inet", TABLE, "cut", &format!("{{ {} }}", a.ip)]);
    }

    /// Every host drops `percent` of the packets it receives, at random
    /// (loopback inside a host excepted); 0 ends the loss.
    pub fn loss(&self, percent: f64) {
        assert!((0.0..=100.0).contains(&percent), "a share of packets: {percent}");
        // nftables counts in whole numbers: basis points of 10,000.
        let basis_points = (percent * 100.0).round() as u32;
        for host in &self.hosts {
            host.nft(&["flush", "chain", "inet", TABLE, "loss"]);
            if basis_points > 0 {
                let rule = format!("numgen random mod 10000 < {basis_points} drop");
                let mut args = vec!["add", "rule", "inet", TABLE, "loss"];
                args.extend(rule.split(' '));
                host.nft(&args);
            }
        }
    }

    /// Caps what `host` sends and receives at `bits_per_second` each way
    /// (a `tbf` qdisc on both ends of its link); `None` lifts the cap.
    pub fn bandwidth(&self, host: &str, bits_per_second: Option<u64>) {
        let host = self.host(host);
        match bits_per_second {
            Some(rate) => {
                // A burst of 20 ms of traffic (at least a few full frames),
                // and a queue deep enough that TCP sees delay, not drops.
                let burst = (rate / 8 / 50).max(4 * 1514).to_string();
                let rate = format!("{rate}bit");
                let tbf = ["root", "tbf", "rate", &rate, "burst", &burst, "latency", "400ms"];
                host.tc(&[&["qdisc", "replace", "dev", "eth0"][..], &tbf].concat());
                tc(&[&["qdisc", "replace", "dev", &host.veth][..], &tbf].concat());
            }
            None => {
                host.tc(&["qdisc", "del", "dev", "eth0", "root"]);
                tc(&["qdisc", "del", "dev", &host.veth, "root"]);
            }
        }
    }

    /// Takes `host`'s link down: it is cut off from everyone, the test
    /// process included, and its sends fail at once.
    pub fn link_down(&self, host: &str) {
        self.host(host).ip(&["link", "set", "eth0", "down"]);
    }

    /// Brings `host`'s link back up.
    pub fn link_up(&self, host: &str) {
        self.host(host).ip(&["link", "set", "eth0", "up"]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            // Deleting the root end removes the pair, so the host is cut
            // off even if a process still lingers in its namespace.
            let _ = run_quietly("ip", &["link", "del", &host.veth]);
            let _ = run_quietly("ip", &["netns", "del", &host.netns]);
        }
        let _ = run_quietly("ip", &["link", "del", &self.bridge]);
    }
}

impl Host {
    fn build(&self, bridge: &str) {
        ip(&["netns", "add", &self.netns]);
        ip(&["link", "add", &self.veth, "type", "veth", "peer", "name", "eth0", "netns", &self.netns]);
        ip(&["link", "set", &self.veth, "master", bridge, "up"]);
        self.ip(&["addr", "add", &format!("{}/24", self.ip), "dev", "eth0"]);
        self.ip(&["link", "set", "eth0", "up"]);
        self.ip(&["link", "set", "lo", "up"]);
        let ruleset = format!(
            "table inet {TABLE} {{
                set cut {{ type ipv4_addr; }}
                chain loss {{ }}
                chain input {{
                    type filter hook input priority filter; policy accept;
                    iif \"lo\" accept
                    ip saddr @cut drop
                    jump loss
                }}
            }}"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.netns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft in the host's namespace");
        nft.stdin.take().expect("stdin piped").write_all(ruleset.as_bytes()).expect("write the ruleset to nft");
        check(&format!("nft -f (host {})", self.name), nft.wait_with_output().expect("wait for nft"));
    }

    /// `ip:port` on this host.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, port))
    }

    /// A command that runs `program` inside this host.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }

    /// `herald <args>` on this host, waiting until every listener of
    /// `expect` is announced.
    pub fn herald(&self, args: &[&str], expect: &[&str]) -> Herald {
        Herald::start_in(&self.netns, args, expect)
    }

    /// A broker on this host, reachable from the others (no API key: the
    /// test network is private) and ready.
    pub fn broker(&self, extra: &[&str]) -> Herald {
        let (listen, admin) = (self.addr(0).to_string(), self.addr(0).to_string());
        let mut args = vec!["broker", "--listen", &listen, "--admin-listen", &admin, "--allow-unauthenticated"];
        if !extra.contains(&"--startup-grace") {
            args.extend(["--startup-grace", "0s"]);
        }
        args.extend_from_slice(extra);
        let broker = self.herald(&args, &["broker", "admin"]);
        broker.wait_ready();
        broker
    }

    /// A WebSocket gateway on this host, linked to `brokers` and ready.
    pub fn ws(&self, brokers: &str, extra: &[&str]) -> Herald {
        let (listen, admin) = (self.addr(0).to_string(), self.addr(0).to_string());
        let mut args = vec!["ws", "--listen", &listen, "--admin-listen", &admin, "--broker", brokers];
        args.extend_from_slice(extra);
        let gateway = self.herald(&args, &["ws", "admin"]);
        gateway.wait_ready();
        gateway
    }

    /// A `nats-server` with JetStream on this host, or `None` when none is
    /// installed (and tools are not required).
    pub fn nats(&self) -> Option<Nats> {
        Nats::start_in(&self.netns, self.ip)
    }

    /// Runs `f` on a thread that has entered this host's namespace: the
    /// sockets it opens belong to the host, wherever they are used later.
    pub fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.netns);
        let netns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns(2) on a descriptor we own; it moves only
                    // this short-lived thread into the namespace.
                    let entered = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(entered, 0, "enter {path}: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("the thread inside the host")
        })
    }

    fn ip(&self, args: &[&str]) {
        ip(&[&["-n", &self.netns][..], args].concat());
    }

    fn tc(&self, args: &[&str]) {
        tc(&[&["-n", &self.netns][..], args].concat());
    }

    fn nft(&self, args: &[&str]) {
        let out = self.command("nft").args(args).output().expect("run nft in the host's namespace");
        check(&format!("nft {} (host {})", args.join(" "), self.name), out);
    }
}

fn ip(args: &[&str]) {
    check(&format!("ip {}", args.join(" ")), run_quietly("ip", args));
}

fn tc(args: &[&str]) {
    check(&format!("tc {}", args.join(" ")), run_quietly("tc", args));
}

fn run_quietly(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn check(what: &str, out: Output) {
    assert!(out.status.success(), "{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
}

/// Takes a free `10.211.K.0/24`: one no other live network holds the lock of
/// and no interface here uses. The search starts at a place that depends on
/// the process and the network, so that parallel tests rarely contend.
fn claim_subnet(pid: u32, serial: u32) -> (u8, File) {
    let in_use = String::from_utf8_lossy(&run_quietly("ip", &["-o", "-4", "addr", "show"]).stdout).into_owned();
    let start = pid.wrapping_mul(31).wrapping_add(serial.wrapping_mul(7));
    for step in 0..250 {
        let subnet = u8::try_from(1 + (start + step) % 250).expect("1..=250");
        if in_use.contains(&format!(" {}.{}.{subnet}.", PREFIX[0], PREFIX[1])) {
            continue;
        }
        let path = std::env::temp_dir().join(format!("herald-faults-subnet-{subnet}.lock"));
        let lock = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        // SAFETY: flock(2) on a descriptor we own; released when it closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return (subnet, lock);
        }
    }
    panic!("every 10.211.K.0/24 test subnet is in use");
}

/// Removes the namespaces and links of test processes that are gone (killed
/// before their networks were dropped).
fn remove_leftovers() {
    let ours_and_gone = |name: &str, prefix: &str| {
        let pid = name.strip_prefix(prefix).and_then(|rest| rest.split('-').next());
        pid.and_then(|pid| u32::from_str_radix(pid, 16).ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let netns_list = String::from_utf8_lossy(&run_quietly("ip", &["netns", "list"]).stdout).into_owned();
    for name in netns_list.lines().filter_map(|l| l.split_whitespace().next()) {
        if ours_and_gone(name, NETNS_PREFIX) {
            let _ = run_quietly("ip", &["netns", "del", name]);
        }
    }
    // `ip -o link` lines read `7: name@peer: <FLAGS> ...`.
    let links = String::from_utf8_lossy(&run_quietly("ip", &["-o", "link", "show"]).stdout).into_owned();
    for name in links.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap_or(n)) {
        if ours_and_gone(name, LINK_PREFIX) {
            let _ = run_quietly("ip", &["link", "del", name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::time::{Duration, Instant};

    use super::*;

    /// How long a connection attempt that should succeed may take here: a
    /// first SYN can be lost while a link comes back, and is sent again
    /// after a second.
    const PROMPT: Duration = Duration::from_secs(3);
    /// How long an attempt that should fail is given.
    const BRIEF: Duration = Duration::from_millis(300);

    /// Whether `from` can open a TCP connection to a listener on `to`
    /// within `patience`.
    fn connects(from: &Host, to: &Host, patience: Duration) -> bool {
        let listener = to.inside(|| TcpListener::bind(to.addr(0))).expect("listen on the host");
        let addr = listener.local_addr().expect("the listener's address");
        from.inside(|| TcpStream::connect_timeout(&addr, patience)).is_ok()
    }

    fn reaches(from: &Host, to: &Host) -> bool {
        connects(from, to, PROMPT)
    }

    fn cut_off(from: &Host, to: &Host) -> bool {
        !connects(from, to, BRIEF)
    }

    fn netns_exists(name: &str) -> bool {
        String::from_utf8_lossy(&run_quietly("ip", &["netns", "list"]).stdout).lines().any(|l| l.starts_with(name))
    }

    fn link_exists(name: &str) -> bool {
        run_quietly("ip", &["link", "show", name]).status.success()
    }

    #[test]
    fn hosts_reach_each_other_and_the_test_until_partitioned_and_again_once_healed() {
        let Some(net) = Network::new(&["a", "b", "c"]) else { return };
        let (a, b, c) = (net.host("a"), net.host("b"), net.host("c"));
        assert_ne!(a.ip, b.ip);
        assert!(reaches(a, b) && reaches(b, a) && reaches(a, c));
        let listener = b.inside(|| TcpListener::bind(b.addr(0))).expect("listen on b");
        let on_b = listener.local_addr().expect("an address");
        assert!(TcpStream::connect_timeout(&on_b, PROMPT).is_ok(), "the test process reaches every host");

        net.partition("a", "b");
        assert!(cut_off(a, b) && cut_off(b, a), "nothing passes either way");
        assert!(reaches(a, c) && reaches(c, b), "the others are not affected");
        assert!(TcpStream::connect_timeout(&on_b, PROMPT).is_ok(), "nor is the test process");

        net.heal("a", "b");
        assert!(reaches(a, b) && reaches(b, a));
    }

    #[test]
    fn random_loss_drops_about_the_share_asked_for() {
        let Some(net) = Network::new(&["sender", "receiver"]) else { return };
        let (sender, receiver) = (net.host("sender"), net.host("receiver"));
        let inbox = receiver.inside(|| UdpSocket::bind(receiver.addr(0))).expect("a UDP socket on the receiver");
        inbox.set_read_timeout(Some(Duration::from_millis(300))).expect("a read timeout");
        let to = inbox.local_addr().expect("its address");
        let outbox = sender.inside(|| UdpSocket::bind(sender.addr(0))).expect("a UDP socket on the sender");
        // Read while sending: a burst would overflow the receive buffer.
        let count = |datagrams: u32| {
            std::thread::scope(|scope| {
                let reading = scope.spawn(|| {
                    let mut buf = [0u8; 4];
                    std::iter::from_fn(|| inbox.recv(&mut buf).ok()).count()
                });
                for i in 0..datagrams {
                    outbox.send_to(&i.to_be_bytes(), to).expect("send a datagram");
                    if i % 50 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                reading.join().expect("the reader")
            })
        };

        net.loss(30.0);
        let arrived = count(2000);
        assert!((1200..=1600).contains(&arrived), "about 70% of 2000 arrive at 30% loss: {arrived}");
        net.loss(0.0);
        assert_eq!(count(500), 500, "no loss once lifted");
    }

    #[test]
    fn a_bandwidth_cap_slows_a_transfer_and_lifting_it_speeds_it_up() {
        let Some(net) = Network::new(&["slow", "peer"]) else { return };
        let (slow, peer) = (net.host("slow"), net.host("peer"));
        let transfer = |bytes: usize| {
            let listener = peer.inside(|| TcpListener::bind(peer.addr(0))).expect("listen on the peer");
            let addr = listener.local_addr().expect("an address");
            let sink = std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().expect("accept");
                let mut received = Vec::new();
                stream.read_to_end(&mut received).expect("receive");
                received.len()
            });
            let mut stream = slow.inside(|| TcpStream::connect_timeout(&addr, PROMPT)).expect("connect");
            let started = Instant::now();
            stream.write_all(&vec![1u8; bytes]).expect("send");
            drop(stream);
            assert_eq!(sink.join().expect("the sink"), bytes);
            started.elapsed()
        };

        net.bandwidth("slow", Some(8_000_000));
        let capped = transfer(1_000_000);
        // 8 Mbit/s is 1 MB/s: a second, give or take the burst.
        assert!(capped >= Duration::from_millis(800), "capped: {capped:?}");
        net.bandwidth("slow", None);
        let free = transfer(1_000_000);
        assert!(free < capped / 4, "lifted: {free:?} against {capped:?}");
    }

    #[test]
    fn a_host_whose_link_is_down_is_cut_off_until_it_comes_back_up() {
        let Some(net) = Network::new(&["down", "other"]) else { return };
        let (down, other) = (net.host("down"), net.host("other"));
        net.link_down("down");
        assert!(cut_off(other, down) && cut_off(down, other));
        net.link_up("down");
        assert!(reaches(other, down) && reaches(down, other));
    }

    #[test]
    fn everything_is_removed_when_the_network_is_dropped_even_by_a_panic() {
        if !available() {
            return;
        }
        let made = std::panic::catch_unwind(|| {
            let net = Network::new(&["doomed"]).expect("the harness is available");
            let (netns, veth, bridge) = (&net.host("doomed").netns, &net.host("doomed").veth, &net.bridge);
            assert!(netns_exists(netns) && link_exists(veth) && link_exists(bridge));
            panic!("a test panics with its network up: {netns} {veth} {bridge}");
        });
        let message = *made.expect_err("the test panicked").downcast::<String>().expect("a panic message");
        let names: Vec<&str> = message.rsplit(": ").next().expect("the names").split(' ').collect();
        let [netns, veth, bridge] = names[..] else { panic!("three names in {message:?}") };
        assert!(!netns_exists(netns), "namespace {netns} removed");
        assert!(!link_exists(veth) && !link_exists(bridge), "links {veth} and {bridge} removed");
    }
}
