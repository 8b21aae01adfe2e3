"""deploy/k8s: the manifests validate offline and agree with the server's routes, config and image.

Kubernetes resources validate against the Kubernetes OpenAPI schemas bundled with the
`kubernetes-validate` package (strict: unknown fields are errors), for the oldest and the newest
Kubernetes version we target. The InferenceService validates against
deploy/k8s/kserve/schema/inferenceservice-v1beta1.schema.json, generated from the kserve SDK's model
classes (see generate.py there), whose Kubernetes types ($refs) resolve to the same bundled definitions.
No cluster, kubectl or network is needed.
"""
from __future__ import annotations

import copy
import inspect
import json
import re
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
import referencing
import yaml
from servers import ROOT

import serve.config
from serve.config import SERVER_ENV, ServerSettings, build_config

K8S = ROOT / "deploy" / "k8s"
ISVC_SCHEMA = K8S / "kserve" / "schema" / "inferenceservice-v1beta1.schema.json"
# The oldest Kubernetes these manifests target (autoscaling/v2, policy/v1, seccompProfile are older)
# and the newest that kubernetes-validate bundles.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
KSERVE_API = "serving.kserve.io/v1beta1"
STARTUP_WINDOW_S = 120
# Environment variables a manifest may set besides the server's own (SERVER_ENV, SERVE_CONFIG,
# SERVE_DEVICE), each with who reads it; only in the InferenceService.
ISVC_EXTRA_ENV = {
    "PROTOCOL": "KServe: the custom predictor's protocol (v1 or v2)",
    "TMPDIR": "Python's tempfile: gunicorn_conf.py's PROMETHEUS_MULTIPROC_DIR, /tmp being reserved by Knative",
}
# patchMergeKey of the lists a strategic-merge patch of a Deployment merges item by item.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "topologySpreadConstraints": "topologyKey",
}


# --- loading ----------------------------------------------------------------------------------------


def load_all() -> dict[Path, list[dict]]:
    return {path: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(K8S.rglob("*.yaml"))}


DOCS = load_all()
KUSTOMIZATIONS = {p: d[0] for p, d in DOCS.items() if d and d[0].get("kind") == "Kustomization"}
RESOURCES = [(p, doc) for p, docs in DOCS.items() for doc in docs if doc.get("kind") != "Kustomization"]
K8S_RESOURCES = [(p, doc) for p, doc in RESOURCES if doc["apiVersion"] != KSERVE_API]


def rel(path: Path) -> str:
    return str(path.relative_to(K8S))


def one(kind: str, path: str | None = None) -> dict:
    found = [doc for p, doc in RESOURCES if doc["kind"] == kind and (path is None or rel(p) == path)]
    assert len(found) == 1, f"expected one {kind} in {path or 'deploy/k8s'}, found {len(found)}"
    return found[0]


CPU_DEPLOYMENT = one("Deployment", "deployment.yaml")
GPU_DEPLOYMENT = one("Deployment", "gpu/deployment.yaml")
ISVC = one("InferenceService", "kserve/inferenceservice.yaml")
ISVC_GRPC = one("InferenceService", "kserve/grpc/inferenceservice.yaml")  # the grpc-v2 variant
CONFIGMAP = one("ConfigMap")
SERVICE = one("Service")
HPA = one("HorizontalPodAutoscaler")
PDB = one("PodDisruptionBudget")
# Everything that runs our image: (label, pod-level spec, the server container).
WORKLOADS = {
    "cpu": (CPU_DEPLOYMENT["spec"]["template"]["spec"], CPU_DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]),
    "gpu": (GPU_DEPLOYMENT["spec"]["template"]["spec"], GPU_DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]),
    "kserve": (ISVC["spec"]["predictor"], ISVC["spec"]["predictor"]["containers"][0]),
}
DEPLOYMENTS = {"cpu": CPU_DEPLOYMENT, "gpu": GPU_DEPLOYMENT}


def env_of(container: dict) -> dict[str, str]:
    env = container.get("env", [])
    assert all("value" in e for e in env), "env values are literals (no valueFrom)"
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e["value"] for e in env}


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def image_env_port() -> int:
    return int(re.search(r"^\s*PORT=(\d+)", dockerfile(), re.M).group(1))


def cpu_cores(quantity) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def server_config(container: dict):
    """What serve.config makes of the ConfigMap's models.yaml with the container's environment."""
    models = yaml.safe_load(CONFIGMAP["data"]["models.yaml"])
    env = env_of(container)
    return build_config(models, base_dir=PurePosixPath(env["SERVE_CONFIG"]).parent, env=env)


def probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


