//! Inference-mode BatchNormalization after a Conv, folded into the Conv's weights and bias.
//!
//! ONNX Runtime folds the pair itself in FP32, but not once the Conv's output is quantized:
//! static INT8 would otherwise put a QuantizeLinear/DequantizeLinear pair between them and run
//! the BatchNormalization in float on every call (PP-OCR's classifiers and recognisers, exported
//! by paddle2onnx, keep some unfolded). Folding first gives the integer kernel the whole job.
//!
//! With s = scale / sqrt(var + epsilon): W'[m] = W[m] * s[m], B'[m] = (B[m] - mean[m]) * s[m] + bias[m].

use std::collections::HashSet;

use crate::graph::GraphIndex;
use crate::onnx::{GraphProto, NodeProto, TensorProto};
use crate::tensor::{f32_values, float_tensor};
use crate::types::float_attribute_or;

/// The constant vectors of an inference-mode BatchNormalization, one entry per channel.
struct Normalization {
    scale: Vec<f32>,
    bias: Vec<f32>,
    mean: Vec<f32>,
    variance: Vec<f32>,
    epsilon: f32,
}

fn initializer<'g>(graph: &'g GraphProto, name: &str) -> Option<&'g TensorProto> {
    graph.initializer.iter().find(|t| t.name() == name)
}

impl Normalization {
    fn of(graph: &GraphProto, node: &NodeProto) -> Option<Self> {
        let training = node.attribute.iter().any(|a| a.name() == "training_mode" && a.i.unwrap_or(0) != 0);
        if training || node.input.len() != 5 || node.output.iter().skip(1).any(|o| !o.is_empty()) {
            return None;
        }
        let vector = |index: usize| initializer(graph, &node.input[index]).and_then(f32_values);
        let normalization = Normalization {
            scale: vector(1)?,
            bias: vector(2)?,
            mean: vector(3)?,
            variance: vector(4)?,
            epsilon: float_attribute_or(node, "epsilon", 1e-5),
        };
        let channels = normalization.scale.len();
        let same =
            [&normalization.bias, &normalization.mean, &normalization.variance].iter().all(|v| v.len() == channels);
        same.then_some(normalization)
    }

    fn factor(&self, channel: usize) -> f32 {
        self.scale[channel] / (self.variance[channel] + self.epsilon).sqrt()
    }
}

/// Folds every BatchNormalization that alone reads a Conv's output (with constant weights read
/// by that Conv only) into the Conv. Returns how many were folded.
pub fn fold_batch_norms(graph: &mut GraphProto) -> usize {
    let mut folds = Vec::new();
    {
        let index = GraphIndex::build(graph);
        let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name()).collect();
        for (position, node) in graph.node.iter().enumerate() {
            if node.op_type() != "BatchNormalization" || !node.domain().is_empty() {
                continue;
            }
            let Some(conv) = node.input.first().and_then(|x| index.producer(x)) else { continue };
            let conv_node = &graph.node[conv];
            let conv_output = conv_node.output.first().map_or("", String::as_str);
            let alone = index.consumers(conv_output).len() == 1 && !outputs.contains(conv_output);
            let weight_alone = conv_node.input.get(1).is_some_and(|w| index.consumers(w).len() == 1);
            let bias_alone = conv_node.input.get(2).is_none_or(|b| b.is_empty() || index.consumers(b).len() == 1);
            if conv_node.op_type() == "Conv"
                && conv_node.domain().is_empty()
                && alone
                && weight_alone
                && bias_alone
                && let Some(normalization) = Normalization::of(graph, node)
            {
                folds.push((conv, position, normalization));
            }
        }
    }
    let mut removed = HashSet::new();
    for (conv, position, normalization) in folds {
        if fold_one(graph, conv, position, &normalization) {
            removed.insert(position);
        }
    }
    if !removed.is_empty() {
        let mut position = 0;
        graph.node.retain(|_| {
            position += 1;
            !removed.contains(&(position - 1))
        });
        tracing::debug!(folded = removed.len(), "int8 static: BatchNormalization folded into Conv");
    }
    removed.len()
}

