//! The crate graph ARCHITECTURE.md describes, held by `cargo tree` (the dependencies cargo
//! actually resolves for this machine, normal edges only: tests may reach further).
//!
//! * Every dependency between workspace crates is one of those listed here, so a new edge is a
//!   deliberate change to this list and to ARCHITECTURE.md, and dependencies point one way:
//!   each crate only depends on crates listed before it.
//! * The sans-I/O crates have no tensor library and no async runtime among everything they
//!   pull in: a policy study or a protocol fuzzer builds in seconds and runs anywhere.
//! * The README's two commands share one build: no dev-dependency changes the features of a
//!   crate the binaries use, or `cargo test` after `cargo build` would rebuild it (and burn
//!   with it, ~10 min).

use std::collections::{BTreeMap, BTreeSet};
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

/// The lines `cargo tree --prefix none <args>` prints, run in the workspace root.
fn cargo_tree(args: &[&str]) -> Vec<String> {
    let output = Command::new(env!("CARGO"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["tree", "--prefix", "none"])
        .args(args)
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo tree {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Package names in `cargo tree -p <package> -e normal`, up to `depth` (all when `None`).
fn tree(package: &str, depth: Option<u32>) -> BTreeSet<String> {
    let depth = depth.map(|d| d.to_string());
    let mut args = vec!["-p", package, "-e", "normal", "-f", "{p}"];
    if let Some(depth) = &depth {
        args.extend(["--depth", depth]);
    }
    cargo_tree(&args)
        .iter()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Every package of the workspace build with the feature sets it is compiled with, over the
/// given kinds of dependency edges.
fn features(edges: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut packages: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // With several roots `cargo tree` separates their trees by an empty line.
    for line in cargo_tree(&["--workspace", "-e", edges, "-f", "{p}|{f}"])
        .into_iter()
        .filter(|line| !line.is_empty())
    {
        let (package, features) = line.split_once('|').expect("the format has a `|`");
        // `{p}` is `name vX.Y.Z`, then the path of a local package; `(*)` marks a repeat.
        let package = package
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let features = features.trim_end_matches(" (*)").trim().to_owned();
        packages.entry(package).or_default().insert(features);
    }
    packages
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

#[test]
fn tests_build_every_crate_of_the_binaries_with_the_same_features() {
    let build = features("normal");
    let test = features("normal,dev");
    let changed: Vec<String> = build
        .iter()
        .filter(|(package, features)| test.get(*package) != Some(*features))
        .map(|(package, features)| format!("{package}: {features:?} → {:?}", test.get(package)))
        .collect();
    assert!(
        changed.is_empty(),
        "dev-dependencies change the features of crates the binaries use, so `cargo test` \
         recompiles them after `cargo build`:\n{}",
        changed.join("\n")
    );
}
