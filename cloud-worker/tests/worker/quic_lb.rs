//! Routable connection IDs on the wire: a real worker and a real client talk through a UDP
//! relay that reads the connection IDs in the packets' clear headers, as a QUIC-LB balancer
//! would, and moves the client to a new address mid-connection (a NAT rebinding).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use cloud_worker::cid::QuicLbConfig;
use splitee_protocol::PayloadEncoding;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::*;

/// What the relay saw in the clear.
#[derive(Default)]
struct Seen {
    /// Source connection IDs of the worker's long-header packets (Retry, Initial, Handshake),
    /// with the packet type (0 Initial, 2 Handshake, 3 Retry).
    server_scids: Vec<(u8, Vec<u8>)>,
    /// Destination connection IDs of the client's short-header (1-RTT) packets: the IDs a
    /// balancer routes by once the handshake is done.
    client_dcids: Vec<Vec<u8>>,
    /// Worker-side addresses the relay sent from.
    upstream_addrs: Vec<SocketAddr>,
}

struct Relay {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    rebind: mpsc::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP relay from one client to `worker`; `short_dcid_len` is the length of the IDs in the
/// client's short headers (which carry no length: a balancer knows it from its configuration).
async fn relay(worker: SocketAddr, short_dcid_len: usize) -> Relay {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (rebind, mut rebinds) = mpsc::channel(1);
    let task = tokio::spawn({
        let seen = seen.clone();
        async move {
            let upstream = || async {
                let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                socket.connect(worker).await.unwrap();
                socket
            };
            let mut back = upstream().await;
            seen.lock()
                .unwrap()
                .upstream_addrs
                .push(back.local_addr().unwrap());
            let mut client = None;
            let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            loop {
                tokio::select! {
                    received = front.recv_from(&mut up) => {
                        let (len, from) = received.unwrap();
                        client = Some(from);
                        let packet = &up[..len];
                        if packet[0] & 0x80 == 0 && len > short_dcid_len {
                            seen.lock().unwrap().client_dcids.push(packet[1..1 + short_dcid_len].to_vec());
                        }
                        let _ = back.send(packet).await;
                    }
                    received = back.recv(&mut down) => {
                        let len = received.unwrap();
                        let packet = &down[..len];
                        seen.lock().unwrap().server_scids.extend(long_header_scids(packet));
                        if let Some(client) = client {
                            let _ = front.send_to(packet, client).await;
                        }
                    }
                    Some(()) = rebinds.recv() => {
                        back = upstream().await;
                        seen.lock().unwrap().upstream_addrs.push(back.local_addr().unwrap());
                    }
                }
            }
        }
    });
    Relay {
        addr,
        seen,
        rebind,
        task,
    }
}

/// The packet type and source connection ID of each QUIC v1 long-header packet coalesced in
/// one datagram (RFC 9000, 12.2 and 17.2); none for a short header or a version negotiation.
fn long_header_scids(mut datagram: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut found = Vec::new();
    while let Some((kind, scid, rest)) = long_header(datagram) {
        found.push((kind, scid));
        datagram = rest;
    }
    found
}

/// One long-header packet: its type, source connection ID and what follows it in the datagram.
fn long_header(packet: &[u8]) -> Option<(u8, Vec<u8>, &[u8])> {
    let first = *packet.first()?;
    let version = u32::from_be_bytes(packet.get(1..5)?.try_into().ok()?);
    if first & 0x80 == 0 || version == 0 {
        return None;
    }
    let kind = (first >> 4) & 0b11;
    let dcid_len = usize::from(*packet.get(5)?);
    let scid_len = usize::from(*packet.get(6 + dcid_len)?);
    let mut at = 7 + dcid_len;
    let scid = packet.get(at..at + scid_len)?.to_vec();
    at += scid_len;
    if kind == 3 {
        // A Retry runs to the end of its datagram.
        return Some((kind, scid, &[]));
    }
    if kind == 0 {
        let token_len = varint(packet, &mut at)?;
        at += token_len;
    }
    let len = varint(packet, &mut at)?;
    Some((kind, scid, packet.get(at + len..)?))
}

/// A QUIC variable-length integer at `*at` (RFC 9000, 16), advancing `at`.
fn varint(packet: &[u8], at: &mut usize) -> Option<usize> {
    let first = *packet.get(*at)?;
    let len = 1usize << (first >> 6);
    let mut value = u64::from(first & 0x3f);
    for byte in packet.get(*at + 1..*at + len)? {
        value = value << 8 | u64::from(*byte);
    }
    *at += len;
    usize::try_from(value).ok()
}

/// Hello and one answer over `connection`.
async fn exchange(harness: &Harness, connection: &Connection, id: u64) {
    transport::hello(connection, &harness.fingerprint, TIMEOUT)
        .await
        .unwrap();
    let request = harness.request("routed by its connection id", 3, PayloadEncoding::F32, id);
    let answer = expect_answer(
        transport::offload(connection, &request, TIMEOUT)
            .await
            .unwrap(),
    );
    assert_eq!(answer.request_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_issues_connection_ids_that_decode_to_its_server_id() {
    let quic_lb = QuicLbConfig {
        server_id: "10.0.0.7".into(),
        config_rotation: 2,
        nonce_len: 8,
    };
    let cids = quic_lb.generator().unwrap();
    let harness = Harness::start(|config, _| config.quic_lb = Some(quic_lb.clone())).await;
    let relay = relay(harness.worker.local_addr(), cids.len()).await;
    let connection = transport::connect(&harness.client_endpoint(), relay.addr, "localhost")
        .await
        .unwrap();
    exchange(&harness, &connection, 1).await;
    // The client's NAT rebinds: the worker sees it come from another port, on the same
    // connection and the same connection IDs.
    relay.rebind.send(()).await.unwrap();
    exchange(&harness, &connection, 2).await;

    let seen = relay.seen.lock().unwrap();
    assert_eq!(seen.upstream_addrs.len(), 2, "the relay rebound once");
    let types: Vec<u8> = seen.server_scids.iter().map(|(kind, _)| *kind).collect();
    assert!(
        types.contains(&3) && types.contains(&0) && types.contains(&2),
        "a Retry, an Initial and a Handshake packet from the worker: {types:?}"
    );
    assert!(
        seen.client_dcids.len() >= 4,
        "1-RTT packets: {}",
        seen.client_dcids.len()
    );
    let ids = seen
        .server_scids
        .iter()
        .map(|(_, cid)| cid)
        .chain(&seen.client_dcids);
    let mut distinct = std::collections::HashSet::new();
    for cid in ids {
        assert_eq!(cid.len(), 13, "{cid:02x?}");
        assert_eq!(cid[0] >> 5, 2, "config rotation of {cid:02x?}");
        assert_eq!(
            usize::from(cid[0] & 0x1f) + 1,
            13,
            "self-encoded length of {cid:02x?}"
        );
        assert_eq!(cids.decode(cid), Some(&[10, 0, 0, 7][..]), "{cid:02x?}");
        distinct.insert(cid.clone());
    }
    // The Retry's ID and the connection's differ: each is a fresh nonce.
    assert!(distinct.len() >= 2, "{distinct:02x?}");
    println!(
        "{} worker long headers and {} client 1-RTT packets, {} distinct connection ids, all \
         decoding to server id 0a000007",
        seen.server_scids.len(),
        seen.client_dcids.len(),
        distinct.len()
    );
    drop(seen);
    harness.worker.shutdown().await.unwrap();
}

/// The control: without `[quic_lb]` the worker keeps quinn's own 8-byte IDs, so the relay's
/// reading is of the configuration, not of the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quic_lb_the_ids_are_quinns_own() {
    let harness = Harness::start(|_, _| {}).await;
    let relay = relay(harness.worker.local_addr(), 8).await;
    let connection = transport::connect(&harness.client_endpoint(), relay.addr, "localhost")
        .await
        .unwrap();
    exchange(&harness, &connection, 1).await;
    let seen = relay.seen.lock().unwrap();
    assert!(!seen.server_scids.is_empty());
    for (_, cid) in &seen.server_scids {
        assert_eq!(cid.len(), 8, "{cid:02x?}");
    }
    drop(seen);
    harness.worker.shutdown().await.unwrap();
}
