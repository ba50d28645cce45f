//! A fault-injecting TCP proxy, in the manner of Toxiproxy, run inside the
//! test process: placed between two roles, it adds latency with jitter, caps
//! bandwidth, cuts every connection, or resets them, all changeable while
//! traffic flows.
//!
//! It exists because this kernel has no `netem`: packet loss, partitions and
//! bandwidth come from [`super::net`], delay does not. The delay keeps byte
//! order, as a real link's does: each chunk read is released after its own
//! delay, but never before the chunk read before it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Largest chunk read from one side before it is delayed and passed on.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks in flight per direction of a connection: past this, reading the
/// sender waits, and TCP flow control pushes back on it.
const CHUNKS_IN_FLIGHT: usize = 256;

/// A proxy from [`Proxy::addr`] to an upstream address. Stopped, and its
/// connections closed, when dropped.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    accepting: tokio::task::JoinHandle<()>,
}

/// What the connections share: the toxics in force and the signal to end.
struct State {
    upstream: SocketAddr,
    toxics: Mutex<Toxics>,
    /// While set, connections are refused (accepted, then reset at once).
    cut: std::sync::atomic::AtomicBool,
    /// Bumped to end every connection made before; the flag says with RST.
    ends: watch::Sender<Ending>,
    live: AtomicUsize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Ending {
    generation: u64,
    reset: bool,
}

struct Toxics {
    latency: Duration,
    jitter: Duration,
    bytes_per_second: Option<u64>,
    random: SplitMix64,
}

impl Proxy {
    /// Listens on `listen` (port 0 picks one) and forwards every connection
    /// to `upstream`, with no toxic yet.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Proxy {
        let listener =
            TcpListener::bind(listen).await.unwrap_or_else(|e| panic!("proxy cannot listen on {listen}: {e}"));
        let addr = listener.local_addr().expect("the proxy's address");
        let state = Arc::new(State {
            upstream,
            toxics: Mutex::new(Toxics {
                latency: Duration::ZERO,
                jitter: Duration::ZERO,
                bytes_per_second: None,
                random: SplitMix64::seeded(),
            }),
            cut: false.into(),
            ends: watch::Sender::new(Ending::default()),
            live: AtomicUsize::new(0),
        });
        let accepting = tokio::spawn(accept(listener, state.clone()));
        Proxy { addr, state, accepting }
    }

    /// Where clients connect to reach the upstream through the proxy.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Delays every chunk, each way, by `latency` ± up to `jitter` (uniform),
    /// from now on.
    pub fn latency(&self, latency: Duration, jitter: Duration) {
        let mut toxics = self.state.toxics();
        toxics.latency = latency;
        toxics.jitter = jitter;
    }

    /// Caps each direction of each connection at `bytes_per_second`; `None`
    /// lifts the cap.
    pub fn bandwidth(&self, bytes_per_second: Option<u64>) {
        self.state.toxics().bytes_per_second = bytes_per_second;
    }

    /// Closes every connection, and refuses new ones until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.end_all(false);
    }

    /// Accepts connections again after a [`cut`](Self::cut).
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Closes every connection with a reset (RST, as `SO_LINGER` 0 does),
    /// both ways; new connections are accepted as before.
    pub fn reset(&self) {
        self.state.end_all(true);
    }

    /// Connections open through the proxy right now.
    pub fn connections(&self) -> usize {
        self.state.live.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.state.end_all(false);
    }
}

impl State {
    fn toxics(&self) -> std::sync::MutexGuard<'_, Toxics> {
        self.toxics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn end_all(&self, reset: bool) {
        self.ends.send_modify(|ending| {
            ending.generation += 1;
            ending.reset = reset;
        });
    }

    /// The delay of the next chunk: the latency plus or minus the jitter.
    fn delay(&self) -> Duration {
        let mut toxics = self.toxics();
        if toxics.jitter.is_zero() {
            return toxics.latency;
        }
        let jitter = toxics.jitter.as_secs_f64();
        let offset = jitter * (2.0 * toxics.random.unit() - 1.0);
        Duration::from_secs_f64((toxics.latency.as_secs_f64() + offset).max(0.0))
    }
}

