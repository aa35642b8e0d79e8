//! The connection to the cloud worker: a hello when connecting, offloading with a deadline, and
//! reconnecting with backoff when the worker or the link goes away.
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
//! else in flight on it go on. A dead path is found two ways: a request that heard not one
//! datagram from the worker during its whole wait (not even the ACK of its own bytes) ends the
//! connection at once, and QUIC's idle timeout (keep-alives at a third of
//! `cloud.idle_timeout_ms`) closes one that hears nothing for that long.
//!
//! The agent never waits for the cloud to come back: while the link is down, an offload fails
//! at once ([`OffloadFailure::Unreachable`]) and the sample is finished on the device, and a
//! background task retries the connection after `backoff` (doubling up to the maximum).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use quinn::{Connection, Endpoint};
use splitee_common::protocol::{Answer, ErrorCode, OffloadRequest, Response, Welcome};
use splitee_common::transport::{self, TransportError};

use crate::config::CloudConfig;

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
}

/// A worker's answer and what the exchange measured.
#[derive(Debug, Clone)]
pub struct CloudAnswer {
    pub answer: Answer,
    /// From the first byte sent to the answer decoded.
    pub round_trip_ms: f64,
    pub bytes_sent: u64,
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
    Connecting,
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

pub struct CloudLink {
    endpoint: Endpoint,
    config: CloudConfig,
    /// This agent's model, which the hello asks the worker about.
    fingerprint: [u8; 32],
    /// Offloads the agent may have in flight (`pipeline.window`), to compare with the share
    /// the worker allows a connection.
    window: usize,
    state: Mutex<LinkState>,
    /// The last connection failure logged: one that repeats is logged once, not every attempt.
    last_failure: Mutex<Option<String>>,
    /// Called with `true`/`false` whenever the link comes up or goes down.
    on_change: Box<dyn Fn(bool) + Send + Sync>,
}

impl CloudLink {
    /// Loads the TLS files and makes a first connection attempt (at most the connect
    /// timeout). A worker that is not there yet is not an error: the agent starts answering
    /// on the device and keeps retrying.
    pub async fn start(
        config: CloudConfig,
        fingerprint: [u8; 32],
        window: usize,
        on_change: Box<dyn Fn(bool) + Send + Sync>,
    ) -> anyhow::Result<Arc<Self>> {
        let roots = transport::load_certs(&config.ca)?;
        let identity = match (&config.client_cert, &config.client_key) {
            (Some(cert), Some(key)) => {
                Some((transport::load_certs(cert)?, transport::load_key(key)?))
            }
            _ => None,
        };
        let client = transport::client_config(roots, identity, config.idle_timeout())?;
        let any_port = match config.address {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        let endpoint = transport::client_endpoint(any_port, client)
            .context("binding the client UDP socket")?;
        let link = Arc::new(Self {
            endpoint,
            fingerprint,
            window,
            state: Mutex::new(LinkState::Connecting),
            last_failure: Mutex::new(None),
            on_change,
            config,
        });
        link.connect().await;
        Ok(link)
    }

    pub fn address(&self) -> SocketAddr {
        self.config.address
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        matches!(*self.lock(), LinkState::Connected { .. })
    }

    /// Sends `request` and waits for the answer, at most the request timeout and at most until
    /// the sample's `deadline` (a `serve` request's). The worker is given the shorter of the two,
    /// less the round trip, as the request's own deadline.
    pub async fn offload(
        self: &Arc<Self>,
        mut request: OffloadRequest,
        deadline: Option<Instant>,
    ) -> Result<CloudAnswer, OffloadFailure> {
        let timeout = self.config.request_timeout();
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|left| left.is_zero()) {
            return Err(OffloadFailure::DeadlinePassed);
        }
        let cut_by_deadline = left.is_some_and(|left| left < timeout);
        let wait = left.map_or(timeout, |left| left.min(timeout));
        let (connection, welcome) = self.connection()?;
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
        let frame = splitee_common::protocol::encode_request(&request);
        // A request that times out resets only its stream: a slow worker is no reason to drop
        // the other requests in flight. But when not one datagram (not even an ACK of the
        // request) came back during the whole wait, the path is dead: waiting for QUIC's idle
        // timeout would make every offload meanwhile pay a full timeout too.
        let heard_before = connection.stats().udp_rx.datagrams;
        let started = Instant::now();
        let outcome = transport::exchange(&connection, &frame, wait).await;
        let round_trip_ms = started.elapsed().as_secs_f64() * 1e3;
        match outcome {
            Ok(Response::Answer(answer)) if answer.request_id == request.request_id => {
                Ok(CloudAnswer {
                    answer,
                    round_trip_ms,
                    bytes_sent: frame.len() as u64,
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
                ErrorCode::Busy => OffloadFailure::Busy,
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
                    connection.close(0u32.into(), b"nothing heard");
                    self.lost(
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
    pub async fn close(&self) {
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
                    (self.on_change)(false);
                    Err(OffloadFailure::Unreachable(reason))
                }
            },
            LinkState::Connecting => Err(OffloadFailure::Unreachable("reconnecting".into())),
            LinkState::Down {
                retry_at,
                backoff,
                reason,
            } => {
                let (due, backoff, reason) =
                    (Instant::now() >= *retry_at, *backoff, reason.clone());
                if due {
                    *state = LinkState::Connecting;
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
                    address = %self.config.address,
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
                (self.on_change)(true);
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
            transport::connect(
                &self.endpoint,
                self.config.address,
                &self.config.server_name,
            ),
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
        let (address, retry_in_ms) = (self.config.address, wait.as_millis() as u64);
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
    fn lost(&self, used: &Connection, reason: String) {
        let mut state = self.lock();
        if let LinkState::Connected { connection, .. } = &*state
            && connection.stable_id() == used.stable_id()
        {
            *state = self.down_state(reason.clone(), None);
            drop(state);
            tracing::warn!(%reason, "lost the cloud worker");
            (self.on_change)(false);
        }
    }
}
