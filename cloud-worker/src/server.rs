//! The QUIC server: connections (address validation, caps), one task per stream, what each
//! client may hold of the worker, and the graceful shutdown.
//!
//! A new connection is first sent a QUIC Retry, so that its client proves it owns its address
//! before the worker spends anything on it (and per-peer shares count real peers); then it is
//! counted against the connection caps (all peers', and its peer's), or refused.
//!
//! A stream is handled as: read the 11-byte header (checked against the limits before anything
//! else is allocated). A hello is answered with the worker's limits, or `wrong_fingerprint`. A
//! request reserves receive budget for the body its header announces, from its connection's
//! and from the worker's (`busy` at once when either is spent), and reads the body as it
//! arrives: the buffer grows with the bytes, never to the announced size up front. The whole
//! frame must arrive within the read timeout. Only then does the request take an in-flight slot
//! (the worker's, within its peer's share; `busy` when none is left), is decoded and validated,
//! and goes to the compute thread with its deadline. A client that resets the stream or leaves
//! while its request is queued cancels it there. Every failure that can still be answered gets
//! an error frame naming the problem; a stream the client reset or a lost connection gets
//! nothing. Nothing a client sends can panic the server or stop it serving other clients.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use burn::prelude::Device;
use quinn::{Endpoint, Incoming, RecvStream, SendStream};
use splitee_model::LoadedModel;
use splitee_protocol::{
    ErrorCode, FrameKind, HEADER_LEN, Limits, MAX_HELLO_BODY_BYTES, PROTOCOL_VERSION,
    ProtocolError, ReplyOptions, Response, Welcome, decode_header, decode_hello_body,
    decode_request_body, encode_error_for_version, encode_response, header_version,
};
use splitee_service::transport;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::compute::{self, BatchPolicy, ComputeHandle, Job};
use crate::config::{LimitsConfig, WorkerConfig};
use crate::metrics::Metrics;
use crate::status::StatusEndpoint;

/// QUIC stream error code sent with `STOP_SENDING` when the server answered before reading
/// the whole request (busy, or a header it refused).
pub const STOP_ANSWERED_EARLY: u32 = 1;
/// QUIC connection close code of a graceful shutdown.
pub const CLOSE_SHUTDOWN: u32 = 0;

/// Connections and in-flight slots by peer, and connections in all.
#[derive(Default)]
struct Peers {
    by_address: HashMap<IpAddr, PeerShare>,
    connections: usize,
}

#[derive(Default)]
struct PeerShare {
    connections: usize,
    in_flight: usize,
}

/// Everything a request task needs.
struct Shared {
    fingerprint: [u8; 32],
    limits: Limits,
    caps: LimitsConfig,
    welcome: Welcome,
    jobs: std::sync::mpsc::Sender<Job>,
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    /// Bytes of announced bodies being received, over all connections.
    receive_budget: Arc<Semaphore>,
    peers: Mutex<Peers>,
    next_connection: AtomicU64,
    metrics: Arc<Metrics>,
    read_timeout: Duration,
    cloud_exits: bool,
    shutting_down: CancellationToken,
}

impl Shared {
    fn peers(&self) -> std::sync::MutexGuard<'_, Peers> {
        // Plain counters: a panic elsewhere cannot leave them half-written.
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a connection from `peer`, or says which cap it would exceed.
    fn admit_connection(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionPermit, String> {
        let mut peers = self.peers();
        if peers.connections >= self.caps.max_connections {
            return Err(format!(
                "the worker holds its cap of {} connections",
                self.caps.max_connections
            ));
        }
        let share = peers.by_address.entry(peer).or_default();
        if share.connections >= self.caps.max_connections_per_peer {
            return Err(format!(
                "{peer} holds its cap of {} connections",
                self.caps.max_connections_per_peer
            ));
        }
        share.connections += 1;
        peers.connections += 1;
        Ok(ConnectionPermit {
            shared: self.clone(),
            peer,
        })
    }

    /// An in-flight slot for a request of `peer`, or why there is none.
    fn take_slot(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, ProtocolError> {
        let busy = |why: String| {
            ProtocolError::new(
                ErrorCode::Busy,
                format!("{why}; retry later or answer locally"),
            )
        };
        let mut peers = self.peers();
        let share = peers.by_address.entry(peer).or_default();
        if share.in_flight >= self.caps.max_in_flight_per_peer {
            return Err(busy(format!(
                "{peer} holds its share of {} requests in flight",
                self.caps.max_in_flight_per_peer
            )));
        }
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            busy(format!(
                "the worker is at its bound of {} requests in flight",
                self.max_in_flight
            ))
        })?;
        share.in_flight += 1;
        self.metrics.in_flight.inc();
        Ok(Slot {
            _permit: permit,
            shared: self.clone(),
            peer,
        })
    }

