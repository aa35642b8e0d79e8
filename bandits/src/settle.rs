//! Settlement: what happened to one sample goes in, its cost and reward come out, and the
//! policy learns from it. The one place where a sample is priced.
//!
//! Drivers (the live edge agent, the simulator) report raw facts in a [`SampleReport`]: the
//! exits the device evaluated ([`DevicePass`](crate::DevicePass) collects them), its clock, and
//! what became of an offload ([`Reported`]). [`Controller::settle`](crate::Controller::settle)
//! prices them with the controller's [`CostModel`](crate::CostModel):
//!
//! * edge: `cost_edge(s)` for the layers the device ran — measured (the device clock), a
//!   device profile scaled by the sample's tokens, or `s` abstract units;
//! * answered offload: the round trip the device waited (network, the worker's queue and
//!   compute) plus `per_kb` per KiB sent — or the constant `o`;
//! * failed offload (timeout, refusal, lost connection): the time until the failure was known,
//!   plus the device's extra layers priced like its other layers
//!   ([`CostModel::device_finish_cost`](crate::CostModel::device_finish_cost)), plus the bytes
//!   sent — or `o` plus those layers.
//!
//! The reward is the controller's [`RewardKind`](crate::RewardKind) of those costs, with the
//! answer's confidence as `C_L`. A failed offload teaches only the played arm: the arms it
//! would be side information for would have failed differently.

use serde::{Deserialize, Serialize};

use crate::arms::ArmIndex;
use crate::observation::{NOT_EVALUATED, Observation};
use crate::pass::NOT_PREDICTED;

/// What a driver saw of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleReport<'a> {
    /// The arm played.
    pub arm: ArmIndex,
    /// Tokens of the sample (device profiles scale with them).
    pub tokens: usize,
    /// `confidences[j − 1]` = `C_j` of each exit the device evaluated, up to where it stopped
    /// ([`NOT_EVALUATED`] for heads it skipped).
    pub confidences: &'a [f64],
    /// Predicted class of each evaluated exit ([`NOT_PREDICTED`] elsewhere).
    pub predictions: &'a [u32],
    /// Device clock from the start of the sample to the end of each layer it ran (ms).
    pub device_ms: &'a [f64],
    pub outcome: Reported,
}

/// What became of the sample after the device's pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reported {
    /// Answered on the device by the exit after `layer`.
    Exited { layer: usize },
    /// Offloaded after `after`; the cloud answered.
    Answered(CloudAnswered),
    /// Offloaded after `after`; the cloud did not answer and the device finished the sample.
    Failed(OffloadFailed),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudAnswered {
    pub after: usize,
    /// The cloud's answering exit: the last layer, or an earlier one the request allowed.
    pub exit_layer: usize,
    /// Its confidence, under the same measure as the device's exits.
    pub confidence: f64,
    /// From the first byte sent to the answer received (ms).
    pub round_trip_ms: f64,
    /// The worker's compute time for layers `after + 1..=exit_layer` (ms).
    pub cloud_compute_ms: f64,
    pub bytes_sent: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadFailed {
    pub after: usize,
    /// From the first byte sent (or the attempt) until the failure was known (ms).
    pub waited_ms: f64,
    pub bytes_sent: u64,
    /// The device's answering exit after finishing (`after` when it holds no deeper one).
    pub finish_layer: usize,
    pub confidence: f64,
    /// Device clock of the layers it ran after the failure (ms).
    pub finish_ms: f64,
}

impl Reported {
    /// The layer the device's pass stopped at.
    pub fn device_layers(&self) -> usize {
        match *self {
            Reported::Exited { layer } => layer,
            Reported::Answered(a) => a.after,
            Reported::Failed(f) => f.after,
        }
    }
}

/// A sample's price and reward.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Settlement {
    pub reward: f64,
    /// `cost_edge` of the layers the device ran before answering or offloading.
    pub edge_cost: f64,
    /// The offload's cost (0 when the sample exited on the device).
    pub offload_cost: f64,
}

impl Settlement {
    /// Everything the sample was charged, before `λ`.
    pub fn cost(&self) -> f64 {
        self.edge_cost + self.offload_cost
    }
}

/// A [`SampleReport`] that owns its data, for logs (the edge agent's per-sample records) and
/// replays: [`as_report`](Self::as_report) gives back exactly what was settled. Unevaluated
/// heads are written as `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleLog {
    pub arm: usize,
    pub tokens: usize,
    #[serde(with = "nan_as_null")]
    pub confidences: Vec<f64>,
    #[serde(with = "unpredicted_as_null")]
    pub predictions: Vec<u32>,
    pub device_ms: Vec<f64>,
    pub outcome: Reported,
}

