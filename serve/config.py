"""ServeConfig and ModelSpec: built once from the YAML file and SERVE_* overrides; the only reader of the environment."""
from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from serve.errors import ConfigError, ServeError
from serve.extras import extra_hint
from serve.formats.timm_folder import folder_fields, is_timm_folder
from serve.preprocess import PreprocessSpec
from serve.sources.address import is_remote
from serve.sources.allow import check_pattern
from serve.sources.resolver import Resolver, SourceSettings
from serve.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = ROOT / "models" / "models.yaml"
PACKAGE_SCHEME = "package://"
TORCHVISION_LABELS_SCHEME = "torchvision:"
DEVICE_PATTERN = r"^(cpu|cuda|cuda:\d+|auto)$"
DEFAULT_VERSION = "1"  # the version of a model configured without `versions`


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"


def _local_checkpoint(value: Any) -> Any:
    """A remote source reaches a spec only as the local path build_config fetched it to."""
    if is_remote(value):
        raise ValueError(f"'{value[:200]}' is a remote source: build_config / load_config fetch it (the "
                         "server's allowed_sources and source cache apply), a spec holds the local path")
    return value


class CalibrationSpec(_Frozen):
    """precision int8: the images that calibrate the quantised model and those its gate is judged on."""

    images: Path | None = Field(None, description="a folder of images (searched recursively, in the order of their "
                                "contents' sha256): the first `count` calibrate, the next `held_out` are the gate's; "
                                "None: the fallback set of docs/precision.md, with a warning that the gate is weaker")
    count: int = Field(32, gt=0, le=1024, description="images that calibrate the activation ranges")
    held_out: int = Field(32, ge=8, le=1024, description="images the calibration never saw, on which the gate "
                          "compares int8 with fp32")


class Int8Gate(_Frozen):
    """precision int8: how close to fp32 int8 must answer on the held-out images, and how much faster it must be
    (docs/precision.md has the measurements behind the defaults)."""

    top1_agreement: float = Field(0.97, ge=0, le=1, description="classify: the share of decisive held-out images "
                                  "(see top1_margin) whose int8 top-1 class is fp32's")
    top1_margin: float = Field(0.05, ge=0, le=1, description="classify: an image is decisive when fp32's top-1 "
                               "probability leads its second by at least this; near-ties may flip either way "
                               "without changing accuracy")
    top5_containment: float = Field(0.97, ge=0, le=1, description="classify: the share of all held-out images whose "
                                    "fp32 top-1 class is in int8's top-5")
    cosine: float = Field(0.98, ge=-1, le=1, description="embed: the lowest cosine similarity of an int8 embedding "
                          "to fp32's")
    pixel_agreement: float = Field(0.97, ge=0, le=1, description="segment: the share of pixels whose int8 class is "
                                   "fp32's, over all held-out images")
    min_speedup: float = Field(1.2, ge=0, description="int8 must run the same batch at least this many times faster "
                               "than fp32, measured at start on this machine; 0: no speed check")


class VersionSpec(_Frozen):
    """One version of a model: its own checkpoint, and the fields that may differ between versions."""

    version: str = Field(pattern=VERSION_PATTERN)
    checkpoint: Path

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _local(cls, value: Any) -> Any:
        return _local_checkpoint(value)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    state_dict_key: str | None = None
    weights: Literal["default", "ema"] | None = None
    strip_prefix: str | None = Field(None, pattern=r"^[^.].*\.$")
    labels: tuple[str, ...] | Path | str | None = None
    precision: Literal["fp32", "int8"] | None = Field(None, description="this version's own precision (None: the model's)")


# The fields a version entry sets over its model's (None: the model's own).
VERSION_FIELDS = ("checkpoint", "sha256", "state_dict_key", "weights", "strip_prefix", "labels", "precision")


