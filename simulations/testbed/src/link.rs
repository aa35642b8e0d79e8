//! The link emulator: a tokio UDP relay between an edge agent (QUIC client) and a cloud
//! worker (QUIC server) that drives two [`Shaper`]s (one per direction) with real datagrams
//! and real time. Datagrams pass through unchanged; only their timing and whether they arrive
//! change. The link model and its config format are `splitee_link`'s.
//!
//! [`LinkEmulator::start`] listens on one UDP address. Each client source address gets its own
//! socket connected to the upstream (server) address, kept for the emulator's lifetime, so
//! several clients can share the link (as processes inside one `mm-link` shell share it: one
//! bottleneck per direction). Sockets get 4 MiB buffers so that the relay itself does not
//! drop. Delivery times are exact in the model; the relay sends each datagram when tokio's
//! timer (1 ms resolution) wakes it, so up to about a millisecond late.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use splitee_service::transport::SOCKET_BUFFER_BYTES;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use splitee_link::{
    Delivery, Direction, DirectionStats, Directions, LinkConfig, LinkModel, LoadedLinkModel, Shaper,
};

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// Bytes the IP and UDP headers add to a datagram on the link.
fn wire_bytes(payload: usize, peer: SocketAddr) -> u64 {
    let headers = if peer.is_ipv4() { 20 + 8 } else { 40 + 8 };
    (payload + headers) as u64
}

/// Binds a UDP socket with [`SOCKET_BUFFER_BYTES`] buffers (best effort: the kernel may cap
/// them, which is logged). Must be called inside a tokio runtime.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // A failure here costs packet loss under load, not correctness; the size check reports it.
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    // Linux reports twice the size it granted, capped at net.core.{w,r}mem_max.
    if let (Ok(send), Ok(recv)) = (socket.send_buffer_size(), socket.recv_buffer_size())
        && send.min(recv) < SOCKET_BUFFER_BYTES
    {
        tracing::warn!(
            %addr, send, recv, wanted = SOCKET_BUFFER_BYTES,
            "the kernel capped the UDP buffers (raise net.core.wmem_max and rmem_max); \
             the relay may drop datagrams under load"
        );
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Counters of both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    pub uplink: DirectionStats,
    pub downlink: DirectionStats,
    /// Datagrams the relay failed to send or to open a socket for (not counted by the
    /// shapers), e.g. while nothing listens at the upstream address.
    pub relay_errors: u64,
}

impl LinkStats {
    pub fn direction(&self, direction: Direction) -> &DirectionStats {
        match direction {
            Direction::Uplink => &self.uplink,
            Direction::Downlink => &self.downlink,
        }
    }
}

/// Starts link emulators.
pub struct LinkEmulator;

impl LinkEmulator {
    /// Reads the config's traces, listens on `listen` and relays to `upstream` until the
    /// handle is shut down or dropped. Time 0 of the link is now. Must be called inside a tokio
    /// runtime.
    pub fn start(
        config: &LinkConfig,
        listen: SocketAddr,
        upstream: SocketAddr,
    ) -> anyhow::Result<LinkHandle> {
        let uplink = config.shaper(Direction::Uplink)?;
        let downlink = config.shaper(Direction::Downlink)?;
        let socket = bind_udp(listen).with_context(|| format!("cannot listen on {listen}"))?;
        let local_addr = socket.local_addr()?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (from_server, from_server_rx) = mpsc::channel(1024);
        let stats = Arc::new(Mutex::new(LinkStats::default()));
        let started_at = Instant::now();
        let relay = Relay {
            started_at,
            listen: socket,
            upstream,
            sessions: HashMap::new(),
            session_tasks: JoinSet::new(),
            from_server,
            uplink,
            downlink,
            relay_errors: 0,
            stats: stats.clone(),
        };
        Ok(LinkHandle {
            local_addr,
            started_at: started_at.into_std(),
            commands,
            stats,
            relay: tokio::spawn(relay.run(command_rx, from_server_rx)),
        })
    }
}

/// A running emulator. Dropping it stops the relay too; [`shutdown`](Self::shutdown) also
/// waits for it.
pub struct LinkHandle {
    local_addr: SocketAddr,
    started_at: std::time::Instant,
    commands: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<LinkStats>>,
    relay: JoinHandle<()>,
}

enum Command {
    SetOutage {
        directions: Directions,
        cut: bool,
        done: oneshot::Sender<()>,
    },
    Replace {
        direction: Direction,
        model: LoadedLinkModel,
        done: oneshot::Sender<()>,
    },
}