impl SampleLog {
    pub fn new(report: &SampleReport<'_>) -> Self {
        Self {
            arm: report.arm.0,
            tokens: report.tokens,
            confidences: report.confidences.to_vec(),
            predictions: report.predictions.to_vec(),
            device_ms: report.device_ms.to_vec(),
            outcome: report.outcome,
        }
    }

    pub fn as_report(&self) -> SampleReport<'_> {
        SampleReport {
            arm: ArmIndex(self.arm),
            tokens: self.tokens,
            confidences: &self.confidences,
            predictions: &self.predictions,
            device_ms: &self.device_ms,
            outcome: self.outcome,
        }
    }
}

/// The observation the reward model prices, and the offload cost already priced.
pub(crate) fn observation<'a>(
    report: &SampleReport<'a>,
    cost: &crate::CostModel,
) -> Result<Observation<'a>, crate::BanditError> {
    use crate::OffloadCost;
    let base = |after: usize, confidence: f64| {
        Observation::offloaded(report.confidences, after, confidence)
            .with_predictions(report.predictions)
            .with_edge_costs(report.device_ms)
            .with_tokens(report.tokens)
    };
    let bytes_cost = |bytes: u64| cost.per_kb * bytes as f64 / 1024.0;
    Ok(match report.outcome {
        Reported::Exited { layer } => Observation::exited(report.confidences, layer)
            .with_predictions(report.predictions)
            .with_edge_costs(report.device_ms)
            .with_tokens(report.tokens),
        Reported::Answered(a) => {
            let obs = base(a.after, a.confidence);
            match cost.offload {
                OffloadCost::Constant(_) => obs,
                OffloadCost::Measured => {
                    let cloud_layers = a.exit_layer.saturating_sub(a.after);
                    let per_layer = if cloud_layers > 0 {
                        a.cloud_compute_ms / cloud_layers as f64
                    } else {
                        0.0
                    };
                    obs.with_offload_cost(a.round_trip_ms + bytes_cost(a.bytes_sent))
                        .with_cloud_layer_cost(per_layer)
                }
            }
        }
        Reported::Failed(f) => {
            let obs = base(f.after, f.confidence);
            let finish = cost.device_finish_cost(f.after, f.finish_layer, f.finish_ms, &obs)?;
            let waited = match cost.offload {
                OffloadCost::Constant(o) => o,
                OffloadCost::Measured => f.waited_ms + bytes_cost(f.bytes_sent),
            };
            obs.with_offload_cost(waited + finish)
        }
    })
}

