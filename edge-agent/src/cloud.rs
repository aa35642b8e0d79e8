//! The connections to the cloud workers: a hello when connecting, offloading with a deadline,
//! reconnecting with backoff when a worker or the link goes away, and failover between several
//! worker endpoints.
//!
//! A connection counts as up once the worker has answered the hello: it serves this agent's
//! model, and it says what the connection may hold. A worker serving another model disables
//! offloading with one error (every sample is then answered on the device; the agent looks
//! again at the longest backoff), and a worker that refuses the agent's certificate is one
//! error too, retried with growing backoff.
//!
//! Each request carries a deadline a little shorter than the agent's wait, so that the worker
//! drops what it could not answer in time rather than compute it for nobody. A request that
//! times out resets its own stream and is finished on the device; the connection and everything
//! else in flight on it go on. A dead path is found three ways: a request that heard not one
//! datagram from the worker during its whole wait (not even the ACK of its own bytes) ends the
//! connection at once; with several endpoints, a request that heard nothing for
//! `cloud.failover_silence_ms` does so sooner (below); and QUIC's idle timeout (keep-alives at
//! a third of `cloud.idle_timeout_ms`) closes one that hears nothing for that long.
//!
//! The agent never waits for the cloud to come back: while the link is down, an offload fails
//! at once ([`OffloadFailure::Unreachable`]) and the sample is finished on the device, and a
//! background task retries the connection after `backoff` (doubling up to the maximum).
//!
//! # Several endpoints
//!
//! `cloud.address` may name several workers (or a name resolving to several). Each endpoint has
//! its own connection, state and backoff: connected, down (retried after its backoff) or
//! connecting, and, while connected, passed over for `cloud.busy_cooldown_ms` after it answered
//! `busy`. An offload goes to the connected endpoint with the fewest offloads of this agent in
//! flight, ties broken round-robin; busy ones only when no other is connected. An offload moves
//! to another endpoint (within its one request timeout, each endpoint tried once) when the
//! worker answered `busy` or `shutting_down`, or when the connection failed or was found dead
//! before an answer came: in every such case no answer can come any more from the first
//! worker (it refused the request, or its connection is closed), so a sample still gets at
//! most one answer. A timeout, an expired deadline or a rejection is not retried. A down
//! endpoint's reconnection is attempted when an offload looks for an endpoint after its
//! backoff; once up, it takes its share again (it has the fewest in flight).
//!
//! With several endpoints a hard-killed worker would hold its requests until their timeout;
//! so a request that hears nothing at all from its worker for `cloud.failover_silence_ms`
//! (keep-alives go out at a third of it, so a live worker, even one computing a long batch, is
//! heard from meanwhile) closes that connection and moves on.
//!
//! The bandit sees one link: an offload's round trip runs from its first attempt to its
//! answer, and its bytes are those of every attempt that went out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use quinn::{Connection, Endpoint};
use splitee_protocol::{Answer, ErrorCode, OffloadRequest, Response, Welcome};
use splitee_service::transport::{self, TransportError};

use crate::config::{CloudConfig, WorkerAddress};
use crate::metrics::Metrics;

/// Time asked of the worker beyond the round trip, for the answer's way back through the
/// network stacks and this side's scheduling: the worker is asked to be done that much before
/// the agent stops waiting.
const DEADLINE_SLACK: Duration = Duration::from_millis(50);

/// Why the cloud did not answer a sample.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadFailure {
    #[error("cloud unreachable: {0}")]
    Unreachable(String),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("the worker is busy")]
    Busy,
    /// The worker dropped the request unanswered: the deadline the agent gave it passed first.
    #[error("the worker could not answer within the request's deadline")]
    Expired,
    #[error("the worker is shutting down")]
    ShuttingDown,
    #[error("the worker rejected the request ({code}): {message}")]
    Rejected { code: &'static str, message: String },
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The sample's deadline (a `serve` request's) came before the answer; unlike a timeout
    /// this says nothing about the link.
    #[error("deadline: no answer by the request's deadline ({0} ms after sending)")]
    Deadline(u64),
    /// The deadline had passed before the offload began: nothing was sent.
    #[error("deadline: it had passed before the offload")]
    DeadlinePassed,
}