class ModelSpec(_Frozen):
    """One model to serve: how to build it, where its weights are and how to feed it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    architecture: str | None = None  # None: the checkpoint must carry its model (checked when loading)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path = Field(description=(
        "`.pth`/`.pt`/`.tar`/`.ckpt`/`.safetensors`, a TorchScript file, a torch.export program (`.pt2`), an "
        "`.onnx` file, a TorchServe archive (`.mar`), or a timm / Hugging Face model folder (`config.json` + "
        "`model.safetensors` or `pytorch_model.bin`, which then supplies `architecture`, `kwargs`, `labels` and "
        "`preprocess`); relative to the config file, or `package://pkg/path/in/pkg`, or a remote source fetched "
        "into `source_cache_dir` when it matches `allowed_sources`: `s3://bucket/key`, "
        "`hf://org/repo[@revision][/path]` (no path: the model folder), `https://host/path` (with `sha256`). "
        "May be left out when `versions` lists the checkpoints (see [checkpoints.md](checkpoints.md))"))
    state_dict_key: str | None = None
    strict: bool = True
    trust_pickle: bool = False
    trust_code: bool = Field(False, description="run the Python a checkpoint carries: a TorchServe archive's "
                             "modelFile, torch.export.load's deserializer")
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    labels: tuple[str, ...] | Path | str | None = None
    topk: int = Field(5, gt=0)
    preprocess: PreprocessSpec = PreprocessSpec()
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    max_batch_size: int = Field(4, gt=0, description="most images one forward pass takes")
    max_delay_ms: float = Field(0.0, ge=0, description="longest a batch waits for more images; 0 = take what is queued")
    half: bool = Field(False, description="float16 weights and inputs on a GPU (ignored on the CPU)")
    channels_last: bool = Field(False, description="NHWC memory format for weights and inputs")
    # Checkpoint formats (serve/formats/): which weights of a training checkpoint, what may be unpickled.
    weights: Literal["default", "ema"] = Field(
        "default", description="ema: the checkpoint's EMA weights (timm's state_dict_ema, model_ema, ...)")
    strip_prefix: str | None = Field(
        None, pattern=r"^[^.].*\.$", description="serve the keys under this prefix (ending in '.'), without it")
    safe_globals: tuple[str, ...] = Field(
        (), description="'package.module:Class' objects the checkpoint may hold besides tensors (unpickling "
        "them must run no code)")
    # What goes in and what comes out (serve/tasks): the task's own fields sit under its name, e.g.
    # `task: embed` with `embed: {node: avgpool}`; task_options holds them, validated by the task.
    task: str = Field("classify", description="classify, detect, segment or embed")
    # What runs the forward (serve/runtimes): auto exports to ONNX at start-up, checks it against eager
    # and serves it only if they agree; onnxruntime fails start-up instead of falling back.
    runtime: Literal["auto", "eager", "onnxruntime"] = "auto"
    # Precision (docs/precision.md): int8 is ONNX Runtime's static quantisation of the fp32 export, served
    # only where it passes its accuracy gate against fp32 and is faster; otherwise fp32, with the reason.
    precision: Literal["fp32", "int8"] = Field(
        "fp32", description="int8: ONNX Runtime's static quantisation of the fp32 export, calibrated through the "
        "model's own preprocessing, served only where it passes `int8_gate` (else fp32, with the reason in "
        "/models/<name>); a version may set its own")
    calibration: CalibrationSpec = Field(CalibrationSpec(), description="precision int8: calibration and held-out images")
    int8_gate: Int8Gate = Field(Int8Gate(), description="precision int8: the accuracy and speed it must reach")
    task_options: Any = None
    response_format: Literal["json", "torchserve"] = Field(
        "json", description="the default answer shape; torchserve: that of TorchServe's default handlers")
    # Versions (README, Operations): each its own checkpoint; `checkpoint` is then the default
    # version's, filled in from the list when the entry leaves it out.
    versions: tuple[VersionSpec, ...] = Field((), description="versions served under /predictions/<name>/<version>")
    default_version: str | None = Field(None, pattern=VERSION_PATTERN,
                                        description="the version answering /predictions/<name>; default: the last listed")
    # Many models in a fixed memory (docs/operations.md, "Many models"): loaded at start or on first use.
    load: Literal["eager", "lazy"] = Field(
        "eager", description="eager: loaded and warmed in the master at start (workers share its pages); lazy: "
        "loaded in each worker by the first request for it, and evicted least recently used first when "
        "the worker's lazy models pass model_memory_budget")
    pin: bool = Field(False, description="a lazy model that, once loaded, is never evicted")

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _local(cls, value: Any) -> Any:
        return _local_checkpoint(value)

    @model_validator(mode="before")
    @classmethod
    def _task_options(cls, data: Any) -> Any:
        """Move the mapping named after the task into task_options, validated by the task's Options."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        versions = data.get("versions")
        if versions and "checkpoint" not in data and isinstance(versions, list):
            default = data.get("default_version")
            chosen = [v for v in versions if isinstance(v, dict) and str(v.get("version")) == str(default)]
            last = chosen[-1] if chosen else versions[-1]
            if isinstance(last, dict) and "checkpoint" in last:
                data["checkpoint"] = last["checkpoint"]
        task = data.get("task", "classify")
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r:.40}")
        others = sorted(name for name in TASKS if name != task and name in data)
        if others:
            raise ValueError(f"'{others[0]}' options given, but the task is '{task}'")
        try:
            data["task_options"] = TASKS[task].Options.model_validate(data.pop(task, None) or {})
        except ValidationError as exc:
            raise ValueError("; ".join(
                f"field '{task}.{'.'.join(str(p) for p in e['loc'])}': {e['msg']} (got {e.get('input')!r:.40})"
                for e in exc.errors())) from None
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.weights == "ema" and self.state_dict_key is not None:
            raise ValueError("weights: ema and state_dict_key both choose the weights; set one")
        for name in self.safe_globals:
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", name):
                raise ValueError(f"safe_globals entry '{name}' is not 'package.module:Class'")
        names = [v.version for v in self.versions]
        repeated = sorted({v for v in names if names.count(v) > 1})
        if repeated:
            raise ValueError(f"versions must be unique, repeated: {repeated}")
        int8 = self.precision == "int8" or any(v.precision == "int8" for v in self.versions)
        if int8 and self.runtime == "eager":
            raise ValueError("precision int8 runs on ONNX Runtime: set runtime auto or onnxruntime, not eager")
        if int8 and TASKS[self.task].int8_refusal:
            raise ValueError(TASKS[self.task].int8_refusal)
        if self.default_version is not None and self.default_version not in (names or [DEFAULT_VERSION]):
            raise ValueError(f"default_version '{self.default_version}' is not one of the versions {names or [DEFAULT_VERSION]}")
        return self

    @property
    def version_names(self) -> tuple[str, ...]:
        """The configured versions, in order; a model without versions has one, "1"."""
        return tuple(v.version for v in self.versions) or (DEFAULT_VERSION,)

    @property
    def default(self) -> str:
        return self.default_version or self.version_names[-1]

    def for_version(self, version: str) -> ModelSpec:
        """This spec with a version's own fields (checkpoint, sha256, ...) over the model's.

        Raises: KeyError: no such version configured.
        """
        if not self.versions and version == DEFAULT_VERSION:
            return self
        entry = next((v for v in self.versions if v.version == version), None)
        if entry is None:
            raise KeyError(version)
        own = {f: getattr(entry, f) for f in VERSION_FIELDS if getattr(entry, f) is not None}
        return self.model_copy(update={**own, "sha256": entry.sha256})  # the model's sha256 is another file's


BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, total: int | None = None) -> int:
    """A byte count from '536870912', '512MiB', '2 GB' or '25%' (of `total`, the machine's memory by default).

    Raises: ValueError: none of those forms.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(%|[kmgt]i?b|b)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"expected bytes such as 536870912, 512MiB, 2GB or 25%, got {text!r:.40}")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if unit == "%":
        if total is None:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total * number / 100)
    return int(number * BYTE_UNITS[unit])


class ServerSettings(_Frozen):
    """Limits and process settings shared by every model."""

    max_upload_bytes: int = Field(20 * 2**20, gt=0)
    max_image_pixels: int = Field(50_000_000, gt=0)
    max_images_per_request: int = Field(32, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    max_queue: int = Field(64, gt=0, description="images waiting for the model in one worker before 503")
    torch_threads: int | None = Field(None, gt=0, description="inference threads per worker, torch's and ONNX Runtime's; "
                                      "default: shared (serve/cores.py)")
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    workers: int | None = Field(None, gt=0, description="default: one per core (CPU), one per GPU (CUDA)")
    threads: int = Field(128, gt=0, description="request threads per worker; keep above max_queue so overload is shed")
    inference_nice: int = Field(
        10, ge=0, le=19, description="added to the nice value of each worker's inference and loader threads (and "
        "their ONNX Runtime threads), above the request threads' (at most 19): on busy cores, refusals and decodes "
        "run first; 0: the same")
    timeout_s: int = Field(120, gt=0)
    graceful_timeout_s: int = Field(30, gt=0)
    preload: bool | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="the server's own logs; access lines are always JSON")
    enable_management: bool = Field(False, description="serve POST /models/<name>/reload")
    onnx_cache_dir: Path | None = Field(None, description="where ONNX exports are cached (build_config's default: "
                                        "$XDG_CACHE_HOME/torch-serve/onnx or ~/.cache/torch-serve/onnx); None: no cache")
    api_keys_file: Path | None = Field(None, description="API keys and their scopes (serve/auth.py), re-read when the file changes")
    api_keys: SecretStr | None = Field(None, description="the same document as text (SERVE_API_KEYS), fixed until restart")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: the server speaks HTTPS only")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_ca_file: Path | None = Field(None, description="PEM CA bundle: every client must present a certificate it signed")
    tls_min_version: Literal["1.2", "1.3"] = "1.2"
    # Operations (README, Operations): admission bounded in time, and model lifecycle across workers.
    max_queue_wait_ms: float = Field(
        250.0, gt=0, description="admit a request only if its predicted wait for the model fits; otherwise 503 at once")
    shed_hold_ms: float = Field(
        20.0, ge=0, le=1000, description="how long a 503 refused for the server's budget is held before it is sent: "
        "a client that resends at once (no back-off) can't spend the CPU admitted requests need")
    state_dir: Path | None = Field(
        None, description="where the workers share the management control file; gunicorn makes one if unset")
    models_dir: Path | None = Field(
        None, description="new versions load only from files under it; default: the config file's directory")
    model_memory_budget: int | None = Field(
        None, gt=0, description="bytes of lazy models (load: lazy) one worker may hold; past it the least recently "
        "used unpinned lazy model with no request in flight is evicted. A number of bytes, or with a unit (512MiB, "
        "2GB) or a share of the machine's memory (25%); None: no limit")

    # gRPC (docs/grpc.md): the Open Inference Protocol's GRPCInferenceService and the gRPC health service,
    # served by every worker on this port (SO_REUSEPORT) beside HTTP. Off unless set; the image sets 8081.
    grpc_port: int | None = Field(None, ge=0, lt=65536, description="gRPC port (KServe's is 8081); None or 0: off")
    grpc_max_message_bytes: int = Field(
        32 * 2**20, ge=4 * 2**20, description="largest gRPC request or answer message (grpcio's own default, 4 MiB, "
        "is smaller than one phone photo)")

    # Tracing (docs/operations.md#tracing): OpenTelemetry spans of each request, set by the standard OTEL_*
    # variables; the exporter's endpoint, headers and batching come from OTEL_EXPORTER_OTLP_* and OTEL_BSP_*.
    tracing: Literal["off", "otlp", "console"] = Field(
        "off", description="OpenTelemetry traces of each request (the `tracing` extra): `otlp` exports over OTLP/HTTP "
        "(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, which also turn it on), `console` "
        "prints each span; OTEL_TRACES_EXPORTER=none or OTEL_SDK_DISABLED=true: off")
    tracing_sampler: Literal["always_on", "always_off", "traceidratio", "parentbased_always_on",
                             "parentbased_always_off", "parentbased_traceidratio"] = Field(
        "parentbased_always_on", description="which requests are traced; parentbased_*: a request carrying a "
        "traceparent follows its sampled flag")
    tracing_sampler_arg: float = Field(1.0, ge=0, le=1, description="the share of traces the traceidratio samplers keep")
    tracing_service_name: str = Field("torch-serve", min_length=1, description="the spans' service.name")

    @field_validator("tracing", mode="before")
    @classmethod
    def _tracing_none(cls, value: Any) -> Any:
        return "off" if isinstance(value, str) and value.strip().lower() == "none" else value

    @field_validator("model_memory_budget", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        return parse_bytes(value) if isinstance(value, str) else value
    # Remote checkpoint sources (docs/checkpoints.md#remote-sources, serve/sources/): fetched once per
    # machine into a content-addressed cache, by the process that builds the config (gunicorn's master).
    allowed_sources: tuple[str, ...] = Field(
        (), description="the remote checkpoints that may be fetched: source prefixes or globs (`s3://models/`, "
        "`hf://my-org/*`, `hf://org/net@<commit>`, `https://files.example.com/weights/`; `*` stays within a path "
        "segment, `**` crosses them); empty: remote sources are off. SERVE_ALLOWED_SOURCES: comma-separated")
    source_cache_dir: Path | None = Field(
        None, description="where fetched checkpoints are kept by content (build_config's default: "
        "$XDG_CACHE_HOME/torch-serve/sources or ~/.cache/torch-serve/sources); must be writable unless offline")
    source_cache_max_bytes: int | None = Field(
        None, gt=0, description="the source cache's size cap, in bytes or with a unit (20GiB): least recently used "
        "checkpoints are evicted to stay under it (never one being served); none: no cap")
    offline: bool = Field(False, description="remote sources come from the source cache only; nothing is connected to")
    source_ca_file: Path | None = Field(
        None, description="PEM CA bundle trusted for https:// and hf:// downloads and the S3 endpoint; default: "
        "the system's")
    s3_endpoint_url: str | None = Field(
        None, pattern=r"^https?://", description="an S3-compatible store (MinIO, Ceph, R2, ...); default: AWS S3")
    s3_region: str | None = Field(None, description="default: boto3's (AWS_REGION, ~/.aws/config)")
    s3_access_key_id: str | None = Field(
        None, description="with s3_secret_access_key; default: boto3's chain (AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, ~/.aws, an instance or pod role)")
    s3_secret_access_key: SecretStr | None = Field(None, description="the secret of s3_access_key_id")
    hf_endpoint: str = Field("https://huggingface.co", pattern=r"^https?://[^/?#]+/?$",
                             description="the Hugging Face Hub (or a mirror) that hf:// sources come from")
    hf_token: SecretStr | None = Field(None, description="a Hub token, for private and gated repos")

    @field_validator("source_cache_max_bytes", mode="before")
    @classmethod
    def _cache_bytes(cls, value: Any) -> Any:
        return parse_bytes(value, total=0) if isinstance(value, str) and not value.strip().endswith("%") else value

    @field_validator("allowed_sources", mode="before")
    @classmethod
    def _split_sources(cls, value: Any) -> Any:
        if isinstance(value, str):  # SERVE_ALLOWED_SOURCES
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("allowed_sources")
    @classmethod
    def _check_sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_pattern(entry) for entry in value)

    @property
    def sources(self) -> SourceSettings:
        """What fetching remote checkpoints needs, from these settings."""
        secret = self.s3_secret_access_key
        return SourceSettings(
            cache_dir=self.source_cache_dir or Path.home() / ".cache" / "torch-serve" / "sources",
            allowed=self.allowed_sources, max_bytes=self.source_cache_max_bytes, offline=self.offline,
            ca_file=self.source_ca_file, s3_endpoint_url=self.s3_endpoint_url, s3_region=self.s3_region,
            s3_access_key_id=self.s3_access_key_id, s3_secret_access_key=secret.get_secret_value() if secret else None,
            hf_endpoint=self.hf_endpoint, hf_token=self.hf_token.get_secret_value() if self.hf_token else None)

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_ca_file (client certificates) needs tls_cert_file and tls_key_file")
        if self.api_keys_file is not None and self.api_keys is not None:
            raise ValueError("set api_keys_file (SERVE_API_KEYS_FILE) or api_keys (SERVE_API_KEYS), not both")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("s3_access_key_id and s3_secret_access_key go together: set both or neither")
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"grpc_port {self.grpc_port} is the HTTP port too: give gRPC a port of its own (8081)")
        return self


class ServeConfig(_Frozen):
    """The whole configuration: server settings plus one spec per model."""

    models: tuple[ModelSpec, ...] = Field(min_length=1)
    server: ServerSettings = ServerSettings()
    source: Path | None = None

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {duplicates}")
        return models

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(name)


# Environment variables that override server settings, with the field each one sets.
SERVER_ENV = {
    "SERVE_MAX_UPLOAD_BYTES": "max_upload_bytes",
    "SERVE_MAX_IMAGE_PIXELS": "max_image_pixels",
    "SERVE_MAX_IMAGES_PER_REQUEST": "max_images_per_request",
    "SERVE_REQUEST_TIMEOUT_S": "request_timeout_s",
    "SERVE_MAX_QUEUE": "max_queue",
    "SERVE_TORCH_THREADS": "torch_threads",
    "SERVE_HOST": "host",
    "PORT": "port",
    "WEB_CONCURRENCY": "workers",
    "SERVE_THREADS": "threads",
    "SERVE_INFERENCE_NICE": "inference_nice",
    "SERVE_TIMEOUT_S": "timeout_s",
    "SERVE_GRACEFUL_TIMEOUT_S": "graceful_timeout_s",
    "SERVE_PRELOAD": "preload",
    "SERVE_LOG_LEVEL": "log_level",
    "SERVE_LOG_FORMAT": "log_format",
    "SERVE_ENABLE_MANAGEMENT": "enable_management",
    "SERVE_ONNX_CACHE_DIR": "onnx_cache_dir",
    "SERVE_API_KEYS_FILE": "api_keys_file",
    "SERVE_API_KEYS": "api_keys",
    "SERVE_TLS_CERT_FILE": "tls_cert_file",
    "SERVE_TLS_KEY_FILE": "tls_key_file",
    "SERVE_TLS_CA_FILE": "tls_ca_file",
    "SERVE_TLS_MIN_VERSION": "tls_min_version",
    "SERVE_MAX_QUEUE_WAIT_MS": "max_queue_wait_ms",
    "SERVE_SHED_HOLD_MS": "shed_hold_ms",
    "SERVE_MODEL_MEMORY_BUDGET": "model_memory_budget",
    "SERVE_STATE_DIR": "state_dir",
    "SERVE_MODELS_DIR": "models_dir",
    "SERVE_ALLOWED_SOURCES": "allowed_sources",
    "SERVE_SOURCE_CACHE_DIR": "source_cache_dir",
    "SERVE_SOURCE_CACHE_MAX_BYTES": "source_cache_max_bytes",
    "SERVE_OFFLINE": "offline",
    "SERVE_SOURCE_CA_FILE": "source_ca_file",
    "SERVE_S3_ENDPOINT_URL": "s3_endpoint_url",
    "SERVE_S3_REGION": "s3_region",
    "SERVE_S3_ACCESS_KEY_ID": "s3_access_key_id",
    "SERVE_S3_SECRET_ACCESS_KEY": "s3_secret_access_key",
    "SERVE_HF_ENDPOINT": "hf_endpoint",
    "SERVE_HF_TOKEN": "hf_token",
    "SERVE_GRPC_PORT": "grpc_port",
    "SERVE_GRPC_MAX_MESSAGE_BYTES": "grpc_max_message_bytes",
    # OpenTelemetry's own variables (https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/);
    # an OTLP endpoint alone also turns tracing on (_tracing_env).
    "OTEL_TRACES_EXPORTER": "tracing",
    "OTEL_TRACES_SAMPLER": "tracing_sampler",
    "OTEL_TRACES_SAMPLER_ARG": "tracing_sampler_arg",
    "OTEL_SERVICE_NAME": "tracing_service_name",
}
# Server fields naming files: relative to the config file when the YAML sets them (as checkpoints
# are), relative to the working directory when the environment does.
SERVER_PATH_FIELDS = ("api_keys_file", "tls_cert_file", "tls_key_file", "tls_ca_file", "onnx_cache_dir", "state_dir",
                      "models_dir", "source_cache_dir", "source_ca_file")
# Never echoed in an error message: the value may hold keys.
SECRET_FIELDS = ("api_keys", "s3_secret_access_key", "hf_token")


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("SERVE_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> ServeConfig:
    """Read the YAML file (SERVE_CONFIG or the default) and apply SERVE_* overrides.

    Raises:
        ConfigError: the file is missing, not YAML, or fails validation.
    """
    env = os.environ if env is None else env
    path = Path(path) if path is not None else config_path(env)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping with a 'models' list")
    return build_config(data, base_dir=path.resolve().parent, env=env, source=path.resolve())


def build_config(
    data: Mapping[str, Any],
    base_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> ServeConfig:
    """Validate a config mapping; relative paths resolve against base_dir (default: cwd).

    `env` holds the overrides; None means none (tests pass dicts, load_config passes os.environ).

    Raises:
        ConfigError: naming the model and the field that is wrong.
    """
    env = env or {}
    base = Path(base_dir or Path.cwd())
    data = dict(data)
    server = _server_section(data.get("server"), base, env)
    raw_models = data.get("models")
    if isinstance(raw_models, list):
        fetch = _Fetch(server)
        data["models"] = [_resolve_model(m, i, base, env, fetch) for i, m in enumerate(raw_models)]
    data["server"] = server
    data["source"] = source
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, raw_models)) from None


def load_server_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> ServerSettings:
    """The server settings alone: the config file's `server` section (if the file exists) and SERVE_*
    overrides; no model is resolved or fetched (`inspect` of a remote source uses them).

    Raises:
        ConfigError: the file is not YAML, or the settings fail validation.
    """
    env = os.environ if env is None else env
    path = Path(path) if path is not None else config_path(env)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} can't be read: {exc}") from None
    section = data.get("server") if isinstance(data, dict) else None
    return _server_settings(_server_section(section, path.resolve().parent, env))


def _server_section(given: Any, base: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """The server mapping: file paths resolved against base, SERVE_* overrides applied, cache defaults."""
    server = dict(given or {})
    off = str(server.get("onnx_cache_dir", "")).lower() == "off"
    for field in SERVER_PATH_FIELDS:
        if isinstance(server.get(field), str) and not (off and field == "onnx_cache_dir"):
            server[field] = (base / Path(server[field]).expanduser()).resolve()
    server.update({field: env[var] for var, field in SERVER_ENV.items() if env.get(var, "") != ""})
    server.update(_tracing_env(env))
    off = str(server.get("onnx_cache_dir", "")).lower() == "off"
    cache_home = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    if off or server.get("onnx_cache_dir") is None:
        server["onnx_cache_dir"] = None if off else cache_home / "torch-serve" / "onnx"
    if server.get("source_cache_dir") is None:
        server["source_cache_dir"] = cache_home / "torch-serve" / "sources"
    return server


def _tracing_env(env: Mapping[str, str]) -> dict[str, Any]:
    """What OpenTelemetry's variables say beyond SERVER_ENV's one-to-one ones: an OTLP endpoint alone turns
    tracing on, OTEL_SDK_DISABLED turns it off.

    Raises:
        ConfigError: OTLP over gRPC asked for (the `tracing` extra's exporter speaks OTLP/HTTP).
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return {"tracing": "off"}
    found = {}
    if not env.get("OTEL_TRACES_EXPORTER") and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                                                 or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        found["tracing"] = "otlp"
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol and protocol != "http/protobuf" and (found or env.get("OTEL_TRACES_EXPORTER", "").strip() == "otlp"):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL '{protocol[:40]}': tracing exports over OTLP/HTTP only; set "
                          "http/protobuf (the collector's port 4318)")
    return found


