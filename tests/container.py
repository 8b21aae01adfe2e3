"""Docker for the tests: a private dockerd, a Debian base image made here, and the project's image.

No image registry is reachable from this machine, so the base image is Debian bookworm made with
debootstrap and `docker import`ed, and passed to the Dockerfile as BASE_IMAGE. pip inside the build
installs from a wheelhouse of requirements.txt (downloaded here by the host's pip, which knows this
machine's mirrors and proxy CA) served on 127.0.0.1 to the build, which runs on the host network.
Everything lives in STATE, outside the clone: the second run reuses the base image, the wheelhouse
and the build's cached layers, and pays only for what changed.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from servers import ROOT

STATE = Path(os.environ.get("SERVE_DOCKER_STATE", "/var/cache/ts-docker"))
BASE_IMAGE = "torch-serve-base:bookworm"
IMAGE = "torch-serve:test"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
# Fixed, because pip's find-links URL is a build argument and so part of the layer cache key.
WHEELHOUSE_PORT = 47891
TOOLS = ("dockerd", "docker", "debootstrap", "docker-compose")


def missing_tools() -> list[str]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (dockerd and debootstrap need it)")
    return missing


def docker_binary() -> str:
    """The engine package's own client: a newer CLI elsewhere on PATH may want buildx for `build`."""
    return "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else shutil.which("docker")


class Dockerd:
    """A dockerd with its own data root, exec root, socket and pidfile; no bridge, no iptables."""

    def __init__(self, state: Path = STATE):
        self.state = state
        self.sock = state / "docker.sock"
        self.pidfile = state / "docker.pid"
        self.log = state / "dockerd.log"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> float:
        started = time.monotonic()
        self._stop_stale()
        with self.log.open("wb") as log:  # dockerd keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                ["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false",
                 "--data-root", str(self.state / "data"), "--exec-root", str(self.state / "exec"),
                 "--host", f"unix://{self.sock}", "--pidfile", str(self.pidfile)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            while time.monotonic() - started < timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"dockerd exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
                if self.cli("version", check=False, timeout=10).returncode == 0:
                    return time.monotonic() - started
                time.sleep(0.2)
            raise RuntimeError(f"dockerd not up in {timeout_s}s:\n{self.log.read_text()[-3000:]}")
        except BaseException:
            self.stop()
            raise

    def _stop_stale(self) -> None:
        """A dockerd left by a killed run holds the pidfile, and a new one would refuse to start."""
        try:
            pid = int(self.pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(self.state / "data").encode() in cmdline:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
                time.sleep(1)

    def cli(self, *args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run([docker_binary(), *args], check=False, env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        return done

    def inspect(self, name: str, template: str) -> str:
        return self.cli("inspect", "-f", template, name).stdout.strip()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # stops its containers, then its containerd
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextmanager
def exclusive_state(state: Path = STATE):
    """One test run at a time uses the data root (two clones testing at once would share it)."""
    state.mkdir(parents=True, exist_ok=True)
    with (state / "lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another test run's lock on {state}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_step(command: list[str], timeout: float) -> None:
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")


def ensure_base_image(docker: Dockerd) -> float:
    """debootstrap Debian bookworm with Python 3.11 and pip's needs, and import it; seconds spent."""
    rootfs = docker.state / "rootfs"
    remove_rootfs(rootfs)  # a run killed mid-way may have left one
    if docker.cli("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return 0.0
    started = time.monotonic()
    run_step(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(rootfs),
              DEBIAN_MIRROR], timeout=900)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        docker.cli("import", "--change", 'CMD ["python3"]', "-", BASE_IMAGE, stdin=tar.stdout, timeout=600)
    except BaseException:
        tar.kill()
        raise
    finally:
        tar.stdout.close()
        tar.wait()
    if tar.returncode != 0:
        docker.cli("image", "rm", "--force", BASE_IMAGE, check=False)  # never keep a partial root
        raise RuntimeError(f"tar of the debootstrap root exited {tar.returncode}")
    remove_rootfs(rootfs)
    return time.monotonic() - started


def remove_rootfs(rootfs: Path) -> None:
    """Delete a debootstrap root, after unmounting what a killed debootstrap may have left mounted in
    it (/proc, /sys, or the host's /dev bound in a container): rmtree must never reach into those."""
    def mounted() -> list[str]:
        points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        return sorted((p for p in points if p.startswith(f"{rootfs}/")), reverse=True)

    for point in mounted():
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    if mounted():
        raise RuntimeError(f"still mounted under {rootfs}: {mounted()}; not deleting it")
    shutil.rmtree(rootfs, ignore_errors=True)


def ensure_wheelhouse(state: Path = STATE) -> Path:
    """Every wheel requirements.txt needs, downloaded by this machine's pip; again only when it changes."""
    requirements = ROOT / "requirements.txt"
    wheels = state / "wheels"
    stamp = wheels / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    # Wheels for the image's Python (3.11), whatever Python runs the tests.
    run_step([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
              "--python-version", "3.11", "--only-binary=:all:",
              "-r", str(requirements), "-d", str(wheels)], timeout=1800)
    stamp.write_text(digest)
    return wheels


@contextmanager
def served_directory(path: Path, port: int):
    handler = functools.partial(QuietFileHandler, directory=str(path))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:  # taken: any free port works, at the price of rebuilding the pip layer
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def build_image(docker: Dockerd, tag: str = IMAGE) -> dict:
    """Build the project's Dockerfile on the local base image; what it took and what came out."""
    started = time.monotonic()
    wheels = ensure_wheelhouse(docker.state)
    with served_directory(wheels, WHEELHOUSE_PORT) as wheelhouse:
        docker.cli("build", "--network", "host", "--tag", tag,
                   "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                   "--build-arg", "PIP_NO_INDEX=1", "--build-arg", f"PIP_FIND_LINKS={wheelhouse}",
                   str(ROOT), timeout=1800)
    docker.cli("image", "prune", "--force")  # an image a changed requirements.txt replaced: 6 GB each
    info = json.loads(docker.cli("image", "inspect", tag).stdout)[0]
    return {"build_s": time.monotonic() - started, "size_bytes": info["Size"], "config": info["Config"]}
