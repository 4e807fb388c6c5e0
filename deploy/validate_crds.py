#!/usr/bin/env python3
"""Validates custom resources (GRPCRoute, ServiceMonitor, ServingRuntime, InferenceService, ...)
against the CRD schemas in deploy/schemas, offline, with the jsonschema package.

    validate_crds.py [--schemas DIR] [--builtin-out FILE] MANIFEST...   (MANIFEST "-" = stdin)

Every YAML document of the manifests is one of:
  * a custom resource whose group and kind a CRD in the schemas directory defines: validated
    against that CRD's openAPIV3Schema for the document's version;
  * a built-in Kubernetes resource (one the kubernetes-validate package has a schema for): not
    checked here but written to --builtin-out, for `kubernetes-validate --strict`;
  * anything else: an error (a misspelt apiVersion or kind would otherwise pass unnoticed).

The CRD schemas are checked the way `kubectl apply --validate=strict` checks a custom resource:
fields a schema does not declare are errors unless it says x-kubernetes-preserve-unknown-fields.
Two extension keys of the schemas in deploy/schemas stand for embedded Kubernetes types, taken
from the OpenAPI definitions shipped with kubernetes-validate:
  x-mantissa-k8s-type: NAME        the value is of that type (e.g. io.k8s.api.core.v1.Container)
  x-mantissa-k8s-inline: [NAME...] the object also accepts those types' fields (Go `json:",inline"`)
and `metadata` is checked as an ObjectMeta. CEL rules (x-kubernetes-validations) are not run.

Exit status: 0 when every custom resource is valid, 1 when one is not or a document is unknown,
2 on a usage error. Needs PyYAML, jsonschema and kubernetes-validate (tests/python/requirements.txt).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml

SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

# Keys of a CRD's openAPIV3Schema that carry over to JSON Schema unchanged.
_PLAIN_KEYS = {
    "type", "enum", "const", "pattern", "minLength", "maxLength", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems", "uniqueItems",
    "minProperties", "maxProperties", "required", "default", "description", "title", "example",
}


class ManifestError(Exception):
    pass


# ---- Kubernetes definitions (from kubernetes-validate) --------------------------------------

def kubernetes_versions() -> list[str]:
    from kubernetes_validate import utils
    return utils.all_versions()


def _k8s_schema_dir(version: str) -> Path:
    import kubernetes_validate
    return Path(kubernetes_validate.__file__).resolve().parent / "kubernetes-json-schema" / f"v{version}-local-strict"


def kubernetes_definitions(version: str) -> dict:
    path = _k8s_schema_dir(version) / "_definitions.json"
    return json.loads(path.read_text())["$defs"]


def is_builtin(doc: dict, version: str) -> bool:
    """True when kubernetes-validate has a schema for the document's apiVersion and kind."""
    api_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", str(doc.get("apiVersion", "")))
    name = f"{str(doc.get('kind', '')).lower()}-{api_version}.json"
    return (_k8s_schema_dir(version) / name).is_file()


# ---- CRD schema -> JSON Schema -------------------------------------------------------------

def _ref(name: str, definitions: dict) -> dict:
    if name not in definitions:
        raise ManifestError(f"unknown Kubernetes definition {name!r} in a CRD schema")
    return {"$ref": f"#/$defs/{name}"}


def convert(node, definitions: dict):
    """One openAPIV3Schema node as JSON Schema (2020-12), strict about unknown fields."""
    if not isinstance(node, dict):
        return node
    out: dict = {}
    for key, value in node.items():
        if key == "properties":
            out["properties"] = {name: convert(sub, definitions) for name, sub in value.items()}
        elif key == "items":
            out["items"] = convert(value, definitions)
        elif key == "additionalProperties":
            out["additionalProperties"] = convert(value, definitions) if isinstance(value, dict) else value
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [convert(sub, definitions) for sub in value]
        elif key == "not":
            out["not"] = convert(value, definitions)
        elif key in _PLAIN_KEYS:
            out[key] = copy.deepcopy(value)
        # format (int32, date-time, ...), nullable, x-kubernetes-* and x-mantissa-* are handled
        # below or carry no validation here.

    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]

    k8s_type = node.get("x-mantissa-k8s-type")
    if k8s_type:
        out.update(_ref(k8s_type, definitions))
        return out

    for name in node.get("x-mantissa-k8s-inline", []) or []:
        _ref(name, definitions)  # existence check
        props = out.setdefault("properties", {})
        for field, sub in definitions[name].get("properties", {}).items():
            props.setdefault(field, copy.deepcopy(sub))
        out["type"] = "object"

    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if out.get("type") == "object" and not preserve and "additionalProperties" not in out:
        # The API server prunes undeclared fields; strict field validation reports them.
        out["additionalProperties"] = False
    return out