def resolve_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in named, f"port {port!r} is not a named containerPort ({sorted(named)})"
    return named[port]


def container_port(container: dict) -> int:
    """The HTTP port: the one named http (http1 in Knative), or the only one."""
    ports = container["ports"]
    named = [p for p in ports if p.get("name") in ("http", "http1")]
    assert len(named) == 1 or len(ports) == 1, "one HTTP port"
    return (named or ports)[0]["containerPort"]


# --- schema validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path,doc", K8S_RESOURCES, ids=[f"{rel(p)}:{d['kind']}" for p, d in K8S_RESOURCES])
def test_kubernetes_schema_strict(path, doc, version):
    validated = kubernetes_validate.validate(doc, version, strict=True)
    assert validated == kv_utils.major_minor(version)


def test_strict_schema_rejects_unknown_fields():
    bad = copy.deepcopy(CPU_DEPLOYMENT)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def isvc_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(ISVC_SCHEMA.read_text())
    version = schema["x-kubernetes-version"]
    definitions = kv_utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("isvc", [ISVC, ISVC_GRPC], ids=["v2", "grpc-v2"])
def test_inferenceservice_matches_kserve_sdk_schema(isvc):
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in isvc_validator().iter_errors(isvc)]
    assert not errors, errors


@pytest.mark.parametrize("mutate", [
    lambda isvc: isvc["spec"]["predictor"].__setitem__("protocolVersion", "v2"),  # not a PredictorSpec field
    lambda isvc: isvc["spec"]["predictor"]["containers"][0].__setitem__("lifecycle", {"preStop": 5}),
    lambda isvc: isvc["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"].pop("port"),
    lambda isvc: isvc["spec"]["predictor"].__setitem__("minReplicas", "one"),
    lambda isvc: isvc.__setitem__("kind", "InferenceServices"),
], ids=["unknown-field", "k8s-type", "k8s-required", "type", "kind"])
def test_inferenceservice_schema_rejects(mutate):
    bad = copy.deepcopy(ISVC)
    mutate(bad)
    assert list(isvc_validator().iter_errors(bad))


# --- kustomize ----------------------------------------------------------------------------------------


def test_kustomizations_reference_existing_files_and_cover_every_manifest():
    reached = set()
    for path, kustomization in KUSTOMIZATIONS.items():
        assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}, kustomization
        for entry in kustomization.get("resources", []) + [p["path"] for p in kustomization.get("patches", [])]:
            target = (path.parent / entry).resolve()
            assert target.exists(), f"{rel(path)}: {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{rel(path)}: {entry} is not a kustomization"
            else:
                # kustomize's default load restrictor: files only from the kustomization's own folder tree.
                assert target.is_relative_to(path.parent), f"{rel(path)}: {entry} is outside its folder"
                reached.add(target)
    manifests = {p.resolve() for p, docs in DOCS.items() if docs and docs[0].get("kind") != "Kustomization"}
    assert manifests - reached == set(), "manifests no kustomization lists"


