//! The bandit's state on disk, so a device that restarts goes on from what it learnt.
//!
//! The file is JSON (readable, and exact: floats round-trip bit for bit with serde_json's
//! `float_roundtrip`). What it guarantees:
//!
//! * **Whole or not at all, also through a power cut.** A save writes a temporary file (a name
//!   no other save uses), flushes it to the disk, renames it over the state, and flushes the
//!   directory, so that after a crash the file is the old state or the new one, never a mix,
//!   and a save that returned is on the disk.
//! * **One agent per file.** The agent holds an exclusive lock on `<state>.lock` while it runs;
//!   a second agent configured with the same file refuses to start instead of overwriting what
//!   the first one learns.
//! * **A damaged file does not stop the device.** A file that is not a state (corrupt,
//!   truncated by a disk error) is moved aside as `<state>.corrupt-<unix time>` with a warning,
//!   and the agent starts learning from zero. A state learnt for another model, arm set,
//!   reward or policy is refused with the difference named: reusing it would silently mislead
//!   the bandit, and it is a configuration mistake to fix rather than data to discard.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use splitee_bandits::{Controller, PolicyConfig};

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct SavedState {
    format: u32,
    model_fingerprint: String,
    policy: PolicyConfig,
    samples_learned: u64,
    controller: Controller,
}

/// Saves of this process so far: with the process id, a temporary name no other save uses.
static SAVES: AtomicU64 = AtomicU64::new(0);

pub struct StateFile {
    path: PathBuf,
    model_fingerprint: String,
    policy: PolicyConfig,
    /// Locked for as long as this value lives.
    _lock: File,
}

