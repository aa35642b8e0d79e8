//! QUIC + TLS plumbing shared by the edge agent (client) and the cloud worker (server).
//!
//! The wire format itself lives in [`splitee_protocol`], sans I/O; this module only moves its
//! frames. One request is one QUIC bidirectional stream: the client writes one request frame
//! and finishes its half, the server answers one response frame and finishes its half.
//!
//! Every exchange has a timeout, and a stream whose answer did not come in time is reset in
//! both directions ([`STREAM_CANCELLED`]): the worker drops the request (it never computes for
//! a client that has given up) and the connection, with everything else in flight on it, goes
//! on. A dead connection is found by QUIC itself: clients send keep-alives, and a connection
//! that hears nothing for its idle timeout closes.
//!
//! Everything TLS here is TLS 1.3 only, on one crypto provider, *ring* (light, and it
//! cross-compiles to aarch64 with a plain gcc). The provider is always passed explicitly
//! (`builder_with_provider`), so no process-wide default provider is needed or installed.
//! Certificates are always verified: there is deliberately no switch that turns verification
//! off. For development, `cloud-worker gen-certs` writes a private CA and certificates signed
//! by it.
//!
//! # Edge-agent usage
//!
//! ```no_run
//! # async fn run(request: splitee_protocol::OffloadRequest) -> Result<(), Box<dyn std::error::Error>> {
//! use splitee_service::transport;
//!
//! let roots = transport::load_certs("certs/agent/ca.pem".as_ref())?;
//! // With mutual TLS, also present a client certificate signed by the worker's client CA.
//! let identity = Some((
//!     transport::load_certs("certs/agent/client.pem".as_ref())?,
//!     transport::load_key("certs/agent/client.key.pem".as_ref())?,
//! ));
//! let endpoint = transport::client_endpoint(
//!     "0.0.0.0:0".parse()?,
//!     transport::client_config(roots, identity, transport::IDLE_TIMEOUT)?,
//! )?;
//! let connection = transport::connect(&endpoint, "127.0.0.1:4433".parse()?, "localhost").await?;
//! // First, once: is the worker serving our model, and what does it allow this connection?
//! let timeout = std::time::Duration::from_secs(2);
//! let welcome = transport::hello(&connection, &request.fingerprint, timeout).await?;
//! // One connection carries up to `welcome.max_streams` concurrent requests, one stream each.
//! match transport::offload(&connection, &request, timeout).await? {
//!     splitee_protocol::Response::Answer(answer) => println!("{:?}", answer.probs),
//!     other => println!("{other:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! A `Busy` error frame means the worker is at its in-flight bound: answer on the device or
//! retry later. The server may answer a request before reading all of it (busy, oversized or
//! malformed headers); [`offload`] handles that and still returns the answer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use quinn;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
pub use quinn::{Connection, Endpoint};
pub use rustls;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
pub use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use splitee_protocol::{
    ErrorFrame, Hello, MAX_RESPONSE_FRAME, OffloadRequest, ProtocolError, Response, Welcome,
    decode_response, encode_hello, encode_request,
};

/// TLS application protocol: a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"splitee/1";

/// QUIC stream error code with which a client resets both halves of a request it stopped
/// waiting for (the worker's own early stop is `cloud_worker::server::STOP_ANSWERED_EARLY`).
pub const STREAM_CANCELLED: u32 = 2;

/// UDP socket send and receive buffer size. Linux's defaults (~200 KiB) dropped about 1% of
/// packets of 400 KB payloads on loopback; 4 MiB removed the loss. The kernel caps the value
/// at `net.core.{r,w}mem_max`; [`bind_endpoint`] warns when it did.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// The worker closes a connection after this long without hearing from it; a client may ask
/// for less (QUIC uses the smaller of the two sides' values). Clients send keep-alives at a
/// third of their own idle timeout, so a wanted connection survives NAT and a lost ping, and
/// a dead one is found within that timeout.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest idle timeout QUIC can carry that we accept (it is an integer of milliseconds below
/// 2^62; far beyond anything useful).
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(3_600);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("reading {path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC cannot use this TLS configuration: {0}")]
    QuicTls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("UDP socket on {addr}: {error}")]
    Socket {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("sending the request: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("reading the response: {0}")]
    Read(#[from] quinn::ReadToEndError),
    #[error("invalid response: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("no answer within {} ms (the stream was reset)", .0.as_millis())]
    TimedOut(Duration),
    #[error("the worker refused ({}): {}", .0.code.name(), .0.message)]
    Refused(ErrorFrame),
}

impl TransportError {
    /// The TLS alert with which the peer ended the connection, if it did. Under mutual TLS this
    /// is how a worker refuses a client certificate, which in TLS 1.3 the client sees only
    /// after its own side of the handshake is done: on the first stream, not on connect.
    pub fn tls_alert(&self) -> Option<u8> {
        let connection = match self {
            Self::Connection(error)
            | Self::Write(quinn::WriteError::ConnectionLost(error))
            | Self::Read(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(error))) => {
                error
            }
            _ => return None,
        };
        let quinn::ConnectionError::ConnectionClosed(close) = connection else {
            return None;
        };
        // QUIC carries a TLS alert as the transport error 0x100 + alert (RFC 9001, 4.8).
        let code = u64::from(close.error_code);
        (0x100..0x200)
            .contains(&code)
            .then_some((code & 0xff) as u8)
    }
}

/// What a QUIC connection may hold, per side: streams the peer may open, and the receive
/// windows that bound the bytes it may send before this side has read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveLimits {
    /// Bidirectional streams the peer may have open at once.
    pub max_streams: u32,
    /// Unread bytes per stream: at least the largest frame the peer may send, so one stream
    /// never waits on this side's reading to deliver a whole frame.
    pub stream_window: u64,
    /// Unread bytes over all streams of the connection.
    pub connection_window: u64,
    pub idle_timeout: Duration,
}