def strategic_merge(base, patch, key: str | None = None):
    """kubectl/kustomize's strategic merge for the fields a Deployment patch touches."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base[k], v, k) if k in base else v for k, v in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merged = {item[MERGE_KEYS[key]]: item for item in base}
        for item in patch:
            k = item[MERGE_KEYS[key]]
            merged[k] = strategic_merge(merged[k], item) if k in merged else item
        return list(merged.values())
    return patch


def keyed(value, key: str | None = None):
    """Lists merged by key compared as mappings (a merge keeps the base's order)."""
    if isinstance(value, dict):
        return {k: keyed(v, k) for k, v in value.items()}
    if isinstance(value, list) and key in MERGE_KEYS:
        return {item[MERGE_KEYS[key]]: keyed(item) for item in value}
    if isinstance(value, list):
        return [keyed(v) for v in value]
    return value


def test_gpu_overlay_renders_to_the_gpu_deployment():
    overlay = KUSTOMIZATIONS[K8S / "gpu" / "kustomization.yaml"]
    assert overlay["resources"] == ["../"] and overlay["patches"] == [{"path": "deployment.yaml"}]
    assert GPU_DEPLOYMENT["metadata"]["name"] == CPU_DEPLOYMENT["metadata"]["name"]
    merged = strategic_merge(CPU_DEPLOYMENT, GPU_DEPLOYMENT)
    assert keyed(merged) == keyed(GPU_DEPLOYMENT), "a field of the CPU Deployment survives the GPU patch"


# --- the server's routes ------------------------------------------------------------------------------


def probe_paths() -> set[str]:
    return {probe["httpGet"]["path"] for _, container in WORKLOADS.values() for probe in probes(container).values()}


def test_probe_and_metrics_paths_are_routes_that_answer_200(app, client):
    paths = probe_paths() | {CPU_DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"],
                             ISVC["metadata"]["annotations"]["prometheus.io/path"]}
    assert {"/ping", "/ready", "/v2/health/live", "/v2/health/ready", "/metrics"} <= paths
    adapter = app.url_map.bind("localhost")
    for path in sorted(paths):
        adapter.match(path, method="GET")  # raises NotFound / MethodNotAllowed
        assert client.get(path).status_code == 200, path


def test_probes_need_no_api_key_and_metrics_do(make_app, tmp_path):
    keys = tmp_path / "api-keys.yaml"
    keys.write_text(yaml.safe_dump({"prometheus": {"key": "prometheus-scrape-key-0001", "scopes": ["metrics"]}}))
    client = make_app(api_keys_file=str(keys)).test_client()
    for path in sorted(probe_paths()):
        assert client.get(path).status_code == 200, path
    metrics = CPU_DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    assert client.get(metrics).status_code == 401
    assert client.get(metrics, headers={"Authorization": "Bearer prometheus-scrape-key-0001"}).status_code == 200


@pytest.mark.parametrize("name", WORKLOADS)
def test_probes(name):
    _, container = WORKLOADS[name]
    found = probes(container)
    assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}
    liveness_path = "/v2/health/live" if name == "kserve" else "/ping"
    readiness_path = "/v2/health/ready" if name == "kserve" else "/ready"
    assert found["livenessProbe"]["httpGet"]["path"] == liveness_path
    assert found["readinessProbe"]["httpGet"]["path"] == readiness_path
    assert found["startupProbe"]["httpGet"]["path"] == readiness_path  # not live before the models are warm
    startup = found["startupProbe"]
    window = startup.get("initialDelaySeconds", 0) + startup["failureThreshold"] * startup["periodSeconds"]
    assert window >= STARTUP_WINDOW_S, f"startupProbe gives up after {window} s"
    for probe in found.values():
        assert resolve_port(container, probe["httpGet"]["port"]) == container_port(container)
        assert probe["timeoutSeconds"] < probe["periodSeconds"]


# --- ports ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_ports(name):
    pod, container = WORKLOADS[name]
    port = container_port(container)
    assert int(env_of(container)["PORT"]) == port == server_config(container).server.port
    assert server_config(container).server.host == "0.0.0.0"
    service_port = SERVICE["spec"]["ports"][0]
    assert service_port["port"] == 80 and resolve_port(container, service_port["targetPort"]) == port
    annotations = DEPLOYMENTS[name]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port


def test_inferenceservice_port():
    _, container = WORKLOADS["kserve"]
    env = env_of(container)
    # Knative reserves PORT and sets it to the declared containerPort; raw mode uses the image's ENV PORT.
    assert "PORT" not in env
    port = container_port(container)
    assert port == image_env_port() == ServerSettings().port
    assert container["ports"][0].get("name", "") in ("", "http1", "h2c")  # the names Knative allows
    assert int(ISVC["metadata"]["annotations"]["prometheus.io/port"]) == port
    assert server_config(container).server.host == "0.0.0.0"


# --- config ---------------------------------------------------------------------------------------------