impl LinkHandle {
    /// Where clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Time 0 of the link: traces and scheduled events count from here.
    pub fn started_at(&self) -> std::time::Instant {
        self.started_at
    }

    /// Counters as of the relay's last step.
    pub fn stats(&self) -> LinkStats {
        *self.stats.lock().expect("stats lock")
    }

    /// Cuts (`true`) or restores the given directions; returns once the relay applied it.
    pub async fn set_outage(&self, directions: Directions, cut: bool) -> anyhow::Result<()> {
        self.command(|done| Command::SetOutage {
            directions,
            cut,
            done,
        })
        .await
    }

    /// Runs `model` on `direction` from now on (its trace starts now); returns once the relay
    /// applied it.
    pub async fn replace_link(
        &self,
        direction: Direction,
        model: &LinkModel,
    ) -> anyhow::Result<()> {
        let model = model.load().context(direction.name())?;
        self.command(|done| Command::Replace {
            direction,
            model,
            done,
        })
        .await
    }

    async fn command(
        &self,
        command: impl FnOnce(oneshot::Sender<()>) -> Command,
    ) -> anyhow::Result<()> {
        let (done, applied) = oneshot::channel();
        let stopped = || anyhow::anyhow!("the link emulator has stopped");
        self.commands.send(command(done)).map_err(|_| stopped())?;
        applied.await.map_err(|_| stopped())
    }

    /// Stops the relay and waits for it; a panic in the relay is re-raised here.
    pub async fn shutdown(self) {
        let LinkHandle {
            commands, relay, ..
        } = self;
        drop(commands);
        if let Err(e) = relay.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// One client: its address and its socket towards the server.
struct Session {
    client: SocketAddr,
    upstream: UdpSocket,
}

struct Datagram {
    session: Arc<Session>,
    bytes: Vec<u8>,
}

struct Relay {
    started_at: Instant,
    listen: UdpSocket,
    upstream: SocketAddr,
    sessions: HashMap<SocketAddr, Arc<Session>>,
    /// The tasks reading each session's upstream socket; aborted when the relay ends.
    session_tasks: JoinSet<()>,
    from_server: mpsc::Sender<Datagram>,
    uplink: Shaper<Datagram>,
    downlink: Shaper<Datagram>,
    relay_errors: u64,
    stats: Arc<Mutex<LinkStats>>,
}

enum Wake {
    Command(Command),
    FromClient(io::Result<(usize, SocketAddr)>),
    FromServer(Datagram),
    Due,
}

impl Relay {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut from_server: mpsc::Receiver<Datagram>,
    ) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            // Nothing scheduled: sleep until a datagram or a command comes.
            let wakeup = self
                .next_wakeup()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let wake = tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => Wake::Command(command),
                    None => return,
                },
                received = self.listen.recv_from(&mut buf) => Wake::FromClient(received),
                // The relay holds a sender, so the channel never closes.
                Some(datagram) = from_server.recv() => Wake::FromServer(datagram),
                () = tokio::time::sleep_until(wakeup) => Wake::Due,
            };
            let now = self.started_at.elapsed();
            match wake {
                Wake::Command(command) => self.apply(now, command),
                Wake::FromClient(Ok((len, client))) => {
                    self.from_client(now, client, buf[..len].to_vec()).await;
                }
                Wake::FromClient(Err(e)) => tracing::debug!(%e, "receive from a client failed"),
                Wake::FromServer(datagram) => {
                    let bytes = wire_bytes(datagram.bytes.len(), self.upstream);
                    if let Err(cause) = self.downlink.arrive(now, bytes, datagram) {
                        tracing::trace!(?cause, "downlink drop");
                    }
                }
                Wake::Due => {}
            }
            self.deliver_due(now).await;
            *self.stats.lock().expect("stats lock") = LinkStats {
                uplink: self.uplink.stats(),
                downlink: self.downlink.stats(),
                relay_errors: self.relay_errors,
            };
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let up = self.uplink.next_wakeup();
        let down = self.downlink.next_wakeup();
        let first = match (up, down) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        first.map(|t| self.started_at + t)
    }

    fn apply(&mut self, now: Duration, command: Command) {
        // A caller that stopped waiting for the acknowledgement does not matter.
        match command {
            Command::SetOutage {
                directions,
                cut,
                done,
            } => {
                if directions.includes(Direction::Uplink) {
                    self.uplink.set_outage(now, cut);
                }
                if directions.includes(Direction::Downlink) {
                    self.downlink.set_outage(now, cut);
                }
                let _ = done.send(());
            }
            Command::Replace {
                direction,
                model,
                done,
            } => {
                let shaper = match direction {
                    Direction::Uplink => &mut self.uplink,
                    Direction::Downlink => &mut self.downlink,
                };
                shaper
                    .replace_model(now, model)
                    .expect("the model was checked when it was loaded");
                let _ = done.send(());
            }
        }
    }

    async fn from_client(&mut self, now: Duration, client: SocketAddr, bytes: Vec<u8>) {
        let session = match self.sessions.get(&client) {
            Some(session) => session.clone(),
            None => match self.open_session(client).await {
                Ok(session) => session,
                Err(e) => {
                    tracing::warn!(%client, %e, "cannot open a socket towards the server");
                    self.relay_errors += 1;
                    return;
                }
            },
        };
        let wire = wire_bytes(bytes.len(), client);
        if let Err(cause) = self.uplink.arrive(now, wire, Datagram { session, bytes }) {
            tracing::trace!(?cause, "uplink drop");
        }
    }

    async fn open_session(&mut self, client: SocketAddr) -> io::Result<Arc<Session>> {
        let any: IpAddr = match self.upstream {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let upstream = bind_udp(SocketAddr::new(any, 0))?;
        upstream.connect(self.upstream).await?;
        tracing::debug!(%client, local = %upstream.local_addr()?, "new client");
        let session = Arc::new(Session { client, upstream });
        self.session_tasks
            .spawn(read_from_server(session.clone(), self.from_server.clone()));
        self.sessions.insert(client, session.clone());
        Ok(session)
    }

    async fn deliver_due(&mut self, now: Duration) {
        while let Some(Delivery { packet, .. }) = self.uplink.poll_delivery(now) {
            if let Err(e) = packet.session.upstream.send(&packet.bytes).await {
                tracing::debug!(%e, "send to the server failed");
                self.relay_errors += 1;
            }
        }
        while let Some(Delivery { packet, .. }) = self.downlink.poll_delivery(now) {
            if let Err(e) = self
                .listen
                .send_to(&packet.bytes, packet.session.client)
                .await
            {
                tracing::debug!(%e, client = %packet.session.client, "send to a client failed");
                self.relay_errors += 1;
            }
        }
    }
}

