//! Offload round trips on loopback through a real worker (quinn + rustls, shared MiniLM):
//!
//! 1. Latency of one request at a time for sequence lengths 16/64/128 and each encoding,
//!    broken into serialize (edge: encode payload + frame), transfer (what is left of the round
//!    trip: QUIC, TLS, copies, both directions), deserialize (worker: decode frame + payload,
//!    timed separately on the same frame), queue and compute (reported by the worker), against
//!    the wire floor: payload bytes at the measured loopback TCP copy rate plus the round trip
//!    of a tiny frame.
//! 2. Throughput with 1, 8 and 32 concurrent clients (dynamic batching at work) against the
//!    single-request compute bound (1 / compute time of a batch of one).
//!
//! `cargo bench --workspace --bench offload`. Numbers are for whatever machine runs it;
//! client and worker share its cores.
//!
//! The worker computes on `SPLITEE_BENCH_BACKEND` (`flex` when unset; `ndarray`; `wgpu`, in a
//! build with `--features cloud-worker/wgpu`, refusing a software rasterizer unless
//! `SPLITEE_WGPU_ALLOW_SOFTWARE=1`, as the worker does); the edge half always runs on flex:
//!
//! `SPLITEE_BENCH_BACKEND=wgpu cargo bench -p cloud-worker --features wgpu --bench offload`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::prelude::*;
use cloud_worker::{CertOptions, Worker, WorkerConfig};
use splitee_model::{BackendChoice, ModelDir};
use splitee_protocol::{
    MAGIC, OffloadRequest, PROTOCOL_VERSION, PayloadEncoding, ReplyOptions, Response,
    decode_request, encode_hidden, encode_request,
};
use splitee_service::transport::{self, Connection};

