//! The bandit's state on disk, so a device that restarts goes on from what it learnt.
//!
//! The file is JSON (readable, and exact: floats round-trip bit for bit with serde_json's
//! `float_roundtrip`), written to a temporary name and renamed over the old one, so a power
//! cut leaves either the old or the new state, never half of one. A state learnt for another
//! model, arm set, reward or policy is refused with the difference named: reusing it would
//! silently mislead the bandit.

use std::path::{Path, PathBuf};

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

pub struct StateFile {
    path: PathBuf,
    model_fingerprint: String,
    policy: PolicyConfig,
}

impl StateFile {
    pub fn new(path: &Path, model_fingerprint: String, policy: PolicyConfig) -> Self {
        Self {
            path: path.to_owned(),
            model_fingerprint,
            policy,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved controller and how many samples it learnt from, if the file exists and
    /// matches `fresh` (the controller the configuration builds).
    pub fn restore(&self, fresh: &Controller) -> anyhow::Result<Option<(Controller, u64)>> {
        let text = match std::fs::read_to_string(&self.path) {
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
        let saved: SavedState =
            serde_json::from_str(&text).map_err(|e| refuse(format!("is corrupt: {e}")))?;
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

    pub fn save(&self, controller: &Controller, samples_learned: u64) -> anyhow::Result<()> {
        let saved = SavedState {
            format: FORMAT,
            model_fingerprint: self.model_fingerprint.clone(),
            policy: self.policy.clone(),
            samples_learned,
            controller: controller.clone(),
        };
        let text = serde_json::to_string(&saved).context("serialising the bandit state")?;
        // A first save into a directory nobody made yet (`results/` in a fresh checkout).
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut staged = self.path.clone().into_os_string();
        staged.push(".partial");
        let staged = PathBuf::from(staged);
        std::fs::write(&staged, text).with_context(|| format!("writing {}", staged.display()))?;
        std::fs::rename(&staged, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))
    }
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
        let file = StateFile::new(&path, "abc".into(), policy.clone());
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

        let other_model = StateFile::new(&path, "def".into(), policy.clone());
        let error = other_model.restore(&live).unwrap_err().to_string();
        assert!(error.contains("was learnt on model abc"), "{error}");
        let other_arms = file
            .restore(&controller(&policy, &[0.7]))
            .unwrap_err()
            .to_string();
        assert!(other_arms.contains("arm set"), "{other_arms}");
        let other_policy = StateFile::new(&path, "abc".into(), PolicyConfig::Ucb1 { c: 2.0 });
        assert!(
            other_policy
                .restore(&live)
                .unwrap_err()
                .to_string()
                .contains("policy")
        );

        std::fs::write(&path, "{ not json").unwrap();
        let corrupt = file.restore(&live).unwrap_err().to_string();
        assert!(corrupt.contains("is corrupt"), "{corrupt}");
    }
}
