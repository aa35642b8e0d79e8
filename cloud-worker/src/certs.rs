//! `gen-certs`: a private development CA and the server and client certificates it signs.
//!
//! Production deployments bring their own PKI; these files exist so that development and
//! tests run with the same, fully verified TLS as production instead of a "skip
//! verification" switch (there is none).
//!
//! The files go in one directory per holder, so that each holder is given exactly what it
//! needs and the CA's key is never among what a worker or an agent mounts:
//!
//! ```text
//! certs/ca/      ca.pem, ca.key.pem                        keep offline: signs what all trust
//! certs/worker/  server.pem, server.key.pem, client-ca.pem what a worker mounts
//! certs/agent/   client.pem, client.key.pem, ca.pem        what an edge device holds
//! ```
//!
//! Keys are 0600 and `ca/` is 0700, also when `--force` replaces older files: each file is
//! written under a temporary name created with its mode, then renamed over the old one.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// What to generate.
#[derive(Debug, Clone)]
pub struct CertOptions {
    pub out_dir: PathBuf,
    /// DNS names and IP addresses the server certificate is valid for.
    pub server_names: Vec<String>,
    /// The client certificate's name (a DNS-style name, also its common name).
    pub client_name: String,
    /// Validity in days, starting yesterday (so that small clock skews do not matter).
    pub days: u32,
    /// Replace existing files instead of refusing.
    pub force: bool,
}

impl Default for CertOptions {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("certs"),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            client_name: "splitee-edge".into(),
            days: 365,
            force: false,
        }
    }
}

/// Paths of the generated PEM files.
#[derive(Debug, Clone)]
pub struct GeneratedCerts {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The CA certificate again, as the worker's `tls.client_ca`.
    pub worker_client_ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The CA certificate again, as the agent's `cloud.ca`.
    pub agent_ca: PathBuf,
    /// Files of the flat layout of earlier versions found in the directory (a CA key beside
    /// the worker's files among them): the caller should tell the user to remove them.
    pub stale: Vec<PathBuf>,
}

/// The flat layout earlier versions wrote, everything in one directory.
const STALE_NAMES: [&str; 6] = [
    "ca.pem",
    "ca.key.pem",
    "server.pem",
    "server.key.pem",
    "client.pem",
    "client.key.pem",
];

impl GeneratedCerts {
    fn in_dir(dir: &Path) -> Self {
        let (ca, worker, agent) = (dir.join("ca"), dir.join("worker"), dir.join("agent"));
        Self {
            ca_cert: ca.join("ca.pem"),
            ca_key: ca.join("ca.key.pem"),
            server_cert: worker.join("server.pem"),
            server_key: worker.join("server.key.pem"),
            worker_client_ca: worker.join("client-ca.pem"),
            client_cert: agent.join("client.pem"),
            client_key: agent.join("client.key.pem"),
            agent_ca: agent.join("ca.pem"),
            stale: STALE_NAMES
                .iter()
                .map(|name| dir.join(name))
                .filter(|path| path.exists())
                .collect(),
        }
    }

    fn all(&self) -> [&Path; 8] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.server_cert,
            &self.server_key,
            &self.worker_client_ca,
            &self.client_cert,
            &self.client_key,
            &self.agent_ca,
        ]
    }
}

pub fn gen_certs(options: &CertOptions) -> anyhow::Result<GeneratedCerts> {
    anyhow::ensure!(
        !options.server_names.is_empty(),
        "the server certificate needs at least one name"
    );
    anyhow::ensure!(
        options.days >= 1,
        "certificates must be valid for at least a day"
    );
    let files = GeneratedCerts::in_dir(&options.out_dir);
    if !options.force
        && let Some(existing) = files.all().into_iter().find(|p| p.exists())
    {
        anyhow::bail!(
            "{} exists; pass --force to replace the certificates in {}",
            existing.display(),
            options.out_dir.display()
        );
    }
    for (dir, mode) in [
        (files.ca_key.parent(), 0o700),
        (files.server_key.parent(), 0o755),
        (files.client_key.parent(), 0o755),
    ] {
        let dir = dir.expect("every file is in a subdirectory");
        create_dir(dir, mode)?;
    }

    let (not_before, not_after) = validity(options.days);
    let dated = |mut params: CertificateParams, common_name: &str| {
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        params.distinguished_name = name;
        params
    };

    let mut ca_params = dated(CertificateParams::default(), "splitee development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let mut server_params = dated(
        CertificateParams::new(options.server_names.clone()).context("invalid server name")?,
        &options.server_names[0],
    );
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let server_cert = server_params.signed_by(&server_key, &*ca)?;

    let mut client_params = dated(
        CertificateParams::new(vec![options.client_name.clone()]).context("invalid client name")?,
        &options.client_name,
    );
    client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate()?;
    let client_cert = client_params.signed_by(&client_key, &*ca)?;

    let ca_pem = ca.pem();
    write(&files.ca_cert, &ca_pem, false)?;
    write(&files.ca_key, &ca_key_pem, true)?;
    write(&files.server_cert, &server_cert.pem(), false)?;
    write(&files.server_key, &server_key.serialize_pem(), true)?;
    write(&files.worker_client_ca, &ca_pem, false)?;
    write(&files.client_cert, &client_cert.pem(), false)?;
    write(&files.client_key, &client_key.serialize_pem(), true)?;
    write(&files.agent_ca, &ca_pem, false)?;
    Ok(files)
}

