//! Bandit policies behind one [`Policy`] trait, dispatched statically through [`AnyPolicy`].

mod baselines;
mod epsilon;
mod kl_ucb;
mod nonstationary;
mod structured;
mod thompson;
mod ucb;

pub use baselines::{FixedArm, Oracle, UniformRandom};
pub use epsilon::EpsilonGreedy;
pub use kl_ucb::KlUcb;
pub use nonstationary::{DiscountedUcb, MAX_WINDOW, SlidingWindowUcb};
pub use structured::{EdgeSeen, LinkSample, Reveal, StructuredUcb};
pub use thompson::GaussianThompson;
pub use ucb::Ucb1;

use serde::{Deserialize, Serialize};

use crate::arms::ArmIndex;
use crate::error::BanditError;
use crate::reward::RewardRange;

/// A stochastic multi-armed bandit policy.
///
/// `select` and `update` never allocate. A round is one `select` followed by one `update` of
/// the selected arm; the time step `t` used by the indices counts `update` calls, so a
/// selection that is abandoned (sample dropped) does not age the policy.
pub trait Policy {
    fn num_arms(&self) -> usize;

    /// The arm to play next. Ties go to the lowest index.
    fn select(&mut self) -> ArmIndex;

    /// Feed the reward of the arm that was played. Errors on a non-finite reward or an arm
    /// out of range, leaving the state untouched.
    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError>;

    /// Feed a reward of an arm that was *not* played but whose reward on this sample could be
    /// computed from what was observed (side information). It does not advance time. Policies
    /// that do not use side information validate the input and ignore it.
    fn update_side(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        check_update(arm, reward, self.num_arms()).map(|_| ())
    }

    /// Whether [`update_side`](Self::update_side) changes anything; callers skip computing
    /// counterfactual rewards otherwise.
    fn uses_side_information(&self) -> bool {
        false
    }

    /// Number of `update` calls so far.
    fn steps(&self) -> u64;
}

/// Configuration of a policy, e.g. from TOML:
///
/// ```toml
/// kind = "discounted-ucb"
/// gamma = 0.995
/// c = 1.0
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PolicyConfig {
    /// UCB1: `μ̂_i + c·(hi − lo)·sqrt(ln t / n_i)`.
    Ucb1 {
        #[serde(default = "default_c")]
        c: f64,
    },
    /// SplitEE-S: UCB1 that also learns from side information.
    SplitEeS {
        #[serde(default = "default_c")]
        c: f64,
    },
    /// KL-UCB with exploration budget `ln t + c·ln ln t` (c = 0 is the practical choice).
    KlUcb {
        #[serde(default)]
        c: f64,
    },
    /// Discounted UCB with discount `gamma` in (0, 1].
    DiscountedUcb {
        gamma: f64,
        #[serde(default = "default_c")]
        c: f64,
    },
    /// Sliding-window UCB over the last `window` rounds.
    SlidingWindowUcb {
        window: usize,
        #[serde(default = "default_c")]
        c: f64,
    },
    /// Gaussian Thompson sampling; posterior std `sigma·(hi − lo)/sqrt(n_i + 1)`.
    Thompson {
        #[serde(default = "default_sigma")]
        sigma: f64,
        #[serde(default)]
        seed: u64,
    },
    EpsilonGreedy {
        epsilon: f64,
        #[serde(default)]
        seed: u64,
    },
    Fixed {
        arm: usize,
    },
    Random {
        #[serde(default)]
        seed: u64,
    },
    /// Always plays the arm with the highest of `means` (known in hindsight).
    Oracle {
        means: Vec<f64>,
    },
    /// Structured UCB: every arm's reward from estimates the arms share (exit rates and
    /// gains per arm from every sample that reveals them, one link cost model forgetting
    /// with `γ = 1 − 1/link_memory` per sample); see [`StructuredUcb`].
    StructuredUcb {
        #[serde(default = "default_structured_c")]
        c: f64,
        #[serde(default = "default_link_memory")]
        link_memory: f64,
    },
}

/// The defaults, chosen on the simulator (docs/bandits.md, "Structured UCB"): the smallest memory and
/// the exploration that re-converge within 100 samples after experiment 3's link changes while
/// keeping ≥ 90 % of the best fixed arm's reward on experiment 2's traces at λ = 0.002.
fn default_structured_c() -> f64 {
    0.25
}

fn default_link_memory() -> f64 {
    100.0
}

fn default_c() -> f64 {
    1.0
}

impl Default for PolicyConfig {
    /// UCB1 with `c = 1`: what an agent config without a `[policy]` plays.
    fn default() -> Self {
        PolicyConfig::Ucb1 { c: default_c() }
    }
}

fn default_sigma() -> f64 {
    1.0
}

