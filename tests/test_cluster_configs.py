"""Offline validation of cluster_configs/: the KubeRay manifests against the KubeRay v1.7.0 CRD schemas
(from ../shared/kuberay-crds, skipped when absent) and the AWS launcher YAML against Ray's bundled schema.

Kubernetes prunes unknown fields of a structural schema silently, so a typo such as ``minReplica`` would be
dropped by the API server without an error. To catch typos the tests close every object schema that lists
``properties`` (``additionalProperties: false``) unless it says ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "cluster_configs"
CRD_DIR = ROOT / ".." / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz"}

needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(),
    reason=f"KubeRay v1.7.0 CRDs not found at {CRD_DIR.resolve()} (shared data folder absent); cannot validate",
)


def strict_schema(schema):
    """A copy of a Kubernetes structural schema that rejects unknown fields and understands int-or-string."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def load_crd_schema(kind: str) -> tuple[dict, str]:
    """(strict openAPIV3Schema of the served storage version, apiVersion) of a KubeRay CRD."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with gzip.open(CRD_DIR / CRD_FILES[kind], "rt") as fh:
        crd = yaml.load(fh, Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return strict_schema(version["schema"]["openAPIV3Schema"]), f"{crd['spec']['group']}/{version['name']}"


@functools.cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(load_crd_schema(kind)[0])


def validation_errors(manifest: dict, kind: str) -> list[str]:
    api_version = load_crd_schema(kind)[1]
    errors = [f"apiVersion {manifest.get('apiVersion')!r} != {api_version!r}"] if (
        manifest.get("apiVersion") != api_version
    ) else []
    for err in _validator(kind).iter_errors(manifest):
        errors.append(f"{'/'.join(map(str, err.absolute_path))}: {err.message}")
    return errors


def load_manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((CONFIGS / name).read_text()) if d]
    assert len(docs) == 1, f"{name} should hold one manifest"
    return docs[0]


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load_manifest("raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_manifest("rayjob.yaml")


def test_strict_schema_closes_objects_and_keeps_maps_open():
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "string"}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True},
                "port": {"x-kubernetes-int-or-string": True},
            },
        }
    )
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"a": {"b": "x"}, "labels": {"any": "thing"}, "free": {"z": 1}, "port": 80})
    assert v.is_valid({"port": "http"})
    assert not v.is_valid({"a": {"c": "x"}})
    assert not v.is_valid({"labels": {"k": 1}})
    assert not v.is_valid({"port": 1.5})


@needs_crds
def test_raycluster_matches_crd(raycluster):
    assert validation_errors(raycluster, "RayCluster") == []


@needs_crds
def test_rayjob_matches_crd(rayjob):
    assert validation_errors(rayjob, "RayJob") == []


@needs_crds
def test_rayjob_inline_cluster_spec_matches_raycluster_crd(rayjob):
    as_cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "inline"},
        "spec": rayjob["spec"]["rayClusterSpec"],
    }
    assert validation_errors(as_cluster, "RayCluster") == []


@needs_crds
@pytest.mark.parametrize(
    "path, typo",
    [
        (["spec", "workerGroupSpecs", 0], "minReplica"),
        (["spec", "headGroupSpec"], "rayStartParam"),
        (["spec"], "enableInTreeAutoscale"),
        (["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0], "resource"),
        (["spec", "headGroupSpec", "template", "spec", "volumes", 0, "persistentVolumeClaim"], "claim"),
    ],
)
def test_typo_in_raycluster_is_caught(raycluster, path, typo):
    broken = copy.deepcopy(raycluster)
    node = broken
    for key in path:
        node = node[key]
    node[typo] = node.get(typo + "s", node.get(typo + "Name", 1))
    errors = validation_errors(broken, "RayCluster")
    assert any(typo in e for e in errors), errors


@needs_crds
def test_typo_in_rayjob_inline_spec_is_caught(rayjob):
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplica"] = 0
    broken["spec"]["shutdownAfterJobFinish"] = True
    errors = validation_errors(broken, "RayJob")
    assert any("minReplica" in e for e in errors) and any("shutdownAfterJobFinish" in e for e in errors), errors


@needs_crds
def test_wrong_type_and_enum_are_caught(raycluster):
    broken = copy.deepcopy(raycluster)
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    broken["spec"]["authOptions"]["mode"] = "password"
    errors = validation_errors(broken, "RayCluster")
    assert len(errors) == 2, errors


def _cluster_specs(raycluster, rayjob):
    return {"raycluster.yaml": raycluster["spec"], "rayjob.yaml": rayjob["spec"]["rayClusterSpec"]}


def _pod_specs(spec):
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def test_cluster_policy(raycluster, rayjob):
    """Project rules the schema cannot express: auth on, private dashboard, idle head, scale-from-zero GPUs."""
    for name, spec in _cluster_specs(raycluster, rayjob).items():
        assert spec["authOptions"] == {"mode": "token", "secretName": "jimray-ray-token"}, name
        assert spec["enableInTreeAutoscaling"] is True, name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", name
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), name
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"gpu-workers", "cpu-workers"}, name
        gpu = groups["gpu-workers"]
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1, name
        pod = gpu["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert "resources" in spec["autoscalerOptions"], name
        for group, pod in _pod_specs(spec):
            for container in pod["containers"]:
                res = container["resources"]
                assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), group
                assert container["image"].startswith("rayproject/ray:2.60.0-py311"), group
            mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
            assert claims[mounts["/mnt/runs"]] == "jimray-runs", (name, group)


def test_rayjob_runs_training_and_cleans_up(rayjob):
    spec = rayjob["spec"]
    assert "jimray train jobs/synechocystis.yaml --out /mnt/runs/synechocystis" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert "jimray" in yaml.safe_load(spec["runtimeEnvYAML"])["pip"][0]


def test_pvc_is_shared_and_named():
    pvc = load_manifest("pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "jimray-runs"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ---------------------------------------------------------------- AWS cluster launcher


def ray_launcher_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed, so its bundled cluster-launcher schema is unavailable")
    path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def aws_cluster() -> dict:
    return yaml.safe_load((CONFIGS / "aws-cluster.yaml").read_text())


def launcher_errors(config: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(ray_launcher_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]


def test_aws_launcher_matches_ray_schema(aws_cluster):
    assert launcher_errors(aws_cluster) == []
    assert aws_cluster["available_node_types"]["gpu-worker"]["min_workers"] == 0
    assert aws_cluster["available_node_types"][aws_cluster["head_node_type"]]["resources"]["CPU"] == 0
    assert any("jimray" in c for c in aws_cluster["setup_commands"])


@pytest.mark.parametrize(
    "path, typo",
    [([], "setup_command"), (["available_node_types", "gpu-worker"], "min_worker"), (["docker"], "images")],
)
def test_typo_in_aws_launcher_is_caught(aws_cluster, path, typo):
    broken = copy.deepcopy(aws_cluster)
    node = broken
    for key in path:
        node = node[key]
    node[typo] = node.get(typo + "s", node.get(typo[:-1], 1))
    errors = launcher_errors(broken)
    assert any(typo in e for e in errors), errors
