//! Binding listeners and announcing them.
//!
//! Every listener is announced on standard output as one line,
//! `herald: <kind> listening on <addr>`, so that scripts and tests that start
//! herald on port 0 learn the port the kernel chose. Logs go to standard error.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors no client listener may take: they stay free for the admin
/// port, the links to brokers and NATS, and the accepts that refuse. A
/// listener flooded with connections thus never starves the rest.
pub const DESCRIPTOR_RESERVE: usize = 128;
/// The open-files limit assumed where `/proc/self/limits` cannot be read.
const ASSUMED_OPEN_FILES: usize = 1024;

/// Backlog of accepted-but-unserved connections (the kernel caps it at somaxconn).
const BACKLOG: i32 = 4096;

/// Binds a TCP listener. With `reuse_port`, several processes may bind the
/// same address and the kernel spreads connections over them.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Prints the announcement line for a bound listener.
pub fn announce(kind: &str, addr: SocketAddr) {
    say(&format!("herald: {kind} listening on {addr}"));
}

/// Prints one line on standard output. A reader that went away (`herald
/// standalone | head -3`) is no reason to stop serving: unlike `println!`,
/// a failed write is ignored, not a panic.
pub fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// A place for one client connection in the process's budget of
/// descriptors; given back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
}

/// Why a connection is refused when [`connection_slot`] has no place left.
pub const NO_SLOT_LEFT: &str = "too many connections: the server is at its open-files limit";

/// Takes a place for one more client connection (HTTP or WebSocket), if the
/// process has one left: its open-files limit less [`DESCRIPTOR_RESERVE`].
pub fn connection_slot() -> Option<ConnectionSlot> {
    static BUDGET: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let budget = BUDGET.get_or_init(|| Arc::new(Semaphore::new(client_connection_budget(open_files_limit()))));
    budget.clone().try_acquire_owned().ok().map(|permit| ConnectionSlot { _permit: permit })
}

/// How many client connections fit in `open_files` descriptors.
fn client_connection_budget(open_files: usize) -> usize {
    open_files.saturating_sub(DESCRIPTOR_RESERVE).max(open_files / 2)
}

/// The soft limit on open files of this process.
pub fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| parse_open_files(&text))
        .unwrap_or(ASSUMED_OPEN_FILES)
}

/// The soft limit of `Max open files` in a `/proc/<pid>/limits` text.
pub fn parse_open_files(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.trim_start_matches("Max open files").split_whitespace().next()?;
    if soft == "unlimited" { Some(usize::MAX) } else { soft.parse().ok() }
}

/// Whether `host` (as in a URL; an IPv6 address may be bracketed) names this
/// machine: `localhost` or a loopback address. Any other name could resolve
/// anywhere.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_read_from_proc() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_open_files(limits), Some(20_000));
        assert_eq!(parse_open_files("Max open files unlimited unlimited files"), Some(usize::MAX));
        assert!(open_files_limit() > 0);
    }

    #[test]
    fn client_connections_leave_the_reserve_free() {
        assert_eq!(client_connection_budget(20_000), 20_000 - DESCRIPTOR_RESERVE);
        assert_eq!(client_connection_budget(200), 100, "a small limit keeps half for clients");
    }
}