impl PolicyConfig {
    /// Builds the policy for `num_arms` arms with rewards bounded by `range`.
    pub fn build(&self, num_arms: usize, range: RewardRange) -> Result<AnyPolicy, BanditError> {
        Ok(match self {
            PolicyConfig::Ucb1 { c } => AnyPolicy::Ucb1(Ucb1::new(num_arms, *c, range)?),
            PolicyConfig::SplitEeS { c } => {
                AnyPolicy::Ucb1(Ucb1::with_side_information(num_arms, *c, range)?)
            }
            PolicyConfig::KlUcb { c } => AnyPolicy::KlUcb(KlUcb::new(num_arms, *c, range)?),
            PolicyConfig::DiscountedUcb { gamma, c } => {
                AnyPolicy::DiscountedUcb(DiscountedUcb::new(num_arms, *gamma, *c, range)?)
            }
            PolicyConfig::SlidingWindowUcb { window, c } => {
                AnyPolicy::SlidingWindowUcb(SlidingWindowUcb::new(num_arms, *window, *c, range)?)
            }
            PolicyConfig::Thompson { sigma, seed } => {
                AnyPolicy::Thompson(GaussianThompson::new(num_arms, *sigma, range, *seed)?)
            }
            PolicyConfig::EpsilonGreedy { epsilon, seed } => {
                AnyPolicy::EpsilonGreedy(EpsilonGreedy::new(num_arms, *epsilon, *seed)?)
            }
            PolicyConfig::Fixed { arm } => AnyPolicy::Fixed(FixedArm::new(num_arms, *arm)?),
            PolicyConfig::Random { seed } => {
                AnyPolicy::Random(UniformRandom::new(num_arms, *seed)?)
            }
            PolicyConfig::Oracle { means } => AnyPolicy::Oracle(Oracle::new(means.clone())?),
            PolicyConfig::StructuredUcb { .. } => {
                return Err(BanditError::InvalidConfig(
                    "structured-ucb knows the arms and the cost model: build it with a \
                     Controller"
                        .into(),
                ));
            }
        })
    }
}

macro_rules! any_policy {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// Enum dispatch over every policy: no virtual calls, one serde representation.
        ///
        /// Deserialization re-checks the internal invariants, so a corrupted state file gives
        /// an error instead of a later panic.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(try_from = "AnyPolicyRepr")]
        pub enum AnyPolicy {
            $($variant($ty)),*
        }

        #[derive(Deserialize)]
        enum AnyPolicyRepr {
            $($variant($ty)),*
        }

        impl TryFrom<AnyPolicyRepr> for AnyPolicy {
            type Error = BanditError;
            fn try_from(repr: AnyPolicyRepr) -> Result<Self, BanditError> {
                match repr {
                    $(AnyPolicyRepr::$variant(mut p) => {
                        p.check_state()?;
                        Ok(AnyPolicy::$variant(p))
                    })*
                }
            }
        }

        impl Policy for AnyPolicy {
            fn num_arms(&self) -> usize {
                match self { $(AnyPolicy::$variant(p) => p.num_arms()),* }
            }
            #[inline]
            fn select(&mut self) -> ArmIndex {
                match self { $(AnyPolicy::$variant(p) => p.select()),* }
            }
            #[inline]
            fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
                match self { $(AnyPolicy::$variant(p) => p.update(arm, reward)),* }
            }
            fn update_side(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
                match self { $(AnyPolicy::$variant(p) => p.update_side(arm, reward)),* }
            }
            fn uses_side_information(&self) -> bool {
                match self { $(AnyPolicy::$variant(p) => p.uses_side_information()),* }
            }
            fn steps(&self) -> u64 {
                match self { $(AnyPolicy::$variant(p) => p.steps()),* }
            }
        }
    };
}

any_policy! {
    Ucb1(Ucb1),
    KlUcb(KlUcb),
    DiscountedUcb(DiscountedUcb),
    SlidingWindowUcb(SlidingWindowUcb),
    Thompson(GaussianThompson),
    EpsilonGreedy(EpsilonGreedy),
    Fixed(FixedArm),
    Random(UniformRandom),
    Oracle(Oracle),
    Structured(StructuredUcb),
}

/// Validates an update; returns the arm as a plain index.
pub(crate) fn check_update(
    arm: ArmIndex,
    reward: f64,
    num_arms: usize,
) -> Result<usize, BanditError> {
    if arm.0 >= num_arms {
        return Err(BanditError::ArmOutOfRange {
            arm: arm.0,
            num_arms,
        });
    }
    if !reward.is_finite() {
        return Err(BanditError::NonFiniteReward(reward));
    }
    Ok(arm.0)
}

pub(crate) fn check_num_arms(num_arms: usize) -> Result<(), BanditError> {
    if num_arms == 0 {
        Err(BanditError::EmptyArmSet)
    } else {
        Ok(())
    }
}

pub(crate) fn check_exploration(c: f64) -> Result<(), BanditError> {
    if c.is_finite() && c >= 0.0 {
        Ok(())
    } else {
        Err(BanditError::InvalidExploration(c))
    }
}

/// Per-arm vectors of a deserialized state must agree, or indexing would panic later; only a
/// hand-edited or truncated state file gets here.
pub(crate) fn check_lengths(num_arms: usize, lengths: &[usize]) -> Result<(), BanditError> {
    check_num_arms(num_arms)?;
    if lengths.iter().all(|&l| l == num_arms) {
        Ok(())
    } else {
        Err(BanditError::CorruptState(
            "per-arm vectors differ in length",
        ))
    }
}
