"""The cluster configs in ``cluster/configs/`` pass the validators of the tools that read them.

Everything runs offline; no cluster, cloud or network is touched.

* Ray autoscaler YAML (``ray up``): what ``ray up`` runs on a config before it calls GCP
  (``ray.autoscaler._private.commands._bootstrap_config`` up to ``bootstrap_gcp``):
  ``util.prepare_config`` (defaults, docker, per-type bounds), the GCP provider's
  ``fillout_available_node_types_resources`` (parses each TPU node config, adds
  ``TPU-<type>-head``) and ``util.validate_config`` (Ray's JSON schema and cross-field rules).
  Ray passes each ``node_config`` to the Compute or TPU API as the request body, so it is also
  checked against that API's schema from the discovery documents google-api-python-client
  ships, unknown fields rejected as the APIs do.
* KubeRay manifests (``kubectl apply``): the CRD's openAPIV3Schema (KubeRay v1.7.0, in
  ``tests/fixtures/kuberay/``) with unknown fields rejected, as kubectl's default strict field
  validation does, and list-map keys unique; KubeRay's own spec rules (a subset of the
  operator's ``utils/validation.go``); and Ray's KubeRay autoscaler deriving its config from
  the cluster spec (``kuberay.autoscaling_config._derive_autoscaling_config_from_ray_cr``,
  which ends in ``validate_config``). Not checked: CEL rules (``x-kubernetes-validations``).
* Job commands (the RayJob's entrypoint, the README's examples): ``griffin-batch generate``'s
  own parser, ``config_from_args`` and ``JobConfig.validate``.

Then our own rules: an on-demand head without CPUs for Ray, spot TPU workers from zero, one
worker per single-host slice with the chips ``hardware.TPU_TYPES`` gives it. The last tests
show each validator rejecting a broken copy.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib
import re
import shlex

import jsonschema
import pytest
import yaml
from googleapiclient import discovery_cache
from ray.autoscaler._private import providers
from ray.autoscaler._private import util as autoscaler_util
from ray.autoscaler._private.kuberay import autoscaling_config

from griffin_batch.cluster import hardware
from griffin_batch.jobs import generate

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "cluster" / "configs"
KUBERAY_SCHEMAS = ROOT / "tests" / "fixtures" / "kuberay"
AUTOSCALER = "gcp-tpu-autoscaler.yaml"
RAYCLUSTER = "kuberay-raycluster-tpu.yaml"
RAYJOB = "kuberay-rayjob-tpu.yaml"
README_SECTION = "## Run on a TPU cluster"


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


# Ray autoscaler (`ray up`) ------------------------------------------------------------------


def ray_up_config(config: dict) -> dict:
    """The config as ``ray up`` resolves it before calling GCP; raises where ``ray up`` would."""
    prepared = autoscaler_util.prepare_config(copy.deepcopy(config))
    provider_cls = providers._get_node_provider_cls(prepared["provider"])
    filled = provider_cls.fillout_available_node_types_resources(prepared)
    autoscaler_util.validate_config(filled)
    for name, node_type in filled["available_node_types"].items():
        _check_gcp_request_body(name, node_type["node_config"])
    return filled


def _check_gcp_request_body(name: str, node_config: dict) -> None:
    if "machineType" in node_config:  # a Compute Engine VM (Ray's GCPCompute)
        body, api, kind = node_config, ("compute", "v1"), "Instance"
    else:  # a TPU VM: Ray's GCPTPU.create_instance renames the service account fields
        body, api, kind = dict(node_config), ("tpu", "v2alpha1"), "Node"
        if "serviceAccounts" in body:
            account = dict(body.pop("serviceAccounts")[0])
            account["scope"] = account.pop("scopes")
            body["serviceAccount"] = account
    try:
        _gcp_api_validator(*api, kind).validate(body)
    except jsonschema.ValidationError as e:
        raise ValueError(f"{name}.node_config is not a {api[0]} API {kind}: {e.message}") from None


@functools.cache
def _gcp_api_validator(api: str, version: str, kind: str) -> jsonschema.Draft4Validator:
    """JSON Schema of one resource of a Google API, from its shipped discovery document."""
    doc = json.loads(discovery_cache.get_static_doc(api, version))
    definitions = {name: _from_discovery(s) for name, s in doc["schemas"].items()}
    return jsonschema.Draft4Validator(
        {"definitions": definitions, "allOf": [{"$ref": f"#/definitions/{kind}"}]}
    )


def _from_discovery(s: dict) -> dict:
    if "$ref" in s:
        return {"$ref": f"#/definitions/{s['$ref']}"}
    out: dict = {}
    if s.get("format") in ("int64", "uint64"):
        out["type"] = ["string", "integer"]  # 64-bit integers travel as strings, numbers accepted
    elif s.get("type") not in (None, "any"):
        out["type"] = s["type"]
    if "enum" in s:
        out["enum"] = s["enum"]
    if "properties" in s:
        out["properties"] = {k: _from_discovery(v) for k, v in s["properties"].items()}
        out["additionalProperties"] = False  # Google APIs reject unknown fields
    if "additionalProperties" in s:
        out["additionalProperties"] = _from_discovery(s["additionalProperties"])
    if "items" in s:
        out["items"] = _from_discovery(s["items"])
    return out


# KubeRay (`kubectl apply`) -------------------------------------------------------------------


def check_kuberay(manifest: dict) -> None:
    """Raises where ``kubectl apply`` (strict) or the KubeRay operator would refuse the manifest."""
    crd = _crd(manifest.get("kind", ""))
    if manifest.get("apiVersion") != f"{crd['group']}/{crd['version']}":
        raise ValueError(
            f"apiVersion {manifest.get('apiVersion')!r} is not served for {crd['kind']}"
        )
    _check_object_meta(manifest.get("metadata", {}), crd["kind"])
    _crd_validator(crd["kind"]).validate(manifest)
    spec = manifest["spec"]
    if crd["kind"] == "RayJob":
        _check_rayjob_rules(spec)
    else:
        _check_raycluster_rules(spec)


@functools.cache
def _crd(kind: str) -> dict:
    for path in KUBERAY_SCHEMAS.glob("ray.io_*.v1.json"):
        crd = json.loads(path.read_text())
        if crd["kind"] == kind:
            return crd
    raise ValueError(f"no KubeRay CRD for kind {kind!r} in {KUBERAY_SCHEMAS}")


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft4Validator:
    strict = jsonschema.validators.extend(
        jsonschema.Draft4Validator,
        {"x-kubernetes-list-map-keys": _unique_map_keys, "x-kubernetes-list-type": _unique_set},
    )
    return strict(_structural(_crd(kind)["openAPIV3Schema"]))


def _structural(s: dict) -> dict:
    """Kubernetes' reading of a CRD schema, spelt out for jsonschema: unknown fields are
    errors unless preserved, ``nullable`` admits null."""
    s = dict(s)
    if "properties" in s:
        s["properties"] = {k: _structural(v) for k, v in s["properties"].items()}
        if not s.get("x-kubernetes-preserve-unknown-fields"):
            s.setdefault("additionalProperties", False)
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _structural(s["additionalProperties"])
    if "items" in s:
        s["items"] = _structural(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [_structural(v) for v in s[key]]
    return {"anyOf": [s, {"type": "null"}]} if s.get("nullable") else s


def _unique_map_keys(validator, keys, instance, schema):
    if validator.is_type(instance, "array"):
        seen = set()
        for item in instance:
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for keys {keys}: {item}")
            seen.add(key)


def _unique_set(validator, list_type, instance, schema):
    if list_type == "set" and validator.is_type(instance, "array"):
        items = [json.dumps(v, sort_keys=True) for v in instance]
        if len(set(items)) != len(items):
            yield jsonschema.ValidationError(f"duplicate entries in a set: {instance}")


_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# KubeRay's MaxRayClusterNameLength and MaxRayJobNameLength (utils/constant.go).
_MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47}


def _check_object_meta(metadata: dict, kind: str) -> None:
    extra = set(metadata) - {"name", "namespace", "labels", "annotations"}
    if extra:
        raise ValueError(f"metadata fields this check does not cover: {sorted(extra)}")
    name = metadata.get("name", "")
    if not _DNS1035_LABEL.fullmatch(name) or len(name) > _MAX_NAME_LENGTH[kind]:
        raise ValueError(
            f"{kind} name {name!r} is not a DNS-1035 label of <= {_MAX_NAME_LENGTH[kind]}"
        )


def _check_raycluster_rules(spec: dict) -> None:
    """KubeRay's ValidateRayClusterSpec, the rules these manifests can meet, and unique groups."""
    if not spec["headGroupSpec"]["template"]["spec"].get("containers"):
        raise ValueError("headGroupSpec should have at least one container")
    for group in spec.get("workerGroupSpecs", []):
        name, low, high = group["groupName"], group.get("minReplicas"), group.get("maxReplicas")
        if not group["template"]["spec"].get("containers"):
            raise ValueError("workerGroupSpec should have at least one container")
        if not spec.get("enableInTreeAutoscaling") and (low is None or high is None):
            raise ValueError(f"worker group {name} must set both minReplicas and maxReplicas")
        if (low or 0) < 0 or (high or 0) < 0:
            raise ValueError(f"worker group {name} has negative replicas")
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"worker group {name} has minReplicas {low} greater than maxReplicas {high}"
            )
    if spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds", 0) < 0:
        raise ValueError("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    names = [group["groupName"] for group in spec.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names):  # ours: Ray's autoscaler keys node types by group name
        raise ValueError(f"a worker group is named twice: {names}")


def _check_rayjob_rules(spec: dict) -> None:
    """KubeRay's ValidateRayJobSpec, the rules these manifests can meet."""
    if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
        raise ValueError("one of RayClusterSpec or ClusterSelector must be set")
    if spec.get("ttlSecondsAfterFinished", 0) < 0 or spec.get("backoffLimit", 0) < 0:
        raise ValueError("ttlSecondsAfterFinished and backoffLimit must be non-negative")
    yaml.safe_load(spec.get("runtimeEnvYAML", ""))
    if "rayClusterSpec" in spec:
        _check_raycluster_rules(spec["rayClusterSpec"])


def kuberay_autoscaler_config(name: str, cluster_spec: dict) -> dict:
    """The autoscaler config Ray's KubeRay autoscaler derives from a cluster spec."""
    ray_cr = {"metadata": {"name": name, "namespace": "default"}, "spec": cluster_spec}
    return autoscaling_config._derive_autoscaling_config_from_ray_cr(copy.deepcopy(ray_cr))


# Job commands --------------------------------------------------------------------------------


def job_config(command: str):
    """The JobConfig of a ``griffin-batch generate ...`` command line; raises as the CLI would."""
    argv = shlex.split(command)
    if argv[:2] != ["griffin-batch", "generate"]:
        raise ValueError(f"not a griffin-batch generate command: {command!r}")
    parser = generate.build_parser()

    def fail(message: str):
        raise ValueError(f"griffin-batch generate rejects {shlex.join(argv[2:])}: {message}")

    parser.error = fail
    config = generate.config_from_args(parser.parse_args(argv[2:]))
    config.validate()
    return config


def readme_commands() -> list[str]:
    """Every ``griffin-batch generate`` command in the README's TPU cluster section."""
    text = (ROOT / "README.md").read_text()
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [
        "griffin-batch generate" + line.split("griffin-batch generate", 1)[1]
        for line in lines
        if "griffin-batch generate" in line
    ]


# Our rules -------------------------------------------------------------------------------------


def tpu_node_types(config: dict) -> dict[str, tuple[hardware.TpuType, dict]]:
    """The TPU node types of a resolved autoscaler config, each with its slice shape.

    Raises:
      ValueError: A TPU node type is not a single-host slice whose ``TPU`` resource is
        the host's chips in ``hardware.TPU_TYPES``, or TPU hosts differ in chips.
    """
    found = {}
    for name, node_type in config["available_node_types"].items():
        heads = [r for r in node_type["resources"] if r.startswith("TPU-") and r.endswith("-head")]
        if not heads:
            if node_type["resources"].get("TPU"):
                raise ValueError(f"{name}: TPU chips but no TPU-<type>-head resource")
            continue
        slice_ = hardware.tpu_type(heads[0])
        if slice_.hosts != 1 or node_type["resources"].get("TPU") != slice_.chips_per_host:
            raise ValueError(f"{name}: {slice_} is not one host with TPU={slice_.chips_per_host}")
        found[name] = (slice_, node_type)
    if len({s.chips_per_host for s, _ in found.values()}) > 1:
        raise ValueError(f"TPU hosts differ in chips: {found}")
    return found


def check_scaling(config: dict) -> None:
    """Head: no CPUs for Ray. TPU workers: at least one type, from zero."""
    head = config["available_node_types"][config["head_node_type"]]
    if head["resources"].get("CPU") != 0:
        raise ValueError(f"the head offers CPUs to Ray: {head['resources']}")
    tpus = tpu_node_types(config)
    if not tpus or any(t["min_workers"] != 0 for _, t in tpus.values()):
        raise ValueError(f"TPU worker types must exist and start from zero: {tpus}")


def check_gcp_preemption(config: dict) -> None:
    """On-demand head VM, spot TPU VMs."""
    scheduling = config["available_node_types"][config["head_node_type"]]["node_config"].get(
        "scheduling", {}
    )
    if scheduling.get("provisioningModel") != "STANDARD" or scheduling.get("preemptible"):
        raise ValueError(f"the head VM must be on-demand: {scheduling}")
    for name, (_, node_type) in tpu_node_types(config).items():
        if node_type["node_config"].get("schedulingConfig") != {"spot": True}:
            raise ValueError(f"{name} must be a spot TPU VM")


def check_gke_preemption(cluster_spec: dict) -> None:
    """Head pod off spot and preemptible nodes, TPU pods on spot nodes."""
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    terms = head["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    for term in terms["nodeSelectorTerms"]:
        absent = {e["key"] for e in term["matchExpressions"] if e["operator"] == "DoesNotExist"}
        if not {"cloud.google.com/gke-spot", "cloud.google.com/gke-preemptible"} <= absent:
            raise ValueError(f"the head pod may land on a spot node: {term}")
    for group in cluster_spec["workerGroupSpecs"]:
        if group["template"]["spec"]["nodeSelector"].get("cloud.google.com/gke-spot") != "true":
            raise ValueError(f"worker group {group['groupName']} is not on spot nodes")


def check_job_fits(config, tpu_config: dict) -> None:
    """A job command asks for TPU workers of one host each, no more than the cluster holds."""
    c = config.cluster
    chips = {s.chips_per_host for s, _ in tpu_node_types(tpu_config).values()}
    if c.accelerator != "tpu" or {c.tpu_chips_per_worker} != chips:
        raise ValueError(f"the job must ask for TPU workers of {chips} chips: {c}")
    if not c.min_workers or not c.max_workers or c.max_workers > tpu_config["max_workers"]:
        raise ValueError(f"--min/--max-workers must be set, at most {tpu_config['max_workers']}")


# The shipped configs ---------------------------------------------------------------------------


def test_autoscaler_yaml_is_what_ray_up_accepts():
    config = ray_up_config(_load(AUTOSCALER))
    check_scaling(config)
    check_gcp_preemption(config)
    assert {s.name.split("-")[0] for s, _ in tpu_node_types(config).values()} == {
        "v5litepod",
        "v6e",
        "v5p",
    }


def test_raycluster_manifest_is_what_kubectl_and_kuberay_accept():
    manifest = _load(RAYCLUSTER)
    check_kuberay(manifest)
    config = kuberay_autoscaler_config(manifest["metadata"]["name"], manifest["spec"])
    check_scaling(config)
    check_gke_preemption(manifest["spec"])
    assert manifest["spec"]["enableInTreeAutoscaling"] is True
    assert len(tpu_node_types(config)) == 3


def test_rayjob_manifest_is_accepted_and_runs_a_valid_job():
    manifest = _load(RAYJOB)
    check_kuberay(manifest)
    cluster_spec = manifest["spec"]["rayClusterSpec"]
    config = kuberay_autoscaler_config(manifest["metadata"]["name"], cluster_spec)
    check_scaling(config)
    check_gke_preemption(cluster_spec)
    assert cluster_spec["enableInTreeAutoscaling"] is True
    job = job_config(manifest["spec"]["entrypoint"])
    check_job_fits(job, config)
    assert job.resume.resume, "a retried RayJob must continue the output, not refuse it"


def test_readme_commands_run_valid_jobs_on_every_config():
    commands = readme_commands()
    assert len(commands) >= 2, "the README's TPU section shows the job commands"
    clusters = [
        ray_up_config(_load(AUTOSCALER)),
        kuberay_autoscaler_config("griffin-tpu", _load(RAYCLUSTER)["spec"]),
    ]
    for command in commands:
        for cluster in clusters:
            check_job_fits(job_config(command), cluster)
    section = (ROOT / "README.md").read_text().split(README_SECTION, 1)[1]
    for name in (AUTOSCALER, RAYCLUSTER, RAYJOB, "Dockerfile"):
        assert f"cluster/configs/{name}" in section


def test_configs_agree_on_the_ray_version():
    dockerfile = (CONFIGS / "Dockerfile").read_text()
    versions = set(re.findall(r"^FROM rayproject/ray:([\d.]+)-py311$", dockerfile, re.M))
    for name in (RAYCLUSTER, RAYJOB):
        text = (CONFIGS / name).read_text()
        versions |= set(re.findall(r'rayVersion: "([\d.]+)"', text))
    versions |= set(re.findall(r'"ray\[default\]==([\d.]+)"', (CONFIGS / AUTOSCALER).read_text()))
    assert len(versions) == 1, f"Ray versions differ between the configs: {versions}"


# Broken copies: each validator catches what it is here for ------------------------------------

_DROP = object()


def _broken(config: dict, path: tuple, value) -> dict:
    broken = copy.deepcopy(config)
    *parents, last = path
    target = functools.reduce(lambda node, key: node[key], parents, broken)
    if value is _DROP:
        del target[last]
    else:
        target[last] = value(target[last]) if callable(value) else value
    return broken


_TPU = ("available_node_types", "tpu_v6e")


@pytest.mark.parametrize(
    "path, value, error",
    [
        # Ray's schema: a misspelt key, a resource count as text.
        (("idle_timeout_minute",), 5, "Additional properties are not allowed"),
        ((*_TPU, "resources", "TPU"), "4", "is not of type 'integer'"),
        # Ray's cross-field rules.
        (("head_node_type",), "ray_head", "must be one of `available_node_types`"),
        # Ray's GCP provider: a TPU type it cannot parse.
        ((*_TPU, "node_config", "acceleratorType"), "v6e4", "should match v(generation)"),
        # The TPU and Compute API schemas: a misspelt field, a list where an object goes.
        ((*_TPU, "node_config", "schedulingConfig"), {"spott": True}, "not a tpu API Node"),
        (("available_node_types", "head", "node_config", "scheduling"), [{}], "not a compute API"),
        # Ours: chips that are not one host's, a TPU VM that is not spot, a spot head.
        ((*_TPU, "resources", "TPU"), 8, "is not one host with TPU=4"),
        ((*_TPU, "node_config", "schedulingConfig"), {"preemptible": False}, "spot TPU VM"),
        (
            ("available_node_types", "head", "node_config", "scheduling", "provisioningModel"),
            "SPOT",
            "on-demand",
        ),
    ],
)
def test_broken_autoscaler_yaml_is_refused(path, value, error):
    with pytest.raises((ValueError, jsonschema.ValidationError), match=re.escape(error)):
        config = ray_up_config(_broken(_load(AUTOSCALER), path, value))
        check_scaling(config)
        check_gcp_preemption(config)


_GROUP = ("spec", "rayClusterSpec", "workerGroupSpecs", 0)
_POD = (*_GROUP, "template", "spec")
_ENTRY = ("spec", "entrypoint")
_HEAD_TERMS = (
    *("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "affinity", "nodeAffinity"),
    *("requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms"),
)


@pytest.mark.parametrize(
    "path, value, error",
    [
        # The CRD schema: a misspelt field, a TPU count that is no quantity, a label as a bool,
        # a container twice (a list-map key), a version KubeRay does not serve, a bad name.
        ((*_GROUP, "minReplica"), 0, "Additional properties are not allowed"),
        (
            (*_POD, "containers", 0, "resources", "limits", "google.com/tpu"),
            "four",
            "does not match",
        ),
        ((*_POD, "nodeSelector", "cloud.google.com/gke-spot"), True, "is not of type 'string'"),
        ((*_POD, "containers"), lambda c: c + c, "duplicate entry"),
        (("apiVersion",), "ray.io/v2", "is not served"),
        (("metadata", "name"), "Griffin_Generate", "DNS-1035"),
        # KubeRay's operator rules; ours: a worker group twice (Ray's autoscaler would merge them).
        ((*_GROUP, "minReplicas"), 20, "greater than maxReplicas"),
        (("spec", "rayClusterSpec", "workerGroupSpecs"), lambda g: g + g, "named twice"),
        # Ray's KubeRay autoscaler: a TPU it cannot name, so no TPU-<type>-head.
        (
            (*_POD, "nodeSelector", "cloud.google.com/gke-tpu-accelerator"),
            "tpu-v5e",
            "no TPU-<type>-head",
        ),
        # Ours: the head on spot, workers not on spot.
        ((*_HEAD_TERMS, 0, "matchExpressions"), lambda e: e[1:], "may land on a spot node"),
        ((*_POD, "nodeSelector", "cloud.google.com/gke-spot"), _DROP, "not on spot nodes"),
        # The job's own command line: a misspelt flag, bounds that cross, a worker that is not a host.
        (_ENTRY, lambda s: s.replace("--max-workers", "--max-wokers"), "unrecognized arguments"),
        (
            _ENTRY,
            lambda s: s.replace("--min-workers 1", "--min-workers 20"),
            "larger than --max-workers",
        ),
        (
            _ENTRY,
            lambda s: s.replace("--tpu-chips-per-worker 4", "--tpu-chips-per-worker 1"),
            "TPU workers of {4} chips",
        ),
    ],
)
def test_broken_rayjob_manifest_is_refused(path, value, error):
    manifest = _broken(_load(RAYJOB), path, value)
    with pytest.raises((ValueError, jsonschema.ValidationError), match=re.escape(error)):
        check_kuberay(manifest)
        cluster_spec = manifest["spec"]["rayClusterSpec"]
        config = kuberay_autoscaler_config(manifest["metadata"]["name"], cluster_spec)
        check_scaling(config)
        check_gke_preemption(cluster_spec)
        check_job_fits(job_config(manifest["spec"]["entrypoint"]), config)