def _server_settings(server: Mapping[str, Any]) -> ServerSettings:
    """Raises: ConfigError: naming the server field that is wrong."""
    try:
        return ServerSettings.model_validate(server)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, None, section="server")) from None


class _Fetch:
    """Remote checkpoints -> local paths, with the server settings validated on the first remote one.

    This is where a remote source is fetched: in the process that builds the config (under gunicorn,
    the master, before any worker forks; each worker then finds it in the cache)."""

    def __init__(self, server: Mapping[str, Any]):
        self.server = server
        self.resolver: Resolver | None = None

    def __call__(self, value: str, sha256: Any, model: str, field: str) -> Path:
        """Raises: ConfigError: naming the model and field (a failed fetch included: start-up stops)."""
        if self.resolver is None:
            self.resolver = Resolver(_server_settings(self.server).sources)
        pinned = sha256 if isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256) else None
        try:
            return self.resolver.resolve(value, pinned)
        except ServeError as exc:
            raise ConfigError(f"model '{model}': field '{field}': {exc.message}") from None


def _resolve_model(raw: Any, index: int, base: Path, env: Mapping[str, str], fetch: _Fetch) -> Any:
    if not isinstance(raw, dict):
        return raw
    model = dict(raw)
    name = model.get("name", f"models[{index}]")
    if env.get("SERVE_DEVICE"):
        model["device"] = env["SERVE_DEVICE"]
    if env.get("SERVE_RUNTIME"):
        model["runtime"] = env["SERVE_RUNTIME"]
    if isinstance(model.get("versions"), list):
        model["versions"] = [_resolve_version(v, base, name, fetch) for v in model["versions"]]
    if is_remote(model.get("checkpoint")):
        model["checkpoint"] = fetch(model["checkpoint"], model.get("sha256"), name, "checkpoint")
    elif isinstance(model.get("checkpoint"), str):
        model["checkpoint"] = _resolve_path(model["checkpoint"], base, name, "checkpoint")
    if isinstance(model.get("checkpoint"), Path) and is_timm_folder(model["checkpoint"]):
        model = _with_folder_fields(model, name)  # a transformers folder says its fields when loaded (Implied)
    calibration = model.get("calibration")
    if isinstance(calibration, dict) and isinstance(calibration.get("images"), str):
        model["calibration"] = {**calibration,
                                "images": _resolve_path(calibration["images"], base, name, "calibration.images")}
    labels = model.get("labels")
    if isinstance(labels, str) and not labels.startswith(TORCHVISION_LABELS_SCHEME):
        model["labels"] = _resolve_path(labels, base, name, "labels")
    if isinstance(model.get("default_version"), (int, float)) and not isinstance(model["default_version"], bool):
        model["default_version"] = str(model["default_version"])
    return model