    fn release(&self, peer: IpAddr, release: impl FnOnce(&mut PeerShare)) {
        let mut peers = self.peers();
        if let Some(share) = peers.by_address.get_mut(&peer) {
            release(share);
            if share.connections == 0 && share.in_flight == 0 {
                peers.by_address.remove(&peer);
            }
        }
    }
}

/// A connection counted against the caps, for as long as it is held.
struct ConnectionPermit {
    shared: Arc<Shared>,
    peer: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.shared.peers().connections -= 1;
        self.shared
            .release(self.peer, |share| share.connections -= 1);
    }
}

/// An in-flight slot: the worker's and one of its peer's share.
struct Slot {
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.metrics.in_flight.dec();
        self.shared.release(self.peer, |share| share.in_flight -= 1);
    }
}

/// Receive budget held for one announced body, from its connection's and the worker's.
struct Reservation {
    _connection: OwnedSemaphorePermit,
    _worker: OwnedSemaphorePermit,
    bytes: i64,
    metrics: Arc<Metrics>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics.receiving_bytes.dec_by(self.bytes);
    }
}

/// One connection's identity and its own receive budget.
struct Client {
    /// The compute thread's tenant: connections take turns.
    id: u64,
    peer: IpAddr,
    receive_budget: Arc<Semaphore>,
}

/// A running worker. Dropping it does not stop it; call [`Worker::shutdown`].
pub struct Worker {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    shutting_down: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    /// Binds the HTTP endpoint when configured ([`StatusEndpoint::bind`]), then
    /// [`Self::start_with_status`]. Must be called inside a tokio runtime.
    pub async fn start(
        config: &WorkerConfig,
        model: LoadedModel,
        device: Device,
    ) -> anyhow::Result<Worker> {
        config.validate()?;
        let status = StatusEndpoint::bind(config).await?;
        Self::start_with_status(config, model, device, status).await
    }

