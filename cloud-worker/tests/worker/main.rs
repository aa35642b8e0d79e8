//! Cloud-worker integration tests: a real worker on loopback (quinn + rustls, certificates
//! from `gen-certs`) and real clients, on the shared all-MiniLM-L6-v2 weights. One test binary
//! (modules below) because each binary links all of burn.

mod bad_input;
mod caps;
mod cli;
mod deadline;
mod encoding_accuracy;
mod load;
mod mtls;
mod quic_lb;
mod readiness;
mod roundtrip;
mod shutdown;
mod signals;

use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::nn::LinearConfig;
use burn::prelude::*;
use cloud_worker::{CertOptions, GeneratedCerts, Worker, WorkerConfig};
use splitee_model::model::ExitHead;
use splitee_model::{LoadedModel, ModelDir, MultiExitBert};
use splitee_protocol::{OffloadRequest, PayloadEncoding, ReplyOptions, Response, encode_hidden};
use splitee_service::transport::{self, Connection, Endpoint};

/// How long a test client waits for an answer: far beyond anything these tests should take,
/// so that a timeout is a failure, never part of the test.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn shared_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    assert!(
        dir.join("models/all-MiniLM-L6-v2").is_dir(),
        "these tests need ../shared (pretrained weights) beside the repository root; not found \
         at {}",
        dir.display()
    );
    dir
}

pub fn device() -> Device {
    splitee_model::BackendChoice::Flex.device().unwrap()
}

/// MiniLM with *random* exit heads: its shipped heads are zero (uniform probabilities), which
/// would make every probability comparison pass whatever the hidden states were.
pub fn model_with_random_exits(device: &Device) -> LoadedModel {
    let mut loaded = ModelDir::open(&shared_dir().join("models/all-MiniLM-L6-v2"))
        .unwrap()
        .load(device)
        .unwrap();
    let hidden = loaded.model.config().hidden_size;
    let labels = loaded.model.exit_config().num_labels;
    for head in &mut loaded.model.exits.heads {
        *head = ExitHead {
            classifier: LinearConfig::new(hidden, labels).init(device),
        };
    }
    loaded
}

/// A worker under test with its certificates and the edge half of the same model.
pub struct Harness {
    pub worker: Worker,
    pub certs: GeneratedCerts,
    pub edge: MultiExitBert,
    pub tokenizer: splitee_model::Tokenizer,
    pub fingerprint: [u8; 32],
    pub device: Device,
    _dir: tempfile::TempDir,
}

pub fn test_config(certs: &GeneratedCerts) -> WorkerConfig {
    let mut config = WorkerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..WorkerConfig::default()
    };
    config.tls.cert = certs.server_cert.clone();
    config.tls.key = certs.server_key.clone();
    config.tls.client_ca = Some(certs.worker_client_ca.clone());
    config
}

pub fn gen_certs(dir: &Path) -> GeneratedCerts {
    cloud_worker::gen_certs(&CertOptions {
        out_dir: dir.to_owned(),
        ..CertOptions::default()
    })
    .unwrap()
}

impl Harness {
    /// Starts a worker; `configure` adjusts the test configuration.
    pub async fn start(configure: impl FnOnce(&mut WorkerConfig, &GeneratedCerts)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = gen_certs(dir.path());
        let mut config = test_config(&certs);
        configure(&mut config, &certs);
        let device = device();
        let loaded = model_with_random_exits(&device);
        let edge = loaded.model.clone();
        // The tokenizer goes to the worker with the model; the edge half loads its own.
        let tokenizer = loaded.dir.tokenizer().unwrap();
        let fingerprint = loaded.fingerprint.0;
        let worker = Worker::start(&config, loaded, device.clone())
            .await
            .unwrap();
        Self {
            worker,
            certs,
            edge,
            tokenizer,
            fingerprint,
            device,
            _dir: dir,
        }
    }

    /// A client endpoint trusting the test CA, presenting the test client certificate.
    pub fn client_endpoint(&self) -> Endpoint {
        client_endpoint(&self.certs, Some(&self.certs))
    }

    pub async fn connect(&self) -> Connection {
        transport::connect(
            &self.client_endpoint(),
            self.worker.local_addr(),
            "localhost",
        )
        .await
        .unwrap()
    }

    /// The edge half: embeddings and layers `0..split` of `text`, as `[seq, hidden]` f32.
    pub fn edge_states(&self, text: &str, split: usize) -> (Vec<f32>, usize) {
        let batch = self.tokenizer.batch(&[text]).unwrap();
        let (ids, mask) = batch.to_tensors(&self.device);
        let hidden = self.edge.embed(ids, mask).unwrap();
        let hidden = self.edge.run_layers(hidden, 0..split).unwrap();
        let states = hidden.states.into_data().try_into_vec_as::<f32>().unwrap();
        (states, batch.seq_len)
    }

    /// What the whole model answers locally: probabilities of the exit after `layer`.
    pub fn local_probs(&self, text: &str, layer: usize) -> Vec<f32> {
        let batch = self.tokenizer.batch(&[text]).unwrap();
        let (ids, mask) = batch.to_tensors(&self.device);
        let hidden = self.edge.embed(ids, mask).unwrap();
        let hidden = self.edge.run_layers(hidden, 0..layer).unwrap();
        self.edge
            .exit_probs(layer, &hidden)
            .unwrap()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    }

    pub fn request(
        &self,
        text: &str,
        split: usize,
        encoding: PayloadEncoding,
        request_id: u64,
    ) -> OffloadRequest {
        let (states, seq_len) = self.edge_states(text, split);
        OffloadRequest {
            request_id,
            fingerprint: self.fingerprint,
            deadline_ms: TIMEOUT.as_millis() as u32,
            split_layer: split as u16,
            seq_len: seq_len as u32,
            encoding,
            options: ReplyOptions::default(),
            payload: encode_hidden(&states, 384, encoding),
        }
    }
}

/// A client endpoint trusting `ca`'s CA and presenting `identity`'s client certificate.
pub fn client_endpoint(ca: &GeneratedCerts, identity: Option<&GeneratedCerts>) -> Endpoint {
    let roots = transport::load_certs(&ca.ca_cert).unwrap();
    let identity = identity.map(|certs| {
        (
            transport::load_certs(&certs.client_cert).unwrap(),
            transport::load_key(&certs.client_key).unwrap(),
        )
    });
    transport::client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        transport::client_config(roots, identity, transport::IDLE_TIMEOUT).unwrap(),
    )
    .unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn expect_answer(response: Response) -> splitee_protocol::Answer {
    match response {
        Response::Answer(answer) => answer,
        other => panic!("expected an answer, got {other:?}"),
    }
}

/// Plain HTTP/1.1 GET on the metrics endpoint: status code and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let text = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    })
    .await
    .unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
