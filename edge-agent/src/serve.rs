//! `edge-agent serve`: the agent as a device service, a local HTTP/JSON API that programs on
//! the board call (described in `edge-agent/openapi.json`, served at [`OPENAPI`]).
//!
//! # One agent for every request
//!
//! All requests feed one [`Agent`] through one channel, so one bandit learns from all of
//! them and one pipeline (`pipeline.window`) bounds the device's work. Each text becomes an
//! [`InputRecord`] with a process-wide line number; the agent gives its record out as soon as
//! it is ready ([`Agent::run_as_answered`]), and [`Waiting`] routes it by that number to the
//! request that is waiting for it.
//!
//! # Exactly one answer per text
//!
//! A request is refused whole (400, 413, 429, 503) or accepted whole. Every text of an
//! accepted request gets exactly one record in the response: the agent's (which has settled
//! the sample once, like in batch mode), or, if none came by the deadline plus
//! `serve.deadline_grace_ms`, an error record whose `error` starts with `deadline`. An answer
//! that comes after that (or after the client left) is counted as unclaimed and dropped; the
//! bandit has learnt from it all the same, once.
//!
//! # Deadlines
//!
//! A request's deadline (`deadline_ms`, else `serve.default_deadline_ms`) travels with its
//! texts into the agent (see the agent's "Deadlines"): a text the device has not started by
//! then is not run; an offload still out then is answered by the split's exit, the deepest
//! the device computed. The response comes by the deadline plus the grace at the latest.
//!
//! # Overload and shutdown
//!
//! `serve.max_queued_texts` bounds the texts accepted and not yet answered: one semaphore
//! permit per text, taken when its request is accepted (all or none: else 429 with
//! `Retry-After`) and given back when the agent answers it. The channel to the agent is as
//! large as that bound, so handing a text over never waits. On SIGTERM/SIGINT the server stops
//! accepting, the requests in flight are answered (for at most `serve.drain_timeout_ms`),
//! then the agent finishes what it started and saves the bandit state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use burn::prelude::Device;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, MAX_DEADLINE_MS, ServeConfig};
use crate::input::{InputRecord, JsonId};
use crate::metrics::{ApiMetrics, Metrics};
use crate::{Agent, SampleRecord};

pub const CLASSIFY: &str = "/v1/classify";
pub const READYZ: &str = "/readyz";
pub const OPENAPI: &str = "/openapi.json";
/// Every route the server answers, `(method, path)`; `/healthz` and `/metrics` are
/// [`splitee_service::http::routes`]. The OpenAPI document describes exactly these (tested).
pub const ROUTES: [(&str, &str); 5] = [
    ("post", CLASSIFY),
    ("get", READYZ),
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", OPENAPI),
];
/// The API's OpenAPI 3 description.
pub const OPENAPI_DOCUMENT: &str = include_str!("../openapi.json");

