//! The link emulator: the sans-IO shaper in simulated time, its configs, and the UDP relay
//! measured with real datagrams on loopback.
//!
//! Statistical tolerances are stated where they are used, as multiples of the estimator's
//! standard deviation (seeded, so a given build always draws the same numbers). Relay timing
//! tolerances allow for tokio's 1 ms timer and a loaded 2-core machine.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splitee_link::network::BaseTrace;
use splitee_link::{
    BurstLoss, Direction, DirectionStats, Directions, DropCause, LinkConfig, LinkModel,
    LoadedLinkModel, Loss, QueueLimit, Shaper,
};
use splitee_testbed::link::{LinkEmulator, LinkHandle, bind_udp};
use tokio::net::UdpSocket;

// ---------------------------------------------------------------------------------------------
// Helpers

fn ms(v: f64) -> Duration {
    Duration::from_nanos((v * 1e6).round() as u64)
}

fn as_ms(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

fn mahimahi(stamps: &[u64], period_ms: u64) -> Arc<BaseTrace> {
    Arc::new(BaseTrace::Packets {
        stamps: stamps.to_vec(),
        period_ms,
    })
}

fn constant(mbps: f64) -> Arc<BaseTrace> {
    Arc::new(BaseTrace::constant(mbps).unwrap())
}

fn shaper(model: LoadedLinkModel) -> Shaper<u32> {
    Shaper::new(model, 7, Direction::Uplink).unwrap()
}

fn limited(trace: Arc<BaseTrace>) -> LoadedLinkModel {
    LinkModel {
        rate: Some(trace),
        ..LinkModel::default()
    }
}

/// Every delivery up to `until_ms`, as (payload, delivery time in ms).
fn drain(shaper: &mut Shaper<u32>, until_ms: f64) -> Vec<(u32, f64)> {
    std::iter::from_fn(|| shaper.poll_delivery(ms(until_ms)))
        .map(|d| (d.packet, as_ms(d.at)))
        .collect()
}

fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A config whose relative paths start in the crate directory.
fn config(text: &str) -> LinkConfig {
    LinkConfig::from_toml(text, crate_dir()).unwrap()
}

fn config_error(text: &str) -> String {
    format!(
        "{:#}",
        LinkConfig::from_toml(text, crate_dir()).unwrap_err()
    )
}

const LTE_UP: &str = "data/traces/verizon-lte-60s.up";

// ---------------------------------------------------------------------------------------------
// The sans-IO core in simulated time

#[test]
fn mahimahi_opportunities_pack_bytes_like_mm_link() {
    // Opportunities at 2, 4, 4, 7, 10 ms, then 12, 14, 14, 17, 20 ms, …
    let mut link = shaper(limited(mahimahi(&[2, 4, 4, 7, 10], 10)));
    link.arrive(ms(0.0), 1000, 0).unwrap();
    link.arrive(ms(0.0), 1000, 1).unwrap();
    link.arrive(ms(0.0), 600, 2).unwrap();
    // Opportunity at 2 carries datagram 0 and 500 bytes of 1; the first one at 4 carries the
    // rest of 1 and all of 2.
    assert_eq!(drain(&mut link, 4.0), [(0, 2.0), (1, 4.0), (2, 4.0)]);
    // Arriving at 4 ms exactly: both opportunities at 4 are gone (the rest of the first was
    // lost when the queue ran empty), so the next usable one is at 7.
    link.arrive(ms(4.0), 1500, 3).unwrap();
    link.arrive(ms(7.5), 100, 4).unwrap();
    // A datagram larger than an opportunity straddles two, and the trace loops: 12 and 14.
    link.arrive(ms(10.5), 3000, 5).unwrap();
    assert_eq!(drain(&mut link, 100.0), [(3, 7.0), (4, 10.0), (5, 14.0)]);
    let stats = link.stats();
    assert_eq!(stats.delivered_packets, 6);
    assert_eq!(stats.delivered_bytes, 1000 + 1000 + 600 + 1500 + 100 + 3000);
}

#[test]
fn a_saturated_mahimahi_link_delivers_1500_bytes_per_opportunity() {
    let trace = BaseTrace::read_mahimahi(&crate_dir().join(LTE_UP)).unwrap();
    let mut link = shaper(limited(Arc::new(trace.clone())));
    // 200 datagrams of 1428 bytes at once, then one every 0.5 ms (23 Mbit/s, above the
    // trace's peak) for 70 s: the queue never empties, so every opportunity is used, across
    // the 60 s loop.
    let mut delivered_bytes = 0u64;
    for i in 0..140_200u32 {
        let now = f64::from(i.saturating_sub(200)) * 0.5;
        link.arrive(ms(now), 1428, i).unwrap();
        delivered_bytes += drain(&mut link, now).len() as u64 * 1428;
    }
    let capacity_bytes = trace.capacity_bits(69_999.5) / 8.0;
    let behind = capacity_bytes - delivered_bytes as f64;
    // At most the datagram in transmission is behind the capacity.
    assert!((0.0..1428.0).contains(&behind), "{behind}");
}

#[test]
fn drop_tail_queue_limits_packets_and_bytes() {
    // 12 Mbit/s: one 1500-byte datagram per millisecond.
    let mut by_packets = shaper(LinkModel {
        queue: QueueLimit {
            packets: Some(3),
            bytes: None,
        },
        ..limited(constant(12.0))
    });
    for i in 0..3 {
        by_packets.arrive(ms(0.0), 1500, i).unwrap();
    }
    assert_eq!(
        by_packets.arrive(ms(0.0), 1500, 3),
        Err(DropCause::QueueFull)
    );
    assert_eq!(
        by_packets.arrive(ms(0.5), 1500, 4),
        Err(DropCause::QueueFull)
    );
    // The first left at 1 ms: room for one.
    by_packets.arrive(ms(1.0), 1500, 5).unwrap();
    assert_eq!(by_packets.stats().dropped_queue, 2);
    assert_eq!(by_packets.stats().queued_packets, 3);
    assert_eq!(
        drain(&mut by_packets, 10.0),
        [(0, 1.0), (1, 2.0), (2, 3.0), (5, 4.0)]
    );

    let mut by_bytes = shaper(LinkModel {
        queue: QueueLimit {
            packets: None,
            bytes: Some(4000),
        },
        ..limited(constant(12.0))
    });
    by_bytes.arrive(ms(0.0), 1500, 0).unwrap();
    by_bytes.arrive(ms(0.0), 1500, 1).unwrap();
    assert_eq!(by_bytes.arrive(ms(0.0), 1500, 2), Err(DropCause::QueueFull));
    by_bytes.arrive(ms(0.0), 1000, 3).unwrap();
    assert_eq!(by_bytes.stats().dropped_queue, 1);
}

#[test]
fn per_second_rate_traces_shape_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    // Norway format: 1 Mbit/s for a second, then 3 Mbit/s; the loop is 2 s.
    std::fs::write(dir.path().join("bus"), "0.0 1.0\n1.0 3.0\n").unwrap();
    // 5Gophers format: 2 Mbit/s, then a second at 0 (an outage in the trace), then 4.
    std::fs::write(
        dir.path().join("car.csv"),
        "seq_num,up_mbps\n0,2\n1,0\n2,4\n",
    )
    .unwrap();
    let links = LinkConfig::from_toml(
        r#"
        [uplink]
        rate = { kind = "norway", path = "bus" }
        [downlink]
        rate = { kind = "fivegophers", path = "car.csv", column = "up_mbps" }
        "#,
        dir.path(),
    )
    .unwrap();
    // 1250-byte datagrams = 10 kbit: 100 per Mbit/s-second.
    let count = |direction: Direction, seconds: &[f64]| {
        let mut link = links.shaper::<u32>(direction).unwrap();
        for i in 0..2000 {
            link.arrive(Duration::ZERO, 1250, i).unwrap();
        }
        let times: Vec<f64> = drain(&mut link, 10_000.0).iter().map(|d| d.1).collect();
        seconds
            .iter()
            .map(|&s| times.iter().filter(|&&t| t <= s * 1000.0 + 1e-6).count())
            .collect::<Vec<_>>()
    };
    assert_eq!(count(Direction::Uplink, &[1.0, 2.0, 3.0]), [100, 400, 500]);
    assert_eq!(
        count(Direction::Downlink, &[1.0, 1.99, 2.0, 3.0]),
        [200, 200, 200, 600]
    );
}

