//! The crate graph ARCHITECTURE.md describes, held by `cargo tree` (the dependencies cargo
//! actually resolves for this machine, normal edges only: tests may reach further).
//!
//! * Every dependency between workspace crates is one of those listed here, so a new edge is a
//!   deliberate change to this list and to ARCHITECTURE.md, and dependencies point one way:
//!   each crate only depends on crates listed before it.
//! * The sans-I/O crates have no tensor library and no async runtime among everything they
//!   pull in: a policy study or a protocol fuzzer builds in seconds and runs anywhere.

use std::collections::BTreeSet;
use std::process::Command;

/// Each workspace crate with the workspace crates it may depend on, in dependency order.
const LAYERS: &[(&str, &[&str])] = &[
    ("splitee-fetch", &[]),
    ("splitee-protocol", &[]),
    ("splitee-bandits", &[]),
    ("splitee-link", &[]),
    ("splitee-model", &["splitee-fetch"]),
    ("splitee-service", &["splitee-protocol"]),
    (
        "splitee-replay",
        &["splitee-bandits", "splitee-link", "splitee-protocol"],
    ),
    (
        "splitee-training",
        &["splitee-bandits", "splitee-model", "splitee-replay"],
    ),
    (
        "cloud-worker",
        &["splitee-model", "splitee-protocol", "splitee-service"],
    ),
    (
        "edge-agent",
        &[
            "splitee-bandits",
            "splitee-model",
            "splitee-protocol",
            "splitee-service",
        ],
    ),
    (
        "splitee-testbed",
        &[
            "cloud-worker",
            "edge-agent",
            "splitee-bandits",
            "splitee-link",
            "splitee-model",
            "splitee-replay",
            "splitee-service",
        ],
    ),
    (
        "simulations",
        &[
            "edge-agent",
            "splitee-bandits",
            "splitee-link",
            "splitee-model",
            "splitee-replay",
            "splitee-service",
            "splitee-testbed",
            "splitee-training",
        ],
    ),
];

/// Crates with no I/O of their own, and what none of them may pull in.
const SANS_IO: &[&str] = &[
    "splitee-protocol",
    "splitee-bandits",
    "splitee-link",
    "splitee-replay",
];
const NOT_IN_SANS_IO: &[&str] = &["burn", "tokio", "quinn", "wgpu"];

/// Package names in `cargo tree -p <package> -e normal`, up to `depth` (all when `None`).
fn tree(package: &str, depth: Option<u32>) -> BTreeSet<String> {
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["tree", "-p", package, "-e", "normal", "--prefix", "none"])
        .args(["-f", "{p}"]);
    if let Some(depth) = depth {
        command.args(["--depth", &depth.to_string()]);
    }
    let output = command.output().expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn workspace_dependencies_are_the_listed_ones_and_point_one_way() {
    let workspace: BTreeSet<&str> = LAYERS.iter().map(|(name, _)| *name).collect();
    for (position, (package, allowed)) in LAYERS.iter().enumerate() {
        let direct: BTreeSet<String> = tree(package, Some(1))
            .into_iter()
            .filter(|name| name != package && workspace.contains(name.as_str()))
            .collect();
        let allowed: BTreeSet<String> = allowed.iter().map(|name| name.to_string()).collect();
        assert_eq!(
            direct, allowed,
            "{package}'s workspace dependencies differ from the list in this test (and in \
             ARCHITECTURE.md)"
        );
        let earlier: BTreeSet<&str> = LAYERS[..position].iter().map(|(name, _)| *name).collect();
        for dependency in &direct {
            assert!(
                earlier.contains(dependency.as_str()),
                "{package} depends on {dependency}, which is not below it"
            );
        }
    }
}

#[test]
fn sans_io_crates_pull_in_no_tensor_library_and_no_runtime() {
    for package in SANS_IO {
        let everything = tree(package, None);
        let forbidden: Vec<&String> = everything
            .iter()
            .filter(|name| {
                NOT_IN_SANS_IO
                    .iter()
                    .any(|banned| *name == banned || name.starts_with(&format!("{banned}-")))
            })
            .collect();
        assert!(
            forbidden.is_empty(),
            "{package} pulls in {forbidden:?} (of {} crates)",
            everything.len()
        );
    }
}