impl ReceiveLimits {
    /// A client's: it only ever receives response frames, on the streams it opened.
    pub fn client(idle_timeout: Duration) -> Self {
        Self {
            max_streams: 0,
            stream_window: MAX_RESPONSE_FRAME as u64,
            connection_window: 4 << 20,
            idle_timeout,
        }
    }
}

/// The one crypto provider splitee uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// All certificates of a PEM file (a chain: leaf first), at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let pem_error = |message: String| TransportError::Pem {
        path: path.to_owned(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no CERTIFICATE section".into()));
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TransportError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn root_store(roots: Vec<CertificateDer<'static>>) -> Result<RootCertStore, TransportError> {
    let mut store = RootCertStore::empty();
    for cert in roots {
        store.add(cert)?;
    }
    Ok(store)
}

/// QUIC transport settings both sides share, with this side's [`ReceiveLimits`] (an idle
/// timeout beyond [`MAX_IDLE_TIMEOUT`] is cut to it).
pub fn transport_config(limits: ReceiveLimits) -> quinn::TransportConfig {
    let idle = limits
        .idle_timeout
        .min(MAX_IDLE_TIMEOUT)
        .try_into()
        .expect("an hour is a valid QUIC idle timeout");
    let window = |bytes: u64| quinn::VarInt::from_u64(bytes).unwrap_or(quinn::VarInt::MAX);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(limits.max_streams.into())
        // Clients never accept streams; servers never open them towards clients.
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(window(limits.stream_window))
        // quinn's default is unbounded: a peer could make this side buffer without limit.
        .receive_window(window(limits.connection_window))
        .max_idle_timeout(Some(idle))
        // Radio links lose packets for reasons other than congestion. Loss-based Cubic (the
        // default) shrinks its window at every loss and collapsed under 10 % random loss
        // (1–3 s per 37 KB request through the link emulator); BBR paces on the measured
        // bandwidth and round trip instead.
        .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    transport
}

/// Server configuration: the worker's certificate chain and key, and, for mutual TLS, the CA
/// certificates that client certificates must chain to. With `client_ca` set, a client
/// without a certificate, or with one from another CA, fails the handshake.
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<Vec<CertificateDer<'static>>>,
    limits: ReceiveLimits,
) -> Result<quinn::ServerConfig, TransportError> {
    let provider = crypto_provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        Some(roots) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(roots)?), provider)
                .build()?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(cert_chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport_config(limits)));
    Ok(config)
}

/// Client configuration: the CA certificates the worker's certificate must chain to, the
/// client's own chain and key when the worker requires mutual TLS, and how long a silent
/// connection lives (keep-alives go out at a third of it).
pub fn client_config(
    roots: Vec<CertificateDer<'static>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TransportError> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(roots)?);
    let mut tls = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    let mut transport = transport_config(ReceiveLimits::client(idle_timeout));
    transport.keep_alive_interval(Some(idle_timeout.min(MAX_IDLE_TIMEOUT) / 3));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Binds a QUIC endpoint on `addr` with [`SOCKET_BUFFER_BYTES`] UDP buffers; a server when
/// `server` is given. Must be called inside a tokio runtime.
pub fn bind_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<Endpoint, TransportError> {
    bind_endpoint_with(addr, quinn::EndpointConfig::default(), server)
}

/// [`bind_endpoint`] with an endpoint configuration of the caller's (the worker's routable
/// connection IDs: `EndpointConfig::cid_generator`).
pub fn bind_endpoint_with(
    addr: SocketAddr,
    endpoint_config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
) -> Result<Endpoint, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let io = |error| TransportError::Socket { addr, error };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(io)?;
    // Buffer sizes are best effort: a smaller buffer costs packet loss, not correctness.
    if let Err(error) = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::warn!(%addr, %error, "could not set the UDP send buffer size");
    }
    if let Err(error) = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::warn!(%addr, %error, "could not set the UDP receive buffer size");
    }
    // Linux reports twice the size it granted, capped at net.core.{w,r}mem_max.
    let granted = (socket.send_buffer_size(), socket.recv_buffer_size());
    if let (Ok(send), Ok(recv)) = granted
        && send.min(recv) < SOCKET_BUFFER_BYTES
    {
        tracing::warn!(
            %addr,
            send,
            recv,
            wanted = SOCKET_BUFFER_BYTES,
            "the kernel capped the UDP buffers (raise net.core.wmem_max and rmem_max); \
             large payloads may lose packets"
        );
    }
    socket.bind(&addr.into()).map_err(io)?;
    Endpoint::new(
        endpoint_config,
        server,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(io)
}