#[test]
fn loss_rates_match_the_configuration() {
    let loss_rate = |loss: Loss, datagrams: u32| {
        let mut link = shaper(LinkModel {
            loss: Some(loss),
            ..LinkModel::default()
        });
        let mut delivered = 0;
        for i in 0..datagrams {
            let now = ms(f64::from(i) * 0.01);
            link.arrive(now, 100, i).unwrap();
            delivered += drain(&mut link, as_ms(now)).len();
        }
        assert_eq!(
            link.stats().dropped_loss as usize,
            datagrams as usize - delivered
        );
        1.0 - delivered as f64 / f64::from(datagrams)
    };
    // Bernoulli, n = 200,000: sd = √(0.1·0.9/n) = 0.00067; tolerance 0.003 (4.5 sd).
    let bernoulli = loss_rate(Loss::Bernoulli { p: 0.1 }, 200_000);
    assert!((bernoulli - 0.1).abs() < 0.003, "{bernoulli}");
    // Gilbert–Elliott, mean 0.0636. Successive losses are correlated (state persistence
    // λ = 1 − p − r = 0.78), which inflates the variance of the mean to ≈ 0.26/n:
    // sd = 0.0008 for n = 400,000; tolerance 0.004 (5 sd).
    let ge = Loss::GilbertElliott(BurstLoss {
        p_good_to_bad: 0.02,
        p_bad_to_good: 0.2,
        loss_good: 0.01,
        loss_bad: 0.6,
    });
    let measured = loss_rate(ge, 400_000);
    assert!(
        (measured - ge.mean_rate()).abs() < 0.004,
        "{measured} vs {}",
        ge.mean_rate()
    );
}

