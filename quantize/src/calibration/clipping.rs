//! Range clipping for tensors read only by saturating functions (precision-rules §1.4): beyond
//! a few units their outputs sit at the asymptotes, so range spent past that is wasted.

/// Inputs of Sigmoid beyond this magnitude give outputs at the asymptotes (precision-rules §1.4).
pub const SIGMOID_INPUT_LIMIT: f32 = 6.0;
/// Inputs of Tanh beyond this magnitude give outputs at the asymptotes (precision-rules §1.4).
pub const TANH_INPUT_LIMIT: f32 = 3.0;

/// The magnitude a tensor's range may be clipped to when every consumer is a saturating
/// function (precision-rules §1.4): 6 when all consumers are Sigmoid, 3 when all are Tanh,
/// otherwise (no consumers, other ops, mixed) none.
pub fn saturating_input_limit<S: AsRef<str>>(consumer_ops: &[S]) -> Option<f32> {
    let first = consumer_ops.first()?.as_ref();
    let limit = match first {
        "Sigmoid" => SIGMOID_INPUT_LIMIT,
        "Tanh" => TANH_INPUT_LIMIT,
        _ => return None,
    };
    consumer_ops.iter().all(|op| op.as_ref() == first).then_some(limit)
}

/// Clips a calibrated range for the op types that read the tensor: a tensor read only by
/// Sigmoid is clipped to [-6, 6], one read only by Tanh to [-3, 3]; any other list (empty,
/// other ops, mixed) leaves the range unchanged. A graph output must appear in the list as a
/// consumer of its own (any other name) so it is never clipped.
pub fn clip_for_consumers<S: AsRef<str>>(range: (f32, f32), consumer_ops: &[S]) -> (f32, f32) {
    match saturating_input_limit(consumer_ops) {
        Some(limit) => (range.0.clamp(-limit, limit), range.1.clamp(-limit, limit)),
        None => range,
    }
}
