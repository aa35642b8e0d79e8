//! `edge-agent serve` as a child process, and a minimal blocking HTTP/1.1 client for it,
//! shared by its tests and its load benchmark. The client makes one request per connection
//! (`Connection: close`, the response read to the end), over TCP or a Unix socket.
//!
//! Why not a client crate: this needs no new dependency or feature (tokio's `io-util` is not
//! in the build, and turning it on for tests would change the feature set every release build
//! shares); the server always sends `Content-Length`, so reading to the close is the whole
//! protocol; and the tests want raw control (malformed and oversized bodies) that a client
//! crate would get in the way of.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where the API listens, as `edge-agent serve` prints it: `127.0.0.1:8780` or `unix:PATH`.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Target {
    pub fn parse(printed: &str) -> Self {
        match printed.strip_prefix("unix:") {
            Some(path) => Self::Unix(PathBuf::from(path)),
            None => Self::Tcp(printed.parse().expect("an address")),
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request; `body` is sent as JSON. Gives up after `timeout` without a response.
pub fn request(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<Response> {
    match target {
        Target::Tcp(addr) => {
            let stream = TcpStream::connect_timeout(addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_nodelay(true)?;
            exchange(stream, method, path, body)
        }
        #[cfg(unix)]
        Target::Unix(path_on_disk) => {
            let stream = std::os::unix::net::UnixStream::connect(path_on_disk)?;
            stream.set_read_timeout(Some(timeout))?;
            exchange(stream, method, path, body)
        }
        #[cfg(not(unix))]
        Target::Unix(_) => unimplemented!("Unix sockets need a Unix system"),
    }
}

fn exchange(
    mut stream: impl Read + Write,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    let body = body.unwrap_or_default();
    let mut message = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    message.extend_from_slice(body);
    stream.write_all(&message)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse(&raw)
}

fn parse(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("headers not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let response = Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    };
    if response.header("transfer-encoding").is_some() {
        return Err(bad("chunked responses are not supported by this client"));
    }
    match response.header("content-length").map(str::parse::<usize>) {
        Some(Ok(length)) if length == response.body.len() => Ok(response),
        None => Ok(response),
        _ => Err(bad("the body does not match its Content-Length")),
    }
}

pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `edge-agent serve`; killed if the test ends without stopping it.
pub struct Service {
    child: Child,
    pub target: Target,
    log: PathBuf,
}

impl Service {
    /// Writes `config` into `dir` and serves it on a free loopback port (or what `listen`
    /// says: `["--unix", PATH]`), once `/readyz` says ready.
    pub fn start(dir: &Path, config: &str, listen: &[&str]) -> Self {
        let path = dir.join("agent.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.join("serve.log");
        let listen = if listen.is_empty() {
            &["--listen", "127.0.0.1:0"][..]
        } else {
            listen
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .args(listen)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The one line it prints: where it listens.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(!line.is_empty(), "serve printed no address: {}", read(&log));
        let service = Self {
            child,
            target: Target::parse(line.trim()),
            log,
        };
        let started = Instant::now();
        while service.call("GET", "/readyz", None).status != 200 {
            assert!(
                started.elapsed() < CALL_TIMEOUT,
                "never ready: {}",
                service.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        service
    }

    pub fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        request(&self.target, method, path, body, CALL_TIMEOUT)
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        self.try_call(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; log: {}", self.log()))
    }

    pub fn classify(&self, body: &Value) -> Response {
        self.call("POST", "/v1/classify", Some(body.to_string().as_bytes()))
    }

    /// One metric's value (`name` with its labels, as the exposition spells it).
    pub fn metric(&self, name: &str) -> f64 {
        let page = self.call("GET", "/metrics", None).text();
        page.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0.0, |value| value.trim().parse().unwrap())
    }

    pub fn queued(&self) -> u64 {
        self.call("GET", "/readyz", None).json()["queued_texts"]
            .as_u64()
            .unwrap()
    }

    /// Blocks until `condition` holds (at most a minute).
    pub fn wait_for(&self, what: &str, condition: impl Fn(&Self) -> bool) {
        let started = Instant::now();
        while !condition(self) {
            assert!(
                started.elapsed() < CALL_TIMEOUT,
                "never {what}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (at most `limit`).
    pub fn exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < limit, "still running: {}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        read(&self.log)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