/// Runs the service until `shutting_down` is cancelled (see [`crate::signals`]), then drains
/// it: binds `config.serve`'s address first (so `/healthz` answers while the model loads),
/// prints it as one line on stdout (`127.0.0.1:8780`, or `unix:PATH`), then starts the agent.
pub async fn serve(
    config: AgentConfig,
    device: Device,
    fresh_state: bool,
    shutting_down: CancellationToken,
) -> anyhow::Result<()> {
    let limits = config.serve.clone();
    let listener = Listener::bind(&limits).await?;
    let _socket_file = limits.unix_socket.clone().map(SocketFile);
    println!("{}", listener.address()?);
    tracing::info!(address = %listener.address()?, "serving the API");

    let mut metrics = Metrics::new();
    let api_metrics = metrics.register_api();
    let metrics = Arc::new(metrics);
    let stop_endpoint = CancellationToken::new();
    let endpoint = match config.metrics_listen {
        Some(addr) => Some(
            crate::metrics::spawn_endpoint(
                addr,
                metrics.clone(),
                shutting_down.clone(),
                stop_endpoint.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let (api, inputs) = Api::new(limits, metrics.clone(), api_metrics, shutting_down.clone());
    let mut server = tokio::spawn(listener.serve(router(api.clone()), shutting_down.clone()));

    let mut agent = match Agent::start(&config, device, metrics, fresh_state).await {
        Ok(agent) => agent,
        Err(error) => {
            shutting_down.cancel();
            let _ = server.await;
            return Err(error);
        }
    };
    let _ = api.ready.set(Ready {
        model: agent.fingerprint().short(),
        cloud: config.cloud.is_some(),
    });
    tracing::info!("ready");

    let stop = CancellationToken::new();
    // Ends when nothing more can come in: Ok after a drain (complete or timed out), Err when
    // the server ended by itself.
    let drain = async {
        let outcome = tokio::select! {
            // The server ends soon after a shutdown begins: that is a drain, not a failure.
            biased;
            () = shutting_down.cancelled() => {
                tracing::info!("answering the requests in flight");
                match tokio::time::timeout(api.limits.drain_timeout(), &mut server).await {
                    Ok(ended) => ended_server(ended).map(|()| {
                        tracing::info!("every request in flight is answered");
                    }),
                    Err(_) => {
                        tracing::warn!(
                            "drain timeout (serve.drain_timeout_ms): stopping with requests \
                             in flight"
                        );
                        Ok(())
                    }
                }
            }
            ended = &mut server => {
                shutting_down.cancel();
                ended_server(ended).and_then(|()| anyhow::bail!("the API server stopped"))
            }
        };
        // What the agent started it finishes; texts it has not taken yet belong to requests
        // already answered or gone.
        api.close_inputs();
        stop.cancel();
        outcome
    };
    let waiting = api.waiting.clone();
    let mut deliver = |record: &SampleRecord| waiting.deliver(record);
    let (summary, drained) = tokio::join!(
        agent.run_as_answered(inputs, stop.clone(), &mut deliver),
        drain
    );
    let summary = summary?;
    agent.shutdown().await?;
    eprintln!("\n{}", summary.table());
    stop_endpoint.cancel();
    if let Some(endpoint) = endpoint {
        endpoint.await??;
    }
    drained
}

fn ended_server(ended: Result<std::io::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    Ok(ended.context("the API server task failed")??)
}

/// Removes the API's socket file when the service ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What `/readyz` tells once the agent runs.
struct Ready {
    model: String,
    /// Whether there is a `[cloud]`.
    cloud: bool,
}

struct Api {
    limits: ServeConfig,
    /// To the agent; `None` once shutting down. Texts are handed over with `try_send` under
    /// this lock, so a request's texts go in together and a handler cancelled half-way (its
    /// client gone) cannot leave texts routed but unsent.
    inputs: Mutex<Option<mpsc::Sender<InputRecord>>>,
    waiting: Arc<Waiting>,
    /// One permit per text accepted and not yet answered.
    queue: Arc<Semaphore>,
    next_line: AtomicUsize,
    ready: OnceLock<Ready>,
    shutting_down: CancellationToken,
    metrics: Arc<Metrics>,
    api_metrics: ApiMetrics,
}

/// The requests waiting for the agent's answers, by the line number of each text.
struct Waiting {
    texts: Mutex<HashMap<usize, Route>>,
    metrics: ApiMetrics,
}

struct Route {
    reply: oneshot::Sender<SampleRecord>,
    /// Its place in the queue, given back with the answer.
    _slot: OwnedSemaphorePermit,
}

impl Waiting {
    /// Hands the agent's record to the request waiting for it.
    fn deliver(&self, record: &SampleRecord) {
        let Some(route) = lock(&self.texts).remove(&record.line) else {
            // Every text is routed before the agent gets it.
            tracing::error!(line = record.line, "an answer for a text nobody sent");
            return;
        };
        self.metrics.queued.dec();
        if route.reply.send(record.clone()).is_err() {
            self.metrics.unclaimed.inc();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data, changed in single statements: a panic elsewhere leaves it consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Api {
    fn new(
        limits: ServeConfig,
        metrics: Arc<Metrics>,
        api_metrics: ApiMetrics,
        shutting_down: CancellationToken,
    ) -> (Arc<Self>, mpsc::Receiver<InputRecord>) {
        let (sender, receiver) = mpsc::channel(limits.max_queued_texts);
        let api = Self {
            queue: Arc::new(Semaphore::new(limits.max_queued_texts)),
            limits,
            inputs: Mutex::new(Some(sender)),
            waiting: Arc::new(Waiting {
                texts: Mutex::new(HashMap::new()),
                metrics: api_metrics.clone(),
            }),
            next_line: AtomicUsize::new(1),
            ready: OnceLock::new(),
            shutting_down,
            metrics,
            api_metrics,
        };
        (Arc::new(api), receiver)
    }

    fn close_inputs(&self) {
        lock(&self.inputs).take();
    }

    fn unavailable(&self) -> Option<Problem> {
        if self.shutting_down.is_cancelled() {
            Some(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is shutting down",
            ))
        } else if self.ready.get().is_none() {
            Some(
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the model is still loading",
                )
                .retry_after(self.limits.retry_after_s),
            )
        } else {
            None
        }
    }

    async fn classify(&self, request: Request) -> Result<Response, Problem> {
        let arrived = Instant::now();
        if let Some(problem) = self.unavailable() {
            return Err(problem);
        }
        let body = read_body(request.into_body(), self.limits.max_body_bytes).await?;
        let request: ClassifyRequest = serde_json::from_slice(&body).map_err(|error| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                format!("malformed request: {error}"),
            )
        })?;
        let (texts, deadline_ms) = request.validate(&self.limits)?;
        let count = texts.len();
        let slots = self
            .queue
            .clone()
            .try_acquire_many_owned(count as u32)
            .map_err(|_| {
                Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{} of {} queue places taken, {count} asked for \
                         (serve.max_queued_texts): retry later",
                        self.limits.max_queued_texts - self.queue.available_permits(),
                        self.limits.max_queued_texts
                    ),
                )
                .retry_after(self.limits.retry_after_s)
            })?;
        let deadline = arrived + std::time::Duration::from_millis(deadline_ms);
        let expected = self.hand_over(texts, slots, deadline)?;
        self.api_metrics.texts.inc_by(count as u64);

        let give_up = tokio::time::Instant::from_std(deadline + self.limits.deadline_grace());
        let mut results = Vec::with_capacity(count);
        for Expected { id, line, answer } in expected {
            results.push(match tokio::time::timeout_at(give_up, answer).await {
                Ok(Ok(record)) => record,
                Ok(Err(_)) => unanswered(id, line, "the agent stopped before answering"),
                Err(_) => unanswered(
                    id,
                    line,
                    &format!("deadline: no answer within the request's {deadline_ms} ms"),
                ),
            });
        }
        Ok(json(StatusCode::OK, &ClassifyResponse { results }))
    }

    /// Routes and sends `texts` to the agent, all of them or (shutting down) none.
    fn hand_over(
        &self,
        texts: Vec<Text>,
        mut slots: OwnedSemaphorePermit,
        deadline: Instant,
    ) -> Result<Vec<Expected>, Problem> {
        let shutting_down = || {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is shutting down",
            )
        };
        let inputs = lock(&self.inputs);
        let Some(sender) = inputs.as_ref() else {
            return Err(shutting_down());
        };
        // One permit per text: each is given back when that text is answered.
        let mut per_text: Vec<OwnedSemaphorePermit> = (1..texts.len())
            .map(|_| slots.split(1).expect("a permit per text"))
            .collect();
        per_text.push(slots);
        let mut expected = Vec::with_capacity(texts.len());
        for (Text { id, text }, slot) in texts.into_iter().zip(per_text) {
            let line = self.next_line.fetch_add(1, Ordering::Relaxed);
            let id = id.unwrap_or_else(|| line.to_string());
            let (reply, answer) = oneshot::channel();
            lock(&self.waiting.texts).insert(line, Route { reply, _slot: slot });
            self.api_metrics.queued.inc();
            let input = InputRecord {
                line,
                id: id.clone(),
                label: None,
                text: Ok(text),
                deadline: Some(deadline),
            };
            if let Err(error) = sender.try_send(input) {
                // The agent is gone (or, against the permits' bound, its channel is full).
                // This text was not sent; the answers to those sent before it go unclaimed.
                tracing::error!(%error, "handing a text to the agent");
                if lock(&self.waiting.texts).remove(&line).is_some() {
                    self.api_metrics.queued.dec();
                }
                return Err(shutting_down());
            }
            expected.push(Expected { id, line, answer });
        }
        Ok(expected)
    }

    fn readiness(&self) -> Response {
        #[derive(Serialize)]
        struct Readiness<'a> {
            ready: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            model: Option<&'a str>,
            /// Absent without a `[cloud]`: every text is answered on the device.
            #[serde(skip_serializing_if = "Option::is_none")]
            cloud: Option<CloudReadiness>,
            queued_texts: usize,
        }
        #[derive(Serialize)]
        struct CloudReadiness {
            /// Whether some endpoint is connected.
            connected: bool,
            endpoints: Vec<EndpointReadiness>,
        }
        #[derive(Serialize)]
        struct EndpointReadiness {
            address: SocketAddr,
            connected: bool,
        }
        let ready = self.ready.get();
        let reason = if self.shutting_down.is_cancelled() {
            Some("shutting down")
        } else if ready.is_none() {
            Some("loading the model")
        } else {
            None
        };
        let body = Readiness {
            ready: reason.is_none(),
            reason,
            model: ready.map(|r| r.model.as_str()),
            cloud: ready.filter(|r| r.cloud).map(|_| CloudReadiness {
                connected: self.metrics.cloud_connected.get() == 1,
                endpoints: self
                    .metrics
                    .endpoint_states()
                    .into_iter()
                    .map(|(address, connected)| EndpointReadiness { address, connected })
                    .collect(),
            }),
            queued_texts: self.limits.max_queued_texts - self.queue.available_permits(),
        };
        let status = match reason {
            None => StatusCode::OK,
            Some(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        json(status, &body)
    }
}

