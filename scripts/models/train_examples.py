#!/usr/bin/env python3
"""Train and export Mantissa's example ONNX models with real weights.

What it does
------------
Trains two small classifiers on scikit-learn's bundled ``load_digits()``
(8x8 grayscale digits, 1797 samples, pixel values 0..16, no download) and
writes a model repository:

    <out>/digits_cnn/model.onnx              CNN, input "input" [batch,1,8,8]
    <out>/digits_cnn/test_data.npz           input, labels, logits (test split)
    <out>/digits_cnn/calibration/sample_NNN.npz   16 x {"input": [8,1,8,8]}
    <out>/digits_transformer/model.onnx      tiny ViT (rows as tokens), input "input" [batch,8,8]
    <out>/digits_transformer/test_data.npz
    <out>/digits_transformer/calibration/sample_NNN.npz   16 x {"input": [8,8,8]}

Preprocessing: float32, x / 16.0 (range [0, 1]).
Split: ``train_test_split(test_size=0.25, random_state=0, stratify=y)``
(1347 train / 450 test). Calibration batches are 128 training-split images
(a fixed-seed permutation), 8 per file. ``logits`` in test_data.npz are the
FP32 outputs of onnxruntime (CPU EP) on the exported model, run at batch 1.

Both models are exported with the legacy TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``) at opset 17 with a dynamic batch
dimension named "batch"; weights are stored inline (no external data).
After export the script runs ``onnx.checker.check_model(full_check=True)``,
runs onnxruntime on the test split at batch 1 and batch 64, checks that the
two agree within 1e-5 and that accuracy matches torch's, and prints a summary.
It fails (non-zero exit) if any of those checks fail.

Everything is seeded and training runs single-threaded, so reruns on the same
machine and library versions give the same weights.

Install (Python 3.11; a venv outside the repo is suggested):

    python3 -m venv /tmp/trainenv
    /tmp/trainenv/bin/pip install -r scripts/models/requirements.txt

PyPI's Linux torch wheel is a CUDA build whose libraries link against the
nvidia-* packages, so those (several GB) get installed too; a GPU is not used.
If a CPU-only torch build of the same version is available, it works as well.

Usage:

    /tmp/trainenv/bin/python scripts/models/train_examples.py --out examples/models
"""

import argparse
import collections
import math
import os
import random
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
OPSET = 17
NUM_CLASSES = 10
N_CALIB_FILES = 16
CALIB_BATCH = 8


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def load_data():
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0)).astype(np.float32)  # [N,8,8]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return (
        np.ascontiguousarray(x_tr, dtype=np.float32),
        np.ascontiguousarray(x_te, dtype=np.float32),
        y_tr.astype(np.int64),
        y_te.astype(np.int64),
    )


def random_shift(xb, gen):
    """Augmentation: shift each image by -1..1 pixels in x and y (zero fill)."""
    n = xb.shape[0]
    padded = F.pad(xb, (1, 1, 1, 1))  # [n, 10, 10] or [n, C, 10, 10]
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(xb)
    for a in range(3):
        for b in range(3):
            sel = (dy == a) & (dx == b)
            out[sel] = padded[sel][..., a : a + 8, b : b + 8]
    return out


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):  # x: [B,1,8,8]
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)  # [B,32,4,4]
        x = F.relu(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 1)  # GlobalAveragePool
        x = torch.flatten(x, 1)
        return self.fc(x)