impl OffloadFailure {
    /// Short label for metrics and records.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::Timeout(_) => "timeout",
            Self::Busy => "busy",
            Self::Expired => "expired",
            Self::ShuttingDown => "shutting_down",
            Self::Rejected { .. } => "rejected",
            Self::ConnectionLost(_) => "connection_lost",
            Self::Deadline(_) | Self::DeadlinePassed => "deadline",
        }
    }

    /// Whether the request went out (and its bytes are charged) before it failed.
    pub fn sent(&self) -> bool {
        !matches!(self, Self::Unreachable(_) | Self::DeadlinePassed)
    }

    /// Whether another endpoint may take the request: the worker refused it or can no longer
    /// answer it (its connection is closed), so a second answer cannot come.
    fn moves_on(&self) -> bool {
        matches!(
            self,
            Self::Busy | Self::ShuttingDown | Self::Unreachable(_) | Self::ConnectionLost(_)
        )
    }
}

/// An offload the cloud did not answer: the last failure, and how many attempts sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    pub failure: OffloadFailure,
    /// Attempts whose request went out (each is charged its bytes).
    pub attempts_sent: u32,
}

/// A worker's answer and what the exchange measured.
#[derive(Debug, Clone)]
pub struct CloudAnswer {
    pub answer: Answer,
    /// From the first byte sent (of the first attempt) to the answer decoded.
    pub round_trip_ms: f64,
    /// Of every attempt that went out.
    pub bytes_sent: u64,
    /// The worker that answered.
    pub endpoint: SocketAddr,
}

impl CloudAnswer {
    /// The worker's queueing and compute time.
    pub fn cloud_ms(&self) -> f64 {
        (self.answer.compute_us + self.answer.queue_us) as f64 / 1e3
    }

    /// Round trip minus the worker's reported time: transmission, propagation and the
    /// network stack on both sides.
    pub fn network_ms(&self) -> f64 {
        (self.round_trip_ms - self.cloud_ms()).max(0.0)
    }
}

enum LinkState {
    Connected {
        connection: Connection,
        /// What the worker allows this connection.
        welcome: Welcome,
    },
    /// An attempt is under way; `after` is why the previous one failed (`None` at start),
    /// which still stands for the samples that meet the attempt: a worker that refused this
    /// model a moment ago most likely still does.
    Connecting { after: Option<String> },
    Down {
        retry_at: Instant,
        /// The wait after the next failed attempt.
        backoff: Duration,
        reason: String,
    },
}

/// Why a connection attempt failed, and how long to wait before the next one.
struct Failure {
    reason: String,
    /// Permanent until the worker changes (another model): look again only at the longest
    /// backoff, and log it as an error.
    disabling: bool,
}