impl StateFile {
    /// Takes the state file's lock; fails when another agent holds it.
    pub fn open(
        path: &Path,
        model_fingerprint: String,
        policy: PolicyConfig,
    ) -> anyhow::Result<Self> {
        // A first run into a directory nobody made yet (`results/` in a fresh checkout).
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let lock_path = with_suffix(path, ".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening the state lock {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "the bandit state {} is in use by another agent (it holds {}); give each agent \
                 its own state_file",
                path.display(),
                lock_path.display()
            ),
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(error).with_context(|| format!("locking {}", lock_path.display()));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            model_fingerprint,
            policy,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved controller and how many samples it learnt from, if the file exists and
    /// matches `fresh` (the controller the configuration builds). A file that is not a state
    /// at all is moved aside (see the module documentation) and `None` returned.
    pub fn restore(&self, fresh: &Controller) -> anyhow::Result<Option<(Controller, u64)>> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context(format!("reading {}", self.path.display())),
        };
        let refuse = |why: String| {
            anyhow::anyhow!(
                "the bandit state {} {why}; delete it (or pass --fresh-state) to start learning anew",
                self.path.display()
            )
        };
        let saved: SavedState = match serde_json::from_slice(&text) {
            Ok(saved) => saved,
            Err(error) => {
                let seconds = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = with_suffix(&self.path, &format!(".corrupt-{seconds}"));
                std::fs::rename(&self.path, &aside).with_context(|| {
                    format!(
                        "the bandit state {} is corrupt ({error}) and could not be moved aside",
                        self.path.display()
                    )
                })?;
                tracing::warn!(
                    path = %self.path.display(),
                    moved_to = %aside.display(),
                    %error,
                    "the bandit state is corrupt; moved it aside and learning from zero"
                );
                return Ok(None);
            }
        };
        if saved.format != FORMAT {
            return Err(refuse(format!(
                "has format {}, expected {FORMAT}",
                saved.format
            )));
        }
        if saved.model_fingerprint != self.model_fingerprint {
            return Err(refuse(format!(
                "was learnt on model {}, this is {}",
                saved.model_fingerprint, self.model_fingerprint
            )));
        }
        let checks = [
            ("arm set", saved.controller.space() == fresh.space()),
            ("exit rule", saved.controller.rule() == fresh.rule()),
            (
                "reward",
                saved.controller.reward_model() == fresh.reward_model(),
            ),
            ("policy", saved.policy == self.policy),
        ];
        if let Some((what, _)) = checks.iter().find(|(_, same)| !same) {
            return Err(refuse(format!(
                "was learnt with another {what} than the configuration's"
            )));
        }
        Ok(Some((saved.controller, saved.samples_learned)))
    }

    /// Writes the state durably (see the module documentation); on error the old state stays.
    pub fn save(&self, controller: &Controller, samples_learned: u64) -> anyhow::Result<()> {
        let saved = SavedState {
            format: FORMAT,
            model_fingerprint: self.model_fingerprint.clone(),
            policy: self.policy.clone(),
            samples_learned,
            controller: controller.clone(),
        };
        let text = serde_json::to_vec(&saved).context("serialising the bandit state")?;
        let staged = with_suffix(
            &self.path,
            &format!(
                ".{}-{}.partial",
                std::process::id(),
                SAVES.fetch_add(1, Ordering::Relaxed)
            ),
        );
        let written = File::create_new(&staged)
            .and_then(|mut file| {
                file.write_all(&text)?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&staged, &self.path));
        if let Err(error) = written {
            let _ = std::fs::remove_file(&staged);
            return Err(error).with_context(|| format!("saving {}", self.path.display()));
        }
        // The rename is only durable once the directory that records it is.
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("flushing the directory {}", dir.display()))
    }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitee_bandits::{
        ArmSpace, CostModel, DecisionRule, Observation, RewardKind, RewardModel,
    };

    fn controller(policy: &PolicyConfig, thresholds: &[f64]) -> Controller {
        Controller::new(
            ArmSpace::grid(6, &[1, 3, 6], thresholds).unwrap(),
            DecisionRule::SPLITEE,
            RewardModel::new(
                RewardKind::SplitEe,
                CostModel::abstract_units(0.1, 0.5).unwrap(),
            ),
            policy,
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_restored_state_makes_the_same_choices_and_mismatches_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-yet/state.json");
        let policy = PolicyConfig::Ucb1 { c: 1.0 };
        let file = StateFile::open(&path, "abc".into(), policy.clone()).unwrap();
        let mut live = controller(&policy, &[0.8, 0.9]);
        assert!(file.restore(&live).unwrap().is_none());
        for step in 0..40 {
            let (index, arm) = live.select();
            let c = [0.3 + 0.01 * step as f64; 6];
            let obs = if arm.split == 6 {
                Observation::exited(&c, 6)
            } else {
                Observation::offloaded(&c[..arm.split], arm.split, 0.95)
            };
            live.learn(index, &obs).unwrap();
        }
        file.save(&live, 40).unwrap();
        let (mut restored, learned) = file
            .restore(&controller(&policy, &[0.8, 0.9]))
            .unwrap()
            .unwrap();
        assert_eq!(learned, 40);
        for _ in 0..10 {
            assert_eq!(restored.select(), live.select());
        }

        drop(file);
        let other_model = StateFile::open(&path, "def".into(), policy.clone()).unwrap();
        let error = other_model.restore(&live).unwrap_err().to_string();
        drop(other_model);
        let file = StateFile::open(&path, "abc".into(), policy.clone()).unwrap();
        assert!(error.contains("was learnt on model abc"), "{error}");
        let other_arms = file
            .restore(&controller(&policy, &[0.7]))
            .unwrap_err()
            .to_string();
        assert!(other_arms.contains("arm set"), "{other_arms}");
        drop(file);
        let other_policy =
            StateFile::open(&path, "abc".into(), PolicyConfig::Ucb1 { c: 2.0 }).unwrap();
        assert!(
            other_policy
                .restore(&live)
                .unwrap_err()
                .to_string()
                .contains("policy")
        );
    }

    #[test]
    fn a_second_agent_on_the_same_file_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let policy = PolicyConfig::Ucb1 { c: 1.0 };
        let first = StateFile::open(&path, "abc".into(), policy.clone()).unwrap();
        let error = StateFile::open(&path, "abc".into(), policy.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("in use by another agent") && error.contains("state.json.lock"),
            "{error}"
        );
        drop(first);
        StateFile::open(&path, "abc".into(), policy).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_learning_starts_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let policy = PolicyConfig::Ucb1 { c: 1.0 };
        let file = StateFile::open(&path, "abc".into(), policy.clone()).unwrap();
        let live = controller(&policy, &[0.9]);
        // A state cut short, as a disk error or an unsafe write would leave it.
        file.save(&live, 5).unwrap();
        let text = std::fs::read(&path).unwrap();
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(file.restore(&live).unwrap().is_none());
        assert!(!path.exists());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("state.json.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(
            std::fs::read(dir.path().join(&aside[0])).unwrap(),
            &text[..text.len() / 2]
        );
        // Saves leave no temporary file behind, and the state reads back.
        file.save(&live, 6).unwrap();
        file.save(&live, 7).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.contains("partial"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        assert_eq!(file.restore(&live).unwrap().unwrap().1, 7);
    }
}
