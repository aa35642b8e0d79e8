//! The relay, with real datagrams on loopback.

use super::*;

/// Relay tests measure wall-clock delays, so they run one at a time: on a 2-core machine two
/// of them at once (each with its runtime and paced senders) make each other's datagrams late.
static REAL_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn socket() -> Arc<UdpSocket> {
    Arc::new(bind_udp(loopback()).unwrap())
}

/// An emulator in front of a fresh server socket; the instant is the link's time 0.
fn emulate(link: &LinkConfig) -> (LinkHandle, Arc<UdpSocket>, Instant) {
    let server = socket();
    let handle = LinkEmulator::start(link, loopback(), server.local_addr().unwrap()).unwrap();
    let origin = handle.started_at();
    (handle, server, origin)
}

/// A datagram as the tests send it: a sequence number, padded to `len` bytes.
fn datagram(seq: u32, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len.max(4)];
    d[..4].copy_from_slice(&seq.to_le_bytes());
    d
}

fn seq_of(datagram: &[u8]) -> u32 {
    u32::from_le_bytes(datagram[..4].try_into().unwrap())
}

struct Arrival {
    /// Since the link started.
    at_ms: f64,
    bytes: Vec<u8>,
}

/// A task receiving on a socket, stamping each datagram with its time since the link's start,
/// and echoing it to its source if asked.
struct Receiver {
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    fn start(socket: Arc<UdpSocket>, origin: Instant, echo: bool) -> Self {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let sink = arrivals.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let (len, from) = socket.recv_from(&mut buf).await.unwrap();
                let at_ms = as_ms(origin.elapsed());
                if echo {
                    socket.send_to(&buf[..len], from).await.unwrap();
                }
                sink.lock().unwrap().push(Arrival {
                    at_ms,
                    bytes: buf[..len].to_vec(),
                });
            }
        });
        Receiver { arrivals, task }
    }

    fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    /// Waits (up to 10 s) until `count` datagrams have arrived.
    async fn wait_for(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.count() < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stop(self) -> Vec<Arrival> {
        self.task.abort();
        std::mem::take(&mut *self.arrivals.lock().unwrap())
    }
}

/// Sends `count` numbered datagrams to `to`, one per `period` on average (tokio's timer
/// fires every millisecond at best; missed ticks are caught up in bursts); returns each one's
/// send time since `origin`.
async fn send_paced(
    socket: &UdpSocket,
    to: std::net::SocketAddr,
    period: Duration,
    count: u32,
    len_of: impl Fn(u32) -> usize,
    origin: Instant,
) -> Vec<f64> {
    let mut ticks = tokio::time::interval(period);
    let mut sent_at = Vec::with_capacity(count as usize);
    for seq in 0..count {
        ticks.tick().await;
        sent_at.push(as_ms(origin.elapsed()));
        socket
            .send_to(&datagram(seq, len_of(seq)), to)
            .await
            .unwrap();
    }
    sent_at
}

/// Waits (up to 10 s) until every datagram offered in `direction` has been delivered or
/// dropped, then returns the stats.
async fn settled(handle: &LinkHandle, direction: Direction, offered: u64) -> DirectionStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = *handle.stats().direction(direction);
        let accounted = s.delivered_packets + s.dropped_loss + s.dropped_queue + s.dropped_outage;
        if accounted >= offered || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wire bytes (with IPv4 and UDP headers) received per window `[from_ms, to_ms)`, in Mbit/s.
