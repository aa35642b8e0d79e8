//! What the edge agent's integration tests (and the `serve` benchmark) share: the repository's
//! default model, the shared labelled sentences, certificates and a real cloud worker on
//! loopback. Each crate that includes this uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::prelude::*;
use cloud_worker::{CertOptions, GeneratedCerts, Worker, WorkerConfig};
use edge_agent::input::{self, InputRecord};
use splitee_model::{BackendChoice, LoadedModel, ModelDir};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_dir() -> PathBuf {
    repo().join("models/default")
}

pub fn device() -> Device {
    BackendChoice::Flex.device().unwrap()
}

/// The shared test split of sentence polarity (labelled).
pub fn sentences_path() -> PathBuf {
    repo().join("../shared/data/sentence-polarity/test.tsv")
}

/// The first `n` labelled sentences of the shared test split.
pub fn sentences(n: usize) -> Vec<InputRecord> {
    let records = read_tsv(&sentences_path(), n);
    assert_eq!(records.len(), n);
    records
}

/// At most `limit` samples of a GLUE-style TSV file.
pub fn read_tsv(path: &Path, limit: usize) -> Vec<InputRecord> {
    input::read_tsv_file(path, limit)
        .unwrap_or_else(|e| panic!("{e:#} (the tests need ../shared beside the repository)"))
}

pub fn certs(dir: &Path) -> GeneratedCerts {
    cloud_worker::gen_certs(&CertOptions {
        out_dir: dir.to_owned(),
        ..CertOptions::default()
    })
    .unwrap()
}

pub fn load_model() -> LoadedModel {
    ModelDir::open(&model_dir())
        .unwrap()
        .load(&device())
        .unwrap()
}

/// A worker on `listen` with the test certificates; `configure` may change its config.
pub async fn start_worker(
    certs: &GeneratedCerts,
    listen: &str,
    configure: impl FnOnce(&mut WorkerConfig),
) -> Worker {
    let mut config = WorkerConfig {
        listen: listen.parse().unwrap(),
        metrics_listen: None,
        shutdown_timeout_ms: 5_000,
        ..WorkerConfig::default()
    };
    config.tls.cert = certs.server_cert.clone();
    config.tls.key = certs.server_key.clone();
    config.tls.client_ca = Some(certs.worker_client_ca.clone());
    configure(&mut config);
    let model = tokio::task::spawn_blocking(load_model).await.unwrap();
    Worker::start(&config, model, device()).await.unwrap()
}

/// An agent config's TOML on the default model; `tables` holds top-level keys and [arms],
/// [policy], … as TOML (the [cloud] table comes after them).
pub fn agent_toml(cloud: Option<(&GeneratedCerts, std::net::SocketAddr)>, tables: &str) -> String {
    let mut text = format!("model = {:?}\n{tables}\n", model_dir().to_str().unwrap());
    if let Some((certs, address)) = cloud {
        text.push_str(&format!(
            "[cloud]\naddress = \"{address}\"\nca = {:?}\nclient_cert = {:?}\n\
             client_key = {:?}\nencoding = \"f32\"\nrequest_timeout_ms = 3000\n\
             connect_timeout_ms = 300\nbackoff_initial_ms = 100\nbackoff_max_ms = 400\n",
            certs.agent_ca, certs.client_cert, certs.client_key
        ));
    }
    text
}