/// A text of a request, with the id its client gave it.
struct Text {
    id: Option<String>,
    text: String,
}

/// A text handed to the agent, and where its answer will come.
struct Expected {
    id: String,
    line: usize,
    answer: oneshot::Receiver<SampleRecord>,
}

fn unanswered(id: String, line: usize, why: &str) -> SampleRecord {
    SampleRecord::failed(id, line, None, why.to_owned())
}

/// The body, at most `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, Problem> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {limit} bytes (serve.max_body_bytes)"),
        )),
        Err(error) => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            format!("reading the body: {error}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyRequest {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    texts: Option<Vec<String>>,
    #[serde(default)]
    id: Option<JsonId>,
    #[serde(default)]
    ids: Option<Vec<JsonId>>,
    #[serde(default)]
    deadline_ms: Option<u64>,
}

impl ClassifyRequest {
    /// The texts and the deadline in ms; or what is wrong, naming the field.
    fn validate(self, limits: &ServeConfig) -> Result<(Vec<Text>, u64), Problem> {
        let bad = |message: String| Problem::new(StatusCode::BAD_REQUEST, message);
        let (texts, ids, name) = match (self.text, self.texts, self.id, self.ids) {
            (Some(text), None, id, None) => (vec![text], id.map(|id| vec![id]), "text"),
            (None, Some(texts), None, ids) => (texts, ids, "texts"),
            (Some(_), Some(_), ..) => {
                return Err(bad("give `text` (one) or `texts` (a list), not both".into()));
            }
            (None, None, ..) => {
                return Err(bad("give `text` (one) or `texts` (a list of texts)".into()));
            }
            _ => return Err(bad("`id` goes with `text`, `ids` with `texts`".into())),
        };
        if texts.is_empty() {
            return Err(bad("`texts` is empty".into()));
        }
        if texts.len() > limits.max_texts_per_request {
            return Err(bad(format!(
                "`texts` has {} texts, at most {} are allowed (serve.max_texts_per_request)",
                texts.len(),
                limits.max_texts_per_request
            )));
        }
        if let Some(ids) = &ids
            && ids.len() != texts.len()
        {
            return Err(bad(format!(
                "`ids` has {} ids for {} texts",
                ids.len(),
                texts.len()
            )));
        }
        for (index, text) in texts.iter().enumerate() {
            let which = match name {
                "text" => "`text`".to_owned(),
                _ => format!("`texts[{index}]`"),
            };
            if text.trim().is_empty() {
                return Err(bad(format!("{which} is empty")));
            }
            if text.len() > limits.max_text_bytes {
                return Err(bad(format!(
                    "{which} has {} bytes, over the limit of {} (serve.max_text_bytes)",
                    text.len(),
                    limits.max_text_bytes
                )));
            }
        }
        let deadline_ms = self.deadline_ms.unwrap_or(limits.default_deadline_ms);
        if !(1..=MAX_DEADLINE_MS).contains(&deadline_ms) {
            return Err(bad(format!(
                "`deadline_ms` must be between 1 and {MAX_DEADLINE_MS}, got {deadline_ms}"
            )));
        }
        let ids = ids.map_or_else(
            || vec![None; texts.len()],
            |ids| ids.into_iter().map(|id| Some(id.to_string())).collect(),
        );
        let texts = ids
            .into_iter()
            .zip(texts)
            .map(|(id, text)| Text { id, text })
            .collect();
        Ok((texts, deadline_ms))
    }
}

