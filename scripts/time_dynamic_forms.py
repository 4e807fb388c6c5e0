#!/usr/bin/env python3
"""Times the two forms dynamic INT8 can take in ONNX Runtime, to back the form Mantissa emits.

Usage: .venv/bin/python scripts/time_dynamic_forms.py MODEL_INT8_DYNAMIC.onnx [--runs 2000] [--threads 2]

MODEL is a `mantissa quantize --precision int8 --mode dynamic` output: its
com.microsoft.DynamicQuantizeMatMul nodes are the fused form. The script rewrites each into the
standard-ops form (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul by the product of
scales -> Add bias) and times both at batch 1 and 8 with intra_op_num_threads=--threads, at
ORT_ENABLE_BASIC (each form runs as written) and ORT_ENABLE_ALL (ONNX Runtime may fuse the
standard form itself). Median ms of interleaved rounds; both forms' outputs are compared.
"""

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


def unfused(model: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeMatMul":
            nodes.append(node)
            continue
        a, b, b_scale = node.input[0], node.input[1], node.input[2]
        bias = node.input[4] if len(node.input) > 4 and node.input[4] else None
        p = node.name or node.output[0]
        zero = f"{p}_b_zero"
        columns = initializers[b].dims[1]
        graph.initializer.append(numpy_helper.from_array(np.zeros(columns, np.int8), zero))
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [a], [f"{p}_aq", f"{p}_as", f"{p}_az"]),
            helper.make_node("MatMulInteger", [f"{p}_aq", b, f"{p}_az", zero], [f"{p}_i32"]),
            helper.make_node("Cast", [f"{p}_i32"], [f"{p}_f32"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}_as", b_scale], [f"{p}_scale"]),
            helper.make_node("Mul", [f"{p}_f32", f"{p}_scale"], [f"{p}_y" if bias else node.output[0]]),
        ]
        if bias:
            nodes.append(helper.make_node("Add", [f"{p}_y", bias], [node.output[0]]))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def session(model: onnx.ModelProto, level, threads: int):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    fused = onnx.load(args.model)
    standard = unfused(fused)
    onnx.checker.check_model(standard)
    graph_input = fused.graph.input[0]
    dims = [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim]
    print(f"| level | batch | DynamicQuantizeMatMul ms | DynamicQuantizeLinear+MatMulInteger ms | ratio |")
    print("|---|---|---|---|---|")
    for name, level in [("BASIC", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), ("ALL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)]:
        sessions = {"fused": session(fused, level, args.threads), "standard": session(standard, level, args.threads)}
        for batch in (1, 8):
            x = np.random.default_rng(0).standard_normal([batch, *dims[1:]]).astype(np.float32)
            feed = {graph_input.name: x}
            results = {k: s.run(None, feed)[0] for k, s in sessions.items()}
            assert np.allclose(results["fused"], results["standard"], atol=1e-3, rtol=1e-3)
            times = {k: [] for k in sessions}
            for _ in range(20):
                for key, s in sessions.items():
                    for _ in range(3):
                        s.run(None, feed)
                    for _ in range(args.runs // 20):
                        start = time.perf_counter()
                        s.run(None, feed)
                        times[key].append((time.perf_counter() - start) * 1000)
            fused_ms, standard_ms = (statistics.median(times[k]) for k in ("fused", "standard"))
            print(f"| {name} | {batch} | {fused_ms:.3f} | {standard_ms:.3f} | {standard_ms / fused_ms:.2f}x |")


if __name__ == "__main__":
    main()