async fn accept(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        if state.cut.load(Ordering::SeqCst) {
            refuse(client);
            continue;
        }
        // Subscribed before anything else can happen to the connection, so
        // that an end signalled while it is being set up is not missed.
        let ends = state.ends.subscribe();
        tokio::spawn(serve(client, state.clone(), ends));
    }
}

/// Ends a connection with a reset, as a host that refuses it would.
fn refuse(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Carries one connection both ways until both sides are done, or the proxy
/// ends it.
async fn serve(client: TcpStream, state: Arc<State>, mut ends: watch::Receiver<Ending>) {
    let Ok(Ok(upstream)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(state.upstream)).await
    else {
        refuse(client);
        return;
    };
    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
    state.live.fetch_add(1, Ordering::SeqCst);
    // The pipes read and write through shared references, so that the
    // sockets stay here, to be reset when the proxy says so.
    let both_ways = async { tokio::join!(pipe(&client, &upstream, &state), pipe(&upstream, &client, &state)) };
    let reset = tokio::select! {
        _ = both_ways => false,
        _ = ends.changed() => ends.borrow().reset,
    };
    state.live.fetch_sub(1, Ordering::SeqCst);
    if reset {
        refuse(client);
        refuse(upstream);
    }
}

/// Copies `from` to `to`, each chunk held back by the latency in force when
/// it was read (never released before the chunk before it) and paced by
/// the bandwidth cap; passes the end of `from` on as the end of `to`.
async fn pipe(from: &TcpStream, to: &TcpStream, state: &State) {
    let (chunks, mut released) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let read = async move {
        let mut previous_release = Instant::now();
        loop {
            if from.readable().await.is_err() {
                break;
            }
            let mut chunk = vec![0; CHUNK_BYTES];
            match from.try_read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => chunk.truncate(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
            let release = (Instant::now() + state.delay()).max(previous_release);
            previous_release = release;
            if chunks.send((release, chunk)).await.is_err() {
                break;
            }
        }
    };
    let write = async {
        let mut next_free = Instant::now();
        while let Some((release, chunk)) = released.recv().await {
            tokio::time::sleep_until(release.max(next_free)).await;
            if write_all(to, &chunk).await.is_err() {
                return;
            }
            // The next chunk leaves once this one would have, at the cap.
            if let Some(rate) = state.toxics().bytes_per_second {
                let sending = Duration::from_secs_f64(chunk.len() as f64 / rate.max(1) as f64);
                next_free = next_free.max(Instant::now()) + sending;
            }
        }
        // The sender is done: so is the proxy, towards the receiver.
        // SAFETY: shutdown(2) on a descriptor the stream owns; it stays open.
        unsafe {
            libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(to), libc::SHUT_WR);
        }
    };
    tokio::join!(read, write);
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A small random number generator (SplitMix64) for the jitter: the test
/// needs spread, not cryptographic quality.
struct SplitMix64(u64);

impl SplitMix64 {
    fn seeded() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
        );
        Self(hasher.finish())
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const LOOPBACK: &str = "127.0.0.1:0";

    /// An upstream that echoes every connection back.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(LOOPBACK).await.expect("bind the echo server");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn through(proxy: &Proxy) -> TcpStream {
        TcpStream::connect(proxy.addr()).await.expect("connect through the proxy")
    }

    async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
        stream.write_all(bytes).await.expect("send");
        let mut back = vec![0; bytes.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
            .await
            .expect("the echo in time")
            .expect("the echo");
        back
    }

    #[tokio::test]
    async fn latency_delays_each_way_and_can_be_lifted_while_connected() {
        let proxy = Proxy::start(LOOPBACK.parse().expect("a loopback address"), echo_server().await).await;
        let mut stream = through(&proxy).await;
        assert_eq!(round_trip(&mut stream, b"warm").await, b"warm");

        proxy.latency(Duration::from_millis(100), Duration::ZERO);
        let started = Instant::now();
        assert_eq!(round_trip(&mut stream, b"slow").await, b"slow");
        let slow = started.elapsed();
        assert!(slow >= Duration::from_millis(200), "100 ms there and 100 ms back: {slow:?}");
        assert!(slow < Duration::from_millis(600), "and not much more: {slow:?}");

        proxy.latency(Duration::ZERO, Duration::ZERO);
        let started = Instant::now();
        round_trip(&mut stream, b"fast").await;
        assert!(started.elapsed() < Duration::from_millis(100), "lifted: {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn jitter_never_reorders_bytes() {
        let proxy = Proxy::start(LOOPBACK.parse().expect("a loopback address"), echo_server().await).await;
        proxy.latency(Duration::from_millis(10), Duration::from_millis(10));
        let stream = through(&proxy).await;
        let (mut read, mut write) = stream.into_split();
        const NUMBERS: u32 = 3000;
        let writer = tokio::spawn(async move {
            for i in 0..NUMBERS {
                write.write_all(&i.to_be_bytes()).await.expect("send a number");
                // Small pauses make many separate chunks, each with its own delay.
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_micros(300)).await;
                }
            }
            write
        });
        let mut next = [0u8; 4];
        for expected in 0..NUMBERS {
            tokio::time::timeout(Duration::from_secs(10), read.read_exact(&mut next))
                .await
                .expect("the numbers in time")
                .expect("a number");
            assert_eq!(u32::from_be_bytes(next), expected, "bytes come out in the order they went in");
        }
        writer.await.expect("the writer");
    }

    #[tokio::test]
    async fn a_bandwidth_cap_paces_a_transfer() {
        let proxy = Proxy::start(LOOPBACK.parse().expect("a loopback address"), echo_server().await).await;
        proxy.bandwidth(Some(200_000));
        let mut stream = through(&proxy).await;
        let started = Instant::now();
        let payload = vec![7u8; 100_000];
        assert_eq!(round_trip(&mut stream, &payload).await, payload);
        let took = started.elapsed();
        // 100 kB at 200 kB/s each way, pipelined: about half a second.
        assert!(took >= Duration::from_millis(400), "paced: {took:?}");
        assert!(took < Duration::from_secs(3), "but not stalled: {took:?}");
    }

    #[tokio::test]
    async fn a_cut_closes_every_connection_and_refuses_new_ones_until_healed() {
        let proxy = Proxy::start(LOOPBACK.parse().expect("a loopback address"), echo_server().await).await;
        let mut stream = through(&proxy).await;
        round_trip(&mut stream, b"up").await;
        assert_eq!(proxy.connections(), 1);

        proxy.cut();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(read.expect("closed in time").is_ok_and(|n| n == 0), "the connection is closed");
        let mut refused = through(&proxy).await;
        let mut byte = [0u8; 1];
        let answer = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut byte)).await.expect("in time");
        assert!(!matches!(answer, Ok(1..)), "nothing passes while cut: {answer:?}");
        assert_eq!(proxy.connections(), 0);

        proxy.heal();
        let mut again = through(&proxy).await;
        assert_eq!(round_trip(&mut again, b"back").await, b"back");
    }

    #[tokio::test]
    async fn a_reset_ends_connections_with_rst_and_new_ones_work() {
        let proxy = Proxy::start(LOOPBACK.parse().expect("a loopback address"), echo_server().await).await;
        let mut stream = through(&proxy).await;
        round_trip(&mut stream, b"up").await;

        proxy.reset();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await.expect("in time");
        let kind = read.expect_err("a reset is an error, not an orderly end").kind();
        assert_eq!(kind, std::io::ErrorKind::ConnectionReset);

        let mut again = through(&proxy).await;
        assert_eq!(round_trip(&mut again, b"back").await, b"back");
    }
}
