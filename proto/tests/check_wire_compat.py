#!/usr/bin/env python3
"""Wire-compatibility check: Mantissa's protos vs. Triton's published client.

Usage (from the repository root, in a throwaway virtualenv outside the repo):

    python3 -m venv /tmp/mantissa-proto-venv
    /tmp/mantissa-proto-venv/bin/pip install 'tritonclient[grpc]' 'grpcio-tools<1.76'
    /tmp/mantissa-proto-venv/bin/python proto/tests/check_wire_compat.py [PROTO_DIR]

    PROTO_DIR defaults to proto/proto next to this script's parent directory.

    (Pin grpcio-tools so that its protobuf requirement overlaps the one of
    tritonclient; e.g. tritonclient 2.73 needs protobuf<7 while grpcio-tools
    >=1.76 wants protobuf>=7.)

What it does:

 1. Compiles PROTO_DIR/*.proto with grpc_tools.protoc into a temporary
    directory (python + grpc python stubs + a descriptor set), and imports the
    generated modules in a child process as a smoke test (the stub must expose
    every rpc of inference.GRPCInferenceService).
 2. Structural check: compares every message, field (name, number, type,
    label, type name, oneof, map entry), enum value and rpc in
    tritonclient.grpc.service_pb2 / model_config_pb2 against ours, both
    directions, ignoring comments and declaration order.
 3. Wire round trip: builds sample messages with our classes, serializes them,
    parses the bytes with tritonclient's classes and compares field by field
    (text format, MessageToDict and deterministic bytes); then the reverse.

Our descriptors are loaded into a private DescriptorPool so they do not clash
with tritonclient's (both register "grpc_service.proto" / "model_config.proto"
in package "inference").

Exit status 0 when everything matches, 1 otherwise.
"""

import os
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, text_format
from google.protobuf import message_factory

try:
    from grpc_tools import protoc
    import grpc_tools
except ImportError:  # pragma: no cover
    sys.exit("grpcio-tools is required: pip install grpcio-tools")

try:
    from tritonclient.grpc import model_config_pb2 as tr_mc
    from tritonclient.grpc import service_pb2 as tr_svc
except ImportError:  # pragma: no cover
    sys.exit("tritonclient[grpc] is required: pip install 'tritonclient[grpc]'")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "proto"))
PROTO_FILES = ("model_config.proto", "grpc_service.proto")

FAILURES = []


def fail(msg):
    FAILURES.append(msg)
    print("FAIL:", msg)


# ---------------------------------------------------------------------------
# 1. compile
# ---------------------------------------------------------------------------


def compile_protos(proto_dir, out_dir):
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    desc_set = os.path.join(out_dir, "mantissa.desc")
    args = [
        "grpc_tools.protoc",
        "-I" + proto_dir,
        "-I" + include,
        "--python_out=" + out_dir,
        "--grpc_python_out=" + out_dir,
        "--descriptor_set_out=" + desc_set,
        "--include_imports",
    ] + [os.path.join(proto_dir, f) for f in PROTO_FILES]
    rc = protoc.main(args)
    if rc != 0:
        sys.exit("protoc failed with status %d" % rc)
    fds = descriptor_pb2.FileDescriptorSet()
    with open(desc_set, "rb") as f:
        fds.ParseFromString(f.read())
    return fds