/// Hands what the server sends to one client's socket to the relay.
async fn read_from_server(session: Arc<Session>, to_relay: mpsc::Sender<Datagram>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match session.upstream.recv(&mut buf).await {
            Ok(len) => {
                let datagram = Datagram {
                    session: session.clone(),
                    bytes: buf[..len].to_vec(),
                };
                if to_relay.send(datagram).await.is_err() {
                    return;
                }
            }
            // The ICMP answer to a datagram sent while nothing listened at the server address.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                tracing::warn!(client = %session.client, %e, "the socket towards the server failed");
                return;
            }
        }
    }
}

/// Runs an emulator until Ctrl-C, logging each second's traffic and drops per direction.
pub async fn run_until_ctrl_c(
    config: &LinkConfig,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<()> {
    let handle = LinkEmulator::start(config, listen, upstream)?;
    tracing::info!(listen = %handle.local_addr(), %upstream, "link emulator running; Ctrl-C stops it");
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.tick().await;
    let mut before = handle.stats();
    loop {
        tokio::select! {
            signal = &mut ctrl_c => {
                signal.context("waiting for Ctrl-C")?;
                break;
            }
            _ = second.tick() => {
                let now = handle.stats();
                for direction in [Direction::Uplink, Direction::Downlink] {
                    let last = now.direction(direction).since(before.direction(direction));
                    tracing::info!(
                        direction = direction.name(),
                        mbit_s = %format!("{:.2}", last.delivered_bytes as f64 * 8e-6),
                        packets = last.delivered_packets,
                        queued = last.queued_packets,
                        dropped_queue = last.dropped_queue,
                        dropped_loss = last.dropped_loss,
                        dropped_outage = last.dropped_outage,
                    );
                }
                if now.relay_errors > before.relay_errors {
                    tracing::warn!(count = now.relay_errors - before.relay_errors, "relay send errors");
                }
                before = now;
            }
        }
    }
    let total = handle.stats();
    handle.shutdown().await;
    tracing::info!(?total, "stopped");
    Ok(())
}
