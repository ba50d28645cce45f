//! Binding listeners and announcing them.
//!
//! Every listener is announced on standard output as one line,
//! `herald: <kind> listening on <addr>`, so that scripts and tests that start
//! herald on port 0 learn the port the kernel chose. Logs go to standard error.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

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
    println!("herald: {kind} listening on {addr}");
}