    /// Loads TLS files, binds the QUIC endpoint (issuing routable connection IDs when
    /// `quic_lb` is set), starts the compute thread and starts serving; `status`, bound before
    /// the model loaded, turns ready. Must be called inside a tokio runtime.
    pub async fn start_with_status(
        config: &WorkerConfig,
        model: LoadedModel,
        device: Device,
        mut status: StatusEndpoint,
    ) -> anyhow::Result<Worker> {
        config.validate()?;
        let LoadedModel {
            model, fingerprint, ..
        } = model;
        let num_layers = model.num_layers();
        anyhow::ensure!(
            model.exit_config().layers.contains(&num_layers),
            "the model has no exit after its last layer ({num_layers}); the worker answers with it"
        );
        let bert = model.config();
        let model_max = bert.max_tokens();
        let max_seq_len = config
            .limits
            .max_seq_len
            .unwrap_or(model_max)
            .min(model_max);
        let limits = Limits::for_model(bert.hidden_size, num_layers, max_seq_len);
        let caps = config.limits;
        anyhow::ensure!(
            caps.receive_bytes_per_connection >= limits.max_body_bytes,
            "limits.receive_bytes_per_connection ({}) is smaller than the largest request this \
             model accepts ({} bytes: {max_seq_len} tokens of f32): such a request could never \
             be received",
            caps.receive_bytes_per_connection,
            limits.max_body_bytes
        );

        let tls = &config.tls;
        let certs = transport::load_certs(&tls.cert)?;
        let key = transport::load_key(&tls.key)?;
        let client_ca = tls
            .client_ca
            .as_deref()
            .map(transport::load_certs)
            .transpose()?;
        let mutual_tls = client_ca.is_some();
        if config.insecure_no_client_auth && !config.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %config.listen,
                "INSECURE: serving without client authentication beyond loopback \
                 (--insecure-no-client-auth): any client that trusts this worker's certificate \
                 gets answers"
            );
        }
        let server_config = transport::server_config(
            certs,
            key,
            client_ca,
            transport::ReceiveLimits {
                max_streams: caps.max_streams_per_connection,
                stream_window: (HEADER_LEN + limits.max_body_bytes) as u64,
                connection_window: caps.receive_bytes_per_connection as u64,
                idle_timeout: transport::IDLE_TIMEOUT,
            },
        )?;
        let (endpoint_config, quic_lb) = match &config.quic_lb {
            Some(quic_lb) => {
                let cids = quic_lb.generator()?;
                let described = format!(
                    "server id 0x{}, config rotation {}, {}-byte connection ids",
                    cids.server_id()
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>(),
                    cids.config_rotation(),
                    cids.len()
                );
                (cids.endpoint_config(), Some(described))
            }
            None => (quinn::EndpointConfig::default(), None),
        };
        let endpoint =
            transport::bind_endpoint_with(config.listen, endpoint_config, Some(server_config))?;
        let local_addr = endpoint.local_addr().context("QUIC endpoint address")?;

        let metrics = status.status.metrics.clone();
        let shutting_down = status.status.shutting_down.clone();
        let metrics_addr = status.addr();

        let compute = compute::spawn(
            model,
            device,
            BatchPolicy {
                max_batch_size: config.batching.max_batch_size,
                max_wait: config.max_wait(),
            },
            metrics.clone(),
        )
        .context("starting the compute thread")?;
        let read_timeout = config.read_timeout();
        let shared = Arc::new(Shared {
            fingerprint: fingerprint.0,
            limits,
            caps,
            welcome: Welcome {
                max_streams: caps.max_streams_per_connection,
                max_seq_len: max_seq_len as u32,
                num_layers: num_layers as u16,
                receive_timeout_ms: caps.read_timeout_ms as u32,
            },
            jobs: compute.jobs.clone(),
            slots: Arc::new(Semaphore::new(config.batching.max_in_flight)),
            max_in_flight: config.batching.max_in_flight,
            receive_budget: Arc::new(Semaphore::new(caps.receive_bytes)),
            peers: Mutex::new(Peers::default()),
            next_connection: AtomicU64::new(0),
            metrics: metrics.clone(),
            read_timeout,
            cloud_exits: caps.cloud_exits,
            shutting_down: shutting_down.clone(),
        });
        status.status.set_serving(fingerprint.short());
        tracing::info!(
            %local_addr,
            metrics = ?metrics_addr,
            quic_lb = quic_lb.as_deref().unwrap_or("off"),
            model = %fingerprint.short(),
            layers = num_layers,
            max_seq_len,
            mutual_tls,
            batching = ?config.batching,
            limits = ?caps,
            "cloud worker serving"
        );
        let task = tokio::spawn(serve(
            endpoint,
            shared,
            compute,
            config.shutdown_timeout(),
            status.take_task(),
        ));
        Ok(Worker {
            local_addr,
            metrics_addr,
            metrics,
            shutting_down,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Begins a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutting_down.cancel();
    }

    /// Graceful shutdown: stop accepting connections, answer requests that have not fully
    /// arrived `shutting_down`, finish the admitted ones (up to the configured timeout),
    /// close connections, stop the compute thread.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.wait().await
    }

    /// Waits until the worker stopped (after [`Self::begin_shutdown`]).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the worker task failed")?
    }
}

async fn serve(
    endpoint: Endpoint,
    shared: Arc<Shared>,
    compute: ComputeHandle,
    shutdown_timeout: Duration,
    http: Option<(JoinHandle<std::io::Result<()>>, CancellationToken)>,
) -> anyhow::Result<()> {
    let connections = TaskTracker::new();
    let requests = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shared.shutting_down.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => accept(incoming, &shared, &connections, &requests),
                None => break,
            },
        }
    }
    tracing::info!(
        in_flight = shared.metrics.in_flight.get(),
        "shutting down: finishing in-flight requests"
    );
    // Refuse new connections explicitly (CONNECTION_REFUSED, so clients fail fast instead of
    // waiting out a handshake timeout) until the endpoint closes; existing connections keep
    // being served (new requests get `shutting_down`) until the in-flight requests are done.
    let refuser = tokio::spawn({
        let endpoint = endpoint.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                incoming.refuse();
            }
        }
    });
    requests.close();
    if tokio::time::timeout(shutdown_timeout, requests.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = shared.metrics.in_flight.get(),
            "shutdown timeout: closing with requests in flight"
        );
    }
    endpoint.close(CLOSE_SHUTDOWN.into(), b"shutting down");
    let _ = refuser.await;
    connections.close();
    // Connection tasks end as soon as their connection is closed; bounded anyway.
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    if let Some((task, stop)) = http {
        stop.cancel();
        match task.await {
            Ok(Err(error)) => tracing::warn!(%error, "metrics endpoint failed"),
            Err(error) => tracing::warn!(%error, "metrics endpoint task failed"),
            Ok(Ok(())) => {}
        }
    }
    // Request tasks cut off by the timeout may still hold the job sender; the compute thread
    // stops once the last one is gone and the queue is answered.
    drop(shared);
    tokio::task::spawn_blocking(move || compute.join())
        .await
        .context("joining the compute thread")?;
    tracing::info!("cloud worker stopped");
    Ok(())
}