#[test]
fn gilbert_elliott_losses_come_in_bursts_of_the_configured_length() {
    // Classic Gilbert (everything lost in the bad state): a loss burst is a bad spell,
    // geometric with mean 1/r = 4. About 8,300 bursts in 200,000 datagrams; the sd of a burst
    // is 3.5, so the mean's sd is 0.04; tolerance 0.2 (5 sd).
    let mut link = shaper(LinkModel {
        loss: Some(Loss::GilbertElliott(BurstLoss {
            p_good_to_bad: 0.05,
            p_bad_to_good: 0.25,
            loss_good: 0.0,
            loss_bad: 1.0,
        })),
        ..LinkModel::default()
    });
    let mut lost_in_a_row = Vec::new();
    let mut run = 0;
    for i in 0..200_000u32 {
        let now = ms(f64::from(i) * 0.01);
        link.arrive(now, 100, i).unwrap();
        if drain(&mut link, as_ms(now)).is_empty() {
            run += 1;
        } else if run > 0 {
            lost_in_a_row.push(f64::from(run));
            run = 0;
        }
    }
    let (mean_burst, _) = mean_sd(&lost_in_a_row);
    assert!(lost_in_a_row.len() > 7000, "{}", lost_in_a_row.len());
    assert!((mean_burst - 4.0).abs() < 0.2, "{mean_burst}");
}

#[test]
fn jitter_is_uniform_and_never_reorders_unless_asked() {
    let delays = |reorder: bool, spacing_ms: f64| {
        let mut link = shaper(LinkModel {
            delay_ms: 30.0,
            jitter_ms: 10.0,
            reorder,
            ..LinkModel::default()
        });
        let mut deliveries = Vec::new();
        for i in 0..20_000u32 {
            let now = f64::from(i) * spacing_ms;
            link.arrive(ms(now), 100, i).unwrap();
            deliveries.extend(drain(&mut link, now));
        }
        deliveries.extend(drain(&mut link, 1e9));
        let in_order = deliveries.windows(2).all(|w| w[0].0 < w[1].0);
        let delays: Vec<f64> = deliveries
            .iter()
            .map(|&(i, at)| at - f64::from(i) * spacing_ms)
            .collect();
        (delays, in_order)
    };
    // Uniform on [20, 40]: mean 30, sd 10/√3 = 5.77. With 20,000 draws the mean's sd is
    // 0.04 and the sd's about 0.03; tolerances 0.2.
    for (reorder, spacing) in [(true, 1.0), (false, 25.0)] {
        let (d, in_order) = delays(reorder, spacing);
        let (mean, sd) = mean_sd(&d);
        assert!((mean - 30.0).abs() < 0.2, "reorder {reorder}: mean {mean}");
        assert!(
            (sd - 10.0 / 3f64.sqrt()).abs() < 0.2,
            "reorder {reorder}: sd {sd}"
        );
        assert!(d.iter().all(|&x| (20.0..=40.0).contains(&x)));
        // Datagrams 25 ms apart never catch up with each other; 1 ms apart, they do.
        assert_eq!(in_order, !reorder);
    }
    // Dense traffic without reordering: held back behind earlier datagrams, never early.
    let (d, in_order) = delays(false, 1.0);
    assert!(in_order);
    assert!(d.iter().all(|&x| (20.0..=40.0).contains(&x)));
    assert!(mean_sd(&d).0 > 31.0, "holding back skews delays up");
}