#[derive(Serialize)]
struct ClassifyResponse {
    results: Vec<SampleRecord>,
}

/// A refused request: its status and why, as `{"error": "…"}`.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    message: String,
    retry_after_s: Option<u64>,
}

impl Problem {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after_s: None,
        }
    }

    fn retry_after(self, seconds: u64) -> Self {
        Self {
            retry_after_s: Some(seconds),
            ..self
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Error {
            error: String,
        }
        let mut response = json(
            self.status,
            &Error {
                error: self.message,
            },
        );
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serialising the response: {error}"),
        )
            .into_response(),
    }
}

fn router(api: Arc<Api>) -> Router {
    let render = {
        let metrics = api.metrics.clone();
        Arc::new(move || metrics.encode())
    };
    Router::new()
        .route(
            CLASSIFY,
            post(|State(api): State<Arc<Api>>, request: Request| async move {
                api.classify(request)
                    .await
                    .unwrap_or_else(IntoResponse::into_response)
            }),
        )
        .route(
            READYZ,
            get(|State(api): State<Arc<Api>>| async move { api.readiness() }),
        )
        .route(
            OPENAPI,
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    OPENAPI_DOCUMENT,
                )
            }),
        )
        .fallback(|request: Request| async move {
            Problem::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no route {} {}; the API is described at {OPENAPI}",
                    request.method(),
                    request.uri().path()
                ),
            )
        })
        .with_state(api.clone())
        .merge(splitee_service::http::routes(
            render,
            api.shutting_down.clone(),
        ))
        .layer(axum::middleware::from_fn_with_state(api, track))
}