/// The agent's side of the cloud: one [`WorkerLink`] per worker endpoint.
pub struct CloudLink {
    links: Vec<Arc<WorkerLink>>,
    request_timeout: Duration,
    /// Where the round-robin tie-break starts next.
    next: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl CloudLink {
    /// Resolves the endpoints, loads the TLS files and makes a first connection attempt to
    /// every endpoint (together, at most the connect timeout). A worker that is not there yet
    /// is not an error: the agent starts answering on the device and keeps retrying. A host
    /// name that does not resolve is.
    pub async fn start(
        config: CloudConfig,
        fingerprint: [u8; 32],
        window: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let addresses = resolve(&config).await?;
        let several = addresses.len() > 1;
        let roots = transport::load_certs(&config.ca)?;
        let identity = match (&config.client_cert, &config.client_key) {
            (Some(cert), Some(key)) => {
                Some((transport::load_certs(cert)?, transport::load_key(key)?))
            }
            _ => None,
        };
        let mut client = transport::client_config(roots, identity, config.idle_timeout())?;
        if several {
            // Keep-alives often enough that a live worker is heard from within the silence
            // that ends a connection (`failover_silence_ms`).
            let mut quic = transport::transport_config(transport::ReceiveLimits::client(
                config.idle_timeout(),
            ));
            let idle = config.idle_timeout().min(transport::MAX_IDLE_TIMEOUT);
            quic.keep_alive_interval(Some(idle.min(config.failover_silence()) / 3));
            client.transport_config(Arc::new(quic));
        }
        let mut links = Vec::with_capacity(addresses.len());
        for address in addresses {
            let any_port = match address {
                SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
                SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
            };
            let endpoint = transport::client_endpoint(any_port, client.clone())
                .context("binding the client UDP socket")?;
            metrics.endpoint_up(address, false);
            links.push(Arc::new(WorkerLink {
                endpoint,
                address,
                fingerprint,
                window,
                silence: several.then(|| config.failover_silence()),
                busy_cooldown: config.busy_cooldown(),
                state: Mutex::new(LinkState::Connecting { after: None }),
                busy_until: Mutex::new(None),
                in_flight: AtomicUsize::new(0),
                last_failure: Mutex::new(None),
                metrics: metrics.clone(),
                config: config.clone(),
            }));
        }
        futures::future::join_all(links.iter().map(|link| link.connect())).await;
        Ok(Arc::new(Self {
            links,
            request_timeout: config.request_timeout(),
            next: AtomicUsize::new(0),
            metrics,
        }))
    }

    /// The worker endpoints, in the config's order (names resolved).
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.links.iter().map(|link| link.address).collect()
    }

    /// Each endpoint and whether a connection to it is up right now.
    pub fn endpoint_states(&self) -> Vec<(SocketAddr, bool)> {
        self.links
            .iter()
            .map(|link| (link.address, link.is_connected()))
            .collect()
    }

    /// Whether a connection to some worker is up right now.
    pub fn is_connected(&self) -> bool {
        self.links.iter().any(|link| link.is_connected())
    }

    /// Sends `request` and waits for the answer, at most the request timeout and at most until
    /// the sample's `deadline` (a `serve` request's), moving to another endpoint when the first
    /// cannot answer (see the module documentation). Each worker is given what is left of the
    /// wait, less the round trip, as the request's own deadline.
    pub async fn offload(
        self: &Arc<Self>,
        mut request: OffloadRequest,
        deadline: Option<Instant>,
    ) -> Result<CloudAnswer, Unanswered> {
        let unanswered = |failure, attempts_sent| Unanswered {
            failure,
            attempts_sent,
        };
        let timeout = self.request_timeout;
        let started = Instant::now();
        let left = deadline.map(|d| d.saturating_duration_since(started));
        if left.is_some_and(|left| left.is_zero()) {
            return Err(unanswered(OffloadFailure::DeadlinePassed, 0));
        }
        let cut_by_deadline = left.is_some_and(|left| left < timeout);
        let end = started + left.map_or(timeout, |left| left.min(timeout));
        // Endpoints tried, one bit each (the addresses, resolved, are at most `MAX_ENDPOINTS`):
        // no allocation per offload.
        const _: () = assert!(crate::config::MAX_ENDPOINTS <= u64::BITS as usize);
        let mut tried = 0u64;
        let (mut attempts_sent, mut last) = (0u32, None);
        loop {
            let link = match self.pick(tried) {
                Ok((index, link)) => {
                    tried |= 1 << index;
                    link
                }
                Err(reason) => {
                    let failure = last.unwrap_or(OffloadFailure::Unreachable(reason));
                    return Err(unanswered(failure, attempts_sent));
                }
            };
            if tried.count_ones() > 1 {
                self.metrics.offload_moved();
            }
            let outcome = link.offload(&mut request, end, cut_by_deadline).await;
            self.metrics.endpoint_offload(
                link.address,
                outcome
                    .as_ref()
                    .map_or_else(OffloadFailure::kind, |_| "answered"),
            );
            match outcome {
                Ok(mut answer) => {
                    answer.bytes_sent *= u64::from(attempts_sent + 1);
                    answer.round_trip_ms = started.elapsed().as_secs_f64() * 1e3;
                    return Ok(answer);
                }
                Err(failure) => {
                    attempts_sent += u32::from(failure.sent());
                    if !failure.moves_on() || Instant::now() >= end {
                        return Err(unanswered(failure, attempts_sent));
                    }
                    tracing::debug!(endpoint = %link.address, %failure, "moving the offload to another endpoint");
                    last = Some(failure);
                }
            }
        }
    }