#[test]
fn an_outage_drops_the_queue_and_arrivals_then_the_link_resumes() {
    let mut link = shaper(limited(constant(12.0)));
    link.schedule_outage(ms(5.0), ms(10.0));
    for i in 0..10 {
        link.arrive(ms(0.0), 1500, i).unwrap();
    }
    // Departures at 1..=5 ms leave before the cut; 5 are still queued when it comes.
    assert_eq!(drain(&mut link, 8.0).len(), 5);
    assert_eq!(link.stats().dropped_outage, 5);
    assert_eq!(link.arrive(ms(8.0), 1500, 10), Err(DropCause::Outage));
    // The link is back at 15 ms, at its rate: idle capacity during the cut is not banked.
    link.arrive(ms(15.0), 1500, 11).unwrap();
    assert_eq!(drain(&mut link, 100.0), [(11, 16.0)]);

    // The same at run time, with a datagram in flight: one that already left the bottleneck
    // still arrives.
    let mut link = shaper(LinkModel {
        delay_ms: 50.0,
        ..limited(constant(12.0))
    });
    link.arrive(ms(0.0), 1500, 0).unwrap();
    link.arrive(ms(0.0), 1500, 1).unwrap();
    link.set_outage(ms(1.5), true);
    assert_eq!(link.arrive(ms(2.0), 1500, 2), Err(DropCause::Outage));
    link.set_outage(ms(3.0), false);
    link.arrive(ms(3.0), 1500, 3).unwrap();
    assert_eq!(drain(&mut link, 100.0), [(0, 51.0), (3, 54.0)]);
    assert_eq!(link.stats().dropped_outage, 2);
}

#[test]
fn a_switch_carries_on_with_the_partly_sent_datagram() {
    // 12 Mbit/s (1 ms per 1500-byte datagram), then 6 Mbit/s from 1.5 ms: datagram 1 is half
    // sent, its other half takes 1 ms at the new rate; datagram 2 then takes 2 ms.
    let mut link = shaper(limited(constant(12.0)));
    link.schedule_switch(ms(1.5), limited(constant(6.0)))
        .unwrap();
    for i in 0..3 {
        link.arrive(ms(0.0), 1500, i).unwrap();
    }
    assert_eq!(drain(&mut link, 100.0), [(0, 1.0), (1, 2.5), (2, 4.5)]);

    // A Mahimahi trace starts at the switch: one opportunity per ms from 1.5 + 1 ms.
    let mut link = shaper(limited(constant(12.0)));
    for i in 0..3 {
        link.arrive(ms(0.0), 1500, i).unwrap();
    }
    link.replace_model(ms(1.5), limited(mahimahi(&[1], 1)))
        .unwrap();
    assert_eq!(drain(&mut link, 100.0), [(0, 1.0), (1, 2.5), (2, 3.5)]);
}