const SPLIT: usize = 3;
const HIDDEN: usize = 384;
const ROUNDS: usize = 40;
const THROUGHPUT_SECONDS: f64 = 3.0;
/// Longer than any exchange here: a timeout is a failure, not a measurement.
const TIMEOUT: Duration = Duration::from_secs(60);

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Bytes per second through a loopback TCP connection (kernel copy both ways).
fn loopback_rate() -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    const TOTAL: usize = 512 << 20;
    let reader = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buffer = vec![0u8; 1 << 20];
        let mut read = 0;
        while read < TOTAL {
            read += stream.read(&mut buffer).unwrap();
        }
    });
    let mut stream = TcpStream::connect(addr).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let started = Instant::now();
    for _ in 0..TOTAL / chunk.len() {
        stream.write_all(&chunk).unwrap();
    }
    reader.join().unwrap();
    TOTAL as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    let backend: BackendChoice = std::env::var("SPLITEE_BENCH_BACKEND")
        .unwrap_or_else(|_| "flex".into())
        .parse()
        .unwrap_or_else(|e| panic!("SPLITEE_BENCH_BACKEND: {e}"));
    // The edge half (building the requests) on the CPU; the worker on the backend measured.
    let device = BackendChoice::Flex.device().unwrap();
    let worker_device = backend
        .select(cloud_worker::WHEN_BACKEND_UNAVAILABLE)
        .unwrap_or_else(|why| panic!("SPLITEE_BENCH_BACKEND={backend}: {why}"))
        .device;
    if backend == BackendChoice::Wgpu {
        println!(
            "worker on wgpu: {}",
            splitee_model::device::gpu_adapter().unwrap()
        );
    }
    let load_model = |device: &Device| {
        ModelDir::open(&shared.join("models/all-MiniLM-L6-v2"))
            .unwrap()
            .load(device)
            .unwrap()
    };
    let edge_loaded = load_model(&device);
    let edge = edge_loaded.model.clone();
    let fingerprint = edge_loaded.fingerprint.0;
    let loaded = load_model(&worker_device);
    assert_eq!(loaded.fingerprint.0, fingerprint);
    let dir = tempfile::tempdir().unwrap();
    let certs = cloud_worker::gen_certs(&CertOptions {
        out_dir: dir.path().to_owned(),
        ..CertOptions::default()
    })
    .unwrap();
    let mut config = WorkerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        ..WorkerConfig::default()
    };
    config.tls.cert = certs.server_cert.clone();
    config.tls.key = certs.server_key.clone();
    config.tls.client_ca = Some(certs.worker_client_ca.clone());
    config.batching.max_batch_size = 32;
    // A lone request does not wait for company: the latency table measures the path itself.
    config.batching.max_wait_us = 0;

    // Edge-side hidden states after layer SPLIT for an input of exactly `len` tokens.
    let states = |len: usize| -> Vec<f32> {
        let ids: Vec<i64> = (0..len)
            .map(|i| match i {
                0 => 101,
                i if i == len - 1 => 102,
                i => 2000 + (i as i64 * 37) % 5000,
            })
            .collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), &device);
        let hidden = edge.embed(ids, None).unwrap();
        let hidden = edge.run_layers(hidden, 0..SPLIT).unwrap();
        hidden.states.into_data().try_into_vec_as::<f32>().unwrap()
    };
    let request = |values: &[f32], encoding, request_id| OffloadRequest {
        request_id,
        fingerprint,
        deadline_ms: TIMEOUT.as_millis() as u32,
        split_layer: SPLIT as u16,
        seq_len: (values.len() / HIDDEN) as u32,
        encoding,
        options: ReplyOptions::default(),
        payload: encode_hidden(values, HIDDEN, encoding),
    };

    println!("measuring the loopback copy rate…");
    let rate = loopback_rate();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let worker = Worker::start(&config, loaded, worker_device.clone())
            .await
            .unwrap();
        let addr = worker.local_addr();
        let client = || {
            let roots = transport::load_certs(&certs.agent_ca).unwrap();
            let identity = Some((
                transport::load_certs(&certs.client_cert).unwrap(),
                transport::load_key(&certs.client_key).unwrap(),
            ));
            transport::client_endpoint(
                "127.0.0.1:0".parse().unwrap(),
                transport::client_config(roots, identity, transport::IDLE_TIMEOUT).unwrap(),
            )
            .unwrap()
        };
        let endpoint = client();
        let connection = transport::connect(&endpoint, addr, "localhost").await.unwrap();

        // Round trip of a tiny frame: an 11-byte header the worker refuses at once.
        let mut tiny = MAGIC.to_vec();
        tiny.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        tiny.extend_from_slice(&[9, 0, 0, 0, 0]);
        let mut rtts = Vec::new();
        for _ in 0..300 {
            let started = Instant::now();
            let response = transport::exchange(&connection, &tiny, TIMEOUT).await.unwrap();
            assert!(matches!(response, Response::Error(_)));
            rtts.push(started.elapsed().as_secs_f64());
        }
        let rtt = median(rtts);

        println!(
            "\nsplit after layer {SPLIT} (the worker runs layers {}..6), one request at a time, \
             medians of {ROUNDS}; loopback copy rate {:.2} GB/s, tiny-frame RTT {:.0} µs\n",
            SPLIT + 1,
            rate / 1e9,
            rtt * 1e6
        );
        println!(
            "seq | encoding | payload KB | serialize µs | transfer µs | deserialize µs | queue µs | compute µs | round trip µs | wire floor µs | transfer / floor"
        );
        println!("---|---|---|---|---|---|---|---|---|---|---");
        let mut compute_64 = 0.0;
        let mut id = 0;
        for len in [16, 64, 128] {
            let values = states(len);
            for encoding in PayloadEncoding::ALL {
                let (mut ser, mut transfer, mut de, mut queue, mut compute, mut total) =
                    (vec![], vec![], vec![], vec![], vec![], vec![]);
                let mut payload_bytes = 0;
                for round in 0..ROUNDS + 5 {
                    id += 1;
                    let started = Instant::now();
                    let req = request(&values, encoding, id);
                    let frame = encode_request(&req);
                    let serialized = started.elapsed().as_secs_f64();
                    let sent = Instant::now();
                    let response = transport::exchange(&connection, &frame, TIMEOUT).await.unwrap();
                    let round_trip = sent.elapsed().as_secs_f64();
                    let Response::Answer(answer) = response else {
                        panic!("{response:?}")
                    };
                    // The worker's decoding of this very frame, timed here.
                    let decoding = Instant::now();
                    let decoded = decode_request(&frame, usize::MAX).unwrap();
                    std::hint::black_box(decoded.hidden_states(HIDDEN).unwrap());
                    let deserialized = decoding.elapsed().as_secs_f64();
                    if round < 5 {
                        continue; // warm-up
                    }
                    payload_bytes = req.payload.len();
                    let q = answer.queue_us as f64 * 1e-6;
                    let c = answer.compute_us as f64 * 1e-6;
                    ser.push(serialized);
                    de.push(deserialized);
                    queue.push(q);
                    compute.push(c);
                    total.push(round_trip);
                    transfer.push((round_trip - q - c - deserialized).max(0.0));
                }
                let floor = payload_bytes as f64 / rate + rtt;
                let transfer = median(transfer);
                if len == 64 && encoding == PayloadEncoding::F32 {
                    compute_64 = median(compute.clone());
                }
                println!(
                    "{len} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1}×",
                    encoding.name(),
                    payload_bytes as f64 / 1e3,
                    median(ser) * 1e6,
                    transfer * 1e6,
                    median(de) * 1e6,
                    median(queue) * 1e6,
                    median(compute) * 1e6,
                    median(total) * 1e6,
                    floor * 1e6,
                    transfer / floor
                );
            }
        }
        worker.shutdown().await.unwrap();

        // Throughput: a worker that waits up to 1 ms for batches to fill.
        let mut config = config.clone();
        config.batching.max_wait_us = 1_000;
        let loaded = load_model(&worker_device);
        let worker = Worker::start(&config, loaded, worker_device.clone())
            .await
            .unwrap();
        let addr = worker.local_addr();
        let values = states(64);
        let template = request(&values, PayloadEncoding::F32, 0);
        println!(
            "\nthroughput, sequence 64, f32, split after layer {SPLIT}, max batch 32, max wait 1 ms; \
             single-request compute bound {:.0} requests/s (1 / {:.0} µs)\n",
            1.0 / compute_64,
            compute_64 * 1e6
        );
        println!("concurrent clients | requests/s | × compute bound | mean batch | median latency ms");
        println!("---|---|---|---|---");
        for clients in [1usize, 8, 32] {
            let deadline = Instant::now() + Duration::from_secs_f64(THROUGHPUT_SECONDS);
            let mut tasks = tokio::task::JoinSet::new();
            for c in 0..clients {
                let endpoint = client();
                let template = template.clone();
                tasks.spawn(async move {
                    let connection: Connection =
                        transport::connect(&endpoint, addr, "localhost").await.unwrap();
                    let (mut done, mut batch_sum, mut latencies) = (0u64, 0u64, Vec::new());
                    while Instant::now() < deadline {
                        let mut req = template.clone();
                        req.request_id = (c as u64) << 32 | done;
                        let started = Instant::now();
                        match transport::offload(&connection, &req, TIMEOUT).await.unwrap() {
                            Response::Answer(answer) => {
                                done += 1;
                                batch_sum += u64::from(answer.batch_size);
                                latencies.push(started.elapsed().as_secs_f64());
                            }
                            other => panic!("{other:?}"),
                        }
                    }
                    connection.close(0u32.into(), b"done");
                    (done, batch_sum, latencies)
                });
            }
            let started = Instant::now();
            let (mut done, mut batch_sum, mut latencies) = (0, 0, Vec::new());
            while let Some(result) = tasks.join_next().await {
                let (d, b, l) = result.unwrap();
                done += d;
                batch_sum += b;
                latencies.extend(l);
            }
            let elapsed = started.elapsed().as_secs_f64();
            let rate = done as f64 / elapsed;
            println!(
                "{clients} | {rate:.0} | {:.2} | {:.1} | {:.1}",
                rate * compute_64,
                batch_sum as f64 / done as f64,
                median(latencies) * 1e3
            );
        }
        worker.shutdown().await.unwrap();
    });
}
