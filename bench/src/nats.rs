//! The `nats-server` a cluster topology needs: started per run on
//! 127.0.0.1 with JetStream (herald's brokers lease worker ids there), on a
//! free port and a fresh store directory, and killed when dropped.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The `nats-server` binary: `given`, else `nats-server` on `PATH`.
pub fn binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join("nats-server")).find(|p| p.is_file()).context(
        "no nats-server for --brokers above 1: give --nats-server PATH or set HERALD_NATS_SERVER \
         (scripts/install-test-deps installs one; then `. .test-tools/env.sh`)",
    )
}

/// A running `nats-server`.
pub struct Nats {
    child: Child,
    addr: SocketAddr,
    /// JetStream store, removed on drop.
    store: PathBuf,
    log: PathBuf,
}

impl Nats {
    /// Starts `binary` with its store and log under `dir` and waits (up to
    /// `within`) until it accepts connections.
    pub fn start(binary: &Path, dir: &Path, within: Duration) -> anyhow::Result<Nats> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
        let name = format!("nats-{port}");
        let store = dir.join(&name);
        let log = dir.join(format!("{name}.log"));
        std::fs::create_dir_all(&store)?;
        let spawned = std::fs::File::create(&log).and_then(|stderr| {
            Command::new(binary)
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(&store)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
        });
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&store);
                let _ = std::fs::remove_file(&log);
                let _ = std::fs::remove_dir(dir);
                return Err(e).with_context(|| format!("starting {}", binary.display()));
            }
        };
        let mut nats = Nats { child, addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)), store, log };
        let deadline = Instant::now() + within;
        while TcpStream::connect(nats.addr).is_err() {
            if let Some(status) = nats.child.try_wait()? {
                bail!("nats-server exited at start ({status}); its log: {}", nats.log_text());
            }
            if Instant::now() >= deadline {
                bail!("nats-server does not accept connections on {}; its log: {}", nats.addr, nats.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nats)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Describes the server's exit, if it has exited (it should not have).
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        Some(format!("nats-server exited during the run ({status}); log: {}", self.log.display()))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Kills the server and removes its store; its log is kept only when the
/// server had exited by itself and said something (a healthy server's log is
/// its start-up banner).
impl Drop for Nats {
    fn drop(&mut self) {
        let crashed = matches!(self.child.try_wait(), Ok(Some(_)));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
        let empty = std::fs::metadata(&self.log).is_ok_and(|m| m.len() == 0);
        if !crashed || empty {
            let _ = std::fs::remove_file(&self.log);
        }
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
