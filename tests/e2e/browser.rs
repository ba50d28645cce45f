//! Headless Chromium holding WebSocket connections with the browser's own
//! WebSocket API, for tests that need a real browser as the client.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{PATIENCE, TempDir, repo_root, tool};

/// A Python script driving headless Chromium, spoken to line by line: a
/// command on its standard input, an answer `<word> <JSON>` on its standard
/// output. Its standard error goes to a log in its own directory, shown
/// when it does not answer as expected. Dropped, it is asked to quit.
pub struct BrowserScript {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    dir: TempDir,
}

impl BrowserScript {
    /// Starts tests/python/`name` with the browser's `tools` and `args`.
    pub fn start(name: &'static str, (chromium, chromedriver): &(PathBuf, PathBuf), args: &[String]) -> Self {
        let dir = TempDir::new("chromium");
        let mut command = Command::new("python3");
        command.arg(repo_root().join("tests/python").join(name));
        command.arg("--chromium").arg(chromium).arg("--chromedriver").arg(chromedriver).args(args);
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("create a log file");
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
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
        Self { name, child, stdin, lines, dir }
    }

    /// A directory of the script's own, for what it serves.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap_or_else(|e| panic!("write to {}: {e}", self.name));
        self.stdin.flush().expect("flush");
    }

    /// The next line, within `within`, which must start with `word`; its JSON.
    pub fn answer(&mut self, word: &str, within: Duration) -> Value {
        let line = self.lines.recv_timeout(within).unwrap_or_else(|_| {
            panic!("{} said nothing in {within:?}; its log:\n{}", self.name, self.log());
        });
        let Some(json) = line.strip_prefix(word).and_then(|rest| rest.strip_prefix(' ')) else {
            panic!("{}: expected {word:?}, got {line}\nits log:\n{}", self.name, self.log());
        };
        serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for BrowserScript {
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

/// Headless Chromium holding WebSocket connections, driven by
/// tests/python/browser_sockets.py.
pub struct BrowserSockets {
    script: BrowserScript,
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
        tools: &(PathBuf, PathBuf),
        sockets: &[(&str, String)],
        protocol_sockets: &[(&str, String)],
    ) -> BrowserSockets {
        let mut args = Vec::new();
        for (name, url) in sockets {
            args.extend(["--socket".to_owned(), format!("{name}={url}")]);
        }
        for (name, url) in protocol_sockets {
            args.extend(["--protocol-socket".to_owned(), format!("{name}={url}")]);
        }
        let mut script = BrowserScript::start("browser_sockets.py", tools, &args);
        // Starting Chromium is the slow part.
        let ready = script.answer("ready", PATIENCE * 3);
        let greetings = serde_json::from_value(ready).expect("greetings by socket name");
        BrowserSockets { script, greetings }
    }

    /// Waits until each named socket has received `count` messages (its
    /// greeting included), then a little longer for anything unexpected;
    /// returns every socket's messages, readyState and close event.
    pub fn wait(&mut self, counts: &[(&str, usize)]) -> Value {
        let counts: HashMap<_, _> = counts.iter().copied().collect();
        self.script.say(&format!("wait {}", json!(counts)));
        self.script.answer("report", PATIENCE * 3)
    }

    /// Sends `text` on socket `name`.
    pub fn send(&mut self, name: &str, text: &str) {
        self.script.say(&format!("send {}", json!({ name: text })));
        self.script.answer("sent", PATIENCE * 3);
    }
}