    /// The endpoint to send to next, not one of `tried`: a connected one with the fewest
    /// offloads in flight, ties broken round-robin, one in its busy cooldown only when no other
    /// is connected. Down endpoints whose backoff is over start reconnecting. Without any, the
    /// reason (each endpoint's with several).
    fn pick(&self, tried: u64) -> Result<(usize, Arc<WorkerLink>), String> {
        let now = Instant::now();
        let count = self.links.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let mut best: Option<((bool, usize), usize)> = None;
        let mut reasons = Vec::new();
        for index in (0..count).map(|k| (first + k) % count) {
            let link = &self.links[index];
            if tried & (1 << index) != 0 {
                continue;
            }
            match link.usable() {
                Ok(()) => {
                    let key = (link.cooling(now), link.in_flight.load(Ordering::Relaxed));
                    if best.is_none_or(|(best_key, _)| key < best_key) {
                        best = Some((key, index));
                    }
                }
                Err(reason) => reasons.push(format!("{}: {reason}", link.address)),
            }
        }
        match best {
            Some((_, index)) => Ok((index, self.links[index].clone())),
            None if count == 1 => Err(reasons.pop().unwrap_or_default()),
            None if reasons.is_empty() => Err("every endpoint failed this request".into()),
            None => Err(format!("no worker endpoint is up ({})", reasons.join("; "))),
        }
    }

    /// Closes the connections and the endpoints, telling the workers we are going.
    pub async fn close(&self) {
        futures::future::join_all(self.links.iter().map(|link| link.close())).await;
    }
}

/// The socket addresses of `cloud.address`: host names resolved (each address once).
async fn resolve(config: &CloudConfig) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addresses = Vec::new();
    for address in &config.address.0 {
        let resolved = match address {
            WorkerAddress::Socket(socket) => vec![*socket],
            WorkerAddress::Name { host, port } => {
                let lookup = tokio::net::lookup_host((host.as_str(), *port));
                tokio::time::timeout(config.connect_timeout(), lookup)
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "resolving cloud.address {address}: no answer within {} ms",
                            config.connect_timeout_ms
                        )
                    })?
                    .with_context(|| format!("resolving cloud.address {address}"))?
                    .collect()
            }
        };
        anyhow::ensure!(
            !resolved.is_empty(),
            "cloud.address {address} resolves to no address"
        );
        if resolved.len() > 1 || matches!(address, WorkerAddress::Name { .. }) {
            tracing::info!(%address, resolved = ?resolved, "resolved a worker name");
        }
        for socket in resolved {
            if !addresses.contains(&socket) {
                addresses.push(socket);
            }
        }
    }
    anyhow::ensure!(
        addresses.len() <= crate::config::MAX_ENDPOINTS,
        "cloud.address resolves to {} endpoints; at most {} are allowed",
        addresses.len(),
        crate::config::MAX_ENDPOINTS
    );
    Ok(addresses)
}

/// Counts an offload in flight on an endpoint while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One worker endpoint: its connection, reconnection with backoff, and the exchange of one
/// request.
struct WorkerLink {
    endpoint: Endpoint,
    address: SocketAddr,
    config: CloudConfig,
    /// This agent's model, which the hello asks the worker about.
    fingerprint: [u8; 32],
    /// Offloads the agent may have in flight (`pipeline.window`), to compare with the share
    /// the worker allows a connection.
    window: usize,
    /// With several endpoints: how long a request may hear nothing before the connection is
    /// taken for dead.
    silence: Option<Duration>,
    busy_cooldown: Duration,
    state: Mutex<LinkState>,
    /// Until when this endpoint is passed over after a `busy`.
    busy_until: Mutex<Option<Instant>>,
    /// This agent's offloads in flight on this endpoint.
    in_flight: AtomicUsize,
    /// The last connection failure logged: one that repeats is logged once, not every attempt.
    last_failure: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

impl WorkerLink {
    /// Whether a connection is up right now.
    fn is_connected(&self) -> bool {
        matches!(*self.lock(), LinkState::Connected { .. })
    }