fn mbit_s(arrivals: &[Arrival], from_ms: f64, to_ms: f64) -> f64 {
    let bytes: usize = arrivals
        .iter()
        .filter(|a| (from_ms..to_ms).contains(&a.at_ms))
        .map(|a| a.bytes.len() + 28)
        .sum();
    bytes as f64 * 8.0 / (to_ms - from_ms) / 1e3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_goodput_tracks_the_mahimahi_trace() {
    let _alone = REAL_TIME.lock().await;
    let link = config(&format!(
        "[uplink]\nrate = {{ kind = \"mahimahi\", path = \"{LTE_UP}\" }}\nqueue = {{ packets = 100 }}\n[downlink]\n"
    ));
    let (handle, server, origin) = emulate(&link);
    let received = Receiver::start(server, origin, false);
    // About 2,000 datagrams of 1400–1472 bytes per second: 23 Mbit/s, well above the trace
    // (4–9 Mbit/s per second in this stretch), so the queue never runs dry.
    let client = socket();
    send_paced(
        &client,
        handle.local_addr(),
        Duration::from_micros(500),
        22_400,
        |seq| 1400 + (seq as usize * 7) % 73,
        origin,
    )
    .await;
    let arrivals = received.stop();
    let trace = BaseTrace::read_mahimahi(&crate_dir().join(LTE_UP)).unwrap();
    // Measured after the first second (the queue has filled), over 10 s.
    let (from, to) = (1000.0, 11_000.0);
    let expected = (trace.capacity_bits(to) - trace.capacity_bits(from)) / (to - from) / 1e3;
    let measured = mbit_s(&arrivals, from, to);
    eprintln!("goodput: measured {measured:.3} Mbit/s, trace {expected:.3} Mbit/s");
    for second in 1..11 {
        let (a, b) = (second as f64 * 1e3, (second + 1) as f64 * 1e3);
        let trace_rate = (trace.capacity_bits(b) - trace.capacity_bits(a)) / 1e6;
        eprintln!(
            "  second {second}: {:.2} Mbit/s (trace {trace_rate:.2})",
            mbit_s(&arrivals, a, b)
        );
    }
    assert!(
        (measured / expected - 1.0).abs() < 0.10,
        "{measured} vs {expected}"
    );
    let stats = handle.stats();
    assert!(stats.uplink.dropped_queue > 0, "the link was saturated");
    assert_eq!(stats.relay_errors, 0);
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_delay_and_jitter_match_per_direction() {
    let _alone = REAL_TIME.lock().await;
    let link = config(
        "[uplink]\ndelay_ms = 30\njitter_ms = 10\n[downlink]\ndelay_ms = 10\njitter_ms = 4\n",
    );
    let (handle, server, origin) = emulate(&link);
    let at_server = Receiver::start(server, origin, true);
    let client = socket();
    let at_client = Receiver::start(client.clone(), origin, false);
    // 20 ms apart, at least twice the larger jitter: no datagram is held behind another.
    let count = 250;
    let sent = send_paced(
        &client,
        handle.local_addr(),
        ms(20.0),
        count,
        |_| 100,
        origin,
    )
    .await;
    at_client.wait_for(count as usize).await;
    let (at_server, at_client) = (at_server.stop(), at_client.stop());
    assert_eq!(
        (at_server.len(), at_client.len()),
        (count as usize, count as usize)
    );
    let mut server_at = vec![0.0; count as usize];
    let up: Vec<f64> = at_server
        .iter()
        .map(|a| {
            let seq = seq_of(&a.bytes) as usize;
            server_at[seq] = a.at_ms;
            a.at_ms - sent[seq]
        })
        .collect();
    let down: Vec<f64> = at_client
        .iter()
        .map(|a| a.at_ms - server_at[seq_of(&a.bytes) as usize])
        .collect();
    for (name, d, delay, jitter) in [("uplink", &up, 30.0, 10.0), ("downlink", &down, 10.0, 4.0)] {
        let (mean, sd) = mean_sd(d);
        let (min, max) = d
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        eprintln!(
            "{name}: one-way delay mean {mean:.2} ms, sd {sd:.2} ms, range {min:.2}–{max:.2} ms \
             (configured {delay} ± {jitter} uniform: sd {:.2})",
            jitter / 3f64.sqrt()
        );
        // Mean: sd of the estimate jitter/√(3·250) ≤ 0.37 ms, plus up to ~1 ms of timer and
        // scheduling lateness (never early): tolerance −1.5 / +2.5 ms.
        assert!(
            mean > delay - 1.5 && mean < delay + 2.5,
            "{name}: mean {mean}"
        );
        // Spread: the sample sd of 250 uniform draws is within ±8% at 4 sd; lateness adds
        // its own sub-millisecond spread. Tolerance ±20% or 0.8 ms.
        let want = jitter / 3f64.sqrt();
        assert!((sd - want).abs() < (0.2 * want).max(0.8), "{name}: sd {sd}");
        assert!(min >= delay - jitter, "{name}: min {min}");
        assert!(max <= delay + jitter + 10.0, "{name}: max {max}");
    }
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_loss_rates_match_per_direction() {
    let _alone = REAL_TIME.lock().await;
    let link = config(
        r#"
        seed = 11
        [uplink]
        loss = { kind = "bernoulli", p = 0.1 }
        [downlink]
        loss = { kind = "gilbert-elliott", p_good_to_bad = 0.02, p_bad_to_good = 0.2, loss_good = 0.01, loss_bad = 0.6 }
        "#,
    );
    let (handle, server, origin) = emulate(&link);
    let at_server = Receiver::start(server, origin, true);
    let client = socket();
    let at_client = Receiver::start(client.clone(), origin, false);
    let sent = 30_000;
    send_paced(
        &client,
        handle.local_addr(),
        Duration::from_micros(70),
        sent,
        |_| 64,
        origin,
    )
    .await;
    let up = settled(&handle, Direction::Uplink, u64::from(sent)).await;
    let down = settled(&handle, Direction::Downlink, up.delivered_packets).await;
    at_client.wait_for(down.delivered_packets as usize).await;
    handle.shutdown().await;
    let (at_server, at_client) = (at_server.stop(), at_client.stop());
    // The relay loses nothing but what the model drops.
    assert_eq!(at_server.len() as u64, up.delivered_packets);
    assert_eq!(up.delivered_packets + up.dropped_loss, u64::from(sent));
    assert_eq!(at_client.len() as u64, down.delivered_packets);
    assert_eq!(
        down.delivered_packets + down.dropped_loss,
        at_server.len() as u64
    );

    let up_loss = 1.0 - at_server.len() as f64 / f64::from(sent);
    let down_loss = 1.0 - at_client.len() as f64 / at_server.len() as f64;
    let ge_mean = link.downlink.loss.unwrap().mean_rate();
    eprintln!(
        "loss: uplink {up_loss:.4} (Bernoulli 0.1), downlink {down_loss:.4} (Gilbert–Elliott, \
         mean {ge_mean:.4}), {sent} datagrams"
    );
    // Bernoulli, n = 30,000: sd 0.0017; tolerance 0.008 (4.6 sd).
    assert!((up_loss - 0.1).abs() < 0.008, "{up_loss}");
    // Gilbert–Elliott, n ≈ 27,000: sd ≈ √(0.26/n) = 0.0031; tolerance 0.015 (4.8 sd).
    assert!((down_loss - ge_mean).abs() < 0.015, "{down_loss}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_outage_drops_everything_then_traffic_resumes() {
    let _alone = REAL_TIME.lock().await;
    let link = config("[uplink]\n[downlink]\n[[outages]]\nat_s = 1.0\nduration_s = 1.0\n");
    let (handle, server, origin) = emulate(&link);
    let received = Receiver::start(server, origin, false);
    let client = socket();
    let sent = send_paced(&client, handle.local_addr(), ms(5.0), 600, |_| 200, origin).await;
    let stats = settled(&handle, Direction::Uplink, sent.len() as u64).await;
    received.wait_for(stats.delivered_packets as usize).await;
    let arrivals = received.stop();
    let mut arrived = vec![false; sent.len()];
    for a in &arrivals {
        arrived[seq_of(&a.bytes) as usize] = true;
    }
    // 50 ms of slack between the sender's clock reading and the relay's.
    let before = (0..sent.len()).filter(|&i| sent[i] < 950.0);
    let during = (0..sent.len()).filter(|&i| (1050.0..1950.0).contains(&sent[i]));
    let after = (0..sent.len()).filter(|&i| sent[i] >= 2050.0);
    assert!(before.clone().count() > 150 && after.clone().count() > 150);
    assert!(before.clone().all(|i| arrived[i]), "lost before the outage");
    assert!(
        during.clone().all(|i| !arrived[i]),
        "delivered during the outage"
    );
    assert!(after.clone().all(|i| arrived[i]), "lost after the outage");
    assert_eq!(
        stats.dropped_outage as usize,
        sent.len() - arrivals.len(),
        "every missing datagram is an outage drop"
    );
    eprintln!(
        "outage: {} of {} datagrams dropped, {} sent well inside the 1 s outage",
        stats.dropped_outage,
        sent.len(),
        during.count()
    );
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_outage_at_run_time_cuts_the_chosen_direction() {
    let _alone = REAL_TIME.lock().await;
    let (handle, server, origin) = emulate(&config("[uplink]\n[downlink]\n"));
    let at_server = Receiver::start(server, origin, true);
    let client = socket();
    let at_client = Receiver::start(client.clone(), origin, false);
    let round = |first: u32| {
        let client = client.clone();
        let to = handle.local_addr();
        async move {
            for seq in first..first + 50 {
                client.send_to(&datagram(seq, 100), to).await.unwrap();
            }
        }
    };
    round(0).await;
    settled(&handle, Direction::Downlink, 50).await;
    handle.set_outage(Directions::Downlink, true).await.unwrap();
    round(100).await;
    settled(&handle, Direction::Downlink, 100).await;
    handle
        .set_outage(Directions::Downlink, false)
        .await
        .unwrap();
    handle.set_outage(Directions::Both, true).await.unwrap();
    round(200).await;
    settled(&handle, Direction::Uplink, 150).await;
    handle.set_outage(Directions::Both, false).await.unwrap();
    round(300).await;
    settled(&handle, Direction::Downlink, 200).await;
    at_client.wait_for(100).await;
    let stats = handle.stats();
    handle.shutdown().await;
    let seqs = |arrivals: Vec<Arrival>| {
        let mut s: Vec<u32> = arrivals.iter().map(|a| seq_of(&a.bytes) / 100).collect();
        s.dedup();
        (s, arrivals.len())
    };
    // Requests of every round but the third reach the server; answers of rounds 1 and 4 come
    // back.
    assert_eq!(seqs(at_server.stop()), (vec![0, 1, 3], 150));
    assert_eq!(seqs(at_client.stop()), (vec![0, 3], 100));
    assert_eq!(
        (stats.uplink.dropped_outage, stats.downlink.dropped_outage),
        (50, 50)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_rate_follows_scheduled_and_run_time_switches() {
    let _alone = REAL_TIME.lock().await;
    let link = config(
        r#"
        [uplink]
        rate = { kind = "constant", rate_mbps = 8 }
        queue = { packets = 50 }
        [downlink]
        [[switches]]
        at_s = 1.5
        uplink = { rate = { kind = "constant", rate_mbps = 2 }, queue = { packets = 50 } }
        "#,
    );
    let (handle, server, origin) = emulate(&link);
    let received = Receiver::start(server, origin, false);
    let client = socket();
    let to = handle.local_addr();
    // 1472-byte datagrams (1500 on the link) every 0.8 ms: 15 Mbit/s, above every rate here.
    let sender = tokio::spawn(async move {
        send_paced(
            &client,
            to,
            Duration::from_micros(800),
            5800,
            |_| 1472,
            origin,
        )
        .await
    });
    tokio::time::sleep_until((origin + Duration::from_secs(3)).into()).await;
    let fast = LinkModel {
        rate: Some(splitee_link::TraceSource::Constant { rate_mbps: 6.0 }),
        queue: QueueLimit {
            packets: Some(50),
            bytes: None,
        },
        ..LinkModel::default()
    };
    handle.replace_link(Direction::Uplink, &fast).await.unwrap();
    sender.await.unwrap();
    let arrivals = received.stop();
    // Windows start after each change plus the time to drain the 50-datagram queue.
    let windows = [
        (300.0, 1500.0, 8.0),
        (2000.0, 3000.0, 2.0),
        (3300.0, 4500.0, 6.0),
    ];
    for (from, to, rate) in windows {
        let measured = mbit_s(&arrivals, from, to);
        eprintln!("switch: {measured:.3} Mbit/s in [{from}, {to}) ms, configured {rate}");
        assert!((measured / rate - 1.0).abs() < 0.10, "{measured} vs {rate}");
    }
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_keeps_clients_apart() {
    let _alone = REAL_TIME.lock().await;
    let (handle, server, origin) = emulate(&config(
        "[uplink]\ndelay_ms = 5\n[downlink]\ndelay_ms = 5\n",
    ));
    let echo = Receiver::start(server, origin, true);
    let clients = [socket(), socket()];
    let replies: Vec<_> = clients
        .iter()
        .map(|c| Receiver::start(c.clone(), origin, false))
        .collect();
    for round in 0..20 {
        for (i, client) in clients.iter().enumerate() {
            let seq = round * 10 + i as u32;
            client
                .send_to(&datagram(seq, 300), handle.local_addr())
                .await
                .unwrap();
        }
    }
    settled(&handle, Direction::Downlink, 40).await;
    handle.shutdown().await;
    echo.stop();
    for (i, reply) in replies.into_iter().enumerate() {
        reply.wait_for(20).await;
        let seqs: Vec<u32> = reply.stop().iter().map(|a| seq_of(&a.bytes)).collect();
        let want: Vec<u32> = (0..20).map(|round| round * 10 + i as u32).collect();
        assert_eq!(seqs, want, "client {i}");
    }
}

#[tokio::test]
async fn replacing_a_link_with_a_bad_model_is_an_error() {
    let (handle, _server, _) = emulate(&config("[uplink]\n[downlink]\n"));
    let bad = LinkModel {
        rate: Some(splitee_link::TraceSource::Mahimahi {
            path: PathBuf::from("/nonexistent/trace.up"),
        }),
        ..LinkModel::default()
    };
    let e = format!(
        "{:#}",
        handle
            .replace_link(Direction::Uplink, &bad)
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("uplink") && e.contains("/nonexistent/trace.up"),
        "{e}"
    );
    handle.shutdown().await;
}
