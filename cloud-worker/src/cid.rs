//! Routable QUIC connection IDs: the worker's server ID inside every connection ID it issues,
//! so that a QUIC-aware load balancer routes a connection by it — also after the client's
//! address changed (NAT rebinding, Wi-Fi to cellular), which breaks a balancer that hashes the
//! UDP 5-tuple.
//!
//! The encoding is the *plaintext* algorithm of QUIC-LB (draft-ietf-quic-load-balancers-19,
//! "Generating Routable QUIC Connection IDs", sections 3 and 5.1, a documented subset: no
//! stream or block cipher, so the server ID is visible to an on-path observer — use it where
//! the worker's identity is not a secret, behind a balancer in the same trust domain):
//!
//! ```text
//! first octet: config rotation (3 bits, 0..=6) | CID length − 1 (5 bits, self-encoded)
//! then:        server ID (1..=15 bytes)  |  nonce (4..=18 bytes, random)
//! ```
//!
//! A balancer configured with the same rotation codepoint and server-ID length reads the
//! server ID at bytes `1..=len`. Codepoint 7 (`0b111`) is reserved for unroutable IDs and is
//! never produced.

use std::time::Duration;

use quinn::{ConnectionId, ConnectionIdGenerator};
use quinn_proto::InvalidCid;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Longest connection ID QUIC v1 allows.
const MAX_CID_LEN: usize = 20;

/// The `[quic_lb]` table of the worker config.
///
/// ```toml
/// [quic_lb]
/// server_id = "0x0a0b0c0d0e0f1011"   # 1..=15 bytes in hex, or an IPv4 address (4 bytes);
///                                     # unique per worker behind one balancer
/// config_rotation = 0                 # 0..=6, the balancer's config codepoint
/// nonce_len = 8                       # 4..=18 random bytes after the server ID
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicLbConfig {
    /// Required, here or from `--quic-lb-server-id` (which overrides it).
    #[serde(default)]
    pub server_id: String,
    #[serde(default)]
    pub config_rotation: u8,
    #[serde(default = "default_nonce_len")]
    pub nonce_len: usize,
}

fn default_nonce_len() -> usize {
    8
}

impl Default for QuicLbConfig {
    /// No server ID: only useful with one set afterwards (`--quic-lb-server-id`).
    fn default() -> Self {
        Self {
            server_id: String::new(),
            config_rotation: 0,
            nonce_len: default_nonce_len(),
        }
    }
}

impl QuicLbConfig {
    /// The generator, or an error naming the bad key.
    pub fn generator(&self) -> anyhow::Result<QuicLbCids> {
        let server_id = parse_server_id(&self.server_id)?;
        QuicLbCids::new(self.config_rotation, server_id, self.nonce_len)
    }
}

/// A server ID as the config and `--quic-lb-server-id` spell it: hex bytes (`0x0a0b0c0d`, the
/// `0x` optional) or a dotted IPv4 address (`10.1.2.3` is the 4 bytes `0x0a010203`; what a
/// Kubernetes pod gets from `status.podIP`). An IPv6 address is 16 bytes, one more than a
/// server ID holds: give such a worker a hex ID.
pub fn parse_server_id(text: &str) -> anyhow::Result<Vec<u8>> {
    let text = text.trim();
    anyhow::ensure!(
        !text.is_empty(),
        "quic_lb.server_id is not set: set it in [quic_lb] or pass --quic-lb-server-id"
    );
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return match ip {
            std::net::IpAddr::V4(v4) => Ok(v4.octets().to_vec()),
            std::net::IpAddr::V6(_) => anyhow::bail!(
                "quic_lb.server_id: the IPv6 address {text} is 16 bytes, and a server ID holds at \
                 most 15; give this worker a hex server ID (e.g. \"0x0a0b0c0d\")"
            ),
        };
    }
    let hex = text.strip_prefix("0x").unwrap_or(text);
    anyhow::ensure!(
        !hex.is_empty() && hex.len() % 2 == 0 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "quic_lb.server_id must be an even number of hex digits (e.g. \"0x0a0b0c0d\") or an \
         IPv4 address, got {text:?}"
    );
    Ok((0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex digits"))
        .collect())
}

/// Issues QUIC-LB plaintext connection IDs carrying one server ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicLbCids {
    first_octet: u8,
    server_id: Vec<u8>,
    nonce_len: usize,
}