#[test]
fn a_seed_makes_a_run_reproducible() {
    let run = |seed: u64, direction: Direction| {
        let mut link = Shaper::new(
            LinkModel {
                delay_ms: 20.0,
                jitter_ms: 5.0,
                reorder: true,
                loss: Some(Loss::Bernoulli { p: 0.2 }),
                ..limited(constant(50.0))
            },
            seed,
            direction,
        )
        .unwrap();
        (0..1000u32)
            .flat_map(|i| {
                link.arrive(ms(f64::from(i)), 1200, i).unwrap();
                drain(&mut link, f64::from(i))
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(3, Direction::Uplink), run(3, Direction::Uplink));
    assert_ne!(run(3, Direction::Uplink), run(4, Direction::Uplink));
    assert_ne!(run(3, Direction::Uplink), run(3, Direction::Downlink));
}

// ---------------------------------------------------------------------------------------------
// Configs

#[test]
fn shipped_link_configs_load_and_run() {
    let dir = crate_dir().join("../configs/links");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let config = LinkConfig::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
        for direction in [Direction::Uplink, Direction::Downlink] {
            config
                .shaper::<()>(direction)
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        }
        names.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    for wanted in [
        "3g.toml",
        "lossy.toml",
        "lte-to-3g.toml",
        "lte.toml",
        "outage.toml",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing from {names:?}"
        );
    }
}

#[test]
fn bad_configs_name_the_field_or_file() {
    let unknown = config_error("[uplink]\ndely_ms = 3\n[downlink]\n");
    assert!(
        unknown.contains("dely_ms") && unknown.contains("line 2"),
        "{unknown}"
    );
    let missing = config_error("[uplink]\n");
    assert!(missing.contains("downlink"), "{missing}");
    let jitter = config_error("[uplink]\ndelay_ms = 5\njitter_ms = 8\n[downlink]\n");
    assert!(jitter.contains("uplink.jitter_ms"), "{jitter}");
    let loss = config_error("[uplink]\n[downlink]\nloss = { kind = \"bernoulli\", p = 1.5 }\n");
    assert!(loss.contains("downlink.loss.p"), "{loss}");
    let kind = config_error("[uplink]\nloss = { kind = \"burst\", p = 0.1 }\n[downlink]\n");
    assert!(kind.contains("burst"), "{kind}");
    let ge = "{ kind = \"gilbert-elliott\", p_good_to_bad = 0.1, p_bad_to_good = 0.5";
    let typo = config_error(&format!(
        "[uplink]\nloss = {ge}, los_bad = 0.5 }}\n[downlink]\n"
    ));
    assert!(typo.contains("los_bad"), "{typo}");
    let stuck = config_error(&format!(
        "[uplink]\n[downlink]\nloss = {ge}, loss_good = 2 }}\n"
    ));
    assert!(stuck.contains("downlink.loss.loss_good"), "{stuck}");
    // loss_good defaults to 0 and loss_bad to 1: a sixth of the datagrams lost on average.
    let mean = config(&format!("[uplink]\nloss = {ge} }}\n[downlink]\n"))
        .uplink
        .loss
        .unwrap();
    assert!((mean.mean_rate() - 1.0 / 6.0).abs() < 1e-12);
    let outage = config_error("[uplink]\n[downlink]\n[[outages]]\nat_s = 1\nduration_s = 0\n");
    assert!(outage.contains("outages[0].duration_s"), "{outage}");
    let switch = config_error("[uplink]\n[downlink]\n[[switches]]\nat_s = 1\n");
    assert!(switch.contains("switches[0] names neither"), "{switch}");
    let nested =
        config_error("[uplink]\n[downlink]\n[[switches]]\nat_s = 1\nuplink = { delay_ms = -1 }\n");
    assert!(nested.contains("switches[0].uplink.delay_ms"), "{nested}");

    // A config file's own name comes first.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[uplink]\nqueue = { packets = 0 }\n[downlink]\n").unwrap();
    let e = format!("{:#}", LinkConfig::load(&path).unwrap_err());
    assert!(
        e.starts_with(&path.display().to_string()) && e.contains("queue"),
        "{e}"
    );

    // Trace errors name the direction, the trace file and the line.
    let missing_trace =
        config("[uplink]\n[downlink]\nrate = { kind = \"mahimahi\", path = \"no/such.down\" }\n");
    let e = format!(
        "{:#}",
        missing_trace
            .shaper::<()>(Direction::Downlink)
            .err()
            .unwrap()
    );
    assert!(e.contains("downlink") && e.contains("no/such.down"), "{e}");
    std::fs::write(dir.path().join("bad.up"), "1\n2\nfast\n").unwrap();
    let bad_trace = LinkConfig::from_toml(
        "[uplink]\nrate = { kind = \"mahimahi\", path = \"bad.up\" }\n[downlink]\n",
        dir.path(),
    )
    .unwrap();
    let e = format!(
        "{:#}",
        bad_trace.shaper::<()>(Direction::Uplink).err().unwrap()
    );
    assert!(e.contains("bad.up:3") && e.contains("fast"), "{e}");
    let zero = config("[uplink]\nrate = { kind = \"constant\", rate_mbps = 0 }\n[downlink]\n");
    let e = format!("{:#}", zero.shaper::<()>(Direction::Uplink).err().unwrap());
    assert!(
        e.contains("uplink: rate") && e.contains("must be > 0"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// The relay, with real datagrams

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
        rate: Some(splitee_link::network::TraceSource::Constant { rate_mbps: 6.0 }),
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
        rate: Some(splitee_link::network::TraceSource::Mahimahi {
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