/// A connection attempt: validated, counted against the caps, and served; or refused.
fn accept(
    incoming: Incoming,
    shared: &Arc<Shared>,
    connections: &TaskTracker,
    requests: &TaskTracker,
) {
    if !incoming.remote_address_validated() {
        // A Retry costs the client one round trip, and the worker nothing: no state until the
        // client comes back with the token, which proves it receives at its address.
        match incoming.retry() {
            Ok(()) => {
                shared.metrics.retries.inc();
            }
            Err(error) => tracing::debug!(%error, "could not send a Retry"),
        }
        return;
    }
    let remote = incoming.remote_address();
    match shared.admit_connection(remote.ip()) {
        Ok(permit) => {
            connections.spawn(connection(
                incoming,
                shared.clone(),
                requests.clone(),
                permit,
            ));
        }
        Err(why) => {
            shared.metrics.connections_refused.inc();
            tracing::debug!(%remote, why, "connection refused");
            incoming.refuse();
        }
    }
}

async fn connection(
    incoming: Incoming,
    shared: Arc<Shared>,
    requests: TaskTracker,
    permit: ConnectionPermit,
) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            // Includes clients without a certificate, or with one from an unknown CA, under
            // mutual TLS.
            shared.metrics.handshake_failures.inc();
            tracing::info!(%remote, %error, "handshake failed");
            return;
        }
    };
    shared.metrics.connections.inc();
    tracing::debug!(%remote, "connection established");
    let client = Arc::new(Client {
        id: shared.next_connection.fetch_add(1, Ordering::Relaxed),
        peer: permit.peer,
        receive_budget: Arc::new(Semaphore::new(shared.caps.receive_bytes_per_connection)),
    });
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                requests.spawn(stream(send, recv, shared.clone(), client.clone()));
            }
            Err(error) => {
                tracing::debug!(%remote, %error, "connection ended");
                break;
            }
        }
    }
    shared.metrics.connections.dec();
    // Counted against the caps until here.
    drop(permit);
}

/// Serves one stream: a request or a hello.
async fn stream(
    mut send: SendStream,
    mut recv: RecvStream,
    shared: Arc<Shared>,
    client: Arc<Client>,
) {
    let opened = Instant::now();
    shared.metrics.requests.inc();
    let Some((response, version)) = respond(&mut send, &mut recv, &shared, &client, opened).await
    else {
        return;
    };
    let frame = match &response {
        Response::Error(error) => {
            shared.metrics.error(error.code);
            tracing::debug!(
                request_id = error.request_id,
                code = error.code.name(),
                message = %error.message,
                "request refused"
            );
            encode_error_for_version(error, version)
        }
        Response::Answer(_) => {
            shared.metrics.answers.inc();
            encode_response(&response)
        }
        Response::Welcome(_) => encode_response(&response),
    };
    if send.write_all(&frame).await.is_err() || send.finish().is_err() {
        return;
    }
    Metrics::observe_seconds(&shared.metrics.latency, opened.elapsed());
    // Stay (bounded) until the client acknowledged the answer, so that a graceful shutdown,
    // which waits for this task, never closes the connection under an unsent answer.
    let _ = tokio::time::timeout(shared.read_timeout, send.stopped()).await;
}

/// Why a stream has no whole frame to work on.
enum Unreceived {
    /// The client can still be told, in the protocol version it spoke.
    Answer(ProtocolError, u16),
    /// Reset by the client, or the connection is gone: nobody can be answered.
    Broken,
}

