//! 6. Casts across float and non-float types.

use mantissa_quantize::elem::{FLOAT, FLOAT16, INT64};
use mantissa_quantize::passes::fp16::{Fp16Options, KeepReason};

use crate::build::{Graph, cast, node};
use crate::inspect::cast_to;
use crate::run::convert;

#[test]
fn cast_from_int64_to_float_stays_fp32_and_reaches_a_converted_add_through_a_cast() {
    let graph = Graph::new("int_cast")
        .input("ids", INT64)
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(cast("to_float", "ids", "f", FLOAT))
        .node(node("relu", "Relu", &["x"], &["h"]))
        .node(node("add", "Add", &["h", "f"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    assert_eq!(converted.kept("to_float"), Some(&KeepReason::TypeBoundaryCast));
    assert_eq!(cast_to(converted.node("to_float")), i64::from(FLOAT));
    assert_eq!(converted.types["f"], FLOAT);
    converted.assert_converted("add");
    // The Add reads `f` through a Cast to FP16 (check_graph verified the operand types).
    let f_reader =
        converted.graph.node.iter().find(|n| n.name() != "add" && n.input.contains(&"f".to_owned())).unwrap();
    assert_eq!(f_reader.op_type(), "Cast");
    assert_eq!(cast_to(f_reader), i64::from(FLOAT16));
    assert_eq!(converted.node("add").input[1], f_reader.output[0]);
}

#[test]
fn cast_from_float_to_int64_reads_the_fp32_value() {
    let graph = Graph::new("float_to_int")
        .input("x", FLOAT)
        .output("ids", INT64)
        .node(node("relu", "Relu", &["x"], &["h"]))
        .node(cast("to_int", "h", "ids", INT64));
    let converted = convert(graph, &Fp16Options::default());

    assert_eq!(converted.kept("to_int"), Some(&KeepReason::TypeBoundaryCast));
    converted.assert_converted("relu");
    let input = &converted.node("to_int").input[0];
    assert_eq!(converted.types[input], FLOAT);
}