/// A client endpoint on `addr` (`0.0.0.0:0` for any port) that connects with `config`.
pub fn client_endpoint(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<Endpoint, TransportError> {
    let mut endpoint = bind_endpoint(addr, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Connects to a worker; `server_name` must match a name in its certificate (`localhost` for
/// the `gen-certs` development certificates).
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<Connection, TransportError> {
    Ok(endpoint.connect(addr, server_name)?.await?)
}

/// Tells the worker which model this client runs (on a stream of its own) and returns what the
/// worker allows this connection. A worker serving another model answers
/// [`TransportError::Refused`] with `wrong_fingerprint`.
pub async fn hello(
    connection: &Connection,
    fingerprint: &[u8; 32],
    timeout: Duration,
) -> Result<Welcome, TransportError> {
    let frame = encode_hello(&Hello {
        fingerprint: *fingerprint,
    });
    match exchange(connection, &frame, timeout).await? {
        Response::Welcome(welcome) => Ok(welcome),
        Response::Error(error) => Err(TransportError::Refused(error)),
        Response::Answer(answer) => Err(ProtocolError::new(
            splitee_protocol::ErrorCode::Malformed,
            format!("an answer (request {}) to a hello", answer.request_id),
        )
        .into()),
    }
}

/// Sends one request on its own stream and waits for the response, at most `timeout`: an
/// answer or an error frame. Transport failures, undecodable responses and timeouts are `Err`;
/// so is a response that is not an answer or error frame for this request.
pub async fn offload(
    connection: &Connection,
    request: &OffloadRequest,
    timeout: Duration,
) -> Result<Response, TransportError> {
    let response = exchange(connection, &encode_request(request), timeout).await?;
    let request_id = match &response {
        Response::Answer(answer) => answer.request_id,
        Response::Error(_) => return Ok(response),
        Response::Welcome(_) => u64::MAX,
    };
    if request_id != request.request_id {
        return Err(ProtocolError::new(
            splitee_protocol::ErrorCode::Malformed,
            format!("{response:?} in answer to request {}", request.request_id),
        )
        .into());
    }
    Ok(response)
}

/// [`offload`] for an already encoded frame (any bytes): for callers that time serialisation
/// separately, and for tests that send malformed frames. Past `timeout` (counted from before
/// the stream opened) both halves of the stream are reset with [`STREAM_CANCELLED`], so the
/// worker stops working on it, and [`TransportError::TimedOut`] is returned.
pub async fn exchange(
    connection: &Connection,
    frame: &[u8],
    timeout: Duration,
) -> Result<Response, TransportError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let Ok(opened) = tokio::time::timeout_at(deadline, connection.open_bi()).await else {
        return Err(TransportError::TimedOut(timeout));
    };
    let (mut send, mut recv) = opened?;
    let exchanged = tokio::time::timeout_at(deadline, async {
        match send.write_all(frame).await {
            // Finishing can only fail on a stream that is already closed; then the server has
            // already answered, and that answer is what matters.
            Ok(()) => {
                let _ = send.finish();
            }
            // The server stopped reading because it answered early (busy, or a bad header):
            // its answer is on the receive side.
            Err(quinn::WriteError::Stopped(_)) => {}
            Err(error) => return Err(TransportError::from(error)),
        }
        Ok(recv.read_to_end(MAX_RESPONSE_FRAME).await?)
    })
    .await;
    match exchanged {
        Ok(bytes) => Ok(decode_response(&bytes?)?),
        Err(_) => {
            // Errors mean the half is already closed, which is all this wants.
            let _ = send.reset(STREAM_CANCELLED.into());
            let _ = recv.stop(STREAM_CANCELLED.into());
            Err(TransportError::TimedOut(timeout))
        }
    }
}