class CrdIndex:
    """The CRDs of a schemas directory, by (group, kind)."""

    def __init__(self, directory: Path, kubernetes_version: str):
        self.definitions = kubernetes_definitions(kubernetes_version)
        self.crds: dict[tuple[str, str], dict] = {}
        self.sources: dict[tuple[str, str], Path] = {}
        self._validators: dict[tuple[str, str, str], jsonschema.protocols.Validator] = {}
        files = sorted(directory.glob("*.yaml"))
        if not files:
            raise ManifestError(f"no CRD schemas (*.yaml) in {directory}")
        for path in files:
            for crd in yaml.safe_load_all(path.read_text()):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                key = (crd["spec"]["group"], crd["spec"]["names"]["kind"])
                self.crds[key] = crd
                self.sources[key] = path

    def kinds(self) -> list[str]:
        return sorted(f"{kind}.{group}" for group, kind in self.crds)

    def lookup(self, doc: dict) -> tuple[str, str, str] | None:
        api_version = str(doc.get("apiVersion", ""))
        group, _, version = api_version.rpartition("/")
        key = (group, str(doc.get("kind", "")))
        return (group, key[1], version) if key in self.crds else None

    def validator(self, group: str, kind: str, version: str):
        cache_key = (group, kind, version)
        if cache_key not in self._validators:
            crd = self.crds[(group, kind)]
            versions = {v["name"]: v for v in crd["spec"]["versions"]}
            if version not in versions or not versions[version].get("served", False):
                raise ManifestError(
                    f"{kind}.{group} has no served version {version!r} in "
                    f"{self.sources[(group, kind)].name} (versions: {', '.join(sorted(versions))})")
            schema = convert(versions[version]["schema"]["openAPIV3Schema"], self.definitions)
            schema.setdefault("properties", {})["metadata"] = _ref(OBJECT_META, self.definitions)
            schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
            schema["$defs"] = self.definitions
            jsonschema.Draft202012Validator.check_schema({k: v for k, v in schema.items() if k != "$defs"})
            self._validators[cache_key] = jsonschema.Draft202012Validator(schema)
        return self._validators[cache_key]

    def validate(self, doc: dict) -> list[str]:
        found = self.lookup(doc)
        assert found is not None
        group, kind, version = found
        errors = []
        crd = self.crds[(group, kind)]
        if crd["spec"].get("scope") == "Cluster" and (doc.get("metadata") or {}).get("namespace"):
            errors.append("metadata.namespace: a cluster-scoped resource has no namespace")
        for error in sorted(self.validator(group, kind, version).iter_errors(doc),
                            key=lambda e: list(map(str, e.absolute_path))):
            path = ".".join(str(p) for p in error.absolute_path) or "(root)"
            errors.append(f"{path}: {error.message}")
        return errors


# ---- command line ----------------------------------------------------------------------------

def describe(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    name = meta.get("name", "?")
    if meta.get("namespace"):
        name = f"{meta['namespace']}/{name}"
    return f"{doc.get('kind', '?')} {name} ({doc.get('apiVersion', '?')})"


def load_documents(path: str) -> list[dict]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    docs = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            raise ManifestError(f"{path}: a document without apiVersion and kind: {str(doc)[:80]}")
        docs.append(doc)
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifests", nargs="+", help="YAML files ('-' for stdin)")
    parser.add_argument("--schemas", type=Path, default=SCHEMAS_DIR,
                        help=f"directory of CRD YAML files (default: {SCHEMAS_DIR})")
    parser.add_argument("--builtin-out", type=Path,
                        help="write the built-in Kubernetes resources here (multi-document YAML)")
    parser.add_argument("--kubernetes-version", default=None,
                        help="Kubernetes definitions for embedded types and for telling built-in "
                             "kinds apart (default: the newest kubernetes-validate ships)")
    parser.add_argument("--quiet", action="store_true", help="print errors only")
    args = parser.parse_args(argv)

    try:
        version = args.kubernetes_version or kubernetes_versions()[-1]
        index = CrdIndex(args.schemas, version)
        failed = 0
        builtin: list[dict] = []
        for manifest in args.manifests:
            for doc in load_documents(manifest):
                if index.lookup(doc):
                    errors = index.validate(doc)
                    if errors:
                        failed += 1
                        for message in errors:
                            print(f"ERROR {manifest}: {describe(doc)}: {message}")
                    elif not args.quiet:
                        print(f"OK    {manifest}: {describe(doc)}")
                elif is_builtin(doc, version):
                    builtin.append(doc)
                else:
                    failed += 1
                    print(f"ERROR {manifest}: {describe(doc)}: neither a built-in Kubernetes kind "
                          f"(Kubernetes {version}) nor a custom resource with a schema in "
                          f"{args.schemas} ({', '.join(index.kinds())})")
        if args.builtin_out is not None:
            args.builtin_out.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    except (ManifestError, OSError, yaml.YAMLError) as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
