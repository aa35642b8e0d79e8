//! The QUIC server: connections, one task per request stream, admission control and the
//! graceful shutdown.
//!
//! A request stream is handled as: read the 11-byte header (checked against the limits before
//! anything else is allocated), take an in-flight slot or answer `busy` at once, read exactly
//! the announced body, decode and validate it, hand it to the compute thread, write the answer.
//! Every failure that can still be answered gets an error frame naming the problem; a stream
//! the client reset or a lost connection gets nothing. Nothing a client sends can panic the
//! server or stop it serving other clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use burn::prelude::Device;
use quinn::{Endpoint, Incoming, ReadExactError, RecvStream, SendStream};
use splitee_common::LoadedModel;
use splitee_common::protocol::{
    ErrorCode, FrameKind, HEADER_LEN, Limits, ProtocolError, ReplyOptions, Response, decode_header,
    decode_request_body, encode_response,
};
use splitee_common::{http, transport};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::compute::{self, BatchPolicy, ComputeHandle, Job};
use crate::config::WorkerConfig;
use crate::metrics::Metrics;

/// QUIC stream error code sent with `STOP_SENDING` when the server answered before reading
/// the whole request (busy, or a header it refused).
pub const STOP_ANSWERED_EARLY: u32 = 1;
/// QUIC connection close code of a graceful shutdown.
pub const CLOSE_SHUTDOWN: u32 = 0;