def test_configmap_is_the_repository_models_yaml():
    assert CONFIGMAP["metadata"]["name"] == "torch-serve-models"
    shipped = yaml.safe_load(CONFIGMAP["data"]["models.yaml"])
    assert shipped == yaml.safe_load((ROOT / "models" / "models.yaml").read_text())
    config = build_config(shipped, base_dir="/etc/torch-serve")  # package:// resolves where the image has it
    assert [m.name for m in config.models] == ["efficientnet_lite0"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_configmap_mounted_where_serve_config_points(name):
    pod, container = WORKLOADS[name]
    config_file = PurePosixPath(env_of(container)["SERVE_CONFIG"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[str(config_file.parent)]
    assert mount.get("readOnly") is True
    assert volumes[mount["name"]]["configMap"]["name"] == CONFIGMAP["metadata"]["name"]
    assert config_file.name in CONFIGMAP["data"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_api_keys_come_from_a_secret_mounted_where_the_server_reads_them(name):
    pod, container = WORKLOADS[name]
    keys_file = PurePosixPath(env_of(container)["SERVE_API_KEYS_FILE"])
    assert str(server_config(container).server.api_keys_file) == str(keys_file)
    assert "SERVE_API_KEYS" not in env_of(container)  # a file, so keys rotate without a restart
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = {m["mountPath"]: m for m in container["volumeMounts"]}[str(keys_file.parent)]
    assert mount.get("readOnly") is True and "subPath" not in mount  # a subPath mount never sees updates
    secret = volumes[mount["name"]]["secret"]
    assert secret == {"secretName": "torch-serve-api-keys"}  # required (no pod without keys), every key a file


@pytest.mark.parametrize("name", WORKLOADS)
def test_env_names_are_read_by_the_server(name):
    _, container = WORKLOADS[name]
    source = inspect.getsource(serve.config)
    assert '"SERVE_CONFIG"' in source and '"SERVE_DEVICE"' in source  # config_path, _resolve_model
    allowed = set(SERVER_ENV) | {"SERVE_CONFIG", "SERVE_DEVICE"}
    if name == "kserve":
        allowed |= set(ISVC_EXTRA_ENV)
    assert set(env_of(container)) <= allowed


@pytest.mark.parametrize("name,device,image_tag", [("cpu", "cpu", "cpu"), ("gpu", "cuda", "gpu"), ("kserve", "cpu", "cpu")])
def test_workers_device_and_resources(name, device, image_tag):
    _, container = WORKLOADS[name]
    config = server_config(container)  # every value parses as serve.config reads it
    assert container["image"].rsplit(":", 1)[1] == image_tag
    assert all(m.device == device for m in config.models)
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    cpus = cpu_cores(resources["limits"]["cpu"])
    workers = config.server.workers
    assert workers is not None, "WEB_CONCURRENCY set: gunicorn would count the node's cores, not the limit"
    if device == "cpu":
        assert workers == cpus
    else:
        assert workers == int(resources["limits"]["nvidia.com/gpu"]) == 1
    # Unset, workers share the cores the container's CPU quota allows (serve.cores.available_cores).
    assert config.server.torch_threads is None or workers * config.server.torch_threads <= cpus
    assert "memory" in resources["limits"]


def test_gpu_scheduling():
    pod, container = WORKLOADS["gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "nvidia.com/gpu" not in WORKLOADS["cpu"][1]["resources"]["limits"]


def test_inferenceservice_speaks_v2():
    pod, container = WORKLOADS["kserve"]
    assert ISVC["apiVersion"] == KSERVE_API
    assert "protocolVersion" not in pod and "model" not in pod  # a custom predictor: containers only
    assert env_of(container)["PROTOCOL"] == "v2"
    assert container["name"] == "kserve-container"


# --- shutdown -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_termination_grace_covers_prestop_and_graceful_timeout(name):
    pod, container = WORKLOADS[name]
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        pre_stop_s = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2
        pre_stop_s = int(command[1])
    assert pre_stop_s > 0
    graceful_s = server_config(container).server.graceful_timeout_s
    if "SERVE_GRACEFUL_TIMEOUT_S" not in env_of(container):
        assert graceful_s == ServerSettings().graceful_timeout_s
    assert pod["terminationGracePeriodSeconds"] > graceful_s + pre_stop_s


def test_inferenceservice_has_no_fields_knative_rejects():
    pod, container = WORKLOADS["kserve"]
    assert "lifecycle" not in container and "terminationGracePeriodSeconds" not in pod
    assert "securityContext" not in pod  # pod-level needs a Knative feature flag
    reserved = {"/", "/dev", "/dev/log", "/tmp", "/var", "/var/log"}
    assert not reserved & {m["mountPath"] for m in container["volumeMounts"]}


# --- security and writable paths ------------------------------------------------------------------------


def dockerfile_uid() -> int:
    return int(re.search(r"useradd\b[^\n]*--uid[ =](\d+)", dockerfile()).group(1))


@pytest.mark.parametrize("name", WORKLOADS)
def test_security_context(name):
    pod, container = WORKLOADS[name]
    pod_ctx, ctx = pod.get("securityContext", {}), container["securityContext"]
    effective = {**pod_ctx, **ctx}
    assert effective["runAsUser"] == dockerfile_uid()
    assert effective["runAsNonRoot"] is True
    assert effective["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in ctx


@pytest.mark.parametrize("name", WORKLOADS)
def test_writable_tmp_and_shm_on_a_read_only_root(name):
    pod, container = WORKLOADS[name]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    tmp = env_of(container).get("TMPDIR", "/tmp")
    assert "emptyDir" in mounts[tmp], f"no writable volume at {tmp} for tempfile.mkdtemp()"
    # gunicorn's worker heartbeat files go to /dev/shm when it exists.
    assert 'worker_tmp_dir = "/dev/shm"' in (ROOT / "serve" / "gunicorn_conf.py").read_text()
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    for volume in mounts.values():
        if volume.get("emptyDir", {}).get("medium") == "Memory":
            assert "sizeLimit" in volume["emptyDir"], "tmpfs counts against the memory limit: cap it"


# --- the objects around the Deployment -----------------------------------------------------------------


def test_service_hpa_and_pdb_select_the_deployment():
    pod_labels = CPU_DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    selector = CPU_DEPLOYMENT["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert selector.items() <= GPU_DEPLOYMENT["spec"]["template"]["metadata"]["labels"].items()
    assert SERVICE["spec"]["type"] == "ClusterIP" and SERVICE["spec"]["selector"] == selector
    assert PDB["spec"]["selector"]["matchLabels"] == selector and PDB["spec"]["minAvailable"] == 1
    target = HPA["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", CPU_DEPLOYMENT["metadata"]["name"])
    assert HPA["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # A PDB that needs every pod blocks node drains forever.
    assert HPA["spec"]["minReplicas"] > PDB["spec"]["minAvailable"]
    assert "replicas" not in CPU_DEPLOYMENT["spec"], "the HPA owns replicas"


# --- gRPC (docs/grpc.md) ----------------------------------------------------------------------------------


def image_env(name: str) -> str:
    return re.search(rf"^\s*{name}=(\S+?)\s*\\?$", dockerfile(), re.M).group(1)


def test_image_serves_grpc_and_exposes_both_ports():
    grpc_port = int(image_env("SERVE_GRPC_PORT"))
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile(), re.M).group(1).split()}
    assert exposed == {image_env_port(), grpc_port} and grpc_port == 8081  # KServe's gRPC convention
    assert ServerSettings().grpc_port is None  # off unless set: the image sets it, a checkout's gunicorn doesn't
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    published = [p.rsplit(":", 1)[1] for p in compose["x-serve"]["ports"]]
    assert sorted(published) == sorted([str(image_env_port()), str(grpc_port)])


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_grpc_port(name):
    _, container = WORKLOADS[name]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = server_config(container).server
    assert named["grpc"] == config.grpc_port == int(env_of(container)["SERVE_GRPC_PORT"]) == int(image_env("SERVE_GRPC_PORT"))
    service_port = next(p for p in SERVICE["spec"]["ports"] if p["name"] == "grpc")
    assert resolve_port(container, service_port["targetPort"]) == config.grpc_port
    assert service_port["appProtocol"] == "kubernetes.io/h2c"  # HTTP/2 without TLS, for meshes and gateways


def test_grpc_inferenceservice_is_the_v2_one_over_h2c():
    container = ISVC_GRPC["spec"]["predictor"]["containers"][0]
    env = env_of(container)
    assert env["PROTOCOL"] == "grpc-v2"
    assert set(env) <= set(SERVER_ENV) | {"SERVE_CONFIG", "SERVE_DEVICE"} | set(ISVC_EXTRA_ENV)
    # Knative: one port, named h2c, and PORT set to it; the command moves HTTP back to 8000.
    assert container["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
    assert container["command"][:2] == ["env", f"PORT={image_env_port()}"] and container["command"][2:] == [
        "gunicorn", "-c", "serve/gunicorn_conf.py", "serve.app:create_app()"]
    config = build_config(yaml.safe_load(CONFIGMAP["data"]["models.yaml"]), base_dir=PurePosixPath(env["SERVE_CONFIG"]).parent,
                          env={**env, "PORT": str(image_env_port())})  # the command's PORT over Knative's
    assert config.server.grpc_port == 8081 and config.server.port == image_env_port()
    found = probes(container)
    assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for probe in found.values():
        assert probe["grpc"] == {"port": 8081} and "httpGet" not in probe
        assert probe["timeoutSeconds"] < probe["periodSeconds"]
    startup = found["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= STARTUP_WINDOW_S
    # Everything else is the V2 predictor's.
    same = copy.deepcopy(ISVC_GRPC)
    rest = copy.deepcopy(ISVC)
    for isvc in (same, rest):
        isvc["metadata"].pop("name")
        isvc["metadata"]["labels"].pop("app.kubernetes.io/variant", None)
        c = isvc["spec"]["predictor"]["containers"][0]
        for field in ("ports", "command", "startupProbe", "readinessProbe", "livenessProbe"):
            c.pop(field, None)
        c["env"] = [e for e in c["env"] if e["name"] not in ("PROTOCOL", "SERVE_GRPC_PORT")]
    assert same == rest
    pod = ISVC_GRPC["spec"]["predictor"]
    assert "lifecycle" not in container and "terminationGracePeriodSeconds" not in pod and "securityContext" not in pod
