//! Sans-IO multi-armed bandits that choose, per sample, where to split an early-exit BERT
//! between the edge device and the cloud, and which confidence threshold to exit with, and that
//! learn from rewards computed without labels.
//!
//! # Sans-IO design
//!
//! This crate performs no I/O and reads no clock. Time steps, confidences and measured costs
//! are inputs; decisions and rewards are outputs. The live edge agent and the offline
//! simulator drive the very same code, the way quinn-proto is driven both by quinn and by
//! simulated tests. It knows nothing of networking or tensors.
//!
//! A round, as both drivers run it ([`Controller`] bundles the pieces):
//!
//! 1. [`Controller::select`] (→ [`Policy::select`]) picks an arm `(s, α)`.
//! 2. A [`DevicePass`] (from [`Controller::device_pass`]) runs the device's layers: it says
//!    which exit heads to evaluate, turns their class probabilities into confidences under the
//!    configured [`ConfidenceMeasure`], feeds them to a [`SampleDecision`] and records the
//!    device clock, until [`Decision::Exit`] or [`Decision::Offload`]. [`decide`] decides
//!    over a slice of confidences.
//! 3. The driver reports what happened in a [`SampleReport`] ([`DevicePass::report`]): the
//!    confidences seen, the device clock, and the offload's fate ([`Reported`]: answered with
//!    its round trip, compute time and bytes, or failed with its wait and the device's finish).
//! 4. [`Controller::settle`] prices the report (see [`settle`]), computes the reward and
//!    updates the policy. The drivers compute neither: one decision path.
//!    ([`Controller::learn`] is the same step from an [`Observation`] already priced.)
//!
//! # Arms
//!
//! An [`Arm`] is `(s, α)`: split layer `s ∈ 1..=L` (layers `1..=s` run on the device; `s = L`
//! means the whole model runs on the device) and threshold `α ∈ [0, 1]`. An [`ArmSpace`]
//! enumerates arms with stable indices ([`ArmIndex`]):
//! [`ArmSpace::splits`] (SplitEE: α fixed), [`ArmSpace::thresholds`] (CeeBERT, UCBEE/AdaEE:
//! exit layer fixed), [`ArmSpace::grid`] (joint, split-major) or [`ArmSpace::from_arms`].
//!
//! # Per-sample decision
//!
//! With confidence `C_j` = max softmax probability of exit `j`, a sample exits at `j` when
//! `C_j ≥ α`. [`ExitCheck::EveryLayer`] tests every device layer `j ≤ s` (first success
//! wins); [`ExitCheck::SplitOnly`] tests only `j = s`. If the test fails at `s < L`,
//! [`Fallback::Offload`] sends the state to the cloud and [`Fallback::ExitAtSplit`] infers at
//! `s` anyway (no cloud). A sample reaching `s = L` always exits at `L`.
//!
//! # Rewards
//!
//! Costs come from a [`CostModel`]: `cost_edge(i)` is the device cost of layers `1..=i` —
//! abstract units `cost_edge(i) = i` as in the papers ([`EdgeCost::Layers`]), a profiled table
//! ([`EdgeCost::Profile`]) or measured per sample ([`EdgeCost::Measured`]) — and
//! `cost_offload` is a constant `o` or measured ([`OffloadCost`]); `λ ≥ 0` prices them.
//!
//! * SplitEE ([`RewardKind::SplitEe`], Bajpai et al. 2023):
//!   exit on device at `i`: `r = C_i − λ·cost_edge(i)`;
//!   offload after `s`: `r = C_L − λ·(cost_edge(s) + cost_offload)`;
//!   whole model on device (`s = L`): `r = C_L − λ·cost_edge(L)`.
//! * AdaEE / UCBEE ([`RewardKind::AdaEe`], Pacheco et al.): exit: `r = 0`;
//!   offload after `s`: `r = max(C_L − C_s, 0) − λ·cost_offload` (λ = 1 gives the paper's
//!   `o`): offloading pays only when the cloud is more confident by more than its cost.
//! * UEE-UCB label-free proxy ([`RewardKind::UeeProxy`], Hanawal et al.): exits only, no
//!   offload; exit at `i`: `r = 1[ŷ_1 ≠ ŷ_i] − λ·cost_edge(i)`. Under strong dominance (an
//!   exit that is right stays right deeper), `err_1 − err_i = P(ŷ_1 ≠ ŷ_i)`, so maximising this
//!   proxy minimises `err_i + λ·cost_edge(i)` without labels.
//!
//! Rewards can fall outside `[0, 1]` because costs subtract. Policies take a known
//! [`RewardRange`] `[lo, hi]` ([`RewardModel::range`] derives it when costs are not measured:
//! `hi = 1`, `lo = −λ·(max cost)`): the UCB family and Thompson sampling scale their
//! exploration by `hi − lo`, KL-UCB normalises `(r − lo)/(hi − lo)` into `[0, 1]` (clamping).
//!
//! # Policies
//!
//! All implement [`Policy`]; [`AnyPolicy`] is the enum dispatch built from a serde
//! [`PolicyConfig`]. `t` is the number of updates, `n_i` the number of rewards of arm `i`,
//! `μ̂_i` their mean, `W = hi − lo`. Arms never played are played first, lowest index first.
//!
//! * [`Ucb1`]: `μ̂_i + c·W·sqrt(ln t / n_i)`; the papers use `c = 1` or `c = 2`
//!   (`c = √2` is Auer et al.'s UCB1).
//! * SplitEE-S ([`Ucb1::with_side_information`], [`PolicyConfig::SplitEeS`]): UCB1, plus after
//!   each sample every arm with a shallower split whose reward on that sample is computable
//!   gets that reward too (`n_i`, `μ̂_i` updated, `t` not).
//! * [`KlUcb`]: `max{q ∈ [μ̂_i, 1] : n_i·kl(μ̂_i, q) ≤ ln t + c·ln ln t}` on normalised rewards,
//!   Bernoulli `kl(p, q) = p ln(p/q) + (1−p) ln((1−p)/(1−q))`, solved by bisection.
//! * [`DiscountedUcb`] (γ ∈ (0, 1]): statistics decay by `γ` each round,
//!   `N_i = Σ_s γ^{t−s} 1[a_s = i]`, `μ̂_i = Σ_s γ^{t−s} r_s 1[a_s = i] / N_i`, index
//!   `μ̂_i + c·W·sqrt(ln Σ_j N_j / N_i)`; memory ≈ `1/(1−γ)` rounds.
//! * [`SlidingWindowUcb`] (τ ≥ 1): statistics over the last `τ` rounds only, index
//!   `μ̂_i + c·W·sqrt(ln min(t, τ) / N_i)`.
//! * [`GaussianThompson`]: sample `θ_i ~ N((S_i + m_0)/(n_i + 1), (σW)²/(n_i + 1))`,
//!   `m_0 = (lo + hi)/2`, play `argmax θ_i`.
//! * [`EpsilonGreedy`]: with probability `ε` a uniform arm, else `argmax μ̂_i`.
//! * Baselines: [`FixedArm`], [`UniformRandom`], and [`Oracle`], which is given the arm means
//!   and always plays the best: the reference for regret `Σ_t (μ* − μ_{a_t})`.
//! * [`StructuredUcb`] (`structured-ucb`): every arm's reward from estimates all arms share —
//!   each arm's exit share and gains from every sample that reveals it, the device's
//!   per-layer costs, one discounted link-cost model — with optimism only where each part is
//!   uncertain; fed by the controller with what each sample reveals ([`policy::Reveal`],
//!   [`policy::LinkSample`]). Its formulas are in its own docs.
//!
//! # Certified thresholds
//!
//! [`calibrate::certify`] keeps the arms whose accuracy drop against the final exit is at most
//! `ε` with probability `≥ 1 − δ` on a labelled calibration set (Learn-then-Test with exact
//! binomial p-values); [`ArmsConfig::allowed`] restricts an agent to them.
//!
//! ## SplitEE-S without peeking
//!
//! [`Controller::learn`] updates a shallower arm `(s', α')` only with a reward computed from what
//! was actually observed for this sample ([`RewardModel::counterfactual`]): its decision must
//! follow from the exit confidences the device evaluated, and if that decision is an offload,
//! `C_L` must have been observed — returned by the cloud because the sample was offloaded, or
//! computed on device when the whole model ran there. **This differs from the published
//! SplitEE code, which uses the final-layer confidence of every sample**, including samples
//! that exited on the device and whose `C_L` a real deployment never sees. The price of
//! honesty: which shallower arms get a side reward depends on the sample (an easy sample that
//! exited on the device reveals no offload rewards), so side rewards are a censored sample;
//! the played arm's own rewards remain unbiased.
//!
//! # Determinism, ties, state
//!
//! Given its configuration and seed, every policy makes the same choices for the same rewards.
//! Randomised policies use a [`rand_chacha::ChaCha8Rng`] seeded from the configured `seed`,
//! and its state is part of the serialized policy. Ties between equal indices are broken
//! deterministically towards the lowest arm index (strict `>` scan). Every policy, and the
//! whole [`Controller`], is `Serialize + Deserialize`: an edge agent that restarts from a
//! saved state makes exactly the choices it would have made without the restart.
//! Deserializing an [`AnyPolicy`] or a [`Controller`] re-validates it. The state must
//! round-trip floats exactly: with `serde_json`, enable its `float_roundtrip` feature (its
//! default parser may change the last bit of an `f64`, after which choices almost always,
//! but not provably, stay the same).
//!
//! # Errors and allocation
//!
//! Invalid configuration (empty arm set, λ < 0, threshold outside `[0, 1]`, `c < 0`,
//! `γ ∉ (0, 1]`, window 0, `ε ∉ [0, 1]`, …) and invalid input (NaN or infinite reward,
//! missing confidence) return a [`BanditError`]; nothing panics on user input.
//! `select`/`update` and [`Controller::learn`] do not allocate: all buffers are sized in the
//! constructors.

mod arms;
pub mod calibrate;
mod config;
mod controller;
mod decision;
mod error;
mod measure;
mod observation;
mod pass;
pub mod policy;
mod reward;
pub mod settle;

pub use arms::{Arm, ArmIndex, ArmSpace};
pub use config::{ArmsConfig, DeviceProfile, EdgeCosts, RewardConfig, Splits};
pub use controller::Controller;
pub use decision::{Decision, DecisionRule, ExitCheck, Fallback, SampleDecision, Step, decide};
pub use error::BanditError;
pub use measure::{Confidence, ConfidenceMeasure, ExitsConfig, argmax, max_prob};
pub use observation::{NOT_EVALUATED, Observation, Outcome};
pub use pass::{DevicePass, NOT_PREDICTED};
pub use policy::{
    AnyPolicy, DiscountedUcb, EpsilonGreedy, FixedArm, GaussianThompson, KlUcb, Oracle, Policy,
    PolicyConfig, SlidingWindowUcb, StructuredUcb, Ucb1, UniformRandom,
};
pub use reward::{CostModel, EdgeCost, OffloadCost, RewardKind, RewardModel, RewardRange};
pub use settle::{CloudAnswered, OffloadFailed, Reported, SampleLog, SampleReport, Settlement};