/// Counts every response by route and status and times it.
async fn track(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let route = ROUTES
        .iter()
        .find(|(_, route)| *route == path)
        .map_or("unmatched", |&(_, route)| route);
    let started = Instant::now();
    let response = next.run(request).await;
    api.api_metrics.observe(
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// The API's bound socket.
enum Listener {
    Tcp(tokio::net::TcpListener),
    #[cfg(unix)]
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    async fn bind(config: &ServeConfig) -> anyhow::Result<Self> {
        match &config.unix_socket {
            #[cfg(unix)]
            Some(path) => {
                remove_stale_socket(path)?;
                let listener = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("binding the API socket {}", path.display()))?;
                Ok(Self::Unix(listener, path.clone()))
            }
            #[cfg(not(unix))]
            Some(_) => anyhow::bail!("serve.unix_socket needs a Unix system"),
            None => Ok(Self::Tcp(
                tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("binding the API address {}", config.listen))?,
            )),
        }
    }

    fn address(&self) -> anyhow::Result<String> {
        Ok(match self {
            Self::Tcp(listener) => listener.local_addr()?.to_string(),
            #[cfg(unix)]
            Self::Unix(_, path) => format!("unix:{}", path.display()),
        })
    }

    /// Serves `app` until `shutting_down`, then until the requests in flight are answered.
    async fn serve(self, app: Router, shutting_down: CancellationToken) -> std::io::Result<()> {
        let signal = async move { shutting_down.cancelled().await };
        match self {
            Self::Tcp(listener) => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(signal)
                    .await
            }
            #[cfg(unix)]
            Self::Unix(listener, _) => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(signal)
                    .await
            }
        }
    }
}

