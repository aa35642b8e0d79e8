//! `edge-agent serve` as a process (the binary cargo built), called over HTTP by a real client,
//! with a real cloud worker on loopback where the test needs one.

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edge_agent::metrics::Metrics;
use edge_agent::{Agent, AgentConfig};
use serde_json::{Value, json};

mod service;
mod support;
use service::{CALL_TIMEOUT, Response, Service, read};
use support::{agent_toml, certs, device, sentences, sentences_path, start_worker};

/// Texts of the shared test split, from `from`, `n` of them.
fn texts(from: usize, n: usize) -> Vec<String> {
    sentences(from + n)[from..]
        .iter()
        .map(|r| r.text.clone().unwrap())
        .collect()
}

fn results(response: &Response) -> Vec<Value> {
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()["results"].as_array().unwrap().clone()
}

/// A device pass of all six layers at the model's token limit: slow enough to hold a queue.
fn long_text() -> String {
    "a long and winding film that goes on and on , ".repeat(60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_equal_runs_on_the_same_inputs_and_every_documented_route_answers() {
    const SAMPLES: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let worker = start_worker(&certs, "127.0.0.1:0", |_| {}).await;
    // A fixed arm: each text's answer depends on the text alone, not on what came before.
    // At split 3 with α = 0.9 some texts exit on the device and the others go to the cloud.
    let config = agent_toml(
        Some((&certs, worker.local_addr())),
        "[pipeline]\nwindow = 8\n[arms]\nsplits = [3]\nthresholds = [0.9]\n\
         [policy]\nkind = \"fixed\"\narm = 0\n",
    );
    std::fs::write(dir.path().join("run.toml"), &config).unwrap();
    let output = dir.path().join("run.jsonl");
    let status = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .current_dir(support::repo())
        .args(["run", "--config"])
        .arg(dir.path().join("run.toml"))
        .arg("--input")
        .arg(sentences_path())
        .args(["--limit", &SAMPLES.to_string(), "--output"])
        .arg(&output)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let ran: Vec<Value> = read(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(ran.len(), SAMPLES);

    let service = Service::start(dir.path(), &config, &[]);
    let ready = service.call("GET", "/readyz", None).json();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["cloud"]["connected"], true, "{ready}");

    // The same texts, concurrently: four requests of eight and eight of one.
    let texts = texts(0, SAMPLES);
    let ids: Vec<String> = ran
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let served: Vec<Value> = std::thread::scope(|scope| {
        let service = &service;
        let mut calls = Vec::new();
        for chunk in 0..4 {
            let range = chunk * 8..chunk * 8 + 8;
            let body = json!({ "texts": texts[range.clone()], "ids": ids[range] });
            calls.push(scope.spawn(move || results(&service.classify(&body))));
        }
        for index in 32..SAMPLES {
            let body = json!({ "text": texts[index], "id": ids[index] });
            calls.push(scope.spawn(move || results(&service.classify(&body))));
        }
        calls
            .into_iter()
            .flat_map(|call| call.join().unwrap())
            .collect()
    });
    assert_eq!(served.len(), SAMPLES);
    let by_id: HashMap<&str, &Value> = served
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    let mut places = HashSet::new();
    for expected in &ran {
        let got = by_id[expected["id"].as_str().unwrap()];
        for field in [
            "prediction",
            "prediction_name",
            "answered",
            "exit_layer",
            "arm",
            "tokens",
            "bytes_sent",
        ] {
            assert_eq!(got[field], expected[field], "{field}: {got} vs {expected}");
        }
        // The device runs one text at a time, bit for bit the same; the cloud batches
        // concurrent requests, which moves probabilities by float rounding (padding is
        // invisible to 1e-5, ARCHITECTURE.md).
        let (a, b) = (
            got["confidence"].as_f64().unwrap(),
            expected["confidence"].as_f64().unwrap(),
        );
        match got["answered"].as_str().unwrap() {
            "device" => assert_eq!(a, b),
            _ => assert!((a - b).abs() < 1e-5, "{a} vs {b}"),
        }
        places.insert(got["answered"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        places,
        HashSet::from(["device".to_owned(), "cloud".to_owned()]),
        "both paths are compared"
    );

    // Every documented route is served (none is 404 or 405), and the document is the file.
    let document: Value =
        serde_json::from_str(&read(&support::repo().join("edge-agent/openapi.json"))).unwrap();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let response = service.call(&method.to_uppercase(), path, Some(br#"{"text": "fine"}"#));
            assert!(
                ![404, 405].contains(&response.status),
                "{method} {path}: {}",
                response.status
            );
        }
    }
    let served_document = service.call("GET", "/openapi.json", None);
    assert_eq!(served_document.json(), document);
    assert_eq!(
        service.metric("splitee_agent_api_requests_total{route=\"/v1/classify\",status=\"200\"}"),
        13.0
    );
    assert_eq!(service.metric("splitee_agent_api_texts_total"), 41.0);

    let mut service = service;
    service.signal("TERM");
    assert!(service.exit(CALL_TIMEOUT).success(), "{}", service.log());
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_load_leaves_no_text_unanswered_or_answered_twice() {
    const CLIENTS: usize = 6;
    const REQUESTS: usize = 10;
    const PER_REQUEST: usize = 4;
    const TOTAL: usize = CLIENTS * REQUESTS * PER_REQUEST;
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    // A shutdown that waits for nothing: requests in flight are cut, like a killed worker.
    let worker = start_worker(&certs, "127.0.0.1:0", |c| c.shutdown_timeout_ms = 1).await;
    let config = agent_toml(
        Some((&certs, worker.local_addr())),
        "[pipeline]\nwindow = 8\n[arms]\nsplits = [2]\nthresholds = [1.0]\n\
         [policy]\nkind = \"fixed\"\narm = 0\n",
    );
    let service = Arc::new(Service::start(dir.path(), &config, &[]));
    let all = Arc::new(texts(0, TOTAL));
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (service, all, answered) = (service.clone(), all.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for request in 0..REQUESTS {
                    let first = (client * REQUESTS + request) * PER_REQUEST;
                    let ids: Vec<String> = (first..first + PER_REQUEST)
                        .map(|i| format!("t{i}"))
                        .collect();
                    let body = json!({ "texts": all[first..first + PER_REQUEST], "ids": ids });
                    let records = results(&service.classify(&body));
                    answered.fetch_add(records.len(), Ordering::Relaxed);
                    got.push((ids, records));
                }
                got
            })
        })
        .collect();
    // A third of the way in, the worker goes.
    while answered.load(Ordering::Relaxed) < TOTAL / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    worker.shutdown().await.unwrap();
    let responses: Vec<(Vec<String>, Vec<Value>)> = tokio::task::spawn_blocking(move || {
        clients
            .into_iter()
            .flat_map(|client| client.join().unwrap())
            .collect()
    })
    .await
    .unwrap();

    let mut lines = HashSet::new();
    let mut by_place: HashMap<String, usize> = HashMap::new();
    for (ids, records) in &responses {
        assert_eq!(records.len(), ids.len());
        for (id, record) in ids.iter().zip(records) {
            assert_eq!(record["id"], id.as_str());
            assert!(record["prediction"].is_u64(), "{record}");
            assert!(
                lines.insert(record["line"].as_u64().unwrap()),
                "answered twice: {record}"
            );
            *by_place
                .entry(record["answered"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(lines.len(), TOTAL);
    // What was answered before the worker went was answered by it.
    assert!(
        by_place.get("cloud").copied().unwrap_or(0) >= TOTAL / 3,
        "{by_place:?}"
    );
    assert!(
        by_place.get("device-fallback").copied().unwrap_or(0) > 0,
        "{by_place:?}"
    );
    assert_eq!(
        by_place.values().sum::<usize>(),
        by_place["cloud"] + by_place["device-fallback"],
        "{by_place:?}"
    );
    assert_eq!(
        service.metric("splitee_agent_api_unclaimed_answers_total"),
        0.0
    );
}

#[test]
fn overflow_gets_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    // Every text runs all six layers on the device, one at a time.
    let config = agent_toml(
        None,
        "[serve]\nmax_queued_texts = 4\nmax_texts_per_request = 4\nretry_after_s = 3\n\
         [pipeline]\nwindow = 1\n\
         [arms]\nsplits = [6]\nthresholds = [1.0]\nfallback = \"exit-at-split\"\n",
    );
    let service = Service::start(dir.path(), &config, &["--unix", socket.to_str().unwrap()]);
    let long = vec![long_text(); 4];
    let first = std::thread::scope(|scope| {
        let service = &service;
        let first = scope.spawn(|| service.classify(&json!({ "texts": long })));
        service.wait_for("queued", |s| s.queued() > 0);
        // The queue holds at most four texts and the first request's are not all answered.
        let refused = service.classify(&json!({ "texts": long }));
        assert_eq!(refused.status, 429, "{}", refused.text());
        assert_eq!(refused.header("retry-after"), Some("3"));
        let message = refused.json()["error"].as_str().unwrap().to_owned();
        assert!(message.contains("serve.max_queued_texts"), "{message}");
        first.join().unwrap()
    });
    let answers = results(&first);
    assert_eq!(answers.len(), 4);
    assert!(
        answers
            .iter()
            .all(|r| r["answered"] == "device" && r["exit_layer"] == 6)
    );
    assert_eq!(answers[0]["tokens"], 512, "the texts were long");
    assert_eq!(
        service.metric("splitee_agent_api_requests_total{route=\"/v1/classify\",status=\"429\"}"),
        1.0
    );
}

#[test]
fn a_second_signal_stops_at_once_with_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    // 64 long texts, one at a time, take seconds even on a fast machine: the request cannot be
    // answered in the few milliseconds between its acceptance and the second signal, however
    // busy the machine running the test is (the deadline is far beyond that too).
    const TEXTS: usize = 64;
    let config = agent_toml(
        None,
        &format!(
            "[serve]\nmax_queued_texts = {TEXTS}\nmax_texts_per_request = {TEXTS}\n\
             [pipeline]\nwindow = 1\n\
             [arms]\nsplits = [6]\nthresholds = [1.0]\nfallback = \"exit-at-split\"\n"
        ),
    );
    let mut service = Service::start(dir.path(), &config, &[]);
    let in_flight = {
        let body = json!({ "texts": vec![long_text(); TEXTS], "deadline_ms": 600_000 });
        let (target, body) = (service.target.clone(), body.to_string());
        std::thread::spawn(move || {
            service::request(
                &target,
                "POST",
                "/v1/classify",
                Some(body.as_bytes()),
                CALL_TIMEOUT,
            )
        })
    };
    service.wait_for("queued", |s| s.queued() > 0);
    service.signal("TERM");
    service.wait_for("draining", |s| {
        s.log().contains("answering the requests in flight")
    });
    let signalled = Instant::now();
    service.signal("INT");
    let status = service.exit(CALL_TIMEOUT);
    assert_eq!(status.code(), Some(130), "{}", service.log());
    assert!(signalled.elapsed() < Duration::from_secs(2));
    let answer = in_flight.join().unwrap();
    assert!(
        answer.is_err(),
        "stopped at once, yet the request was answered: {:?}",
        answer.map(|r| r.text())
    );
}

#[test]
fn bad_requests_get_400_or_413_naming_the_problem_and_the_agent_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_toml(
        None,
        "[serve]\nmax_body_bytes = 4096\nmax_text_bytes = 1000\nmax_texts_per_request = 4\n\
         [arms]\nsplits = [2]\nthresholds = [0.9]\nfallback = \"exit-at-split\"\n",
    );
    let service = Service::start(dir.path(), &config, &[]);
    let post = |body: &[u8]| service.call("POST", "/v1/classify", Some(body));
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"{\"text\": \"a\"".to_vec(),
            400,
            "malformed request: EOF while parsing",
        ),
        (
            b"<html>".to_vec(),
            400,
            "malformed request: expected value at line 1 column 1",
        ),
        (
            b"{\"text\": [1]}".to_vec(),
            400,
            "invalid type: sequence, expected a string",
        ),
        (b"{\"texts\": \"one\"}".to_vec(), 400, "expected a sequence"),
        (
            b"{\"text\": \"a\", \"label\": 1}".to_vec(),
            400,
            "unknown field `label`",
        ),
        (b"{}".to_vec(), 400, "give `text` (one) or `texts`"),
        (b"{\"text\": \"\"}".to_vec(), 400, "`text` is empty"),
        (
            b"{\"texts\": [\"a\", \"b\", \"c\", \"d\", \"e\"]}".to_vec(),
            400,
            "at most 4",
        ),
        (
            json!({ "texts": ["fine", "x".repeat(1001)] })
                .to_string()
                .into_bytes(),
            400,
            "`texts[1]` has 1001 bytes, over the limit of 1000 (serve.max_text_bytes)",
        ),
        (
            b"{\"text\": \"\xff\xfe\"}".to_vec(),
            400,
            "malformed request: invalid unicode",
        ),
        (
            b"{\"text\": \"a\", \"deadline_ms\": 0}".to_vec(),
            400,
            "`deadline_ms` must be",
        ),
        (
            json!({ "texts": vec!["y".repeat(900); 4], "id": 1 })
                .to_string()
                .into_bytes(),
            400,
            "`id` goes with `text`",
        ),
        (
            json!({ "texts": vec!["z".repeat(999); 5] })
                .to_string()
                .into_bytes(),
            413,
            "the body is over 4096 bytes (serve.max_body_bytes)",
        ),
    ];
    for (body, status, message) in &cases {
        let response = post(body);
        assert_eq!(response.status, *status, "{}", response.text());
        let error = response.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(message), "{error} lacks {message}");
    }
    assert_eq!(service.call("GET", "/v1/classify", None).status, 405);
    let unknown = service.call("GET", "/v2/classify", None);
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.json()["error"]
            .as_str()
            .unwrap()
            .contains("/openapi.json")
    );

    // Still serving, and none of that reached the bandit.
    let good = results(&post(
        b"{\"text\": \"a gorgeous, witty film\", \"id\": \"g\"}",
    ));
    assert_eq!(
        (good[0]["id"].as_str(), good[0]["learned"].as_u64()),
        (Some("g"), Some(1))
    );
    assert_eq!(service.call("GET", "/healthz", None).text(), "ok\n");
    assert_eq!(
        service.metric("splitee_agent_api_requests_total{route=\"/v1/classify\",status=\"400\"}"),
        12.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_gets_the_devices_answer_instead_of_a_slow_clouds() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    // A lone request waits a second (the longest batching wait) for a batch to fill: a slow
    // cloud that answers.
    let worker = start_worker(&certs, "127.0.0.1:0", |c| {
        c.batching.max_batch_size = 64;
        c.batching.max_wait_us = 1_000_000;
    })
    .await;
    let config = agent_toml(
        Some((&certs, worker.local_addr())),
        "[serve]\ndeadline_grace_ms = 100\n[pipeline]\nwindow = 1\n\
         [arms]\nsplits = [2]\nthresholds = [1.0]\n[policy]\nkind = \"fixed\"\narm = 0\n",
    );
    let service = Service::start(dir.path(), &config, &[]);
    let few = texts(0, 3);

    // Without a deadline (the default, 10 s) the cloud's answer is waited for; meanwhile a
    // text behind it in the pipeline gets its deadline's error in time, not the answer late.
    std::thread::scope(|scope| {
        let service = &service;
        let slow = scope.spawn(|| service.classify(&json!({ "text": few[0] })));
        service.wait_for("queued", |s| s.queued() > 0);
        let sent = Instant::now();
        let stuck = results(&service.classify(&json!({ "text": few[1], "deadline_ms": 300 })));
        assert!(
            sent.elapsed() < Duration::from_millis(1_500),
            "{:?}",
            sent.elapsed()
        );
        assert_eq!(stuck[0]["answered"], "error");
        assert_eq!(
            stuck[0]["error"],
            "deadline: no answer within the request's 300 ms"
        );
        let slow = results(&slow.join().unwrap());
        assert_eq!(slow[0]["answered"], "cloud", "{}", slow[0]);
    });

    // With one: the first text's offload is cut at the deadline and the device answers at
    // the split; the others, not started by then, are not run.
    let sent = Instant::now();
    let cut = results(&service.classify(&json!({ "texts": few, "deadline_ms": 400 })));
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1_500),
        "{took:?}"
    );
    assert_eq!(cut[0]["answered"], "device-fallback", "{}", cut[0]);
    assert_eq!(cut[0]["exit_layer"], 2);
    assert!(cut[0]["prediction"].is_u64());
    assert!(
        cut[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("deadline: no answer by the request's deadline")
    );
    assert!(cut[0]["learned"].is_u64(), "the bandit learnt from it");
    for late in &cut[1..] {
        assert_eq!(late["answered"], "error");
        assert_eq!(
            late["error"],
            "deadline: it passed before the device started this sample"
        );
        assert!(late.get("learned").is_none(), "the bandit never saw it");
    }
    // The text that missed its deadline behind the slow one was answered once, unclaimed.
    assert_eq!(
        service.metric("splitee_agent_api_unclaimed_answers_total"),
        1.0
    );
    assert_eq!(
        service.metric("splitee_agent_offload_failures_total{reason=\"deadline\"}"),
        1.0
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_answers_the_requests_in_flight_saves_the_state_and_exits_0() {
    const CLIENTS: usize = 4;
    const PER_REQUEST: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let config = agent_toml(
        None,
        &format!(
            "state_file = {:?}\nsave_state_every = 1000\n\
             [arms]\nsplits = \"exits\"\nthresholds = [0.8, 0.9]\nfallback = \"exit-at-split\"\n\
             [policy]\nkind = \"ucb1\"\n",
            state.to_str().unwrap()
        ),
    );
    let mut service = Service::start(dir.path(), &config, &[]);
    // Short texts and long ones (all of the device's layers at 512 tokens, for some arms),
    // so that the signal surely comes with work in flight.
    let mut all = texts(0, CLIENTS * PER_REQUEST);
    for text in all.iter_mut().step_by(4) {
        *text = long_text();
    }
    let responses: Vec<Response> = std::thread::scope(|scope| {
        let service = &service;
        let calls: Vec<_> = all
            .chunks(PER_REQUEST)
            .map(|chunk| scope.spawn(move || service.classify(&json!({ "texts": chunk }))))
            .collect();
        service.wait_for("every request accepted", |s| {
            s.metric("splitee_agent_api_texts_total") == (CLIENTS * PER_REQUEST) as f64
        });
        assert!(
            service.queued() > 0,
            "the texts were answered before the signal"
        );
        service.signal("TERM");
        // From now on nothing new is taken: new connections are refused.
        service.wait_for("refusing", |s| s.try_call("GET", "/healthz", None).is_err());
        assert!(
            service
                .try_call("POST", "/v1/classify", Some(br#"{"text": "late"}"#))
                .is_err()
        );
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let mut answered = 0;
    for response in &responses {
        let records = results(response);
        assert_eq!(records.len(), PER_REQUEST);
        assert!(
            records.iter().all(|r| r["answered"] == "device"),
            "{records:?}"
        );
        answered += records.len();
    }
    let status = service.exit(CALL_TIMEOUT);
    assert!(status.success(), "{status:?}: {}", service.log());
    assert!(
        service
            .log()
            .contains("every request in flight is answered")
    );

    // The saved state is the bandit's after every answer, and an agent restores it.
    let config = AgentConfig::from_toml(&config).unwrap();
    let restored = Agent::start(&config, device(), Arc::new(Metrics::new()), false)
        .await
        .unwrap();
    assert_eq!(restored.learned(), answered as u64);
    restored.shutdown().await.unwrap();
}