class Attention(nn.Module):
    """Multi-head self-attention written out with MatMul/Softmax."""

    def __init__(self, d_model, n_heads, n_tokens):
        super().__init__()
        self.h = n_heads
        self.dh = d_model // n_heads
        self.t = n_tokens
        self.d = d_model
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.scale = 1.0 / math.sqrt(self.dh)

    def forward(self, x):  # [B,T,D]
        def heads(t):  # [B,T,D] -> [B,H,T,Dh]
            return t.reshape(-1, self.t, self.h, self.dh).transpose(1, 2)

        q = heads(self.q(x))
        k = heads(self.k(x))
        v = heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [B,H,T,T]
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, v)  # [B,H,T,Dh]
        ctx = ctx.transpose(1, 2).reshape(-1, self.t, self.d)
        return self.o(ctx)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer with exact (erf) GELU."""

    def __init__(self, d_model, n_heads, d_ff, n_tokens, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, n_tokens)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()  # approximate="none" -> Erf
        self.ff2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        x = x + self.drop(self.ff2(self.act(self.ff1(self.ln2(x)))))
        return x


class DigitsTransformer(nn.Module):
    def __init__(self, n_tokens=8, d_in=8, d_model=32, n_heads=2, d_ff=64, n_layers=2,
                 dropout=0.1):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.pos = nn.Embedding(n_tokens, d_model)
        self.layers = nn.ModuleList(
            [EncoderLayer(d_model, n_heads, d_ff, n_tokens, dropout) for _ in range(n_layers)]
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, NUM_CLASSES)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, x):  # [B,8,8]: 8 row tokens of 8 pixels
        # Position ids come from the runtime token count, so the exported graph
        # keeps a Range + Gather on the embedding table instead of folding it.
        pos_ids = torch.arange(x.shape[1], device=x.device)
        h = self.embed(x) + self.pos(pos_ids)  # [B,T,D] + [T,D]
        for layer in self.layers:
            h = layer(h)
        h = h.mean(dim=1)  # mean-pool over tokens
        h = self.norm(h)
        return self.head(h)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def evaluate_torch(model, x, y):
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    return float((logits.argmax(1).numpy() == y).mean())


def train(model, x_tr, y_tr, x_te, y_te, *, epochs, batch_size, lr, weight_decay,
          label_smoothing, augment, name):
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / batch_size)
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch * 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
    )
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        tot_loss = 0.0
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = xt[idx], yt[idx]
            if augment:
                xb = random_shift(xb, gen)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
        if (epoch + 1) % 20 == 0 or epoch + 1 == epochs:
            acc = evaluate_torch(model, x_te, y_te)
            print(f"[{name}] epoch {epoch + 1:3d} loss {tot_loss / len(xt):.4f} "
                  f"test acc {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return model


# --------------------------------------------------------------------------
# Export and verification
# --------------------------------------------------------------------------


def export_onnx(model, example, path):
    model.eval()
    torch.onnx.export(
        model,
        (example,),
        path,
        dynamo=False,
        export_params=True,
        opset_version=OPSET,
        do_constant_folding=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    m = onnx.load(path)
    # Keep the file self-contained and stable.
    m.producer_name = "mantissa/scripts/models/train_examples.py"
    m.producer_version = f"torch-{torch.__version__.split('+')[0]}"
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise RuntimeError(f"{path}: initializer {init.name} uses external data")
    onnx.save_model(m, path, save_as_external_data=False)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    return m


def ort_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_ort(sess, x, batch):
    outs = []
    for i in range(0, len(x), batch):
        outs.append(sess.run(["logits"], {"input": x[i : i + batch]})[0])
    return np.concatenate(outs, axis=0).astype(np.float32)


def dim_str(d):
    return d.dim_param if d.HasField("dim_param") else str(d.dim_value)


def describe(m):
    def vi(v):
        dims = [dim_str(d) for d in v.type.tensor_type.shape.dim]
        return f"{v.name} {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)} [{','.join(dims)}]"

    hist = collections.Counter(n.op_type for n in m.graph.node)
    return {
        "inputs": [vi(v) for v in m.graph.input],
        "outputs": [vi(v) for v in m.graph.output],
        "ops": dict(sorted(hist.items())),
        "n_nodes": len(m.graph.node),
        "n_params": int(sum(np.prod(i.dims) for i in m.graph.initializer)),
        "ir_version": m.ir_version,
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
    }


def save_npz(path, **arrays):
    # Uncompressed .npz so simple readers (e.g. Rust's ndarray-npy) can load it.
    np.savez(path, **arrays)


def finish_model(name, model, out_dir, x_te_m, y_te, x_calib_m, torch_acc):
    mdir = os.path.join(out_dir, name)
    os.makedirs(os.path.join(mdir, "calibration"), exist_ok=True)
    path = os.path.join(mdir, "model.onnx")
    m = export_onnx(model, torch.from_numpy(x_te_m[:2]), path)

    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_te_m)).numpy()

    sess = ort_session(path)
    logits_b1 = run_ort(sess, x_te_m, 1)
    logits_b64 = run_ort(sess, x_te_m, 64)
    diff_b = float(np.abs(logits_b1 - logits_b64).max())
    diff_t = float(np.abs(logits_b1 - torch_logits).max())
    acc_b1 = float((logits_b1.argmax(1) == y_te).mean())
    acc_b64 = float((logits_b64.argmax(1) == y_te).mean())

    save_npz(os.path.join(mdir, "test_data.npz"),
             input=x_te_m.astype(np.float32), labels=y_te.astype(np.int64),
             logits=logits_b1.astype(np.float32))
    for i in range(N_CALIB_FILES):
        batch = x_calib_m[i * CALIB_BATCH : (i + 1) * CALIB_BATCH].astype(np.float32)
        save_npz(os.path.join(mdir, "calibration", f"sample_{i:03d}.npz"), input=batch)

    info = describe(m)
    info.update(
        path=path,
        size_bytes=os.path.getsize(path),
        torch_acc=torch_acc,
        ort_acc_b1=acc_b1,
        ort_acc_b64=acc_b64,
        max_abs_diff_b1_vs_b64=diff_b,
        max_abs_diff_ort_vs_torch=diff_t,
    )
    print(f"\n== {name}")
    for k, v in info.items():
        print(f"  {k}: {v}")

    problems = []
    if diff_b > 1e-5:
        problems.append(f"batch-1 vs batch-64 logits differ by {diff_b}")
    if diff_t > 1e-4:
        problems.append(f"onnxruntime vs torch logits differ by {diff_t}")
    if acc_b1 != acc_b64 or abs(acc_b1 - torch_acc) > 1e-9:
        problems.append(f"accuracy mismatch torch={torch_acc} ort_b1={acc_b1} ort_b64={acc_b64}")
    if info["size_bytes"] > 1_000_000:
        problems.append(f"model too large: {info['size_bytes']} bytes")
    return info, problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output model repository, e.g. examples/models")
    ap.add_argument("--cnn-epochs", type=int, default=60)
    ap.add_argument("--vit-epochs", type=int, default=300)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    seed_everything(SEED)

    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
          f"numpy {np.__version__}")
    x_tr, x_te, y_tr, y_te = load_data()
    print(f"train {x_tr.shape} test {x_te.shape}")

    calib_idx = np.random.RandomState(SEED).permutation(len(x_tr))[: N_CALIB_FILES * CALIB_BATCH]
    x_calib = x_tr[calib_idx]  # [128,8,8]

    results = {}
    problems = []

    # ---- digits_cnn
    seed_everything(SEED)
    cnn = DigitsCNN()
    train(cnn, x_tr[:, None], y_tr, x_te[:, None], y_te, epochs=args.cnn_epochs, batch_size=32,
          lr=3e-3, weight_decay=1e-4, label_smoothing=0.0, augment=True, name="digits_cnn")
    acc = evaluate_torch(cnn, x_te[:, None], y_te)
    results["digits_cnn"], p = finish_model("digits_cnn", cnn, args.out, x_te[:, None], y_te,
                                            x_calib[:, None], acc)
    problems += [f"digits_cnn: {s}" for s in p]
    if acc < 0.97:
        problems.append(f"digits_cnn: torch accuracy {acc:.4f} < 0.97")

    # ---- digits_transformer
    seed_everything(SEED)
    vit = DigitsTransformer()
    train(vit, x_tr, y_tr, x_te, y_te, epochs=args.vit_epochs, batch_size=64, lr=3e-3,
          weight_decay=0.05, label_smoothing=0.1, augment=True, name="digits_transformer")
    acc = evaluate_torch(vit, x_te, y_te)
    results["digits_transformer"], p = finish_model("digits_transformer", vit, args.out, x_te,
                                                    y_te, x_calib, acc)
    problems += [f"digits_transformer: {s}" for s in p]
    if acc < 0.95:
        problems.append(f"digits_transformer: torch accuracy {acc:.4f} < 0.95")

    print("\nsummary:")
    for name, r in results.items():
        print(f"  {name}: torch {r['torch_acc']:.4f}  ort b1 {r['ort_acc_b1']:.4f}  "
              f"ort b64 {r['ort_acc_b64']:.4f}  size {r['size_bytes']} B")
    if problems:
        print("\nPROBLEMS:")
        for s in problems:
            print("  " + s)
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
