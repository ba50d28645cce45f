//! Headless Chromium holding WebSocket connections with the browser's own
//! WebSocket API, for tests that need a real browser as the client.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{PATIENCE, TempDir, repo_root, tool};

/// Headless Chromium holding WebSocket connections, driven by
/// tests/python/browser_sockets.py over its standard input and output.
pub struct BrowserSockets {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    stderr: TempDir,
    /// The first message (the greeting) of each socket.
    pub greetings: HashMap<String, String>,
}

impl BrowserSockets {
    /// The tools it needs, or `None` (after saying why) when one is missing.
    pub fn tools() -> Option<(PathBuf, PathBuf)> {
        let (Some(_), Some(chromium), Some(chromedriver)) =
            (tool("python-selenium"), tool("chromium"), tool("chromedriver"))
        else {
            return None;
        };
        Some((chromium, chromedriver))
    }

    /// Opens one page whose script connects a WebSocket per `(name, url)`,
    /// and waits until each has its greeting.
    pub fn open(tools: &(PathBuf, PathBuf), sockets: &[(&str, String)]) -> BrowserSockets {
        Self::open_speaking(tools, sockets, &[])
    }

    /// Like [`BrowserSockets::open`], with `protocol_sockets` asking for
    /// herald's client protocol (`herald.json.v1`).
    pub fn open_speaking(
        (chromium, chromedriver): &(PathBuf, PathBuf),
        sockets: &[(&str, String)],
        protocol_sockets: &[(&str, String)],
    ) -> BrowserSockets {
        let stderr = TempDir::new("chromium");
        let mut command = Command::new("python3");
        command.arg(repo_root().join("tests/python/browser_sockets.py"));
        command.arg("--chromium").arg(chromium).arg("--chromedriver").arg(chromedriver);
        for (name, url) in sockets {
            command.arg("--socket").arg(format!("{name}={url}"));
        }
        for (name, url) in protocol_sockets {
            command.arg("--protocol-socket").arg(format!("{name}={url}"));
        }
        let log = std::fs::File::create(stderr.path().join("stderr.log")).expect("create a log file");
        let mut child =
            command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log).spawn().expect("run browser_sockets.py");
        let stdin = child.stdin.take().expect("stdin piped");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut browser = BrowserSockets { child, stdin, lines, stderr, greetings: HashMap::new() };
        let ready = browser.answer("ready");
        browser.greetings = serde_json::from_value(ready).expect("greetings by socket name");
        browser
    }

    /// The next line, which must start with `word`; its JSON.
    fn answer(&mut self, word: &str) -> Value {
        // Starting Chromium is the slow part.
        let line = self.lines.recv_timeout(PATIENCE * 3).unwrap_or_else(|_| {
            panic!("browser_sockets.py said nothing; its log:\n{}", self.log());
        });
        let Some(json) = line.strip_prefix(word).and_then(|rest| rest.strip_prefix(' ')) else {
            panic!("browser_sockets.py: expected {word:?}, got {line}\nits log:\n{}", self.log());
        };
        serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"))
    }

    /// Waits until each named socket has received `count` messages (its
    /// greeting included), then a little longer for anything unexpected;
    /// returns every socket's messages, readyState and close event.
    pub fn wait(&mut self, counts: &[(&str, usize)]) -> Value {
        let counts: HashMap<_, _> = counts.iter().copied().collect();
        writeln!(self.stdin, "wait {}", json!(counts)).expect("write to browser_sockets.py");
        self.stdin.flush().expect("flush");
        self.answer("report")
    }

    /// Sends `text` on socket `name`.
    pub fn send(&mut self, name: &str, text: &str) {
        writeln!(self.stdin, "send {}", json!({ name: text })).expect("write to browser_sockets.py");
        self.stdin.flush().expect("flush");
        self.answer("sent");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.stderr.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for BrowserSockets {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