def _resolve_version(raw: Any, base: Path, model: str, fetch: _Fetch) -> Any:
    if not isinstance(raw, dict):
        return raw
    version = dict(raw)
    if isinstance(version.get("version"), (int, float)) and not isinstance(version.get("version"), bool):
        version["version"] = str(version["version"])  # `version: 2` in YAML means "2"
    if is_remote(version.get("checkpoint")):
        version["checkpoint"] = fetch(version["checkpoint"], version.get("sha256"), model, "versions.checkpoint")
    for field in ("checkpoint", "labels"):
        value = version.get(field)
        if isinstance(value, str) and not (field == "labels" and value.startswith(TORCHVISION_LABELS_SCHEME)):
            version[field] = _resolve_path(value, base, model, f"versions.{field}")
    return version


def _with_folder_fields(model: dict, name: str) -> dict:
    """A timm model folder answers what the entry leaves out: architecture (and with it kwargs), labels,
    and each preprocess field."""
    found = folder_fields(model["checkpoint"], name)
    if "architecture" not in model:
        model["architecture"] = found["architecture"]
        model["kwargs"] = {**found["kwargs"], **(model.get("kwargs") or {})}
    if "labels" not in model and "labels" in found:
        model["labels"] = found["labels"]
    given = model.get("preprocess")
    model["preprocess"] = {**found["preprocess"], **given} if isinstance(given, dict) else given or found["preprocess"]
    return model


