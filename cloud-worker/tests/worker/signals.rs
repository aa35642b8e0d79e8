//! The `cloud-worker serve` process and its signals (what `systemctl stop`, `docker stop` and a
//! Kubernetes eviction send): SIGTERM drains — the request in flight is answered — and exits
//! 0; a second signal during the drain stops at once (128 + 15).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use splitee_protocol::{PayloadEncoding, Response};
use splitee_service::transport;

use super::*;

/// A worker process on free loopback ports whose lone requests wait `wait_ms` for a batch.
struct Process {
    child: Child,
    listen: std::net::SocketAddr,
}

impl Process {
    async fn start(certs: &GeneratedCerts, wait_ms: u64) -> Self {
        let free = |kind: &str| -> std::net::SocketAddr {
            match kind {
                "udp" => std::net::UdpSocket::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap(),
                _ => std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap(),
            }
        };
        let (listen, metrics) = (free("udp"), free("tcp"));
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let child = Command::new(env!("CARGO_BIN_EXE_cloud-worker"))
            .arg("serve")
            .arg("--model")
            .arg(repo.join("models/default"))
            .args(["--listen", &listen.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .arg("--cert")
            .arg(&certs.server_cert)
            .arg("--key")
            .arg(&certs.server_key)
            .arg("--client-ca")
            .arg(&certs.worker_client_ca)
            .args(["--max-batch-size", "8"])
            .args(["--max-wait-us", &(wait_ms * 1000).to_string()])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while http_get_status(metrics).await != Some(200) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the worker never came up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, listen }
    }

    /// Sends `request` on a new connection; its answer comes from the returned task.
    async fn send(
        &self,
        endpoint: &Endpoint,
        request: &OffloadRequest,
    ) -> tokio::task::JoinHandle<Result<Response, transport::TransportError>> {
        let connection = transport::connect(endpoint, self.listen, "localhost")
            .await
            .unwrap();
        let request = request.clone();
        tokio::spawn(async move { transport::offload(&connection, &request, TIMEOUT).await })
    }

    fn signal(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The exit code within `limit`, or a panic.
    async fn exit_code(mut self, limit: Duration) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("the worker did not exit within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `/readyz`'s status (200 once the model is loaded and the QUIC endpoint serves), or none
/// while nothing listens.
async fn http_get_status(addr: std::net::SocketAddr) -> Option<u16> {
    if std::net::TcpStream::connect(addr).is_err() {
        return None;
    }
    Some(http_get(addr, "/readyz").await.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_0_and_a_second_signal_stops_at_once() {
    // Requests from the harness's edge half (the same backbone as models/default), sent under
    // models/default's fingerprint, to the worker process serving it.
    let harness = Harness::start(|_, _| {}).await;
    let fingerprint =
        ModelDir::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default"))
            .unwrap()
            .load(&harness.device)
            .unwrap()
            .fingerprint
            .0;
    let mut request = harness.request("a drain to wait for", 3, PayloadEncoding::F32, 1);
    request.fingerprint = fingerprint;
    let endpoint = harness.client_endpoint();

    // One signal: the request waiting 800 ms in the batcher is answered, then exit 0.
    let process = Process::start(&harness.certs, 800).await;
    let in_flight = process.send(&endpoint, &request).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    process.signal();
    assert!(
        matches!(in_flight.await.unwrap(), Ok(Response::Answer(_))),
        "the request in flight was not answered"
    );
    assert_eq!(process.exit_code(Duration::from_secs(10)).await, Some(0));

    // Two: the drain (a request waiting a second, the longest batching wait, for its batch)
    // is cut short at once.
    let process = Process::start(&harness.certs, 1_000).await;
    let _in_flight = process.send(&endpoint, &request).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    process.signal();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut process = process;
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "the first signal should drain, not stop"
    );
    let second = Instant::now();
    process.signal();
    assert_eq!(process.exit_code(Duration::from_secs(2)).await, Some(143));
    println!("second signal: exit 143 after {:.0?}", second.elapsed());
    harness.worker.shutdown().await.unwrap();
}