/// Rewrites the Conv at `conv` to include the normalization at `position`; the caller drops the
/// normalization node. False (nothing changed) when the weights do not fit.
fn fold_one(graph: &mut GraphProto, conv: usize, position: usize, normalization: &Normalization) -> bool {
    let conv_node = &graph.node[conv];
    let weight_name = conv_node.input[1].clone();
    let bias_name = conv_node.input.get(2).filter(|b| !b.is_empty()).cloned();
    let Some(weight) = initializer(graph, &weight_name) else { return false };
    let (Some(mut values), dims) = (f32_values(weight), weight.dims.clone()) else { return false };
    let channels = normalization.scale.len();
    if dims.first().copied() != Some(channels as i64) || values.len() % channels != 0 {
        return false;
    }
    let bias = match &bias_name {
        Some(name) => match initializer(graph, name).and_then(f32_values) {
            Some(bias) if bias.len() == channels => bias,
            _ => return false,
        },
        None => vec![0.0; channels],
    };
    let per_channel = values.len() / channels;
    for (channel, block) in values.chunks_exact_mut(per_channel).enumerate() {
        let factor = normalization.factor(channel);
        block.iter_mut().for_each(|w| *w *= factor);
    }
    let folded_bias: Vec<f32> = (0..channels)
        .map(|c| (bias[c] - normalization.mean[c]) * normalization.factor(c) + normalization.bias[c])
        .collect();
    let normalized_output = graph.node[position].output[0].clone();
    let new_bias_name = bias_name.unwrap_or_else(|| format!("{normalized_output}_folded_bias"));
    graph.initializer.retain(|t| t.name() != weight_name && t.name() != new_bias_name);
    graph.initializer.push(float_tensor(&weight_name, dims, &values));
    graph.initializer.push(float_tensor(&new_bias_name, vec![channels as i64], &folded_bias));
    let conv_node = &mut graph.node[conv];
    conv_node.input.resize(3, String::new());
    conv_node.input[2] = new_bias_name;
    let unnormalized = std::mem::replace(&mut conv_node.output[0], normalized_output);
    graph.value_info.retain(|v| v.name() != unnormalized);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{node, typed_value};

    #[test]
    fn a_normalized_convolution_becomes_one_convolution_with_the_same_result() {
        // 1x1 Conv with two output channels on one input channel: y[m] = w[m] * x + b[m].
        let vector = |name: &str, values: &[f32]| float_tensor(name, vec![values.len() as i64], values);
        let mut graph = GraphProto {
            node: vec![
                node("conv", "Conv", &["x", "w", "b"], &["c"]),
                node("bn", "BatchNormalization", &["c", "s", "t", "m", "v"], &["y"]),
            ],
            input: vec![typed_value("x", 1)],
            output: vec![typed_value("y", 1)],
            initializer: vec![
                float_tensor("w", vec![2, 1, 1, 1], &[2.0, -1.0]),
                vector("b", &[0.5, 1.0]),
                vector("s", &[3.0, 0.5]),
                vector("t", &[0.25, -0.25]),
                vector("m", &[1.0, 2.0]),
                vector("v", &[4.0, 0.25]),
            ],
            ..Default::default()
        };
        assert_eq!(fold_batch_norms(&mut graph), 1);
        assert_eq!(graph.node.len(), 1);
        assert_eq!(graph.node[0].output, ["y"]);
        let values = |name: &str| f32_values(initializer(&graph, name).unwrap()).unwrap();
        let eps = 1e-5f32;
        let f = [3.0 / (4.0 + eps).sqrt(), 0.5 / (0.25 + eps).sqrt()];
        let expected_w = [2.0 * f[0], -f[1]];
        let expected_b = [(0.5 - 1.0) * f[0] + 0.25, (1.0 - 2.0) * f[1] - 0.25];
        for (got, want) in values("w").iter().zip(expected_w).chain(values("b").iter().zip(expected_b)) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn a_convolution_read_elsewhere_too_is_left_alone() {
        let vector = |name: &str| float_tensor(name, vec![1], &[1.0]);
        let mut graph = GraphProto {
            node: vec![
                node("conv", "Conv", &["x", "w"], &["c"]),
                node("bn", "BatchNormalization", &["c", "s", "t", "m", "v"], &["y"]),
                node("relu", "Relu", &["c"], &["z"]),
            ],
            initializer: vec![
                float_tensor("w", vec![1, 1, 1, 1], &[2.0]),
                vector("s"),
                vector("t"),
                vector("m"),
                vector("v"),
            ],
            ..Default::default()
        };
        assert_eq!(fold_batch_norms(&mut graph), 0);
        assert_eq!(graph.node.len(), 3);
    }
}
