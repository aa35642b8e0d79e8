//! The shipped link configs, and bad ones.

use super::*;

#[test]
fn shipped_link_configs_load_and_run() {
    let dir = crate_dir().join("../configs/links");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let config = LinkConfig::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
        for direction in [Direction::Uplink, Direction::Downlink] {
            config
                .shaper::<()>(direction)
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        }
        names.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    for wanted in [
        "3g.toml",
        "lossy.toml",
        "lte-to-3g.toml",
        "lte.toml",
        "outage.toml",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing from {names:?}"
        );
    }
}

#[test]
fn bad_configs_name_the_field_or_file() {
    let unknown = config_error("[uplink]\ndely_ms = 3\n[downlink]\n");
    assert!(
        unknown.contains("dely_ms") && unknown.contains("line 2"),
        "{unknown}"
    );
    let missing = config_error("[uplink]\n");
    assert!(missing.contains("downlink"), "{missing}");
    let jitter = config_error("[uplink]\ndelay_ms = 5\njitter_ms = 8\n[downlink]\n");
    assert!(jitter.contains("uplink.jitter_ms"), "{jitter}");
    let loss = config_error("[uplink]\n[downlink]\nloss = { kind = \"bernoulli\", p = 1.5 }\n");
    assert!(loss.contains("downlink.loss.p"), "{loss}");
    let kind = config_error("[uplink]\nloss = { kind = \"burst\", p = 0.1 }\n[downlink]\n");
    assert!(kind.contains("burst"), "{kind}");
    let ge = "{ kind = \"gilbert-elliott\", p_good_to_bad = 0.1, p_bad_to_good = 0.5";
    let typo = config_error(&format!(
        "[uplink]\nloss = {ge}, los_bad = 0.5 }}\n[downlink]\n"
    ));
    assert!(typo.contains("los_bad"), "{typo}");
    let stuck = config_error(&format!(
        "[uplink]\n[downlink]\nloss = {ge}, loss_good = 2 }}\n"
    ));
    assert!(stuck.contains("downlink.loss.loss_good"), "{stuck}");
    // loss_good defaults to 0 and loss_bad to 1: a sixth of the datagrams lost on average.
    let mean = config(&format!("[uplink]\nloss = {ge} }}\n[downlink]\n"))
        .uplink
        .loss
        .unwrap();
    assert!((mean.mean_rate() - 1.0 / 6.0).abs() < 1e-12);
    let outage = config_error("[uplink]\n[downlink]\n[[outages]]\nat_s = 1\nduration_s = 0\n");
    assert!(outage.contains("outages[0].duration_s"), "{outage}");
    let switch = config_error("[uplink]\n[downlink]\n[[switches]]\nat_s = 1\n");
    assert!(switch.contains("switches[0] names neither"), "{switch}");
    let nested =
        config_error("[uplink]\n[downlink]\n[[switches]]\nat_s = 1\nuplink = { delay_ms = -1 }\n");
    assert!(nested.contains("switches[0].uplink.delay_ms"), "{nested}");

    // A config file's own name comes first.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[uplink]\nqueue = { packets = 0 }\n[downlink]\n").unwrap();
    let e = format!("{:#}", LinkConfig::load(&path).unwrap_err());
    assert!(
        e.starts_with(&path.display().to_string()) && e.contains("queue"),
        "{e}"
    );

    // Trace errors name the direction, the trace file and the line.
    let missing_trace =
        config("[uplink]\n[downlink]\nrate = { kind = \"mahimahi\", path = \"no/such.down\" }\n");
    let e = format!(
        "{:#}",
        missing_trace
            .shaper::<()>(Direction::Downlink)
            .err()
            .unwrap()
    );
    assert!(e.contains("downlink") && e.contains("no/such.down"), "{e}");
    std::fs::write(dir.path().join("bad.up"), "1\n2\nfast\n").unwrap();
    let bad_trace = LinkConfig::from_toml(
        "[uplink]\nrate = { kind = \"mahimahi\", path = \"bad.up\" }\n[downlink]\n",
        dir.path(),
    )
    .unwrap();
    let e = format!(
        "{:#}",
        bad_trace.shaper::<()>(Direction::Uplink).err().unwrap()
    );
    assert!(e.contains("bad.up:3") && e.contains("fast"), "{e}");
    let zero = config("[uplink]\nrate = { kind = \"constant\", rate_mbps = 0 }\n[downlink]\n");
    let e = format!("{:#}", zero.shaper::<()>(Direction::Uplink).err().unwrap());
    assert!(
        e.contains("uplink: rate") && e.contains("must be > 0"),
        "{e}"
    );
}
