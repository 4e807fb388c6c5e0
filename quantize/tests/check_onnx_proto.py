#!/usr/bin/env python3
"""Check that quantize/proto/onnx.proto is equivalent to ONNX's onnx-ml.proto.

Usage (from the repository root):

    .venv/bin/python quantize/tests/check_onnx_proto.py [--proto PATH] [--keep-tmp]
                                                        [MODEL.onnx ...]

    --proto PATH   proto file to check (default: quantize/proto/onnx.proto)
    --keep-tmp     keep the temporary protoc output directory and print its path
    MODEL.onnx     extra model files for the wire round trip (in addition to the
                   generated ones and examples/models/*/model.onnx,
                   tests/fixtures/store/*/model.onnx)

Requires the `onnx` and `grpcio-tools` packages (both in the project venv).

What it does:
  1. Compiles our proto with grpc_tools.protoc (python output + descriptor set).
  2. Loads the descriptor set into a private DescriptorPool, so it does not clash
     with onnx's own registration of `onnx.*` in the default pool.
  3. Compares it structurally with `onnx.onnx_ml_pb2` in both directions: file
     syntax/package/options, every message (nested too), field (name, number,
     type, label, type_name, oneof, default, presence, packed, json_name,
     options), oneofs, reserved ranges/names, enums and enum values, and the
     declaration order.
  4. Wire round trip: generated models (Conv, If subgraph, external data +
     sparse initializer, a "kitchen sink" that sets every field) and any model
     files found are parsed with OUR classes; we assert no unknown fields, that
     re-serialization is byte-identical to the input, that the text form equals
     onnx's text form, and that onnx parses our bytes back equal.

Exits 0 and prints "ALL CHECKS PASSED" on success; non-zero with a diff otherwise.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import os
import shutil
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_PROTO = os.path.join(REPO_ROOT, "quantize", "proto", "onnx.proto")
MODEL_GLOBS = [
    os.path.join(REPO_ROOT, "examples", "models", "*", "model.onnx"),
    os.path.join(REPO_ROOT, "tests", "fixtures", "store", "*", "model.onnx"),
]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx.onnx_ml_pb2 as onnx_pb  # noqa: E402
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format  # noqa: E402
from google.protobuf.unknown_fields import UnknownFieldSet  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


# ---------------------------------------------------------------------------
# 1. compile
# ---------------------------------------------------------------------------


def compile_proto(proto_path: str, out_dir: str) -> descriptor_pb2.FileDescriptorSet:
    import grpc_tools
    from grpc_tools import protoc  # noqa: F401  (import check)

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    proto_dir, proto_name = os.path.split(os.path.abspath(proto_path))
    py_out = os.path.join(out_dir, "py")
    os.makedirs(py_out, exist_ok=True)
    fds_path = os.path.join(out_dir, "onnx.fds.pb")
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{proto_dir}", f"-I{well_known}",
        f"--python_out={py_out}",
        f"--descriptor_set_out={fds_path}",
        proto_name,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or res.stderr.strip():
        print("protoc output:\n" + res.stdout + res.stderr, file=sys.stderr)
    if res.returncode != 0:
        raise SystemExit(f"FAIL: protoc could not compile {proto_path}")
    fds = descriptor_pb2.FileDescriptorSet()
    with open(fds_path, "rb") as f:
        fds.ParseFromString(f.read())
    if len(fds.file) != 1:
        raise SystemExit(f"FAIL: expected exactly one file in descriptor set, got {len(fds.file)}")
    return fds


# ---------------------------------------------------------------------------
# 2./3. structural comparison
# ---------------------------------------------------------------------------


class Diff:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, what: str, ours, theirs) -> None:
        self.lines.append(f"  {path}: {what}: ours={ours!r} onnx={theirs!r}")

    def cmp(self, path: str, what: str, ours, theirs) -> None:
        if ours != theirs:
            self.add(path, what, ours, theirs)


def _label(f) -> str:
    if f.is_repeated:
        return "repeated"
    if getattr(f, "is_required", False):
        return "required"
    return "optional"


def _full(d) -> str | None:
    return d.full_name if d is not None else None


def compare_enum(path: str, ours, theirs, diff: Diff) -> None:
    o_vals = [(v.name, v.number) for v in ours.values]
    t_vals = [(v.name, v.number) for v in theirs.values]
    o_map, t_map = dict(o_vals), dict(t_vals)
    for name in set(t_map.keys()) - set(o_map.keys()):
        diff.add(f"{path}.{name}", "enum value missing in ours", None, t_map[name])
    for name in set(o_map.keys()) - set(t_map.keys()):
        diff.add(f"{path}.{name}", "enum value not in onnx", o_map[name], None)
    for name in set(o_map.keys()) & set(t_map.keys()):
        diff.cmp(f"{path}.{name}", "enum value number", o_map[name], t_map[name])
    if set(o_vals) == set(t_vals):
        diff.cmp(path, "enum value order", [n for n, _ in o_vals], [n for n, _ in t_vals])
    o_ep, t_ep = descriptor_pb2.EnumDescriptorProto(), descriptor_pb2.EnumDescriptorProto()
    ours.CopyToProto(o_ep)
    theirs.CopyToProto(t_ep)
    diff.cmp(path, "enum options", str(o_ep.options), str(t_ep.options))
    diff.cmp(path, "enum reserved ranges",
             [(r.start, r.end) for r in o_ep.reserved_range], [(r.start, r.end) for r in t_ep.reserved_range])
    diff.cmp(path, "enum reserved names", list(o_ep.reserved_name), list(t_ep.reserved_name))


def compare_field(path: str, o, t, diff: Diff) -> None:
    diff.cmp(path, "number", o.number, t.number)
    diff.cmp(path, "type", o.type, t.type)
    diff.cmp(path, "label", _label(o), _label(t))
    diff.cmp(path, "message type", _full(o.message_type), _full(t.message_type))
    diff.cmp(path, "enum type", _full(o.enum_type), _full(t.enum_type))
    diff.cmp(path, "oneof",
             o.containing_oneof.name if o.containing_oneof else None,
             t.containing_oneof.name if t.containing_oneof else None)
    diff.cmp(path, "has_default_value", o.has_default_value, t.has_default_value)
    if not o.is_repeated and o.type != o.TYPE_MESSAGE:
        diff.cmp(path, "default_value", o.default_value, t.default_value)
    diff.cmp(path, "has_presence", o.has_presence, t.has_presence)
    diff.cmp(path, "is_packed", o.is_packed, t.is_packed)
    diff.cmp(path, "json_name", o.json_name, t.json_name)
    diff.cmp(path, "options", str(o.GetOptions()), str(t.GetOptions()))


def compare_message(path: str, ours, theirs, diff: Diff) -> None:
    # fields
    of, tf = ours.fields_by_name, theirs.fields_by_name
    for name in set(tf.keys()) - set(of.keys()):
        diff.add(f"{path}.{name}", "field missing in ours", None, tf[name].number)
    for name in set(of.keys()) - set(tf.keys()):
        diff.add(f"{path}.{name}", "field not in onnx", of[name].number, None)
    for name in sorted(set(of.keys()) & set(tf.keys())):
        compare_field(f"{path}.{name}", of[name], tf[name], diff)
    # number -> name (catches a swapped pair of names)
    o_num = {f.number: f.name for f in ours.fields}
    t_num = {f.number: f.name for f in theirs.fields}
    for num in sorted(set(o_num.keys()) & set(t_num.keys())):
        diff.cmp(f"{path}[#{num}]", "field name for number", o_num[num], t_num[num])
    if set(of) == set(tf):
        diff.cmp(path, "field declaration order", [f.name for f in ours.fields], [f.name for f in theirs.fields])
    # oneofs
    o_oneofs = {o.name: [f.name for f in o.fields] for o in ours.oneofs}
    t_oneofs = {o.name: [f.name for f in o.fields] for o in theirs.oneofs}
    diff.cmp(path, "oneofs", o_oneofs, t_oneofs)
    # reserved ranges/names, options, extension ranges
    o_dp, t_dp = descriptor_pb2.DescriptorProto(), descriptor_pb2.DescriptorProto()
    ours.CopyToProto(o_dp)
    theirs.CopyToProto(t_dp)
    diff.cmp(path, "reserved ranges",
             [(r.start, r.end) for r in o_dp.reserved_range], [(r.start, r.end) for r in t_dp.reserved_range])
    diff.cmp(path, "reserved names", list(o_dp.reserved_name), list(t_dp.reserved_name))
    diff.cmp(path, "extension ranges",
             [(r.start, r.end) for r in o_dp.extension_range], [(r.start, r.end) for r in t_dp.extension_range])
    diff.cmp(path, "message options", str(o_dp.options), str(t_dp.options))
    # nested enums
    oe, te = ours.enum_types_by_name, theirs.enum_types_by_name
    for name in set(te.keys()) - set(oe.keys()):
        diff.add(f"{path}.{name}", "nested enum missing in ours", None, name)
    for name in set(oe.keys()) - set(te.keys()):
        diff.add(f"{path}.{name}", "nested enum not in onnx", name, None)
    for name in sorted(set(oe.keys()) & set(te.keys())):
        compare_enum(f"{path}.{name}", oe[name], te[name], diff)
    # nested messages
    on, tn = ours.nested_types_by_name, theirs.nested_types_by_name
    for name in set(tn.keys()) - set(on.keys()):
        diff.add(f"{path}.{name}", "nested message missing in ours", None, name)
    for name in set(on.keys()) - set(tn.keys()):
        diff.add(f"{path}.{name}", "nested message not in onnx", name, None)
    for name in sorted(set(on.keys()) & set(tn.keys())):
        compare_message(f"{path}.{name}", on[name], tn[name], diff)


def normalized_file_proto(file_desc) -> descriptor_pb2.FileDescriptorProto:
    fp = descriptor_pb2.FileDescriptorProto()
    file_desc.CopyToProto(fp)
    fp.ClearField("name")
    fp.ClearField("source_code_info")
    if fp.syntax == "proto2":  # "" and "proto2" mean the same thing
        fp.ClearField("syntax")

    # protoc records json_name explicitly, the embedded python descriptor does
    # not; the effective json_name is compared field by field in the walk.
    def strip_json(msgs) -> None:
        for m in msgs:
            for f in m.field:
                f.ClearField("json_name")
            strip_json(m.nested_type)

    strip_json(fp.message_type)
    return fp


def compare_files(ours, theirs) -> list[str]:
    diff = Diff()
    o_fp, t_fp = normalized_file_proto(ours), normalized_file_proto(theirs)
    diff.cmp("<file>", "package", ours.package, theirs.package)
    diff.cmp("<file>", "syntax", o_fp.syntax or "proto2", t_fp.syntax or "proto2")
    diff.cmp("<file>", "dependencies", list(o_fp.dependency), list(t_fp.dependency))
    diff.cmp("<file>", "file options", str(o_fp.options), str(t_fp.options))
    diff.cmp("<file>", "extensions", len(o_fp.extension), len(t_fp.extension))
    diff.cmp("<file>", "services", len(o_fp.service), len(t_fp.service))

    om, tm = ours.message_types_by_name, theirs.message_types_by_name
    for name in set(tm.keys()) - set(om.keys()):
        diff.add(name, "message missing in ours", None, name)
    for name in set(om.keys()) - set(tm.keys()):
        diff.add(name, "message not in onnx", name, None)
    for name in sorted(set(om.keys()) & set(tm.keys())):
        compare_message(name, om[name], tm[name], diff)

    oe, te = ours.enum_types_by_name, theirs.enum_types_by_name
    for name in set(te.keys()) - set(oe.keys()):
        diff.add(name, "top-level enum missing in ours", None, name)
    for name in set(oe.keys()) - set(te.keys()):
        diff.add(name, "top-level enum not in onnx", name, None)
    for name in sorted(set(oe.keys()) & set(te.keys())):
        compare_enum(name, oe[name], te[name], diff)

    # Catch-all: the normalized descriptors must be identical (covers anything
    # the walk above does not name explicitly, including top-level order).
    if o_fp != t_fp:
        o_txt = text_format.MessageToString(o_fp).splitlines()
        t_txt = text_format.MessageToString(t_fp).splitlines()
        udiff = list(difflib.unified_diff(t_txt, o_txt, "onnx", "ours", lineterm="", n=2))
        diff.lines.append("  normalized FileDescriptorProto differs (--- onnx, +++ ours):")
        diff.lines.extend("    " + line for line in udiff[:200])
    return diff.lines


# ---------------------------------------------------------------------------
# 4. wire round trip
# ---------------------------------------------------------------------------


def make_conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((4,)).astype(np.float32), "B")
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["C"], name="conv0",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], group=1),
        helper.make_node("Relu", ["C"], ["Y"], name="relu0"),
    ]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="check")
    onnx.checker.check_model(model)
    return model


def make_if_model() -> onnx.ModelProto:
    def branch(name: str, value: float) -> onnx.GraphProto:
        const = helper.make_tensor(f"{name}_c", TensorProto.FLOAT, [2], [value, -value])
        return helper.make_graph(
            [helper.make_node("Constant", [], [f"{name}_out"], value=const)],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])],
        )

    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch("then", 1.5),
                            else_branch=branch("else", -2.0))
    graph = helper.make_graph(
        [node], "if_graph",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def make_external_sparse_model(tmp_dir: str) -> onnx.ModelProto:
    big = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "big")
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("sp_values", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
        helper.make_tensor("sp_indices", TensorProto.INT64, [3], [1, 70, 4000]),
        [64, 64],
    )
    graph = helper.make_graph(
        [helper.make_node("Add", ["big", "sp_values"], ["out"])], "ext_sparse",
        [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64, 64])],
        initializer=[big], sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = os.path.join(tmp_dir, "ext_model.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext_model.data", size_threshold=0)
    loaded = onnx.load_model(path, load_external_data=False)
    assert loaded.graph.initializer[0].data_location == TensorProto.EXTERNAL
    return loaded


def make_kitchen_sink_model() -> onnx.ModelProto:
    """Sets (nearly) every field of every message, including explicit defaults."""
    m = onnx.ModelProto()
    m.ir_version = onnx.IR_VERSION
    m.producer_name = "check_onnx_proto"
    m.producer_version = "0"
    m.domain = "ai.mantissa"
    m.model_version = 0  # explicitly set to the default: presence must survive
    m.doc_string = "kitchen sink"
    m.opset_import.add(domain="", version=21)
    m.opset_import.add(domain="ai.onnx.ml", version=5)
    m.opset_import.add(domain="local", version=1)
    m.metadata_props.add(key="k", value="v")
    m.metadata_props.add(key="", value="")

    cfg = m.configuration.add(name="cfg", num_devices=2)
    cfg.device.extend(["gpu:0", "gpu:1"])

    g = m.graph
    g.name = "sink"
    g.doc_string = "graph doc"
    g.metadata_props.add(key="gk", value="gv")

    # tensors exercising every data field
    t = g.initializer.add(name="t_float", data_type=TensorProto.FLOAT, doc_string="d")
    t.dims.extend([2, 2])
    t.float_data.extend([0.0, -1.5, 3.25, float("inf")])
    t.segment.begin = 0
    t.segment.end = 4
    t.metadata_props.add(key="tk", value="tv")
    t.data_location = TensorProto.DEFAULT  # explicit default
    t = g.initializer.add(name="t_i32", data_type=TensorProto.INT32)
    t.dims.append(3)
    t.int32_data.extend([-1, 0, 2**31 - 1])
    t = g.initializer.add(name="t_str", data_type=TensorProto.STRING)
    t.dims.append(2)
    t.string_data.extend([b"a", b"\xff\x00"])
    t = g.initializer.add(name="t_i64", data_type=TensorProto.INT64)
    t.dims.append(2)
    t.int64_data.extend([-(2**63), 2**63 - 1])
    t = g.initializer.add(name="t_f64", data_type=TensorProto.DOUBLE)
    t.dims.append(1)
    t.double_data.append(-0.0)
    t = g.initializer.add(name="t_u64", data_type=TensorProto.UINT64)
    t.dims.append(1)
    t.uint64_data.append(2**64 - 1)
    t = g.initializer.add(name="t_raw", data_type=TensorProto.FLOAT4E2M1, raw_data=b"\x12\x34")
    t.dims.append(4)
    t = g.initializer.add(name="t_ext", data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
    t.dims.append(8)
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", "32")):
        t.external_data.add(key=k, value=v)
    for dt in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2FNUZ, TensorProto.INT4,
               TensorProto.UINT2, TensorProto.FLOAT6E3M2, TensorProto.FLOAT8E8M0):
        g.initializer.add(name=f"t_dt{dt}", data_type=dt, raw_data=b"\x01")

    sp = g.sparse_initializer.add()
    sp.values.CopyFrom(helper.make_tensor("sv", TensorProto.FLOAT, [2], [1.0, 2.0]))
    sp.indices.CopyFrom(helper.make_tensor("si", TensorProto.INT64, [2, 2], [0, 1, 1, 0]))
    sp.dims.extend([2, 2])

    # value infos with every TypeProto variant
    x = g.input.add(name="x", doc_string="input doc")
    x.metadata_props.add(key="vk", value="vv")
    x.type.denotation = "TENSOR"
    x.type.tensor_type.elem_type = TensorProto.FLOAT
    d = x.type.tensor_type.shape.dim.add(dim_param="N", denotation="DATA_BATCH")
    d = x.type.tensor_type.shape.dim.add(dim_value=0)  # explicit zero in a oneof
    x.type.tensor_type.shape.dim.add()  # unknown dimension
    seq = g.input.add(name="seq")
    seq.type.sequence_type.elem_type.tensor_type.elem_type = TensorProto.INT64
    mp = g.input.add(name="map")
    mp.type.map_type.key_type = TensorProto.STRING
    mp.type.map_type.value_type.tensor_type.elem_type = TensorProto.FLOAT
    opt = g.input.add(name="opt")
    opt.type.optional_type.elem_type.sequence_type.elem_type.tensor_type.elem_type = TensorProto.BOOL
    spt = g.input.add(name="spt")
    spt.type.sparse_tensor_type.elem_type = TensorProto.FLOAT
    spt.type.sparse_tensor_type.shape.dim.add(dim_value=5)
    opq = g.output.add(name="opq")
    opq.type.opaque_type.domain = "ai.mantissa"
    opq.type.opaque_type.name = "Blob"
    vi = g.value_info.add(name="y")
    vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    vi.type.tensor_type.shape.SetInParent()  # present but empty shape

    # a node with every attribute type
    sub = helper.make_graph([], "sub", [], [])
    n = g.node.add(name="n0", op_type="Custom", domain="local", overload="ov", doc_string="nd")
    n.input.extend(["x", "", "seq"])
    n.output.extend(["y"])
    n.metadata_props.add(key="nk", value="nv")
    n.attribute.extend([
        helper.make_attribute("f", 0.5),
        helper.make_attribute("i", -7, doc_string="attr doc"),
        helper.make_attribute("s", b"bytes"),
        helper.make_attribute("t", helper.make_tensor("at", TensorProto.INT8, [1], [-3])),
        helper.make_attribute("g", sub),
        helper.make_attribute("sparse", sp),
        helper.make_attribute("tp", x.type),
        helper.make_attribute("floats", [1.0, 2.0]),
        helper.make_attribute("ints", [1, -2, 3]),
        helper.make_attribute("strings", [b"a", b"b"]),
        helper.make_attribute("tensors", [helper.make_tensor("at2", TensorProto.BOOL, [1], [True])]),
        helper.make_attribute("graphs", [sub, sub]),
        helper.make_attribute("sparse_tensors", [sp]),
        helper.make_attribute("type_protos", [x.type, seq.type]),
    ])
    a = n.attribute.add(name="zero", type=onnx.AttributeProto.INT, i=0)  # explicit default
    a = n.attribute.add(name="ref", ref_attr_name="alpha", type=onnx.AttributeProto.FLOAT)
    ndc = n.device_configurations.add(configuration_id="cfg", pipeline_stage=0)
    ss = ndc.sharding_spec.add(tensor_name="x")
    ss.device.extend([0, 1, -1])
    e = ss.index_to_device_group_map.add(key=-1)
    e.value.extend([0, 1])
    sd = ss.sharded_dim.add(axis=0)
    sd.simple_sharding.add(dim_value=64, num_shards=2)
    sd.simple_sharding.add(dim_param="N", num_shards=2)

    qa = g.quantization_annotation.add(tensor_name="y")
    qa.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value="s")
    qa.quant_parameter_tensor_names.add(key="ZERO_POINT_TENSOR", value="z")

    # training info
    ti = m.training_info.add()
    ti.initialization.name = "init"
    ti.algorithm.name = "algo"
    ti.initialization_binding.add(key="a", value="b")
    ti.update_binding.add(key="c", value="d")

    # function
    fn = m.functions.add(name="Custom", domain="local", overload="ov", doc_string="fd")
    fn.input.extend(["a"])
    fn.output.extend(["b"])
    fn.attribute.extend(["alpha"])
    fn.attribute_proto.append(helper.make_attribute("beta", 1.0))
    fn.node.append(helper.make_node("Identity", ["a"], ["b"]))
    fn.opset_import.add(domain="", version=21)
    fn.value_info.add(name="b").type.tensor_type.elem_type = TensorProto.FLOAT
    fn.metadata_props.add(key="fk", value="fv")
    return m


def find_unknown_fields(msg, path: str = "") -> list[str]:
    found = []
    if len(UnknownFieldSet(msg)):
        found.append(f"{path or msg.DESCRIPTOR.name}: {len(UnknownFieldSet(msg))} unknown field(s)")
    for fd, value in msg.ListFields():
        if fd.type != fd.TYPE_MESSAGE:
            continue
        if fd.is_repeated:
            for i, item in enumerate(value):
                found.extend(find_unknown_fields(item, f"{path}.{fd.name}[{i}]"))
        else:
            found.extend(find_unknown_fields(value, f"{path}.{fd.name}"))
    return found


def first_diff_offset(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def round_trip(name: str, data: bytes, OurModel) -> list[str]:
    errors = []
    ours = OurModel()
    try:
        ours.ParseFromString(data)
    except Exception as exc:  # noqa: BLE001
        return [f"{name}: our classes failed to parse: {exc}"]
    unknown = find_unknown_fields(ours)
    if unknown:
        errors.append(f"{name}: fields unknown to our proto (likely missing/renumbered):\n    "
                      + "\n    ".join(unknown[:20]))
    out = ours.SerializeToString()
    if out != data:
        off = first_diff_offset(out, data)
        errors.append(f"{name}: re-serialized bytes differ (ours {len(out)} B, input {len(data)} B, "
                      f"first difference at offset {off}: ours={out[off:off + 16].hex()} "
                      f"input={data[off:off + 16].hex()})")
    ref = onnx.ModelProto()
    ref.ParseFromString(data)
    back = onnx.ModelProto()
    back.ParseFromString(out)
    if back != ref:
        errors.append(f"{name}: onnx parses our bytes to a different ModelProto")
    # Same text form <=> every set field has the same name and value on both sides.
    o_txt = text_format.MessageToString(ours)
    r_txt = text_format.MessageToString(ref)
    if o_txt != r_txt:
        udiff = list(difflib.unified_diff(r_txt.splitlines(), o_txt.splitlines(), "onnx", "ours",
                                          lineterm="", n=1))
        errors.append(f"{name}: text form differs (--- onnx, +++ ours):\n    " + "\n    ".join(
            line if len(line) <= 160 else line[:157] + "..." for line in udiff[:60]))
    return errors


# ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proto", default=DEFAULT_PROTO)
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("models", nargs="*")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="check_onnx_proto_")
    failures: list[str] = []
    try:
        print(f"onnx {onnx.__version__} (IR_VERSION {onnx.IR_VERSION}); checking {args.proto}")
        fds = compile_proto(args.proto, tmp)
        pool = descriptor_pool.DescriptorPool()
        for fp in fds.file:
            pool.Add(fp)
        ours_file = pool.FindFileByName(fds.file[0].name)
        print(f"[1] compiled with grpc_tools.protoc: OK ({len(ours_file.message_types_by_name)} "
              f"top-level messages, {len(ours_file.enum_types_by_name)} top-level enums)")

        struct_diff = compare_files(ours_file, onnx_pb.DESCRIPTOR)
        if struct_diff:
            failures.append("structural differences vs onnx.onnx_ml_pb2:\n" + "\n".join(struct_diff))
            print(f"[2] structural comparison: FAIL ({len(struct_diff)} difference lines)")
        else:
            print("[2] structural comparison (both directions): OK")

        OurModel = message_factory.GetMessageClass(pool.FindMessageTypeByName("onnx.ModelProto"))
        cases: list[tuple[str, bytes]] = [
            ("generated:conv", make_conv_model().SerializeToString()),
            ("generated:if_subgraph", make_if_model().SerializeToString()),
            ("generated:external_data+sparse", make_external_sparse_model(tmp).SerializeToString()),
            ("generated:kitchen_sink", make_kitchen_sink_model().SerializeToString()),
        ]
        paths = sorted({p for g in MODEL_GLOBS for p in glob.glob(g)} | set(args.models))
        for p in paths:
            with open(p, "rb") as f:
                cases.append((os.path.relpath(p, REPO_ROOT), f.read()))
        rt_fail = 0
        for name, data in cases:
            errs = round_trip(name, data, OurModel)
            status = "OK" if not errs else "FAIL"
            rt_fail += bool(errs)
            print(f"[3] round trip {name} ({len(data)} B): {status}")
            failures.extend(errs)
    finally:
        if args.keep_tmp:
            print(f"temporary output kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if failures:
        print("\n".join(["", "FAILURES:"] + failures), file=sys.stderr)
        print(f"\nCHECK FAILED ({len(failures)} problem(s))", file=sys.stderr)
        return 1
    print("ALL CHECKS PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