/// Everything a request task needs.
struct Shared {
    fingerprint: [u8; 32],
    limits: Limits,
    jobs: std::sync::mpsc::Sender<Job>,
    admission: Arc<Semaphore>,
    max_in_flight: usize,
    metrics: Arc<Metrics>,
    read_timeout: Duration,
    cloud_exits: bool,
    shutting_down: CancellationToken,
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
    /// Loads TLS files, binds the QUIC endpoint (and the HTTP endpoint when configured),
    /// starts the compute thread and starts serving. Must be called inside a tokio runtime.
    pub async fn start(
        config: &WorkerConfig,
        model: LoadedModel,
        device: Device,
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

        let tls = &config.tls;
        let certs = transport::load_certs(&tls.cert)?;
        let key = transport::load_key(&tls.key)?;
        let client_ca = tls
            .client_ca
            .as_deref()
            .map(transport::load_certs)
            .transpose()?;
        let mutual_tls = client_ca.is_some();
        let server_config = transport::server_config(
            certs,
            key,
            client_ca,
            config.limits.max_streams_per_connection,
        )?;
        let endpoint = transport::bind_endpoint(config.listen, Some(server_config))?;
        let local_addr = endpoint.local_addr().context("QUIC endpoint address")?;

        let metrics = Arc::new(Metrics::new());
        let shutting_down = CancellationToken::new();
        let http_stop = CancellationToken::new();
        let (metrics_addr, http) = match config.metrics_listen {
            Some(addr) => {
                let listener = http::bind(addr)
                    .await
                    .with_context(|| format!("binding the metrics endpoint {addr}"))?;
                let addr = listener.local_addr()?;
                let render = {
                    let metrics = metrics.clone();
                    Arc::new(move || metrics.encode())
                };
                let task = tokio::spawn(http::serve_metrics(
                    listener,
                    render,
                    shutting_down.clone(),
                    http_stop.clone(),
                ));
                (Some(addr), Some(task))
            }
            None => (None, None),
        };

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
        let shared = Arc::new(Shared {
            fingerprint: fingerprint.0,
            limits,
            jobs: compute.jobs.clone(),
            admission: Arc::new(Semaphore::new(config.batching.max_in_flight)),
            max_in_flight: config.batching.max_in_flight,
            metrics: metrics.clone(),
            read_timeout: config.read_timeout(),
            cloud_exits: config.limits.cloud_exits,
            shutting_down: shutting_down.clone(),
        });
        tracing::info!(
            %local_addr,
            metrics = ?metrics_addr,
            model = %fingerprint.short(),
            layers = num_layers,
            max_seq_len,
            mutual_tls,
            batching = ?config.batching,
            "cloud worker serving"
        );
        let task = tokio::spawn(serve(
            endpoint,
            shared,
            compute,
            config.shutdown_timeout(),
            http.map(|task| (task, http_stop)),
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

    /// Graceful shutdown: stop accepting connections, answer new requests `shutting_down`,
    /// finish the in-flight ones (up to the configured timeout), close connections, stop the
    /// compute thread.
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
                Some(incoming) => {
                    connections.spawn(connection(incoming, shared.clone(), requests.clone()));
                }
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

async fn connection(incoming: Incoming, shared: Arc<Shared>, requests: TaskTracker) {
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
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                requests.spawn(request(send, recv, shared.clone()));
            }
            Err(error) => {
                tracing::debug!(%remote, %error, "connection ended");
                break;
            }
        }
    }
    shared.metrics.connections.dec();
}

/// Serves one request stream.
async fn request(mut send: SendStream, mut recv: RecvStream, shared: Arc<Shared>) {
    let started = Instant::now();
    shared.metrics.requests.inc();
    let Some(response) = answer(&mut recv, &shared).await else {
        return;
    };
    match &response {
        Response::Answer(_) => {
            shared.metrics.answers.inc();
        }
        Response::Error(error) => {
            shared.metrics.error(error.code);
            tracing::debug!(
                request_id = error.request_id,
                code = error.code.name(),
                message = %error.message,
                "request refused"
            );
        }
    }
    let frame = encode_response(&response);
    if send.write_all(&frame).await.is_err() || send.finish().is_err() {
        return;
    }
    Metrics::observe_seconds(&shared.metrics.latency, started.elapsed());
    // Stay (bounded) until the client acknowledged the answer, so that a graceful shutdown,
    // which waits for this task, never closes the connection under an unsent answer.
    let _ = tokio::time::timeout(shared.read_timeout, send.stopped()).await;
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Response {
    ProtocolError::new(code, message).into_frame(0)
}

/// The response to one request, or `None` when the stream broke and nobody can be answered.
async fn answer(recv: &mut RecvStream, shared: &Shared) -> Option<Response> {
    let mut header = [0u8; HEADER_LEN];
    match read_exact(recv, &mut header, shared.read_timeout).await {
        Ok(()) => {}
        Err(ReadFailure::Broken) => return None,
        Err(ReadFailure::Short(arrived)) => {
            return Some(refuse(
                ErrorCode::Malformed,
                format!("truncated frame: {arrived} bytes, the header alone needs {HEADER_LEN}"),
            ));
        }
        Err(ReadFailure::TimedOut) => {
            let _ = recv.stop(STOP_ANSWERED_EARLY.into());
            return Some(refuse(
                ErrorCode::Malformed,
                "timed out waiting for the frame header",
            ));
        }
    }
    // Header checks (magic, version, kind, body length against the limit) come before any
    // allocation that depends on what the client claims.
    let body_len = match decode_header(&header, FrameKind::Request, shared.limits.max_body_bytes) {
        Ok(len) => len,
        Err(error) => {
            let _ = recv.stop(STOP_ANSWERED_EARLY.into());
            return Some(error.into_frame(0));
        }
    };
    if shared.shutting_down.is_cancelled() {
        let _ = recv.stop(STOP_ANSWERED_EARLY.into());
        return Some(refuse(
            ErrorCode::ShuttingDown,
            "the worker is shutting down; retry on another worker",
        ));
    }
    let Ok(_permit) = shared.admission.clone().try_acquire_owned() else {
        let _ = recv.stop(STOP_ANSWERED_EARLY.into());
        return Some(refuse(
            ErrorCode::Busy,
            format!(
                "the worker is at its bound of {} requests in flight; retry later or answer locally",
                shared.max_in_flight
            ),
        ));
    };
    shared.metrics.in_flight.inc();
    let response = admitted(recv, shared, body_len).await;
    shared.metrics.in_flight.dec();
    response
}

/// The part of a request that holds an in-flight slot.
async fn admitted(recv: &mut RecvStream, shared: &Shared, body_len: usize) -> Option<Response> {
    let mut body = vec![0u8; body_len];
    match read_exact(recv, &mut body, shared.read_timeout).await {
        Ok(()) => {}
        Err(ReadFailure::Broken) => return None,
        Err(ReadFailure::Short(arrived)) => {
            return Some(refuse(
                ErrorCode::Malformed,
                format!(
                    "truncated frame: the header announces {body_len} body bytes, {arrived} arrived"
                ),
            ));
        }
        Err(ReadFailure::TimedOut) => {
            let _ = recv.stop(STOP_ANSWERED_EARLY.into());
            return Some(refuse(
                ErrorCode::Malformed,
                format!("timed out waiting for the {body_len}-byte frame body"),
            ));
        }
    }
    // One request per stream: anything after the frame is a protocol violation.
    match tokio::time::timeout(shared.read_timeout, recv.read_to_end(0)).await {
        Ok(Ok(_)) => {}
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            let _ = recv.stop(STOP_ANSWERED_EARLY.into());
            return Some(refuse(
                ErrorCode::Malformed,
                "bytes after the request frame (one request per stream)",
            ));
        }
        Ok(Err(quinn::ReadToEndError::Read(_))) => return None,
        Err(_) => {
            let _ = recv.stop(STOP_ANSWERED_EARLY.into());
            return Some(refuse(
                ErrorCode::Malformed,
                "the request stream was not finished after its frame",
            ));
        }
    }
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
    let states = match request.hidden_states(shared.limits.hidden_size) {
        Ok(states) => states,
        Err(error) => return Some(error.into_frame(request_id)),
    };
    let (reply, answer) = oneshot::channel();
    let job = Job {
        request_id,
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
        reply,
    };
    if shared.jobs.send(job).is_err() {
        return Some(
            ProtocolError::new(ErrorCode::Internal, "the compute thread stopped")
                .into_frame(request_id),
        );
    }
    Some(match answer.await {
        Ok(Ok(answer)) => Response::Answer(answer),
        Ok(Err(error)) => error.into_frame(request_id),
        Err(_) => ProtocolError::new(
            ErrorCode::Internal,
            "the compute thread dropped the request",
        )
        .into_frame(request_id),
    })
}

enum ReadFailure {
    /// The stream finished after this many bytes.
    Short(usize),
    TimedOut,
    /// Reset by the client or the connection is gone: no answer can be delivered.
    Broken,
}

async fn read_exact(
    recv: &mut RecvStream,
    buffer: &mut [u8],
    timeout: Duration,
) -> Result<(), ReadFailure> {
    match tokio::time::timeout(timeout, recv.read_exact(buffer)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(ReadExactError::FinishedEarly(arrived))) => Err(ReadFailure::Short(arrived)),
        Ok(Err(ReadExactError::ReadError(_))) => Err(ReadFailure::Broken),
        Err(_) => Err(ReadFailure::TimedOut),
    }
}