impl Unreceived {
    fn malformed(message: String) -> Self {
        Self::Answer(
            ProtocolError::new(ErrorCode::Malformed, message),
            PROTOCOL_VERSION,
        )
    }
}

/// A frame received whole; a request's body still holds its receive budget.
enum Received {
    Hello(Vec<u8>),
    Request {
        body: Vec<u8>,
        reservation: Reservation,
    },
}

/// The response to one stream and the protocol version to frame it in, or `None` when the
/// stream broke (or the client stopped waiting) and nobody can be answered.
async fn respond(
    send: &mut SendStream,
    recv: &mut RecvStream,
    shared: &Arc<Shared>,
    client: &Client,
    opened: Instant,
) -> Option<(Response, u16)> {
    let arrived_by = tokio::time::Instant::from_std(opened + shared.read_timeout);
    // Until its frame is in, a stream holds no in-flight slot, and a shutdown answers it at
    // once: the worker never waits for clients that are still sending (or pretend to be).
    let received = tokio::select! {
        biased;
        () = shared.shutting_down.cancelled() => Err(Unreceived::Answer(
            ProtocolError::new(
                ErrorCode::ShuttingDown,
                "the worker is shutting down; retry on another worker",
            ),
            PROTOCOL_VERSION,
        )),
        () = tokio::time::sleep_until(arrived_by) => Err(Unreceived::malformed(format!(
            "the request frame did not arrive whole within {} ms",
            shared.read_timeout.as_millis()
        ))),
        received = receive(recv, shared, client) => received,
    };
    let response = match received {
        Ok(Received::Hello(body)) => hello(&body, shared),
        Ok(Received::Request { body, reservation }) => {
            request(body, reservation, send, shared, client, opened).await?
        }
        Err(Unreceived::Broken) => return None,
        Err(Unreceived::Answer(error, version)) => {
            let _ = recv.stop(STOP_ANSWERED_EARLY.into());
            return Some((error.into_frame(0), version));
        }
    };
    Some((response, PROTOCOL_VERSION))
}

/// Reads one whole frame (header, body, end of stream). The read timeout is the caller's.
async fn receive(
    recv: &mut RecvStream,
    shared: &Shared,
    client: &Client,
) -> Result<Received, Unreceived> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(arrived)) => {
            return Err(Unreceived::malformed(format!(
                "truncated frame: {arrived} bytes, the header alone needs {HEADER_LEN}"
            )));
        }
        Err(quinn::ReadExactError::ReadError(_)) => return Err(Unreceived::Broken),
    }
    // Header checks (magic, version, kind, body length against the limit) come before any
    // allocation that depends on what the client claims. An older client is refused in its
    // own version's framing, so that it can read why.
    let version = header_version(&header).unwrap_or(PROTOCOL_VERSION);
    let (kind, len) =
        decode_header(
            &header,
            &[FrameKind::Request, FrameKind::Hello],
            |kind| match kind {
                FrameKind::Hello => MAX_HELLO_BODY_BYTES,
                _ => shared.limits.max_body_bytes,
            },
        )
        .map_err(|error| Unreceived::Answer(error, version))?;
    let received = match kind {
        FrameKind::Hello => Received::Hello(read_body(recv, len).await?),
        _ => {
            let reservation = reserve(shared, client, len)?;
            Received::Request {
                body: read_body(recv, len).await?,
                reservation,
            }
        }
    };
    // One frame per stream: anything after it is a protocol violation.
    match recv.read_to_end(0).await {
        Ok(_) => Ok(received),
        Err(quinn::ReadToEndError::TooLong) => Err(Unreceived::malformed(
            "bytes after the request frame (one request per stream)".into(),
        )),
        Err(quinn::ReadToEndError::Read(_)) => Err(Unreceived::Broken),
    }
}

