//! The connection to the cloud worker: offloading with a deadline, and reconnecting with
//! backoff when the worker or the link goes away.
//!
//! The agent never waits for the cloud to come back: while the link is down, an offload fails
//! at once ([`OffloadFailure::Unreachable`]) and the sample is finished on the device, and a
//! background task retries the connection after `backoff` (doubling up to the maximum).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use quinn::{Connection, Endpoint};
use splitee_common::protocol::{Answer, ErrorCode, OffloadRequest, Response};
use splitee_common::transport::{self, TransportError};

use crate::config::CloudConfig;

/// Why the cloud did not answer a sample.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadFailure {
    #[error("cloud unreachable: {0}")]
    Unreachable(String),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("the worker is busy")]
    Busy,
    #[error("the worker is shutting down")]
    ShuttingDown,
    #[error("the worker rejected the request ({code}): {message}")]
    Rejected { code: &'static str, message: String },
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The sample's deadline (a `serve` request's) came before the answer; unlike a timeout
    /// this says nothing about the link, so it does not count towards reconnecting.
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
        /// Requests timed out in a row on this connection.
        timeouts: u32,
    },
    Connecting,
    Down {
        retry_at: Instant,
        /// The wait after the next failed attempt.
        backoff: Duration,
        reason: String,
    },
}

pub struct CloudLink {
    endpoint: Endpoint,
    config: CloudConfig,
    state: Mutex<LinkState>,
    /// Called with `true`/`false` whenever the link comes up or goes down.
    on_change: Box<dyn Fn(bool) + Send + Sync>,
}

impl CloudLink {
    /// Loads the TLS files and makes a first connection attempt (at most the connect
    /// timeout). A worker that is not there yet is not an error: the agent starts answering
    /// on the device and keeps retrying.
    pub async fn start(
        config: CloudConfig,
        on_change: Box<dyn Fn(bool) + Send + Sync>,
    ) -> anyhow::Result<Arc<Self>> {
        let roots = transport::load_certs(&config.ca)?;
        let identity = match (&config.client_cert, &config.client_key) {
            (Some(cert), Some(key)) => {
                Some((transport::load_certs(cert)?, transport::load_key(key)?))
            }
            _ => None,
        };
        let client = transport::client_config(roots, identity)?;
        let any_port = match config.address {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        let endpoint = transport::client_endpoint(any_port, client)
            .context("binding the client UDP socket")?;
        let link = Arc::new(Self {
            endpoint,
            state: Mutex::new(LinkState::Connecting),
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
    /// `deadline`.
    pub async fn offload(
        self: &Arc<Self>,
        request: &OffloadRequest,
        deadline: Option<Instant>,
    ) -> Result<CloudAnswer, OffloadFailure> {
        let timeout = self.config.request_timeout();
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|left| left.is_zero()) {
            return Err(OffloadFailure::DeadlinePassed);
        }
        let cut_by_deadline = left.is_some_and(|left| left < timeout);
        let connection = self.connection()?;
        let frame = splitee_common::protocol::encode_request(request);
        let started = Instant::now();
        let wait = left.map_or(timeout, |left| left.min(timeout));
        let outcome = tokio::time::timeout(wait, transport::exchange(&connection, &frame)).await;
        let round_trip_ms = started.elapsed().as_secs_f64() * 1e3;
        match outcome {
            Err(_) if cut_by_deadline => Err(OffloadFailure::Deadline(wait.as_millis() as u64)),
            Err(_) => {
                self.timed_out(&connection);
                Err(OffloadFailure::Timeout(self.config.request_timeout_ms))
            }
            Ok(Ok(Response::Answer(answer))) if answer.request_id == request.request_id => {
                self.answered(&connection);
                Ok(CloudAnswer {
                    answer,
                    round_trip_ms,
                    bytes_sent: frame.len() as u64,
                })
            }
            Ok(Ok(Response::Answer(answer))) => Err(OffloadFailure::Rejected {
                code: ErrorCode::Malformed.name(),
                message: format!(
                    "answer for request {} to request {}",
                    answer.request_id, request.request_id
                ),
            }),
            Ok(Ok(Response::Error(error))) => Err(match error.code {
                ErrorCode::Busy => OffloadFailure::Busy,
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
            Ok(Err(TransportError::Protocol(error))) => Err(OffloadFailure::Rejected {
                code: error.code.name(),
                message: error.message,
            }),
            Ok(Err(error)) => {
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

    /// The live connection, or why there is none (starting a reconnection when one is due).
    fn connection(self: &Arc<Self>) -> Result<Connection, OffloadFailure> {
        let mut state = self.lock();
        match &*state {
            LinkState::Connected { connection, .. } => match connection.close_reason() {
                None => Ok(connection.clone()),
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

    /// One connection attempt; on failure the next one waits `backoff`.
    async fn reconnect(&self, backoff: Duration) {
        let attempt = tokio::time::timeout(
            self.config.connect_timeout(),
            transport::connect(
                &self.endpoint,
                self.config.address,
                &self.config.server_name,
            ),
        )
        .await;
        let result = match attempt {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!(
                "no handshake within {} ms",
                self.config.connect_timeout_ms
            )),
        };
        match result {
            Ok(connection) => {
                tracing::info!(address = %self.config.address, "connected to the cloud worker");
                *self.lock() = LinkState::Connected {
                    connection,
                    timeouts: 0,
                };
                (self.on_change)(true);
            }
            Err(reason) => {
                tracing::warn!(
                    address = %self.config.address,
                    retry_in_ms = backoff.as_millis() as u64,
                    %reason,
                    "cannot reach the cloud worker; answering on the device meanwhile"
                );
                *self.lock() = self.down_state(reason, Some(backoff));
            }
        }
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

    fn answered(&self, used: &Connection) {
        if let LinkState::Connected {
            connection,
            timeouts,
        } = &mut *self.lock()
            && connection.stable_id() == used.stable_id()
        {
            *timeouts = 0;
        }
    }

    fn timed_out(&self, used: &Connection) {
        let mut state = self.lock();
        if let LinkState::Connected {
            connection,
            timeouts,
        } = &mut *state
            && connection.stable_id() == used.stable_id()
        {
            *timeouts += 1;
            if *timeouts >= self.config.timeouts_before_reconnect {
                let count = *timeouts;
                connection.close(0u32.into(), b"requests timed out");
                *state = self.down_state(format!("{count} requests in a row timed out"), None);
                drop(state);
                tracing::warn!(count, "requests keep timing out; reconnecting");
                (self.on_change)(false);
            }
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
