//! One hostile connection against a well-behaved agent on the same worker, with the worker's
//! default limits: the agent's cloud rate under attack stays at least 90 % of its undisturbed
//! rate.
//!
//! The hostile connection (from another loopback address, so another peer) does at once what
//! was measured to deny service before: streams that send a frame header announcing the
//! largest body and then nothing (they held every admission slot), streams that send 90 % of
//! such a body and stall (each allocated the whole announced size), and a flood of valid,
//! expensive requests (no layer run on the edge, 64 tokens) sent back to back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use splitee_protocol::{
    self as protocol, Limits, MAGIC, OffloadRequest, PROTOCOL_VERSION, PayloadEncoding,
    ReplyOptions,
};
use splitee_service::transport::{self, Connection};
use tokio::task::JoinSet;

use super::*;

const SAMPLES: usize = 150;
const HEADER_ONLY_STREAMS: usize = 200;
const STALLED_BODY_STREAMS: usize = 200;
const FLOODING_STREAMS: usize = 16;

/// What the hostile connection got done.
#[derive(Debug, Default)]
struct HostileCounts {
    streams_opened: AtomicU64,
    flood_answers: AtomicU64,
}

struct Hostile {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    connection: Connection,
    counts: Arc<HostileCounts>,
    _endpoint: transport::Endpoint,
}

fn frame_header(body_len: usize) -> Vec<u8> {
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header.push(1); // a request
    header.extend_from_slice(&(body_len as u32).to_le_bytes());
    header
}

impl Hostile {
    async fn start(certs: &GeneratedCerts, worker: std::net::SocketAddr) -> Self {
        let roots = transport::load_certs(&certs.ca_cert).unwrap();
        let identity = Some((
            transport::load_certs(&certs.client_cert).unwrap(),
            transport::load_key(&certs.client_key).unwrap(),
        ));
        let endpoint = transport::client_endpoint(
            "127.0.0.2:0".parse().unwrap(),
            transport::client_config(roots, identity, transport::IDLE_TIMEOUT).unwrap(),
        )
        .unwrap();
        let connection = transport::connect(&endpoint, worker, "localhost")
            .await
            .unwrap();
        let largest_body = Limits::for_model(384, 6, 512).max_body_bytes;
        let stop = CancellationToken::new();
        let counts = Arc::new(HostileCounts::default());
        let mut tasks = JoinSet::new();
        // Holds a stream open with `prefix` sent until the worker ends it, then again.
        let mut hold = |prefix: Vec<u8>| {
            let (connection, stop, counts) = (connection.clone(), stop.clone(), counts.clone());
            tasks.spawn(async move {
                let attack = async {
                    loop {
                        let Ok((mut send, mut recv)) = connection.open_bi().await else {
                            return;
                        };
                        counts.streams_opened.fetch_add(1, Ordering::Relaxed);
                        let _ = send.write_all(&prefix).await;
                        let _ = recv.read_to_end(1 << 16).await;
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = attack => {}
                }
            });
        };
        for _ in 0..HEADER_ONLY_STREAMS {
            hold(frame_header(largest_body));
        }
        let mut stalled = frame_header(largest_body);
        stalled.resize(stalled.len() + largest_body * 9 / 10, 0);
        for _ in 0..STALLED_BODY_STREAMS {
            hold(stalled.clone());
        }
        let fingerprint = load_model().fingerprint.0;
        let tokens = 64;
        let values: Vec<f32> = (0..tokens * 384).map(|i| (i as f32 * 0.01).sin()).collect();
        let heavy = protocol::encode_request(&OffloadRequest {
            request_id: 0,
            fingerprint,
            deadline_ms: 10_000,
            split_layer: 0,
            seq_len: tokens as u32,
            encoding: PayloadEncoding::F32,
            options: ReplyOptions::default(),
            payload: protocol::encode_hidden(&values, 384, PayloadEncoding::F32),
        });
        for _ in 0..FLOODING_STREAMS {
            let (connection, stop, counts, heavy) = (
                connection.clone(),
                stop.clone(),
                counts.clone(),
                heavy.clone(),
            );
            tasks.spawn(async move {
                let flood = async {
                    loop {
                        counts.streams_opened.fetch_add(1, Ordering::Relaxed);
                        let timeout = Duration::from_secs(10);
                        match transport::exchange(&connection, &heavy, timeout).await {
                            Ok(protocol::Response::Answer(_)) => {
                                counts.flood_answers.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = flood => {}
                }
            });
        }
        Self {
            stop,
            tasks,
            connection,
            counts,
            _endpoint: endpoint,
        }
    }

    async fn stop(mut self) -> Arc<HostileCounts> {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.connection.close(0u32.into(), b"done");
        self.counts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hostile_connection_cannot_starve_a_well_behaved_agent() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let worker = start_worker(&certs, "127.0.0.1:0").await;
    // Every sample is offloaded (α = 1 is never reached on the device).
    let config = agent_config(
        Some((&certs, worker.local_addr())),
        "[arms]\nsplits = [2]\nthresholds = [1.0]\n[policy]\nkind = \"fixed\"\narm = 0\n",
    );
    let mut agent = Agent::start(&config, device(), Arc::new(Metrics::new()), true)
        .await
        .unwrap();
    let cloud_rate = |summary: &Summary| summary.in_cloud as f64 / SAMPLES as f64;
    let (_, undisturbed) = run(&mut agent, sentences(SAMPLES), |_, _| {}).await;

    let hostile = Hostile::start(&certs, worker.local_addr()).await;
    // Let the hostile connection take whatever the worker lets it take.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (records, attacked) = run(&mut agent, sentences(SAMPLES), |_, _| {}).await;
    let counts = hostile.stop().await;
    println!(
        "cloud rate undisturbed {:.3}, under attack {:.3} (fallbacks {:?}); the hostile \
         connection opened {} streams and got {} answers to its flood",
        cloud_rate(&undisturbed),
        cloud_rate(&attacked),
        attacked.fallback_reasons,
        counts.streams_opened.load(Ordering::Relaxed),
        counts.flood_answers.load(Ordering::Relaxed),
    );
    assert_each_answered_once(&records, SAMPLES);
    assert!(
        cloud_rate(&attacked) >= 0.9 * cloud_rate(&undisturbed),
        "under attack the cloud answered {:.3} of the samples, undisturbed {:.3}: {attacked:?}",
        cloud_rate(&attacked),
        cloud_rate(&undisturbed)
    );
    agent.shutdown().await.unwrap();
    worker.shutdown().await.unwrap();
}