/// Creates `dir` (and its parents) and gives it `mode`, also when it existed.
fn create_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("restricting {} to {mode:o}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    Ok(())
}

/// Writes `contents` under a temporary name beside `path`, created with the file's final mode
/// (0600 for keys: readable by their owner only from the moment they exist), then renames it
/// over `path`. An existing file's looser mode therefore never survives a `--force`.
fn write(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    let staged = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    use std::io::Write;
    let _ = std::fs::remove_file(&staged); // left by an interrupted run of this process id
    options
        .open(&staged)
        .and_then(|mut file| {
            file.write_all(contents.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&staged, path))
        .with_context(|| format!("writing {}", path.display()))
}

/// `(yesterday, yesterday + days)` as `(year, month, day)`.
fn validity(days: u32) -> ((i32, u8, u8), (i32, u8, u8)) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0);
    (
        civil_from_days(today - 1),
        civil_from_days(today - 1 + i64::from(days)),
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let options = CertOptions {
            out_dir: dir.path().to_owned(),
            ..CertOptions::default()
        };
        let files = gen_certs(&options).unwrap();
        let first = std::fs::read(&files.ca_cert).unwrap();
        assert!(gen_certs(&options).is_err());
        assert_eq!(std::fs::read(&files.ca_cert).unwrap(), first);
        gen_certs(&CertOptions {
            force: true,
            ..options
        })
        .unwrap();
        assert_ne!(std::fs::read(&files.ca_cert).unwrap(), first);
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_private_and_the_ca_key_is_apart_from_what_a_worker_mounts() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let options = CertOptions {
            out_dir: dir.path().to_owned(),
            ..CertOptions::default()
        };
        let files = gen_certs(&options).unwrap();
        let worker_dir = files.server_key.parent().unwrap();
        let mounted: Vec<_> = std::fs::read_dir(worker_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            !mounted.iter().any(|name| name.contains("ca.key")),
            "{mounted:?}"
        );
        assert_eq!(files.worker_client_ca.parent().unwrap(), worker_dir);
        assert_ne!(files.ca_key.parent().unwrap(), worker_dir);
        assert_ne!(
            files.ca_key.parent().unwrap(),
            files.client_key.parent().unwrap()
        );
        for key in [&files.ca_key, &files.server_key, &files.client_key] {
            assert_eq!(mode(key), 0o600, "{}", key.display());
            // Someone loosened them; --force must tighten them again.
            std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::set_permissions(
            files.ca_key.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        gen_certs(&CertOptions {
            force: true,
            ..options
        })
        .unwrap();
        for key in [&files.ca_key, &files.server_key, &files.client_key] {
            assert_eq!(mode(key), 0o600, "{} after --force", key.display());
        }
        assert_eq!(mode(files.ca_key.parent().unwrap()), 0o700);
        assert_eq!(mode(&files.server_cert), 0o644);
        // The flat layout of earlier versions is reported, so that its CA key gets removed.
        std::fs::write(dir.path().join("ca.key.pem"), "old").unwrap();
        let again = gen_certs(&CertOptions {
            out_dir: dir.path().to_owned(),
            force: true,
            ..CertOptions::default()
        })
        .unwrap();
        assert_eq!(again.stale, vec![dir.path().join("ca.key.pem")]);
    }
}