/// A socket file left by an agent that did not exit cleanly (nobody accepts on it) is
/// replaced; a live socket or any other file at that path is an error, never deleted.
#[cfg(unix)]
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => anyhow::bail!(
                    "serve.unix_socket {}: another process is listening on it",
                    path.display()
                ),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing the stale socket {}", path.display()))
                }
                Err(error) => Err(error).with_context(|| format!("probing {}", path.display())),
            }
        }
        Ok(_) => anyhow::bail!(
            "serve.unix_socket {} exists and is not a socket",
            path.display()
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("inspecting {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_describes_exactly_the_servers_routes() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI_DOCUMENT).unwrap();
        assert!(document["openapi"].as_str().unwrap().starts_with("3."));
        let mut documented: Vec<(String, String)> = document["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .map(move |method| (method.clone(), path.clone()))
            })
            .collect();
        documented.sort();
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|&(method, path)| (method.to_owned(), path.to_owned()))
            .collect();
        served.sort();
        assert_eq!(documented, served);
        // Every reference resolves.
        let text = OPENAPI_DOCUMENT;
        for reference in text.split("\"$ref\": \"#/").skip(1) {
            let pointer = format!("/{}", &reference[..reference.find('"').unwrap()]);
            assert!(document.pointer(&pointer).is_some(), "{pointer}");
        }
    }

    fn validate(body: &str) -> Result<(Vec<Text>, u64), String> {
        let limits = ServeConfig {
            max_texts_per_request: 3,
            max_text_bytes: 10,
            ..ServeConfig::default()
        };
        serde_json::from_str::<ClassifyRequest>(body)
            .map_err(|e| format!("malformed request: {e}"))
            .and_then(|request| request.validate(&limits).map_err(|p| p.message))
    }

    #[test]
    fn requests_are_validated_with_the_problem_named() {
        let (texts, deadline) = validate(r#"{"text": "good", "id": 7}"#).unwrap();
        assert_eq!((texts[0].id.as_deref(), deadline), (Some("7"), 10_000));
        let (texts, deadline) =
            validate(r#"{"texts": ["a", "b"], "ids": ["x", 2], "deadline_ms": 50}"#).unwrap();
        assert_eq!(texts.len(), 2);
        assert_eq!(
            (texts[1].id.as_deref(), texts[1].text.as_str()),
            (Some("2"), "b")
        );
        assert_eq!(deadline, 50);
        assert_eq!(validate(r#"{"texts": ["a"]}"#).unwrap().0[0].id, None);

        for (body, expected) in [
            (
                r#"{"text": 3}"#,
                "invalid type: integer `3`, expected a string",
            ),
            (r#"{"txt": "a"}"#, "unknown field `txt`"),
            (r#"{"text": "a""#, "malformed request: EOF"),
            (
                "3",
                "invalid type: integer `3`, expected struct ClassifyRequest",
            ),
            ("[]", "give `text` (one) or `texts`"),
            (r#"{}"#, "give `text` (one) or `texts`"),
            (r#"{"text": "a", "texts": ["b"]}"#, "not both"),
            (r#"{"texts": ["a"], "id": 1}"#, "`id` goes with `text`"),
            (r#"{"texts": []}"#, "`texts` is empty"),
            (
                r#"{"texts": ["a", "b", "c", "d"]}"#,
                "`texts` has 4 texts, at most 3",
            ),
            (
                r#"{"texts": ["a", "b"], "ids": [1]}"#,
                "`ids` has 1 ids for 2 texts",
            ),
            (r#"{"text": "  "}"#, "`text` is empty"),
            (
                r#"{"texts": ["a", "eleven char"]}"#,
                "`texts[1]` has 11 bytes, over the limit of 10",
            ),
            (
                r#"{"text": "a", "deadline_ms": 0}"#,
                "`deadline_ms` must be between 1 and 3600000",
            ),
            (
                r#"{"text": "a", "deadline_ms": -1}"#,
                "invalid value: integer `-1`",
            ),
        ] {
            let error = validate(body).map(|_| ()).unwrap_err();
            assert!(error.contains(expected), "{body}: {error}");
        }
    }
}
