//! Builders shared by the unit tests: small hand-made graphs and deterministic random data.

use crate::onnx::{GraphProto, NodeProto, TensorProto, TypeProto, ValueInfoProto, type_proto};

/// A node of the default domain.
pub(crate) fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A value declaration without a type.
pub(crate) fn value(name: &str) -> ValueInfoProto {
    ValueInfoProto { name: Some(name.into()), ..Default::default() }
}

/// A value declaration of a tensor with element type `elem_type` and no shape.
pub(crate) fn typed_value(name: &str, elem_type: i32) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: Some(elem_type), shape: None })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A graph reading `x` and the initializer `w` and writing `y`.
pub(crate) fn graph(nodes: Vec<NodeProto>) -> GraphProto {
    GraphProto {
        name: Some("g".into()),
        node: nodes,
        input: vec![value("x")],
        output: vec![value("y")],
        initializer: vec![TensorProto { name: Some("w".into()), ..Default::default() }],
        ..Default::default()
    }
}

/// SplitMix64 with Box-Muller: deterministic test data without a rand dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn gaussian(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub(crate) fn gaussians(&mut self, n: usize, sigma: f32) -> Vec<f32> {
        (0..n).map(|_| self.gaussian() * sigma).collect()
    }
}