SMOKE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import grpc_service_pb2 as s, grpc_service_pb2_grpc as g, model_config_pb2 as m
rpcs = [x.name for x in s.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]
stub_src = open(g.__file__).read()
missing = [r for r in rpcs if "/inference.GRPCInferenceService/" + r not in stub_src]
assert not missing, missing
assert hasattr(g, "GRPCInferenceServiceStub") and hasattr(g, "GRPCInferenceServiceServicer")
r = s.ModelInferRequest(model_name="m", raw_input_contents=[b"x"])
assert s.ModelInferRequest.FromString(r.SerializeToString()) == r
assert m.DataType.Value("TYPE_BF16") == 14
print("generated modules import OK (%d rpcs)" % len(rpcs))
"""


def smoke_import(out_dir):
    res = subprocess.run([sys.executable, "-c", SMOKE, out_dir],
                         capture_output=True, text=True)
    sys.stdout.write(res.stdout)
    if res.returncode != 0:
        fail("generated python modules failed to import:\n" + res.stderr)


# ---------------------------------------------------------------------------
# 2. structural comparison
# ---------------------------------------------------------------------------

FD = descriptor_pb2.FieldDescriptorProto


def _fields(d):
    out = {}
    for f in d.field:
        out[f.name] = (
            f.number,
            FD.Type.Name(f.type),
            FD.Label.Name(f.label),
            f.type_name,
            d.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None,
            f.proto3_optional,
            f.json_name,
            f.options.SerializeToString(deterministic=True),
        )
    return out


def _enum(prefix, e, out):
    out["enum " + prefix + e.name] = {v.name: v.number for v in e.value}


def _msg(prefix, d, out):
    name = prefix + d.name
    out["message " + name] = {
        "fields": _fields(d),
        "map_entry": d.options.map_entry,
        "reserved": sorted((r.start, r.end) for r in d.reserved_range),
        "reserved_names": sorted(d.reserved_name),
    }
    for e in d.enum_type:
        _enum(name + ".", e, out)
    for n in d.nested_type:
        _msg(name + ".", n, out)


def flatten(fdp):
    out = {"file": (fdp.name, fdp.package, fdp.syntax, tuple(fdp.dependency))}
    prefix = "." + fdp.package + "."
    for e in fdp.enum_type:
        _enum(prefix, e, out)
    for d in fdp.message_type:
        _msg(prefix, d, out)
    for s in fdp.service:
        for m in s.method:
            out["rpc %s%s.%s" % (prefix, s.name, m.name)] = (
                m.input_type, m.output_type, m.client_streaming, m.server_streaming)
    return out


def compare_structure(ours_by_name):
    total = 0
    for mod in (tr_mc, tr_svc):
        theirs = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(theirs)
        # CopyToProto omits json_name; normalize ours the same way.
        ours = descriptor_pb2.FileDescriptorProto()
        ours.CopyFrom(ours_by_name[theirs.name])
        ft, fo = flatten(theirs), flatten(ours)
        if not any(f.json_name for d in theirs.message_type for f in d.field):
            for v in fo.values():
                if isinstance(v, dict) and "fields" in v:
                    for k, t in v["fields"].items():
                        v["fields"][k] = t[:6] + ("",) + t[7:]
        for key in sorted(set(ft) | set(fo)):
            if key not in fo:
                fail("%s: %s missing in ours" % (theirs.name, key))
            elif key not in ft:
                fail("%s: %s extra in ours (not in tritonclient)" % (theirs.name, key))
            elif ft[key] != fo[key]:
                a, b = ft[key], fo[key]
                if isinstance(a, dict) and "fields" in a:
                    for fk in sorted(set(a["fields"]) | set(b["fields"])):
                        if a["fields"].get(fk) != b["fields"].get(fk):
                            fail("%s: %s field %s: triton=%s ours=%s" % (
                                theirs.name, key, fk, a["fields"].get(fk), b["fields"].get(fk)))
                    for k in ("map_entry", "reserved", "reserved_names"):
                        if a[k] != b[k]:
                            fail("%s: %s %s differs: %s vs %s" % (theirs.name, key, k, a[k], b[k]))
                else:
                    fail("%s: %s differs: triton=%s ours=%s" % (theirs.name, key, a, b))
        total += len(ft)
    print("structural check: %d definitions compared" % total)


# ---------------------------------------------------------------------------
# 3. wire round trips
# ---------------------------------------------------------------------------

SAMPLES = {
    "ModelInferRequest": r"""
        model_name: "resnet50" model_version: "3" id: "req-42"
        parameters { key: "sequence_id" value { int64_param: 7 } }
        parameters { key: "sequence_start" value { bool_param: true } }
        parameters { key: "priority" value { uint64_param: 18446744073709551615 } }
        parameters { key: "temperature" value { double_param: 0.25 } }
        parameters { key: "tag" value { string_param: "abc" } }
        inputs { name: "INPUT0" datatype: "FP32" shape: [1, 3, -1]
                 parameters { key: "binary_data_size" value { int64_param: 12 } } }
        inputs { name: "INPUT1" datatype: "BYTES" shape: [2] }
        outputs { name: "OUTPUT0"
                  parameters { key: "classification" value { int64_param: 3 } } }
        outputs { name: "OUTPUT1" }
        raw_input_contents: "\000\000\200?\000\000\000@\000\000@@"
        raw_input_contents: "\003\000\000\000foo\000\000\000\000"
    """,
    "ModelInferResponse": r"""
        model_name: "m" model_version: "1" id: "x"
        parameters { key: "triton_final_response" value { bool_param: true } }
        outputs { name: "O" datatype: "INT64" shape: [2]
                  contents { int64_contents: [1, -2] } }
        outputs { name: "T" datatype: "FP64" shape: [1]
                  contents { fp64_contents: 1.5 bool_contents: true int_contents: -3
                             uint_contents: 4 uint64_contents: 5 fp32_contents: 0.5
                             bytes_contents: "zz" } }
        raw_output_contents: "\001\002"
    """,
    "ModelStreamInferResponse": r"""
        error_message: "boom"
        infer_response { model_name: "m" outputs { name: "o" datatype: "BOOL" shape: 1 } }
    """,
    "ModelMetadataResponse": r"""
        name: "densenet" versions: ["1", "2"] platform: "onnxruntime_onnx"
        inputs { name: "data_0" datatype: "FP32" shape: [-1, 3, 224, 224] }
        outputs { name: "prob" datatype: "FP32" shape: [-1, 1000] }
    """,
    "ServerMetadataResponse": r"""
        name: "mantissa" version: "0.1.0" extensions: ["classification", "statistics"]
    """,
    "ModelConfigResponse": r"""
        config {
          name: "resnet" platform: "onnxruntime_onnx" backend: "onnxruntime" runtime: "r"
          version_policy { latest { num_versions: 2 } }
          max_batch_size: 8
          input { name: "in" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [3, -1, -1]
                  reshape { shape: [1, 3] } is_shape_tensor: false allow_ragged_batch: true
                  optional: true is_non_linear_format_io: true }
          output { name: "out" data_type: TYPE_BF16 dims: [1000] label_filename: "l.txt"
                   reshape { shape: 1000 } is_shape_tensor: true is_non_linear_format_io: true }
          batch_input { kind: BATCH_ITEM_SHAPE_FLATTEN target_name: "bi" data_type: TYPE_INT32
                        source_input: "in" }
          batch_output { target_name: "bo" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "in" }
          optimization {
            graph { level: 1 } priority: PRIORITY_MAX
            cuda { graphs: true busy_wait_events: true output_copy_stream: true
                   graph_spec { batch_size: 4
                                input { key: "in" value { dim: [3, 224, 224] } }
                                graph_lower_bound { batch_size: 1
                                  input { key: "in" value { dim: [3, 1, 1] } } } } }
            execution_accelerators {
              gpu_execution_accelerator { name: "tensorrt"
                parameters { key: "precision_mode" value: "FP16" } }
              cpu_execution_accelerator { name: "openvino" } }
            input_pinned_memory { enable: true } output_pinned_memory { enable: false }
            gather_kernel_buffer_threshold: 5 eager_batching: true
          }
          dynamic_batching {
            preferred_batch_size: [4, 8] max_queue_delay_microseconds: 100
            preserve_ordering: true priority_levels: 2 default_priority_level: 1
            default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 9
                                   allow_timeout_override: true max_queue_size: 16 }
            priority_queue_policy { key: 1 value { timeout_action: REJECT max_queue_size: 3 } }
          }
          instance_group { name: "g0" kind: KIND_GPU count: 2 gpus: [0, 1]
                           rate_limiter { resources { name: "R1" global: true count: 4 }
                                          priority: 2 }
                           secondary_devices { kind: KIND_NVDLA device_id: 1 }
                           profile: "0" passive: true host_policy: "gpu_0" }
          instance_group { kind: KIND_CPU count: 1 }
          default_model_filename: "model.onnx"
          cc_model_filenames { key: "8.6" value: "m86.plan" }
          metric_tags { key: "team" value: "ml" }
          parameters { key: "p" value { string_value: "v" } }
          model_warmup { name: "w" batch_size: 1 count: 2
                         inputs { key: "in" value { data_type: TYPE_FP32 dims: [3]
                                                    random_data: true } } }
          model_operations { op_library_filename: "libop.so" }
          model_transaction_policy { decoupled: true }
          model_repository_agents { agents { name: "checksum"
                                             parameters { key: "k" value: "v" } } }
          response_cache { enable: true }
          model_metrics { metric_control { metric_identifier { family: "nv_inference_first_response_histogram_ms" }
                                           histogram_options { buckets: [1, 10, 100] } } }
        }
    """,
    # Second config exercising the other scheduling_choice branches.
    "ModelConfigResponse#sequence": r"""
        config {
          name: "seq" backend: "python" max_batch_size: 4
          version_policy { specific { versions: [1, 3] } }
          sequence_batching {
            oldest { max_candidate_sequences: 4 preferred_batch_size: 2
                     max_queue_delay_microseconds: 5 preserve_ordering: true }
            max_sequence_idle_microseconds: 5000000
            control_input { name: "START"
              control { kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1]
                        fp32_false_true: [0, 1] bool_false_true: [false, true]
                        data_type: TYPE_INT32 } }
            state { input_name: "si" output_name: "so" data_type: TYPE_FP32 dims: [-1]
                    initial_state { data_type: TYPE_FP32 dims: [1] data_file: "f" name: "init" }
                    use_same_buffer_for_input_output: true use_growable_memory: true }
            iterative_sequence: true
          }
        }
    """,
    "ModelConfigResponse#ensemble": r"""
        config {
          name: "ens" platform: "ensemble" version_policy { all {} }
          ensemble_scheduling {
            step { model_name: "pre" model_version: -1
                   input_map { key: "IN" value: "raw" } output_map { key: "OUT" value: "mid" }
                   model_namespace: "ns" }
            max_inflight_requests: 3
          }
        }
    """,
    "ModelConfigResponse#direct": r"""
        config {
          name: "seq_direct"
          sequence_batching { direct { max_queue_delay_microseconds: 1
                                       minimum_slot_utilization: 0.5 } }
        }
    """,
    "ModelStatisticsResponse": r"""
        model_stats {
          name: "m" version: "1" last_inference: 1700000000000
          inference_count: 10 execution_count: 5
          inference_stats {
            success { count: 10 ns: 1000 } fail { count: 1 ns: 2 } queue { count: 10 ns: 3 }
            compute_input { count: 5 ns: 4 } compute_infer { count: 5 ns: 5 }
            compute_output { count: 5 ns: 6 } cache_hit { count: 1 ns: 7 }
            cache_miss { count: 2 ns: 8 } }
          batch_stats { batch_size: 2 compute_input { count: 1 ns: 1 }
                        compute_infer { count: 1 ns: 2 } compute_output { count: 1 ns: 3 } }
          memory_usage { type: "GPU" id: 0 byte_size: 1048576 }
          response_stats { key: "0" value {
            compute_infer { count: 1 ns: 1 } compute_output { count: 1 ns: 2 }
            success { count: 1 ns: 3 } fail { count: 0 ns: 0 }
            empty_response { count: 1 ns: 4 } cancel { count: 1 ns: 5 } } }
        }
        model_stats { name: "other" version: "2" }
    """,
    "RepositoryIndexResponse": r"""
        models { name: "a" version: "1" state: "READY" }
        models { name: "b" version: "2" state: "UNAVAILABLE" reason: "unloaded" }
    """,
    "RepositoryIndexRequest": 'repository_name: "r" ready: true',
    "RepositoryModelLoadRequest": r"""
        repository_name: "" model_name: "m"
        parameters { key: "config" value { string_param: "{}" } }
        parameters { key: "file:1/model.onnx" value { bytes_param: "\000\001" } }
        parameters { key: "n" value { int64_param: -1 } }
        parameters { key: "b" value { bool_param: true } }
    """,
    "RepositoryModelUnloadRequest": r"""
        model_name: "m" parameters { key: "unload_dependents" value { bool_param: true } }
    """,
    "ModelReadyRequest": 'name: "m" version: "2"',
    "ServerLiveResponse": "live: true",
    "ServerReadyResponse": "ready: true",
    "ModelConfigRequest": 'name: "m" version: "1"',
    "ModelStatisticsRequest": 'name: "m"',
    "SystemSharedMemoryRegisterRequest": 'name: "r" key: "/shm" offset: 8 byte_size: 64',
    "SystemSharedMemoryStatusResponse": r"""
        regions { key: "r" value { name: "r" key: "/shm" offset: 8 byte_size: 64 } }
    """,
    "CudaSharedMemoryRegisterRequest": 'name: "c" raw_handle: "\\001\\002" device_id: 0 byte_size: 128',
    "CudaSharedMemoryStatusResponse": r"""
        regions { key: "c" value { name: "c" device_id: 1 byte_size: 128 } }
    """,
    "TraceSettingRequest": r"""
        settings { key: "trace_level" value { value: ["TIMESTAMPS", "TENSORS"] } }
        settings { key: "trace_rate" value {} }
        model_name: "m"
    """,
    "TraceSettingResponse": r"""
        settings { key: "trace_file" value { value: "/tmp/t.json" } }
    """,
    "LogSettingsRequest": r"""
        settings { key: "log_info" value { bool_param: true } }
        settings { key: "log_verbose_level" value { uint32_param: 2 } }
        settings { key: "log_format" value { string_param: "ISO8601" } }
    """,
    "LogSettingsResponse": r"""
        settings { key: "log_file" value { string_param: "" } }
    """,
}


def _triton_class(name):
    for mod in (tr_svc, tr_mc):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise KeyError(name)


def _same(a, b):
    ta = text_format.MessageToString(a, as_utf8=False)
    tb = text_format.MessageToString(b, as_utf8=False)
    da = json_format.MessageToDict(a, preserving_proto_field_name=True)
    db = json_format.MessageToDict(b, preserving_proto_field_name=True)
    return ta == tb and da == db, ta, tb


def roundtrip(pool):
    n = 0
    for key, text in SAMPLES.items():
        try:
            n += _roundtrip_one(pool, key, text)
        except Exception as e:  # a parse error is a compatibility failure too
            fail("%s: %s: %s" % (key, type(e).__name__, e))
    print("wire round trip: %d/%d samples identical in both directions" % (n, len(SAMPLES)))


def _roundtrip_one(pool, key, text):
    name = key.split("#")[0]
    ours_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("inference." + name))
    theirs_cls = _triton_class(name)
    before = len(FAILURES)

    ours = text_format.Parse(text, ours_cls())
    theirs_ref = text_format.Parse(text, theirs_cls())

    # ours -> bytes -> theirs
    wire = ours.SerializeToString(deterministic=True)
    got = theirs_cls.FromString(wire)
    ok, ta, tb = _same(got, theirs_ref)
    if not ok:
        fail("%s: ours->triton mismatch\n--- triton parsed:\n%s--- expected:\n%s" % (key, ta, tb))
    if got.SerializeToString(deterministic=True) != wire:
        fail("%s: ours->triton re-serialized bytes differ" % key)

    # theirs -> bytes -> ours
    wire2 = theirs_ref.SerializeToString(deterministic=True)
    back = ours_cls.FromString(wire2)
    ok, ta, tb = _same(back, ours)
    if not ok:
        fail("%s: triton->ours mismatch\n--- ours parsed:\n%s--- expected:\n%s" % (key, ta, tb))
    if wire2 != wire:
        fail("%s: deterministic encodings differ between ours and triton" % key)
    if not wire:
        fail("%s: sample serialized to zero bytes" % key)

    if len(FAILURES) != before:
        return 0
    print("  ok  %-36s %5d bytes" % (key, len(wire)))
    return 1


def main():
    proto_dir = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PROTO_DIR)
    print("protos:       ", proto_dir)
    print("tritonclient: ", os.path.dirname(tr_svc.__file__))
    with tempfile.TemporaryDirectory(prefix="mantissa-proto-") as out_dir:
        fds = compile_protos(proto_dir, out_dir)
        print("compiled %s into %s" % (", ".join(PROTO_FILES), out_dir))
        smoke_import(out_dir)

    pool = descriptor_pool.DescriptorPool()
    ours_by_name = {}
    for fdp in fds.file:
        pool.Add(fdp)
        ours_by_name[fdp.name] = fdp

    compare_structure(ours_by_name)
    roundtrip(pool)

    if FAILURES:
        print("\n%d FAILURE(S)" % len(FAILURES))
        return 1
    print("\nALL CHECKS PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