/// `NaN` ↔ `null`: JSON has no NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::NOT_EVALUATED;

    pub fn serialize<S: Serializer>(values: &[f64], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(values.iter().map(|v| (!v.is_nan()).then_some(*v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f64>, D::Error> {
        let values = Vec::<Option<f64>>::deserialize(deserializer)?;
        Ok(values
            .into_iter()
            .map(|v| v.unwrap_or(NOT_EVALUATED))
            .collect())
    }
}

mod unpredicted_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::NOT_PREDICTED;

    pub fn serialize<S: Serializer>(values: &[u32], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(values.iter().map(|&v| (v != NOT_PREDICTED).then_some(v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        let values = Vec::<Option<u32>>::deserialize(deserializer)?;
        Ok(values
            .into_iter()
            .map(|v| v.unwrap_or(NOT_PREDICTED))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        AnyPolicy, ArmSpace, Controller, DecisionRule, DeviceProfile, Policy, PolicyConfig,
        RewardConfig, Ucb1,
    };

    fn controller(
        reward: &str,
        device: Option<&DeviceProfile>,
        policy: PolicyConfig,
    ) -> Controller {
        let reward: RewardConfig = toml::from_str(reward).unwrap();
        let (model, range) = reward.build(4, device).unwrap();
        Controller::new(
            ArmSpace::splits(4, 0.9).unwrap(),
            DecisionRule::SPLITEE,
            model,
            &policy,
            Some(range),
        )
        .unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    const CONF: [f64; 2] = [0.5, 0.6];
    const PRED: [u32; 2] = [1, 1];
    const CLOCK: [f64; 2] = [3.0, 7.0];

    fn report(outcome: Reported) -> SampleReport<'static> {
        SampleReport {
            arm: ArmIndex(1),
            tokens: 20,
            confidences: &CONF,
            predictions: &PRED,
            device_ms: &CLOCK,
            outcome,
        }
    }

    fn answered() -> Reported {
        Reported::Answered(CloudAnswered {
            after: 2,
            exit_layer: 4,
            confidence: 0.9,
            round_trip_ms: 40.0,
            cloud_compute_ms: 10.0,
            bytes_sent: 2048,
        })
    }

    #[test]
    fn a_measured_offload_costs_the_round_trip_and_its_bytes() {
        let mut c = controller(
            "lambda = 0.01\nms_per_kb = 1.5",
            None,
            PolicyConfig::Ucb1 { c: 1.0 },
        );
        let s = c.settle(&report(answered())).unwrap();
        assert!(close(s.edge_cost, 7.0));
        assert!(close(s.offload_cost, 40.0 + 3.0));
        assert!(close(s.reward, 0.9 - 0.01 * (7.0 + 43.0)));
        assert_eq!(c.policy().steps(), 1);
        assert_eq!(
            c.price(&report(answered())).unwrap(),
            s,
            "pricing does not learn"
        );
        assert_eq!(c.policy().steps(), 1);
    }

    #[test]
    fn a_failed_offload_costs_the_wait_and_the_profiled_finish() {
        let device: DeviceProfile =
            toml::from_str("layer_ms = [10.0, 10.0, 10.0, 10.0]\nref_tokens = 10").unwrap();
        let mut c = controller(
            "lambda = 0.01\nedge_costs = \"profile\"",
            Some(&device),
            PolicyConfig::SplitEeS { c: 1.0 },
        );
        let failed = Reported::Failed(OffloadFailed {
            after: 2,
            waited_ms: 100.0,
            bytes_sent: 0,
            finish_layer: 4,
            confidence: 0.8,
            finish_ms: 1.0,
        });
        let s = c.settle(&report(failed)).unwrap();
        // 20 tokens at a 10-token profile: 20 ms a layer, whatever the clock said.
        assert!(close(s.edge_cost, 40.0));
        assert!(close(s.offload_cost, 100.0 + 40.0));
        assert!(close(s.reward, 0.8 - 0.01 * 180.0));
        let AnyPolicy::Ucb1(p) = c.policy() else {
            panic!()
        };
        assert_eq!(
            Ucb1::counts(p),
            [0, 1, 0, 0],
            "no side information from a failure"
        );
        // An answered offload does teach the shallower arm, priced with one more cloud layer.
        c.settle(&report(answered())).unwrap();
        let AnyPolicy::Ucb1(p) = c.policy() else {
            panic!()
        };
        assert_eq!(Ucb1::counts(p), [1, 2, 0, 0]);
    }

    #[test]
    fn side_information_prices_a_shallower_offload_with_more_cloud_layers() {
        let c = controller("lambda = 0.01", None, PolicyConfig::SplitEeS { c: 1.0 });
        let rep = report(answered());
        let obs = observation(&rep, &c.reward_model().cost).unwrap();
        let shallower = crate::Arm {
            split: 1,
            threshold: 0.9,
        };
        let r = c
            .reward_model()
            .counterfactual(shallower, DecisionRule::SPLITEE, 4, &obs)
            .unwrap();
        // Edge: 3 ms to layer 1; offload: 40 ms plus one more cloud layer at 10 / 2 ms.
        assert!(close(r, 0.9 - 0.01 * (3.0 + 45.0)));
    }

    #[test]
    fn a_log_gives_back_the_report_it_was_made_from() {
        let confidences = [f64::NAN, 0.75];
        let predictions = [NOT_PREDICTED, 0];
        let rep = SampleReport {
            confidences: &confidences,
            predictions: &predictions,
            ..report(answered())
        };
        let json = serde_json::to_string(&SampleLog::new(&rep)).unwrap();
        assert!(json.contains("\"confidences\":[null,0.75]"), "{json}");
        let back: SampleLog = serde_json::from_str(&json).unwrap();
        let again = back.as_report();
        assert!(again.confidences[0].is_nan() && again.confidences[1] == 0.75);
        assert_eq!(again.predictions, predictions);
        assert_eq!(
            (again.outcome, again.device_ms),
            (rep.outcome, rep.device_ms)
        );
        let c = controller("lambda = 0.01", None, PolicyConfig::Ucb1 { c: 1.0 });
        assert_eq!(c.price(&again), c.price(&rep));
    }
}