/// Receive budget for a body of `len` bytes: the connection's and the worker's, or `busy`.
fn reserve(shared: &Shared, client: &Client, len: usize) -> Result<Reservation, Unreceived> {
    let busy = |why: String| {
        Unreceived::Answer(
            ProtocolError::new(
                ErrorCode::Busy,
                format!("{why}; retry later or answer locally"),
            ),
            PROTOCOL_VERSION,
        )
    };
    // `len` passed the body limit, which the budgets (at most u32::MAX) are at least.
    let permits = u32::try_from(len).unwrap_or(u32::MAX);
    let connection = client
        .receive_budget
        .clone()
        .try_acquire_many_owned(permits)
        .map_err(|_| {
            busy(format!(
                "this connection is already receiving its budget of {} request bytes",
                shared.caps.receive_bytes_per_connection
            ))
        })?;
    let worker = shared
        .receive_budget
        .clone()
        .try_acquire_many_owned(permits)
        .map_err(|_| {
            busy(format!(
                "the worker is already receiving its budget of {} request bytes",
                shared.caps.receive_bytes
            ))
        })?;
    shared.metrics.receiving_bytes.inc_by(i64::from(permits));
    Ok(Reservation {
        _connection: connection,
        _worker: worker,
        bytes: i64::from(permits),
        metrics: shared.metrics.clone(),
    })
}

/// The first allocation for a body; later ones double, up to the announced length.
const FIRST_ALLOCATION: usize = 16 << 10;

/// Reads exactly `len` body bytes into a buffer that grows with what arrives, so that a client
/// announcing a large body and sending little costs little.
async fn read_body(recv: &mut RecvStream, len: usize) -> Result<Vec<u8>, Unreceived> {
    let mut body = Vec::new();
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => {
                let needed = body.len() + chunk.bytes.len();
                if needed > body.capacity() {
                    let grown = (body.capacity() * 2).max(FIRST_ALLOCATION).max(needed);
                    body.reserve_exact(grown.min(len) - body.len());
                }
                body.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => {
                return Err(Unreceived::malformed(format!(
                    "truncated frame: the header announces {len} body bytes, {} arrived",
                    body.len()
                )));
            }
            Err(_) => return Err(Unreceived::Broken),
        }
    }
    Ok(body)
}

fn hello(body: &[u8], shared: &Shared) -> Response {
    match decode_hello_body(body).and_then(|hello| hello.validate(&shared.fingerprint)) {
        Ok(()) => Response::Welcome(shared.welcome),
        Err(error) => error.into_frame(0),
    }
}

/// A request received whole: decoded, validated, admitted and computed. `None` when the client
/// stopped waiting (it reset the stream or left), which cancels the job.
async fn request(
    body: Vec<u8>,
    reservation: Reservation,
    send: &SendStream,
    shared: &Arc<Shared>,
    client: &Client,
    opened: Instant,
) -> Option<Response> {
    let received = Instant::now();
    let request = match decode_request_body(&body) {
        Ok(request) => request,
        Err(error) => return Some(error.into_frame(0)),
    };
    drop(body);
    let request_id = request.request_id;
    if let Err(error) = request.validate(&shared.fingerprint, &shared.limits) {
        return Some(error.into_frame(request_id));
    }
    let _slot = match shared.take_slot(client.peer) {
        Ok(slot) => slot,
        Err(error) => return Some(error.into_frame(request_id)),
    };
    let states = match request.hidden_states(shared.limits.hidden_size) {
        Ok(states) => states,
        Err(error) => return Some(error.into_frame(request_id)),
    };
    // The deadline counts from the stream's opening, when the request began to arrive.
    let deadline = opened
        .checked_add(Duration::from_millis(request.deadline_ms.into()))
        .unwrap_or(opened + Duration::from_secs(86_400));
    let (reply, answer) = oneshot::channel();
    let job = Job {
        request_id,
        tenant: client.id,
        split_layer: usize::from(request.split_layer),
        seq_len: request.seq_len as usize,
        states,
        options: ReplyOptions {
            cloud_exit_threshold: request
                .options
                .cloud_exit_threshold
                .filter(|_| shared.cloud_exits),
        },
        received,
        deadline,
        reply,
    };
    drop((request, reservation));
    if shared.jobs.send(job).is_err() {
        return Some(
            ProtocolError::new(ErrorCode::Internal, "the compute thread stopped")
                .into_frame(request_id),
        );
    }
    // A client that stops waiting (a reset stream, a lost connection) drops the answer's
    // receiver here, which the compute thread sees before it runs the job.
    let answer = tokio::select! {
        answer = answer => answer,
        _ = send.stopped() => return None,
    };
    Some(match answer {
        Ok(Ok(answer)) => Response::Answer(answer),
        Ok(Err(error)) => error.into_frame(request_id),
        Err(_) => ProtocolError::new(
            ErrorCode::Internal,
            "the compute thread dropped the request",
        )
        .into_frame(request_id),
    })
}
