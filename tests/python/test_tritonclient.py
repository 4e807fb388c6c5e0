"""End-to-end tests of Mantissa through NVIDIA's own Python client (tritonclient[grpc])."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import EXAMPLES_STORE, served_variant

TIMEOUT_S = 20.0  # per RPC
BATCH_ROWS = 50
MAX_ABS_DIFF = 1e-5

DIGITS_MODELS = {
    # name: (input shape in metadata, input dims in config)
    "digits_cnn": ([-1, 1, 8, 8], [1, 8, 8]),
    "digits_transformer": ([-1, 8, 8], [8, 8]),
}


def assert_status(exc: InferenceServerException, code: str) -> None:
    status = exc.status() or ""
    assert code in status or code.replace("_", " ").lower() in str(exc).lower(), (
        f"expected {code}, got status={status!r} message={exc.message()!r}"
    )


@pytest.fixture(scope="module")
def client(examples_server):
    with grpcclient.InferenceServerClient(examples_server.grpc_url) as c:
        yield c


def digits_input(model: str, batch: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    return inp


def load_test_data(model: str):
    data = np.load(EXAMPLES_STORE / model / "test_data.npz")
    return data["input"].astype(np.float32), data["labels"], data["logits"]


# ---- server level -----------------------------------------------------------------

def test_server_live_and_ready(client):
    assert client.is_server_live(client_timeout=TIMEOUT_S)
    assert client.is_server_ready(client_timeout=TIMEOUT_S)
    for model in DIGITS_MODELS:
        assert client.is_model_ready(model, client_timeout=TIMEOUT_S)
        assert client.is_model_ready(model, "fp32", client_timeout=TIMEOUT_S)
        assert client.is_model_ready(model, "3", client_timeout=TIMEOUT_S)
    # As with Triton, an unknown model or version is answered OK with ready=false.
    assert not client.is_model_ready("no_such_model", client_timeout=TIMEOUT_S)
    assert not client.is_model_ready("digits_cnn", "int4", client_timeout=TIMEOUT_S)
    assert not client.is_model_ready("digits_cnn", "4", client_timeout=TIMEOUT_S)


def test_server_metadata(client):
    md = client.get_server_metadata(client_timeout=TIMEOUT_S)
    assert md.name == "mantissa"
    assert md.version, "server version must not be empty"
    assert "model_configuration" in list(md.extensions)
    md_json = client.get_server_metadata(as_json=True, client_timeout=TIMEOUT_S)
    assert md_json["name"] == "mantissa"


# ---- model metadata / config ------------------------------------------------------

@pytest.mark.parametrize("model", sorted(DIGITS_MODELS))
def test_model_metadata(client, model):
    in_shape, _ = DIGITS_MODELS[model]
    for version in ("", "fp32", "1", "int8"):
        md = client.get_model_metadata(model, version, client_timeout=TIMEOUT_S)
        assert md.name == model
        # Numeric versions, in the policy's variant order (fp32, fp16, int8).
        assert list(md.versions) == ["1", "2", "3"]
        assert md.platform == "onnxruntime_onnx"
        assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("input", "FP32", in_shape)]
        assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("logits", "FP32", [-1, 10])]


@pytest.mark.parametrize("model", sorted(DIGITS_MODELS))
def test_model_config(client, model):
    _, in_dims = DIGITS_MODELS[model]
    cfg = client.get_model_config(model, client_timeout=TIMEOUT_S).config
    assert cfg.name == model
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 64
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [
        ("input", grpcclient.model_config_pb2.TYPE_FP32, in_dims)
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [
        ("logits", grpcclient.model_config_pb2.TYPE_FP32, [10])
    ]
    assert len(cfg.instance_group) == 1
    group = cfg.instance_group[0]
    assert group.kind == grpcclient.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert group.count == 1  # policy.yaml: instances: 1
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params.get("variant") == "fp32"
    assert params.get("precision") == "fp32"
    # The JSON form (what many tools consume) parses too.
    cfg_json = client.get_model_config(model, as_json=True, client_timeout=TIMEOUT_S)["config"]
    assert cfg_json["max_batch_size"] == 64
    assert cfg_json["instance_group"][0]["kind"] == "KIND_CPU"


def test_model_metadata_unknown_model_and_version(client):
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model", client_timeout=TIMEOUT_S)
    assert_status(e.value, "NOT_FOUND")
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("digits_cnn", "int4", client_timeout=TIMEOUT_S)
    assert_status(e.value, "NOT_FOUND")
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("no_such_model", client_timeout=TIMEOUT_S)
    assert_status(e.value, "NOT_FOUND")


# ---- inference over the whole test split ----------------------------------------------

@pytest.mark.parametrize("model", sorted(DIGITS_MODELS))
def test_whole_test_split_matches_onnxruntime(client, model, report_line):
    x, labels, stored_logits = load_test_data(model)
    n = x.shape[0]
    assert n == 450 and labels.shape == (n,)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(EXAMPLES_STORE / model / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )

    server_logits, ort_logits = [], []
    for i, start in enumerate(range(0, n, BATCH_ROWS)):
        batch = x[start:start + BATCH_ROWS]
        request_id = f"{model}-batch-{i}"
        result = client.infer(
            model, [digits_input(model, batch)], request_id=request_id, client_timeout=TIMEOUT_S
        )
        response = result.get_response()
        assert response.id == request_id
        assert response.model_name == model
        assert (response.model_version, served_variant(response)) == ("1", "fp32")
        assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
            ("logits", "FP32", [batch.shape[0], 10])
        ]
        out = result.as_numpy("logits")
        assert out.dtype == np.float32 and out.shape == (batch.shape[0], 10)
        server_logits.append(out)
        ort_logits.append(session.run(["logits"], {"input": batch})[0])

    server_logits = np.concatenate(server_logits)
    ort_logits = np.concatenate(ort_logits)
    max_diff = float(np.max(np.abs(server_logits - ort_logits)))
    stored_diff = float(np.max(np.abs(server_logits - stored_logits)))
    server_acc = float(np.mean(server_logits.argmax(axis=1) == labels))
    ort_acc = float(np.mean(ort_logits.argmax(axis=1) == labels))
    report_line(
        f"{model}: server accuracy {server_acc:.4%} ({int(round(server_acc * n))}/{n}), "
        f"onnxruntime {ort.__version__} accuracy {ort_acc:.4%}, "
        f"max |server - ort| = {max_diff:.3g}, max |server - stored batch-1 logits| = {stored_diff:.3g}"
    )
    assert max_diff <= MAX_ABS_DIFF, f"max abs diff {max_diff} > {MAX_ABS_DIFF}"
    assert server_acc == ort_acc
    assert np.array_equal(server_logits.argmax(axis=1), ort_logits.argmax(axis=1))
    # Sanity against the reference outputs shipped with the model (batch-1 ORT run).
    assert stored_diff <= 1e-4


@pytest.mark.parametrize("version", ["fp32", "1"])
@pytest.mark.parametrize("model", sorted(DIGITS_MODELS))
def test_requested_output_and_explicit_version(client, model, version):
    x, _, stored_logits = load_test_data(model)
    batch = x[:4]
    result = client.infer(
        model,
        [digits_input(model, batch)],
        model_version=version,
        outputs=[grpcclient.InferRequestedOutput("logits")],
        request_id="explicit",
        client_timeout=TIMEOUT_S,
    )
    response = result.get_response()
    assert response.id == "explicit"
    assert (response.model_version, served_variant(response)) == ("1", "fp32")
    assert [o.name for o in response.outputs] == ["logits"]
    assert len(response.raw_output_contents) == 1
    np.testing.assert_allclose(result.as_numpy("logits"), stored_logits[:4], atol=1e-4)


@pytest.mark.parametrize("version,number,variant", [("3", "3", "int8"), ("int8", "3", "int8"), ("2", "2", "fp16")])
def test_a_variant_is_picked_by_version_number_or_name(client, version, number, variant):
    x, _, stored_logits = load_test_data("digits_cnn")
    before = client.get_inference_statistics("digits_cnn", number, client_timeout=TIMEOUT_S).model_stats[0]
    result = client.infer("digits_cnn", [digits_input("digits_cnn", x[:3])], model_version=version,
                          client_timeout=TIMEOUT_S)
    response = result.get_response()
    assert (response.model_version, served_variant(response)) == (number, variant)
    assert result.as_numpy("logits").shape == (3, 10)
    # Statistics are kept under the number, and the same variant answers when asked by name.
    for asked in (number, variant):
        stats = client.get_inference_statistics("digits_cnn", asked, client_timeout=TIMEOUT_S).model_stats
        assert [(s.name, s.version) for s in stats] == [("digits_cnn", number)]
        assert stats[0].inference_count == before.inference_count + 3
    config = client.get_model_config("digits_cnn", version, as_json=True, client_timeout=TIMEOUT_S)["config"]
    assert config["parameters"]["variant"]["string_value"] == variant
    assert config["parameters"]["version"]["string_value"] == number
    assert config["parameters"]["versions"]["string_value"] == "1 (fp32), 2 (fp16), 3 (int8)"
    assert config["version_policy"]["specific"]["versions"] == ["1", "2", "3"]
    index = client.get_model_repository_index(as_json=True, client_timeout=TIMEOUT_S)["models"]
    assert sorted(m["version"] for m in index if m["name"] == "digits_cnn") == ["1", "2", "3"]


def test_requesting_unknown_output_is_rejected(client):
    x, _, _ = load_test_data("digits_cnn")
    with pytest.raises(InferenceServerException) as e:
        client.infer(
            "digits_cnn", [digits_input("digits_cnn", x[:1])],
            outputs=[grpcclient.InferRequestedOutput("no_such_output")],
            client_timeout=TIMEOUT_S,
        )
    assert_status(e.value, "INVALID_ARGUMENT")


def test_unknown_version_and_model_are_not_found(client):
    x, _, _ = load_test_data("digits_cnn")
    inp = digits_input("digits_cnn", x[:2])
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits_cnn", [inp], model_version="int4", client_timeout=TIMEOUT_S)
    assert_status(e.value, "NOT_FOUND")
    with pytest.raises(InferenceServerException) as e:
        client.infer("no_such_model", [inp], client_timeout=TIMEOUT_S)
    assert_status(e.value, "NOT_FOUND")
    # The server keeps serving afterwards.
    ok = client.infer("digits_cnn", [inp], client_timeout=TIMEOUT_S)
    assert ok.as_numpy("logits").shape == (2, 10)


# ---- every datatype through tritonclient ------------------------------------------------

ALL_TYPES = {
    # suffix: (KServe datatype, numpy dtype)
    "bool": ("BOOL", np.bool_),
    "uint8": ("UINT8", np.uint8),
    "uint16": ("UINT16", np.uint16),
    "uint32": ("UINT32", np.uint32),
    "uint64": ("UINT64", np.uint64),
    "int8": ("INT8", np.int8),
    "int16": ("INT16", np.int16),
    "int32": ("INT32", np.int32),
    "int64": ("INT64", np.int64),
    "fp16": ("FP16", np.float16),
    "bf16": ("BF16", ml_dtypes.bfloat16),  # tritonclient >= 2.6x encodes BF16 from ml_dtypes
    "fp32": ("FP32", np.float32),
    "fp64": ("FP64", np.float64),
    "string": ("BYTES", np.object_),
}


def all_types_values(rows: int, cols: int) -> dict[str, np.ndarray]:
    """Deterministic arrays of shape [rows, cols] including each type's edge values."""
    shape = (rows, cols)
    n = rows * cols
    out = {}
    for suffix, (_, dtype) in ALL_TYPES.items():
        if suffix == "bool":
            vals = np.array([(i * 7) % 3 == 0 for i in range(n)], dtype=np.bool_)
        elif suffix == "string":
            # (NUL bytes are covered separately: test_all_types_string_with_nul_byte.)
            pool = [b"", b"hello", "h\u00e9llo w\u00f6rld \u2713".encode(), b"x" * 300,
                    "\U0001f600".encode(), b" spaces ", b"\n\t"]
            vals = np.array([pool[i % len(pool)] for i in range(n)], dtype=object)
        elif np.issubdtype(np.dtype(dtype), np.integer):
            info = np.iinfo(dtype)
            pool = [info.min, info.max, 0, 1, info.max - 1, info.min + 1]
            if info.min < 0:
                pool += [-1]
            vals = np.array([pool[i % len(pool)] for i in range(n)], dtype=dtype)
        else:
            pool = [0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), float("nan"), 1e-3, 3.0e4]
            vals = np.array(pool * (n // len(pool) + 1), dtype=np.float64)[:n].astype(dtype)
            if n >= 3:  # also the type's extremes
                finfo = ml_dtypes.finfo(dtype)
                vals[-1] = finfo.max
                vals[-2] = finfo.smallest_subnormal
                vals[-3] = finfo.min
        out[suffix] = vals.reshape(shape)
    return out


def all_types_inputs(values: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for suffix, arr in values.items():
        datatype, _ = ALL_TYPES[suffix]
        inp = grpcclient.InferInput(f"in_{suffix}", list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


@pytest.fixture(scope="module")
def all_types_client(fixture_store_server):
    with grpcclient.InferenceServerClient(fixture_store_server.grpc_url) as c:
        yield c


def test_all_types_metadata(all_types_client):
    md = all_types_client.get_model_metadata("all_types", client_timeout=TIMEOUT_S)
    expected = [(f"in_{s}", dt, [-1, -1]) for s, (dt, _) in ALL_TYPES.items()]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == expected
    expected = [(f"out_{s}", dt, [-1, -1]) for s, (dt, _) in ALL_TYPES.items()]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == expected


@pytest.mark.parametrize("rows,cols", [(1, 3), (2, 3), (8, 5)])
def test_all_types_round_trip(all_types_client, rows, cols):
    values = all_types_values(rows, cols)
    result = all_types_client.infer(
        "all_types", all_types_inputs(values), request_id=f"types-{rows}x{cols}",
        client_timeout=TIMEOUT_S,
    )
    response = result.get_response()
    assert response.id == f"types-{rows}x{cols}"
    assert (response.model_version, served_variant(response)) == ("1", "fp32")
    got = {o.name: (o.datatype, list(o.shape)) for o in response.outputs}
    assert got == {f"out_{s}": (dt, [rows, cols]) for s, (dt, _) in ALL_TYPES.items()}
    for suffix, sent in values.items():
        back = result.as_numpy(f"out_{suffix}")
        assert back is not None, f"out_{suffix} missing"
        assert back.shape == sent.shape, suffix
        if suffix == "string":
            assert back.dtype == np.object_
            assert back.tolist() == sent.tolist(), suffix
        else:
            assert back.dtype == sent.dtype, suffix
            # Bit-exact (covers -0.0, inf, subnormals).
            assert back.tobytes() == sent.tobytes(), f"{suffix}: {back!r} != {sent!r}"


def test_all_types_requested_output_subset(all_types_client):
    values = all_types_values(2, 3)
    wanted = ["out_string", "out_bf16", "out_int64"]
    result = all_types_client.infer(
        "all_types", all_types_inputs(values),
        outputs=[grpcclient.InferRequestedOutput(name) for name in wanted],
        client_timeout=TIMEOUT_S,
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == wanted
    assert len(response.raw_output_contents) == len(wanted)
    assert result.as_numpy("out_string").tolist() == values["string"].tolist()
    assert result.as_numpy("out_bf16").tobytes() == values["bf16"].tobytes()
    assert result.as_numpy("out_int64").tobytes() == values["int64"].tobytes()
    assert result.as_numpy("out_fp32") is None


def test_all_types_non_utf8_bytes_rejected(all_types_client):
    # Documented server behaviour: ONNX string tensors must be UTF-8 (Triton itself would
    # pass arbitrary bytes through).
    values = all_types_values(1, 3)
    values["string"] = np.array([[b"ok", b"\xc3\x28", b"ok"]], dtype=object)
    with pytest.raises(InferenceServerException) as e:
        all_types_client.infer("all_types", all_types_inputs(values), client_timeout=TIMEOUT_S)
    assert_status(e.value, "INVALID_ARGUMENT")
    assert "UTF-8" in e.value.message()


def test_fixture_store_models_ready(all_types_client):
    for model in ("all_types", "slow_matmul", "runtime_error"):
        assert all_types_client.is_model_ready(model, client_timeout=TIMEOUT_S), model
        md = all_types_client.get_model_metadata(model, client_timeout=TIMEOUT_S)
        assert list(md.versions) == ["1"]


def test_all_types_string_with_nul_byte(all_types_client):
    # ONNX Runtime strings are NUL-terminated C strings, so a NUL byte cannot reach the
    # model: the server rejects it during validation instead of failing inside ORT.
    values = all_types_values(1, 3)
    values["string"] = np.array([[b"a\x00b", b"\x00", b"ok"]], dtype=object)
    with pytest.raises(InferenceServerException) as e:
        all_types_client.infer(
            "all_types", all_types_inputs(values),
            outputs=[grpcclient.InferRequestedOutput("out_string")], client_timeout=TIMEOUT_S,
        )
    assert_status(e.value, "INVALID_ARGUMENT")
    assert "contains a NUL byte at offset 1" in e.value.message()
    # The server keeps serving.
    values = all_types_values(1, 3)
    ok = all_types_client.infer("all_types", all_types_inputs(values), client_timeout=TIMEOUT_S)
    assert ok.as_numpy("out_string").tolist() == values["string"].tolist()


def test_runtime_error_is_internal_and_server_keeps_serving(all_types_client):
    def reshape(target):
        data = grpcclient.InferInput("data", [6], "FP32")
        data.set_data_from_numpy(np.arange(1, 7, dtype=np.float32))
        shape = grpcclient.InferInput("shape", [2], "INT64")
        shape.set_data_from_numpy(np.array(target, dtype=np.int64))
        return all_types_client.infer("runtime_error", [data, shape], client_timeout=TIMEOUT_S)

    with pytest.raises(InferenceServerException) as e:
        reshape([4, 4])
    assert_status(e.value, "INTERNAL")
    assert "reshape" in e.value.message().lower()
    out = reshape([2, 3]).as_numpy("reshaped")
    assert out.shape == (2, 3)
    assert out.tolist() == [[1, 2, 3], [4, 5, 6]]
