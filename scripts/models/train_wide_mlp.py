#!/usr/bin/env python3
"""Train a wide MLP on scikit-learn's bundled digits and export it as ONNX: the INT8 benchmark
model, large enough (3 hidden layers of 1024, 2.2 M multiply-accumulates per sample) that its
MatMuls, not per-run overhead, dominate the run time.

Usage: python scripts/models/train_wide_mlp.py [--out DIR] [--width 1024] [--layers 3]
       (needs numpy, onnx, onnxruntime and scikit-learn; see requirements-bench.txt)

Writes DIR/model.onnx (input "input" [batch, 64], output "logits" [batch, 10]; MatMul + Add +
Relu layers, opset 17), DIR/calibration/sample_NNN.npz (16 files of 8 training images),
DIR/test_data.npz (input, labels, logits: the 450-image test split and FP32 outputs). Inputs are
pixel values / 16, as for the example models; split and seeds match scripts/models/train_examples.py.
Training is seeded; the script checks that onnxruntime reproduces scikit-learn's predictions.
"""

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier


def export(classifier: MLPClassifier, path: Path) -> None:
    nodes, initializers, previous = [], [], "input"
    layers = len(classifier.coefs_)
    for index, (weight, bias) in enumerate(zip(classifier.coefs_, classifier.intercepts_)):
        initializers += [numpy_helper.from_array(weight.astype(np.float32), f"fc{index}.weight"),
                         numpy_helper.from_array(bias.astype(np.float32), f"fc{index}.bias")]
        nodes.append(helper.make_node("MatMul", [previous, f"fc{index}.weight"], [f"mm{index}"], name=f"fc{index}/MatMul"))
        last = index == layers - 1
        added = "logits" if last else f"pre{index}"
        nodes.append(helper.make_node("Add", [f"mm{index}", f"fc{index}.bias"], [added], name=f"fc{index}/Add"))
        if not last:
            nodes.append(helper.make_node("Relu", [added], [f"act{index}"], name=f"fc{index}/Relu"))
            previous = f"act{index}"
    graph = helper.make_graph(
        nodes, "digits_mlp_wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("target/bench-models/digits_mlp_wide"))
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    classifier = MLPClassifier(hidden_layer_sizes=(args.width,) * args.layers, max_iter=40, random_state=0,
                               batch_size=64, learning_rate_init=1e-3)
    classifier.fit(x_train, y_train)
    sklearn_accuracy = classifier.score(x_test, y_test)

    args.out.mkdir(parents=True, exist_ok=True)
    export(classifier, args.out / "model.onnx")
    session = ort.InferenceSession(str(args.out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"input": x_test[i : i + 1]})[0] for i in range(len(x_test))])
    onnx_accuracy = float((logits.argmax(1) == y_test).mean())
    assert (logits.argmax(1) == classifier.predict(x_test)).all(), "onnxruntime disagrees with scikit-learn"
    np.savez(args.out / "test_data.npz", input=x_test, labels=y_test.astype(np.int64), logits=logits)
    calibration = args.out / "calibration"
    calibration.mkdir(exist_ok=True)
    order = np.random.default_rng(0).permutation(len(x_train))[:128]
    for index in range(16):
        np.savez(calibration / f"sample_{index:03d}.npz", input=x_train[order[index * 8 : (index + 1) * 8]])
    print(f"{args.out}/model.onnx: {args.layers} x {args.width} hidden, test accuracy {onnx_accuracy:.2%} "
          f"(scikit-learn {sklearn_accuracy:.2%})")


if __name__ == "__main__":
    main()
