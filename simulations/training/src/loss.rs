//! Losses for exit training.

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};

/// Mean cross-entropy of `logits` `[batch, classes]` against class indices `labels` `[batch]`.
pub fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let [batch, _] = logits.dims();
    let picked = log_softmax(logits, 1).gather(1, labels.reshape([batch, 1]));
    picked.mean().neg()
}

/// Knowledge distillation from a teacher exit (Hinton et al.): `T²·KL(p_T ‖ q_T)` between the
/// temperature-softened teacher and student distributions. `T²` keeps the gradient scale
/// independent of the temperature. The teacher is detached: students learn from it, it does
/// not learn from them.
pub fn distillation(
    student_logits: Tensor<2>,
    teacher_logits: Tensor<2>,
    temperature: f64,
) -> Tensor<1> {
    let [batch, _] = student_logits.dims();
    let teacher = teacher_logits.detach().div_scalar(temperature);
    let teacher_probs = softmax(teacher.clone(), 1);
    let teacher_log_probs = log_softmax(teacher, 1);
    let student_log_probs = log_softmax(student_logits.div_scalar(temperature), 1);
    let kl = (teacher_probs * (teacher_log_probs - student_log_probs)).sum();
    kl.div_scalar(batch as f64)
        .mul_scalar(temperature * temperature)
}

/// Joint-training weights `wᵢ = i / Σⱼ j` over the exit layers: deeper exits weigh more.
pub fn joint_weights(exit_layers: &[usize]) -> Vec<f64> {
    let total: usize = exit_layers.iter().sum();
    exit_layers
        .iter()
        .map(|&layer| layer as f64 / total as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_matches_the_formula() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_data([[2.0f32, 0.0], [0.0, 1.0]], &device);
        let labels = Tensor::<1, Int>::from_data([0i64, 0], &device);
        let loss: f32 = cross_entropy(logits, labels).into_scalar::<f32>();
        let expected = ((1.0 + (-2.0f32).exp()).ln() + (1.0 + 1.0f32.exp()).ln()) / 2.0;
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    }

    #[test]
    fn distillation_is_zero_for_identical_logits_and_positive_otherwise() {
        let device = Device::flex();
        let a = Tensor::<2>::from_data([[2.0f32, -1.0], [0.5, 0.3]], &device);
        let b = Tensor::<2>::from_data([[-1.0f32, 2.0], [0.5, 0.3]], &device);
        let same: f32 = distillation(a.clone(), a.clone(), 2.0).into_scalar::<f32>();
        let different: f32 = distillation(a, b, 2.0).into_scalar::<f32>();
        assert!(same.abs() < 1e-6, "{same}");
        assert!(different > 0.1, "{different}");
    }

    #[test]
    fn joint_weights_grow_with_depth_and_sum_to_one() {
        let w = joint_weights(&[1, 2, 3]);
        assert_eq!(w, [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
    }
}
