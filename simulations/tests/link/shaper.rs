//! The sans-IO core in simulated time.

use super::*;

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