impl QuicLbCids {
    pub fn new(config_rotation: u8, server_id: Vec<u8>, nonce_len: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            config_rotation <= 6,
            "quic_lb.config_rotation must be in 0..=6 (7 marks unroutable IDs), got {config_rotation}"
        );
        anyhow::ensure!(
            (1..=15).contains(&server_id.len()),
            "quic_lb.server_id must be 1 to 15 bytes, got {}",
            server_id.len()
        );
        anyhow::ensure!(
            (4..=18).contains(&nonce_len),
            "quic_lb.nonce_len must be 4 to 18 bytes, got {nonce_len}"
        );
        let len = 1 + server_id.len() + nonce_len;
        anyhow::ensure!(
            len <= MAX_CID_LEN,
            "quic_lb: 1 + {} server-ID bytes + {nonce_len} nonce bytes exceed the {MAX_CID_LEN}-byte \
             connection ID",
            server_id.len()
        );
        Ok(Self {
            first_octet: (config_rotation << 5) | (len - 1) as u8,
            server_id,
            nonce_len,
        })
    }

    pub fn len(&self) -> usize {
        1 + self.server_id.len() + self.nonce_len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The server ID inside every connection ID this generator issues.
    pub fn server_id(&self) -> &[u8] {
        &self.server_id
    }

    /// The configuration rotation codepoint (the first octet's top three bits).
    pub fn config_rotation(&self) -> u8 {
        self.first_octet >> 5
    }

    /// An endpoint configuration whose endpoint issues these IDs.
    pub fn endpoint_config(&self) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::default();
        let generator = self.clone();
        config.cid_generator(move || Box::new(generator.clone()));
        config
    }

    /// The server ID a balancer with this configuration reads from `cid`; `None` for an ID of
    /// another configuration or length.
    pub fn decode<'a>(&self, cid: &'a [u8]) -> Option<&'a [u8]> {
        let first = *cid.first()?;
        let self_encoded_len = usize::from(first & 0x1f) + 1;
        (first >> 5 == self.first_octet >> 5 && self_encoded_len == cid.len())
            .then(|| cid.get(1..1 + self.server_id.len()))
            .flatten()
    }
}

impl ConnectionIdGenerator for QuicLbCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; MAX_CID_LEN];
        bytes[0] = self.first_octet;
        bytes[1..1 + self.server_id.len()].copy_from_slice(&self.server_id);
        // The nonce makes IDs of one connection unlinkable to each other; rand's thread RNG is
        // a CSPRNG (ChaCha) seeded from the OS.
        rand::rng().fill_bytes(&mut bytes[1 + self.server_id.len()..self.len()]);
        ConnectionId::new(&bytes[..self.len()])
    }

    /// Packets for an ID that is not one of ours (another configuration, length or server ID)
    /// are dropped without a stateless reset: a balancer sent them to the wrong worker, or
    /// they are noise.
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        match self.decode(cid) {
            Some(server_id) if server_id == self.server_id.as_slice() => Ok(()),
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        self.len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(server_id: &str, rotation: u8, nonce: usize) -> QuicLbConfig {
        QuicLbConfig {
            server_id: server_id.into(),
            config_rotation: rotation,
            nonce_len: nonce,
        }
    }

    #[test]
    fn issued_ids_decode_to_the_configured_server_id() {
        let mut cids = config("0x0a0b0c0d0e0f1011", 2, 8).generator().unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let cid = cids.generate_cid();
            assert_eq!(cid.len(), 17);
            assert_eq!(cid[0] >> 5, 2, "config rotation");
            assert_eq!(usize::from(cid[0] & 0x1f) + 1, 17, "self-encoded length");
            assert_eq!(
                cids.decode(&cid),
                Some(&[0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11][..])
            );
            seen.insert(cid[9..].to_vec());
        }
        assert!(seen.len() > 990, "nonces repeat: {}", seen.len());
        // Another worker's IDs, or another configuration's, are not ours.
        let mut other = config("0x0a0b0c0d0e0f1012", 2, 8).generator().unwrap();
        let theirs = other.generate_cid();
        assert_eq!(
            cids.decode(&theirs),
            Some(&[0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x12][..])
        );
        let mut rotated = config("0x0a0b0c0d0e0f1011", 3, 8).generator().unwrap();
        assert_eq!(cids.decode(&rotated.generate_cid()), None);
    }

    #[test]
    fn bad_configurations_name_the_key() {
        let error = |c: QuicLbConfig| c.generator().unwrap_err().to_string();
        assert!(error(config("0xabc", 0, 8)).contains("even number of hex digits"));
        assert!(error(config("0xzz", 0, 8)).contains("hex digits"));
        assert!(error(config("0x01", 7, 8)).contains("config_rotation"));
        assert!(error(config("0x01", 0, 3)).contains("nonce_len"));
        assert!(error(config("0x", 0, 8)).contains("server_id"));
        assert!(error(config(&format!("0x{}", "01".repeat(16)), 0, 4)).contains("1 to 15 bytes"));
        assert!(error(config(&format!("0x{}", "01".repeat(15)), 0, 8)).contains("exceed"));
        assert!(error(config("fd00::1", 0, 8)).contains("IPv6"));
        assert!(error(config("10.1.2", 0, 8)).contains("IPv4 address"));
    }

    #[test]
    fn an_ipv4_address_is_its_four_octets() {
        let cids = config("10.244.3.17", 1, 8).generator().unwrap();
        assert_eq!(cids.server_id(), &[10, 244, 3, 17]);
        assert_eq!(cids.len(), 13);
        assert_eq!(cids.config_rotation(), 1);
        assert_eq!(parse_server_id("0a0b").unwrap(), vec![10, 11]);
        assert_eq!(parse_server_id(" 0x0A0b ").unwrap(), vec![10, 11]);
    }

    #[test]
    fn only_our_own_ids_validate() {
        let mut ours = config("0x0102", 0, 6).generator().unwrap();
        let mut theirs = config("0x0103", 0, 6).generator().unwrap();
        let (mine, other) = (ours.generate_cid(), theirs.generate_cid());
        assert!(ours.validate(&mine).is_ok());
        assert!(ours.validate(&other).is_err());
        assert!(ours.validate(&ConnectionId::new(&[0u8; 9])).is_err());
    }
}