def _resolve_path(value: str, base: Path, model: str, field: str) -> Path:
    """A path relative to the config file, or package://pkg/path/in/pkg for a file shipped in a package."""
    if not value.startswith(PACKAGE_SCHEME):
        return (base / Path(value).expanduser()).resolve()
    package, _, inner = value[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package) if re.fullmatch(r"[A-Za-z_][\w.]*", package) else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model '{model}': field '{field}': package '{package}' is not installed{extra_hint(package)}")
    return Path(next(iter(spec.submodule_search_locations))) / inner


def _describe(exc: ValidationError, raw_models: Any, section: str | None = None) -> str:
    """One line per error, naming the model (or the server) and the field; `where` names what was validated
    alone (the server section)."""
    lines = []
    errors = exc.errors()
    item_failed = any(len(e["loc"]) >= 2 and e["loc"][0] == "models" for e in errors)
    for err in errors:
        loc = list(err["loc"])
        if item_failed and loc == ["models"] and err["type"] == "too_short":
            continue  # only because an invalid model was dropped: its own error says why
        where = section or "config"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            index = loc[1]
            raw = raw_models[index] if isinstance(raw_models, list) and index < len(raw_models) else {}
            name = raw.get("name") if isinstance(raw, dict) else None
            where = f"model '{name}'" if name else f"models[{index}]"
            loc = loc[2:]
        elif loc and loc[0] == "server":
            where, loc = "server", loc[1:]
        field = ".".join(str(p) for p in loc if not str(p).startswith(("function-", "tuple[", "list[")))
        if not field and err["type"] == "value_error":  # a whole-entry check: its message says it all
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
            continue
        given = err.get("input")
        secret = any(str(p) in SECRET_FIELDS for p in loc) or _holds_secret(given)
        got = "" if err["type"] == "missing" or secret else f" (got {given!r:.80})"
        lines.append(f"{where}: field '{field or '-'}': {err['msg']}{got}")
    return "invalid config: " + "; ".join(dict.fromkeys(lines))


def _holds_secret(value: Any) -> bool:
    """Whether an input (a whole section, for a model-level error) carries a secret field."""
    return isinstance(value, Mapping) and any(
        key in SECRET_FIELDS or _holds_secret(inner) for key, inner in value.items())
