//! What the agent tells its user: one JSON line per sample, and a summary at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use splitee_bandits::SampleLog;

/// Where a sample's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answered {
    /// An exit on the device was confident enough (or the arm kept the sample on the device).
    Device,
    /// The cloud worker finished it.
    Cloud,
    /// It was offloaded, the cloud did not answer, and the device finished it.
    DeviceFallback,
    /// The input could not be run (see `error`).
    Error,
}

impl Answered {
    pub fn name(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Cloud => "cloud",
            Self::DeviceFallback => "device-fallback",
            Self::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ArmRecord {
    pub index: usize,
    pub split: usize,
    pub threshold: f64,
}

/// Milliseconds spent on a sample, by where.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Latency {
    /// From the start of the sample's edge pass to its answer.
    pub total: f64,
    /// Tokenizing, embedding, device layers and exits.
    pub edge: f64,
    /// Round trip minus the worker's own time (transmission, propagation, stacks).
    pub network: f64,
    /// The worker's queueing and compute.
    pub cloud: f64,
    /// Waiting for a cloud answer that never came, plus finishing on the device.
    pub fallback: f64,
}

/// One output line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleRecord {
    pub id: String,
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<usize>,
    pub prediction: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_name: Option<String>,
    /// Top class probability of the answering exit.
    pub confidence: Option<f64>,
    pub answered: Answered,
    /// The layer whose exit answered.
    pub exit_layer: Option<usize>,
    pub arm: Option<ArmRecord>,
    pub tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_from: Option<usize>,
    pub latency_ms: Latency,
    pub bytes_sent: u64,
    /// Cost charged to the bandit (edge + offload, in the `[reward]` table's units: ms unless
    /// abstract).
    pub cost_ms: Option<f64>,
    pub reward: Option<f64>,
    /// The bandit had learnt from this many samples after this one (its place in the order
    /// of learning, which is not input order: offloads are learnt when their answer comes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned: Option<u64>,
    /// What the settlement priced: replaying these through `Controller::settle` in `learned`
    /// order reproduces every reward and the bandit's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed: Option<SampleLog>,
    /// The worker endpoint that answered (cloud answers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<std::net::SocketAddr>,
    /// Why the sample failed, or why the cloud did not answer it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SampleRecord {
    /// The record of a sample that could not be run.
    pub fn failed(id: String, line: usize, label: Option<usize>, error: String) -> Self {
        Self {
            id,
            line,
            label,
            prediction: None,
            prediction_name: None,
            confidence: None,
            answered: Answered::Error,
            exit_layer: None,
            arm: None,
            tokens: None,
            truncated_from: None,
            latency_ms: Latency::default(),
            bytes_sent: 0,
            cost_ms: None,
            reward: None,
            learned: None,
            observed: None,
            worker: None,
            error: Some(error),
        }
    }
}

/// Running totals over a run, turned into the final [`Summary`].
#[derive(Debug, Default)]
pub struct Tally {
    by_answer: BTreeMap<Answered, u64>,
    labelled: u64,
    correct: u64,
    latencies: Vec<f64>,
    cost_ms: f64,
    reward: f64,
    rewarded: u64,
    bytes_sent: u64,
    /// Pulls per arm index.
    pulls: BTreeMap<usize, (ArmRecord, u64)>,
    failures: BTreeMap<String, u64>,
}

impl Tally {
    pub fn add(&mut self, record: &SampleRecord) {
        *self.by_answer.entry(record.answered).or_default() += 1;
        if record.answered == Answered::Error {
            return;
        }
        if let (Some(label), Some(prediction)) = (record.label, record.prediction) {
            self.labelled += 1;
            self.correct += u64::from(label == prediction as usize);
        }
        self.latencies.push(record.latency_ms.total);
        self.cost_ms += record.cost_ms.unwrap_or(0.0);
        if let Some(reward) = record.reward {
            self.reward += reward;
            self.rewarded += 1;
        }
        self.bytes_sent += record.bytes_sent;
        if let Some(arm) = record.arm {
            self.pulls.entry(arm.index).or_insert((arm, 0)).1 += 1;
        }
        if record.answered == Answered::DeviceFallback
            && let Some(error) = &record.error
        {
            let kind = error.split(':').next().unwrap_or(error).to_owned();
            *self.failures.entry(kind).or_default() += 1;
        }
    }

    pub fn count(&self, answered: Answered) -> u64 {
        self.by_answer.get(&answered).copied().unwrap_or(0)
    }