    /// Whether this endpoint is in its cooldown after a `busy`.
    fn cooling(&self, now: Instant) -> bool {
        let until = self.busy_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|until| now < until)
    }

    /// Whether a request may go here now (else why not; a reconnection starts when due).
    fn usable(self: &Arc<Self>) -> Result<(), String> {
        match self.connection() {
            Ok(_) => Ok(()),
            Err(OffloadFailure::Unreachable(reason)) => Err(reason),
            Err(failure) => Err(failure.to_string()),
        }
    }

    /// Sends `request` and waits for the answer until `end`, setting the request's deadline
    /// for the worker (the wait less the round trip). `cut_by_deadline`: `end` is the sample's
    /// deadline rather than the request timeout.
    async fn offload(
        self: &Arc<Self>,
        request: &mut OffloadRequest,
        end: Instant,
        cut_by_deadline: bool,
    ) -> Result<CloudAnswer, OffloadFailure> {
        let wait = end.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Err(if cut_by_deadline {
                OffloadFailure::DeadlinePassed
            } else {
                OffloadFailure::Timeout(self.config.request_timeout_ms)
            });
        }
        let (connection, welcome) = self.connection()?;
        let _in_flight = InFlight::new(&self.in_flight);
        if request.seq_len > welcome.max_seq_len {
            return Err(OffloadFailure::Rejected {
                code: ErrorCode::SequenceTooLong.name(),
                message: format!(
                    "{} tokens; the worker accepts at most {} (not sent)",
                    request.seq_len, welcome.max_seq_len
                ),
            });
        }
        let margin = (connection.rtt() + DEADLINE_SLACK).min(wait / 2);
        request.deadline_ms = u32::try_from((wait - margin).as_millis())
            .unwrap_or(u32::MAX)
            .max(1);
        let frame = splitee_protocol::encode_request(request);
        // A request that times out resets only its stream: a slow worker is no reason to drop
        // the other requests in flight. But when not one datagram (not even an ACK of the
        // request) came back during the whole wait, the path is dead: waiting for QUIC's idle
        // timeout would make every offload meanwhile pay a full timeout too.
        let heard_before = connection.stats().udp_rx.datagrams;
        let started = Instant::now();
        let exchange = transport::exchange(&connection, &frame, wait);
        let outcome = match self.silence {
            None => exchange.await,
            Some(silence) => tokio::select! {
                outcome = exchange => outcome,
                () = silent(&connection, silence) => {
                    let reason = format!(
                        "nothing heard from the worker for {} ms with a request in flight",
                        silence.as_millis()
                    );
                    self.abandon(&connection, reason.clone());
                    return Err(OffloadFailure::ConnectionLost(reason));
                }
            },
        };
        let round_trip_ms = started.elapsed().as_secs_f64() * 1e3;
        match outcome {
            Ok(Response::Answer(answer)) if answer.request_id == request.request_id => {
                Ok(CloudAnswer {
                    answer,
                    round_trip_ms,
                    bytes_sent: frame.len() as u64,
                    endpoint: self.address,
                })
            }
            Ok(Response::Answer(answer)) => Err(OffloadFailure::Rejected {
                code: ErrorCode::Malformed.name(),
                message: format!(
                    "answer for request {} to request {}",
                    answer.request_id, request.request_id
                ),
            }),
            Ok(Response::Welcome(_)) => Err(OffloadFailure::Rejected {
                code: ErrorCode::Malformed.name(),
                message: format!("a welcome in answer to request {}", request.request_id),
            }),
            Ok(Response::Error(error)) => Err(match error.code {
                ErrorCode::Busy => {
                    *self.busy_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Instant::now() + self.busy_cooldown);
                    OffloadFailure::Busy
                }
                ErrorCode::DeadlineExceeded => OffloadFailure::Expired,
                ErrorCode::ShuttingDown => {
                    self.lost(&connection, "the worker is shutting down".into());
                    OffloadFailure::ShuttingDown
                }
                code => {
                    tracing::warn!(code = code.name(), message = %error.message, "the worker rejected a request");
                    OffloadFailure::Rejected {
                        code: code.name(),
                        message: error.message,
                    }
                }
            }),
            Err(TransportError::TimedOut(_)) if cut_by_deadline => {
                Err(OffloadFailure::Deadline(wait.as_millis() as u64))
            }
            Err(TransportError::TimedOut(_)) => {
                if connection.stats().udp_rx.datagrams == heard_before {
                    self.abandon(
                        &connection,
                        format!("nothing heard from the worker for {} ms", wait.as_millis()),
                    );
                }
                Err(OffloadFailure::Timeout(self.config.request_timeout_ms))
            }
            Err(TransportError::Protocol(error)) => Err(OffloadFailure::Rejected {
                code: error.code.name(),
                message: error.message,
            }),
            Err(error) => {
                let reason = error.to_string();
                self.lost(&connection, reason.clone());
                Err(OffloadFailure::ConnectionLost(reason))
            }
        }
    }

    /// Closes the connection and the endpoint, telling the worker we are going.
    async fn close(&self) {
        if let LinkState::Connected { connection, .. } = &*self.lock() {
            connection.close(0u32.into(), b"edge agent stopping");
        }
        self.endpoint.wait_idle().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        // The state is a plain value; a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live connection and what it may hold, or why there is none (starting a
    /// reconnection when one is due).
    fn connection(self: &Arc<Self>) -> Result<(Connection, Welcome), OffloadFailure> {
        let mut state = self.lock();
        match &*state {
            LinkState::Connected {
                connection,
                welcome,
            } => match connection.close_reason() {
                None => Ok((connection.clone(), *welcome)),
                Some(reason) => {
                    let reason = reason.to_string();
                    *state = self.down_state(reason.clone(), None);
                    drop(state);
                    self.metrics.endpoint_up(self.address, false);
                    Err(OffloadFailure::Unreachable(reason))
                }
            },
            LinkState::Connecting { after } => Err(OffloadFailure::Unreachable(match after {
                Some(reason) => format!("{reason} (reconnecting)"),
                None => "connecting".into(),
            })),
            LinkState::Down {
                retry_at,
                backoff,
                reason,
            } => {
                let (due, backoff, reason) =
                    (Instant::now() >= *retry_at, *backoff, reason.clone());
                if due {
                    *state = LinkState::Connecting {
                        after: Some(reason.clone()),
                    };
                    drop(state);
                    let link = self.clone();
                    tokio::spawn(async move { link.reconnect(backoff).await });
                }
                Err(OffloadFailure::Unreachable(reason))
            }
        }
    }

    async fn connect(&self) {
        self.reconnect(Duration::from_millis(self.config.backoff_initial_ms))
            .await;
    }

    /// One connection attempt, hello included; on failure the next one waits `backoff`.
    async fn reconnect(&self, backoff: Duration) {
        match self.establish().await {
            Ok((connection, welcome)) => {
                tracing::info!(
                    address = %self.address,
                    max_streams = welcome.max_streams,
                    "connected to the cloud worker"
                );
                if self.window > welcome.max_streams as usize {
                    tracing::warn!(
                        window = self.window,
                        max_streams = welcome.max_streams,
                        "pipeline.window exceeds the requests the worker lets one connection \
                         have open: offloads beyond it wait for a stream and may time out"
                    );
                }
                *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *self.lock() = LinkState::Connected {
                    connection,
                    welcome,
                };
                self.metrics.endpoint_up(self.address, true);
            }
            Err(failure) => {
                let wait = if failure.disabling {
                    Duration::from_millis(self.config.backoff_max_ms)
                } else {
                    backoff
                };
                self.log_failure(&failure, wait);
                *self.lock() = self.down_state(failure.reason, Some(wait));
            }
        }
    }

    /// Connects and says hello, within the connect timeout.
    async fn establish(&self) -> Result<(Connection, Welcome), Failure> {
        let failed = |reason: String| Failure {
            reason,
            disabling: false,
        };
        let timeout = self.config.connect_timeout();
        let connection = match tokio::time::timeout(
            timeout,
            transport::connect(&self.endpoint, self.address, &self.config.server_name),
        )
        .await
        {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Err(failed(error.to_string())),
            Err(_) => {
                return Err(failed(format!(
                    "no handshake within {} ms",
                    self.config.connect_timeout_ms
                )));
            }
        };
        let error = match transport::hello(&connection, &self.fingerprint, timeout).await {
            Ok(welcome) => return Ok((connection, welcome)),
            Err(error) => error,
        };
        connection.close(0u32.into(), b"hello failed");
        Err(match (&error, error.tls_alert()) {
            (TransportError::Refused(refusal), _)
                if refusal.code == ErrorCode::WrongFingerprint =>
            {
                Failure {
                    reason: format!(
                        "offloading disabled: the worker serves another model ({}); every \
                         sample is answered on the device",
                        refusal.message
                    ),
                    disabling: true,
                }
            }
            (_, Some(alert)) => failed(format!(
                "the worker refused this agent's TLS handshake (TLS alert {alert}): under mutual \
                 TLS it wants cloud.client_cert and cloud.client_key, signed by its client CA"
            )),
            _ => failed(format!("hello: {error}")),
        })
    }

    /// Logs a failed attempt: as a warning (an error when it disables offloading) the first
    /// time, at debug level while the same failure repeats.
    fn log_failure(&self, failure: &Failure, wait: Duration) {
        let mut last = self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
        let (address, retry_in_ms) = (self.address, wait.as_millis() as u64);
        let reason = &failure.reason;
        if last.as_deref() == Some(reason.as_str()) {
            tracing::debug!(%address, retry_in_ms, %reason, "still cannot reach the cloud worker");
        } else if failure.disabling {
            tracing::error!(%address, retry_in_ms, %reason, "cannot offload to the cloud worker");
        } else {
            tracing::warn!(
                %address,
                retry_in_ms,
                %reason,
                "cannot reach the cloud worker; answering on the device meanwhile"
            );
        }
        *last = Some(reason.clone());
    }

    /// `Down`, retrying after `wait` (the initial backoff when none is given).
    fn down_state(&self, reason: String, wait: Option<Duration>) -> LinkState {
        let initial = Duration::from_millis(self.config.backoff_initial_ms);
        let max = Duration::from_millis(self.config.backoff_max_ms);
        let wait = wait.unwrap_or(initial);
        LinkState::Down {
            retry_at: Instant::now() + wait,
            backoff: (wait * 2).min(max),
            reason,
        }
    }

    /// The connection `used` failed: the worker went away or the link broke.
    /// The path to the worker is dead (nothing heard): close the connection, so that its
    /// other requests fail now rather than at their timeouts, and mark the endpoint down.
    fn abandon(&self, connection: &Connection, reason: String) {
        connection.close(0u32.into(), b"nothing heard");
        self.lost(connection, reason);
    }

    fn lost(&self, used: &Connection, reason: String) {
        let mut state = self.lock();
        if let LinkState::Connected { connection, .. } = &*state
            && connection.stable_id() == used.stable_id()
        {
            *state = self.down_state(reason.clone(), None);
            drop(state);
            tracing::warn!(address = %self.address, %reason, "lost the cloud worker");
            self.metrics.endpoint_up(self.address, false);
        }
    }
}

/// Returns once `connection` has received nothing for `silence` (checked a few times per
/// `silence`).
async fn silent(connection: &Connection, silence: Duration) {
    let tick = (silence / 8).max(Duration::from_millis(5));
    let (mut heard, mut since) = (connection.stats().udp_rx.datagrams, Instant::now());
    loop {
        tokio::time::sleep(tick).await;
        let now = connection.stats().udp_rx.datagrams;
        if now != heard {
            (heard, since) = (now, Instant::now());
        } else if since.elapsed() >= silence {
            return;
        }
    }
}
