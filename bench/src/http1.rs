//! A minimal HTTP/1.1 keep-alive client: one connection, one `GET` or `POST`
//! at a time, responses framed by `Content-Length`. Enough for herald's
//! classic and JSON publish endpoints and the admin `/readyz`, cheap enough to
//! drive 50k requests/s.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One keep-alive connection.
pub struct Conn {
    stream: BufReader<TcpStream>,
    /// The request headers after the request line.
    headers: String,
    line: String,
}

impl Conn {
    /// Connects to `addr`; requests carry `Authorization: Bearer <api_key>` when a key is given.
    pub async fn connect(addr: SocketAddr, api_key: Option<&str>) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let mut headers = format!("Host: {addr}\r\n");
        if let Some(key) = api_key {
            headers.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        Ok(Self { stream: BufReader::new(stream), headers, line: String::new() })
    }

    /// `GET path`; returns the status and body.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let request = format!("GET {path} HTTP/1.1\r\n{}\r\n", self.headers);
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        self.response().await
    }

    /// `POST path` with `body` of `content_type`; returns the status and body.
    pub async fn post(&mut self, path: &str, content_type: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\n{}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            self.headers,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.stream.get_mut().write_all(&request).await?;
        self.response().await
    }

    async fn response(&mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        self.read_line().await?;
        let status: u16 = self
            .line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("bad status line {:?}", self.line))?;
        let mut length = None;
        loop {
            self.read_line().await?;
            let header = self.line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>().context("bad content-length")?);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    bail!("unsupported transfer-encoding {}", value.trim());
                }
            }
        }
        let mut body = vec![0; length.context("response without content-length")?];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }

    async fn read_line(&mut self) -> anyhow::Result<()> {
        self.line.clear();
        if self.stream.read_line(&mut self.line).await? == 0 {
            bail!("connection closed by the server");
        }
        Ok(())
    }
}

/// Percent-encodes `value` for a query string (unreserved characters and
/// `:`, `/`, `*` stay as they are).
pub fn query_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/*".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn queries_keep_benchmark_payloads_readable() {
        assert_eq!(query_encode("1:2:gw0/3:xx"), "1:2:gw0/3:xx");
        assert_eq!(query_encode("a b&c"), "a%20b%26c");
    }

    #[tokio::test]
    async fn keep_alive_requests_read_each_response_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut socket = BufReader::new(socket);
            let responses = [
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                "HTTP/1.1 400 Bad\r\nContent-Length: 3\r\n\r\nno\n",
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            ];
            for response in responses {
                let mut line = String::new();
                let mut authorized = false;
                let mut length = 0;
                while line != "\r\n" {
                    line.clear();
                    socket.read_line(&mut line).await.unwrap();
                    authorized |= line == "Authorization: Bearer k\r\n";
                    if let Some(n) = line.strip_prefix("Content-Length: ") {
                        length = n.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                socket.read_exact(&mut body).await.unwrap();
                assert!(authorized);
                assert!(length == 0 || body == b"{\"a\":1}", "{body:?}");
                socket.get_mut().write_all(response.as_bytes()).await.unwrap();
            }
        });
        let mut conn = Conn::connect(addr, Some("k")).await.unwrap();
        assert_eq!(conn.get("/?content=x").await.unwrap(), (200, b"ok".to_vec()));
        assert_eq!(conn.get("/").await.unwrap(), (400, b"no\n".to_vec()));
        assert_eq!(conn.post("/v1/publish", "application/json", b"{\"a\":1}").await.unwrap(), (200, b"{}".to_vec()));
    }
}