    pub fn summary(&self) -> Summary {
        let answered = self.latencies.len() as u64;
        let mut sorted = self.latencies.clone();
        sorted.sort_by(f64::total_cmp);
        let per_sample = |total: f64| (answered > 0).then(|| total / answered as f64);
        Summary {
            samples: self.by_answer.values().sum(),
            answered,
            on_device: self.count(Answered::Device),
            in_cloud: self.count(Answered::Cloud),
            fallbacks: self.count(Answered::DeviceFallback),
            errors: self.count(Answered::Error),
            offload_rate: (answered > 0).then(|| {
                (self.count(Answered::Cloud) + self.count(Answered::DeviceFallback)) as f64
                    / answered as f64
            }),
            accuracy: (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64),
            labelled: self.labelled,
            latency_mean_ms: per_sample(self.latencies.iter().sum()),
            latency_p50_ms: percentile(&sorted, 0.50),
            latency_p99_ms: percentile(&sorted, 0.99),
            cost_mean_ms: per_sample(self.cost_ms),
            reward_mean: (self.rewarded > 0).then(|| self.reward / self.rewarded as f64),
            bytes_sent: self.bytes_sent,
            pulls: self
                .pulls
                .values()
                .map(|&(arm, pulls)| ArmPulls { arm, pulls })
                .collect(),
            fallback_reasons: self.failures.clone(),
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmPulls {
    pub arm: ArmRecord,
    pub pulls: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub samples: u64,
    pub answered: u64,
    pub on_device: u64,
    pub in_cloud: u64,
    pub fallbacks: u64,
    pub errors: u64,
    /// Samples the arm sent to the cloud (answered there or, failing that, on the device),
    /// over samples answered.
    pub offload_rate: Option<f64>,
    pub accuracy: Option<f64>,
    pub labelled: u64,
    pub latency_mean_ms: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub cost_mean_ms: Option<f64>,
    pub reward_mean: Option<f64>,
    pub bytes_sent: u64,
    pub pulls: Vec<ArmPulls>,
    /// Fallbacks by the reason the cloud did not answer.
    pub fallback_reasons: BTreeMap<String, u64>,
}

impl Summary {
    /// A plain-text table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let opt = |v: Option<f64>, scale: f64, unit: &str| {
            v.map_or_else(|| "n/a".to_owned(), |v| format!("{:.2}{unit}", v * scale))
        };
        let _ = writeln!(out, "samples          {}", self.samples);
        let _ = writeln!(
            out,
            "answered         {} (device {}, cloud {}, device fallback {}); errors {}",
            self.answered, self.on_device, self.in_cloud, self.fallbacks, self.errors
        );
        let _ = writeln!(
            out,
            "accuracy         {}{}",
            opt(self.accuracy, 100.0, "%"),
            if self.labelled > 0 {
                format!(" on {} labelled", self.labelled)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "offload rate     {}",
            opt(self.offload_rate, 100.0, "%")
        );
        let _ = writeln!(
            out,
            "latency          mean {} · p50 {} · p99 {}",
            opt(self.latency_mean_ms, 1.0, " ms"),
            opt(self.latency_p50_ms, 1.0, " ms"),
            opt(self.latency_p99_ms, 1.0, " ms")
        );
        let _ = writeln!(
            out,
            "cost             mean {} per sample; mean reward {}",
            opt(self.cost_mean_ms, 1.0, " ms"),
            opt(self.reward_mean, 1.0, "")
        );
        let _ = writeln!(out, "bytes sent       {}", self.bytes_sent);
        if !self.fallback_reasons.is_empty() {
            let reasons: Vec<String> = self
                .fallback_reasons
                .iter()
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect();
            let _ = writeln!(out, "fallbacks by     {}", reasons.join(", "));
        }
        let _ = writeln!(out, "arm pulls        (split, α): pulls");
        for ArmPulls { arm, pulls } in &self.pulls {
            let _ = writeln!(
                out,
                "  #{:<3} ({}, {:.2})  {pulls}",
                arm.index, arm.split, arm.threshold
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(answered: Answered, label: usize, prediction: u32, total: f64) -> SampleRecord {
        SampleRecord {
            prediction: Some(prediction),
            answered,
            latency_ms: Latency {
                total,
                ..Latency::default()
            },
            arm: Some(ArmRecord {
                index: 1,
                split: 2,
                threshold: 0.9,
            }),
            error: (answered == Answered::DeviceFallback).then(|| "timeout: no answer".into()),
            ..SampleRecord::failed("x".into(), 1, Some(label), String::new())
        }
    }

    #[test]
    fn summary_counts_accuracy_rates_and_percentiles() {
        let mut tally = Tally::default();
        tally.add(&answered(Answered::Device, 1, 1, 10.0));
        tally.add(&answered(Answered::Cloud, 0, 1, 30.0));
        tally.add(&answered(Answered::DeviceFallback, 0, 0, 50.0));
        tally.add(&answered(Answered::Device, 1, 1, 20.0));
        tally.add(&SampleRecord::failed(
            "bad".into(),
            9,
            None,
            "empty line".into(),
        ));
        let s = tally.summary();
        assert_eq!((s.samples, s.answered, s.errors), (5, 4, 1));
        assert_eq!(s.accuracy, Some(0.75));
        assert_eq!(s.offload_rate, Some(0.5));
        assert_eq!(s.latency_mean_ms, Some(27.5));
        assert_eq!(
            (s.latency_p50_ms, s.latency_p99_ms),
            (Some(20.0), Some(50.0))
        );
        assert_eq!(s.pulls[0].pulls, 4);
        assert_eq!(s.fallback_reasons.get("timeout"), Some(&1));
        assert!(s.table().contains("75.00%"), "{}", s.table());
    }
}
