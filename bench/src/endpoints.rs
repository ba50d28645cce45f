//! Where the benchmark sends traffic: herald's WebSocket, HTTP, gRPC and admin
//! addresses, parsed from the command line or from herald's announcements.
//! Every address must be on this machine (127.0.0.0/8, `::1` or `localhost`):
//! the harness refuses anything else.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, bail};

/// A WebSocket endpoint: where to connect and which path to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    pub addr: SocketAddr,
    pub path: String,
}

impl WsUrl {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("ws://").with_context(|| format!("{url:?}: expected ws://host:port[/path]"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        Ok(Self { addr: loopback(authority)?, path: path.to_owned() })
    }
}

impl std::fmt::Display for WsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ws://{}{}", self.addr, self.path)
    }
}

/// The address of an `http://host:port[/]` URL.
pub fn http_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.strip_prefix("http://").with_context(|| format!("{url:?}: expected http://host:port"))?;
    loopback(rest.trim_end_matches('/'))
}

/// Parses `host:port` (`localhost` allowed) and checks it is a loopback address.
pub fn loopback(authority: &str) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = match authority.strip_prefix("localhost:") {
        Some(port) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port.parse().context("bad port")?),
        None => authority.parse().with_context(|| format!("{authority:?}: expected ip:port"))?,
    };
    if !addr.ip().is_loopback() {
        bail!("{addr}: the benchmark only sends traffic to loopback addresses");
    }
    Ok(addr)
}

/// Hands out loopback source addresses for client connections. Each run takes
/// fresh ones, so sockets left in TIME_WAIT by an earlier run never collide.
pub struct SourceAddrs {
    next: u32,
}

impl SourceAddrs {
    /// Starts in a /16 picked from the process id, away from 127.0.0.1.
    pub fn new() -> Self {
        let block = 10 + std::process::id() % 200;
        Self { next: u32::from(Ipv4Addr::new(127, block as u8, 0, 1)) }
    }

    /// `count` fresh source addresses.
    pub fn take(&mut self, count: usize) -> Vec<Ipv4Addr> {
        (0..count)
            .map(|_| {
                // Wrap inside 127.0.0.0/8 and skip the .0 and .255 host octets.
                loop {
                    if self.next >> 24 != 127 {
                        self.next = u32::from(Ipv4Addr::new(127, 10, 0, 1));
                    } else if matches!(self.next & 0xff, 0 | 255) {
                        self.next += 1;
                    } else {
                        break;
                    }
                }
                let addr = Ipv4Addr::from(self.next);
                self.next += 1;
                addr
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_loopback_addresses() {
        let url = WsUrl::parse("ws://127.0.0.1:4236").unwrap();
        assert_eq!(url.addr, "127.0.0.1:4236".parse().unwrap());
        assert_eq!(url.path, "/");
        assert_eq!(WsUrl::parse("ws://localhost:9/x").unwrap().path, "/x");
        assert_eq!(http_addr("http://127.0.0.2:80/").unwrap(), "127.0.0.2:80".parse().unwrap());
        assert_eq!(loopback("[::1]:5").unwrap(), "[::1]:5".parse().unwrap());
    }

    #[test]
    fn other_addresses_are_refused() {
        assert!(WsUrl::parse("ws://10.0.0.1:4236").is_err());
        assert!(http_addr("http://example.com:80").is_err());
        assert!(loopback("192.168.1.1:1").is_err());
        assert!(WsUrl::parse("wss://127.0.0.1:1").is_err());
    }

    #[test]
    fn source_addresses_are_fresh_usable_loopback_hosts() {
        let mut sources = SourceAddrs { next: u32::from(Ipv4Addr::new(127, 10, 0, 254)) };
        let taken = sources.take(3);
        assert_eq!(taken, [Ipv4Addr::new(127, 10, 0, 254), Ipv4Addr::new(127, 10, 1, 1), Ipv4Addr::new(127, 10, 1, 2)]);
        let mut edge = SourceAddrs { next: u32::from(Ipv4Addr::new(127, 255, 255, 254)) };
        assert_eq!(edge.take(2), [Ipv4Addr::new(127, 255, 255, 254), Ipv4Addr::new(127, 10, 0, 1)]);
        assert!(taken.iter().all(Ipv4Addr::is_loopback));
    }
}
