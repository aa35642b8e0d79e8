use thiserror::Error;

/// Everything that can go wrong in this crate.
///
/// Every invalid configuration and every invalid input is reported through this type; the
/// crate never panics on user input.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum BanditError {
    #[error("the arm set is empty")]
    EmptyArmSet,
    #[error("the model must have at least one layer")]
    NoLayers,
    #[error("split layer {split} is outside 1..={num_layers}")]
    SplitOutOfRange { split: usize, num_layers: usize },
    #[error("threshold {0} is outside [0, 1]")]
    ThresholdOutOfRange(f64),
    #[error("arm {index} duplicates an earlier arm")]
    DuplicateArm { index: usize },
    #[error("lambda must be finite and >= 0, got {0}")]
    InvalidLambda(f64),
    #[error("cost {what} must be finite and >= 0, got {value}")]
    InvalidCost { what: &'static str, value: f64 },
    #[error("cost profile has {got} entries but the model has {num_layers} layers")]
    CostProfileLength { got: usize, num_layers: usize },
    #[error("reward range [{lo}, {hi}] must be finite with lo < hi")]
    InvalidRewardRange { lo: f64, hi: f64 },
    #[error("the reward range cannot be derived from measured costs; supply one explicitly")]
    RewardRangeUnknown,
    #[error("reward must be finite, got {0}")]
    NonFiniteReward(f64),
    #[error("arm index {arm} is out of range for {num_arms} arms")]
    ArmOutOfRange { arm: usize, num_arms: usize },
    #[error("exploration constant c must be finite and >= 0, got {0}")]
    InvalidExploration(f64),
    #[error("discount factor gamma must be in (0, 1], got {0}")]
    InvalidDiscount(f64),
    #[error("sliding window length must be at least 1")]
    ZeroWindow,
    #[error("epsilon must be in [0, 1], got {0}")]
    InvalidEpsilon(f64),
    #[error("Thompson sampling scale sigma must be finite and > 0, got {0}")]
    InvalidSigma(f64),
    #[error("oracle has {got} arm means but there are {num_arms} arms")]
    OracleMeansLength { got: usize, num_arms: usize },
    #[error("oracle arm mean {index} is not finite")]
    NonFiniteMean { index: usize },
    #[error("confidence at layer {layer} must be in [0, 1], got {value}")]
    ConfidenceOutOfRange { layer: usize, value: f64 },
    #[error("the observation lacks the confidence of layer {layer}")]
    MissingConfidence { layer: usize },
    #[error("the observation lacks the measured edge cost up to layer {layer}")]
    MissingEdgeCost { layer: usize },
    #[error("the observation lacks the measured offload cost")]
    MissingOffloadCost,
    #[error("the observation lacks the token count that a device profile is scaled by")]
    MissingTokens,
    #[error("{0}")]
    InvalidConfig(String),
    #[error("the observation lacks the predicted classes of layers 1 and {layer}")]
    MissingPredictions { layer: usize },
    #[error("layer {layer} is outside 1..={num_layers}")]
    LayerOutOfRange { layer: usize, num_layers: usize },
    #[error("expected layer {expected}, got layer {got}")]
    LayerOutOfOrder { expected: usize, got: usize },
    #[error("the sample decision is already final")]
    DecisionAlreadyMade,
    #[error("corrupt policy state: {0}")]
    CorruptState(&'static str),
    #[error("sliding window {window} exceeds the supported maximum {max}")]
    WindowTooLarge { window: usize, max: usize },
    #[error("the UEE-UCB proxy reward has no offload: a sample must exit on the device")]
    OffloadNotSupported,
    #[error("arms.splits: `{0}` is neither \"exits\" nor a list of layers")]
    UnknownSplits(String),
    #[error("arms with split {split} test the exit after layer {layer}, which has no exit head")]
    NoExitHead { layer: usize, split: usize },
}
