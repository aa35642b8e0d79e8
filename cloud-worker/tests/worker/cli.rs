//! The binary's refusals: bad flags and an unusable backend are errors naming the problem,
//! before anything is loaded or bound.

use std::process::Command;

fn serve(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_cloud-worker"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--no-metrics"])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_server_id_that_cannot_be_one_is_refused_with_its_reason() {
    for (id, needle) in [
        ("fd00::1", "IPv6"),
        ("0xabc", "even number of hex digits"),
        ("10.0.0", "IPv4 address"),
        ("", "quic_lb.server_id is not set"),
    ] {
        let (ok, stderr) = serve(&["--quic-lb-server-id", id], &[]);
        assert!(!ok, "{id:?} was accepted");
        assert!(stderr.contains(needle), "{id:?}: {stderr}");
    }
}

/// Asked for a GPU it cannot have, the worker refuses (no CPU fallback) and says why.
#[cfg(not(feature = "wgpu"))]
#[test]
fn without_the_wgpu_feature_a_gpu_worker_refuses_to_start() {
    let (ok, stderr) = serve(&["--backend", "wgpu"], &[]);
    assert!(!ok);
    assert!(
        stderr.contains("does not fall back") && stderr.contains("--features"),
        "{stderr}"
    );
}
