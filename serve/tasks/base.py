"""Task: what goes into a model and what comes out. The base every task module's class extends.

A request runs: route -> Task.prepare (request thread: decoded image -> uint8 tensor + what is needed
to map results back) -> scheduler (the batcher) -> Task.run (batcher thread: collate, runtime.forward,
one output per image on the CPU) -> Task.finish (request thread: one typed result) -> the answer.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from serve.errors import CheckpointError, InvalidRequestError
from serve.preprocess import build_normalizer, draft_side

Forward = Callable[[Any], Any]


class Options(BaseModel):
    """A task's own config fields (the model entry's mapping named after the task)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Result(BaseModel):
    """One image's typed answer; its JSON schema is the OpenAPI response schema."""

    model_config = ConfigDict(frozen=True)

    def to_dict(self) -> dict:
        return self.model_dump(exclude_none=True)


@dataclass(frozen=True)
class Prepared:
    """One decoded image as the model's input, and what finish() needs to map results back to it."""

    tensor: torch.Tensor  # uint8 [C, H, W]
    size: tuple[int, int]  # (width, height) of the uploaded image as the user sees it (EXIF-rotated)
    scale: tuple[float, float] = (1.0, 1.0)  # tensor pixels per uploaded-image pixel, (x, y)
    content: tuple[int, int] | None = None  # (width, height) of the image in the tensor, when padded right and below


@dataclass(frozen=True)
class V2Output:
    """One output tensor of a V2 answer: its name, datatype and data (numpy, C order)."""

    name: str
    datatype: str
    data: np.ndarray | list[str]
    shape: tuple[int, ...]


class Task:
    """Base of the four tasks. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    Result: ClassVar[type[Result]]
    # Every prepared input has the same shape (one stacked batch; V2's FP32 input is accepted).
    fixed_size: ClassVar[bool] = True
    # Answer formats (?format=...).
    formats: ClassVar[tuple[str, ...]] = ("json", "torchserve")
    # V2 outputs honour Triton's classification extension (output parameter "classification": K).
    v2_classification: ClassVar[bool] = False
    # runtime auto tries ONNX Runtime for this task (runtime: onnxruntime always does).
    auto_export: ClassVar[bool] = True
    # Why precision int8 is not offered for this task (the config refuses it), or None.
    int8_refusal: ClassVar[str | None] = None
    # The TorchServe built-in handler this task stands for: a .mar naming it is served as this task.
    torchserve_handler: ClassVar[str | None] = None

    def __init__(self, spec, labels: tuple[str, ...] | None, device: torch.device):
        self.spec = spec
        self.options = spec.task_options
        self.labels = labels
        self.device = device
        self.normalize = build_normalizer(spec.preprocess, device)

    # --- start-up (batcher thread) ---------------------------------------------------------------

    def adapt(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module the runtime runs: the loaded one, or a view of it (embed's inner node)."""
        return module

    def needs_module(self) -> bool:
        """Whether adapt() needs the PyTorch module (a file that runs only on ONNX Runtime has none)."""
        return False

    def blank(self) -> torch.Tensor:
        """A uint8 input for warm-up."""
        pre = self.spec.preprocess
        return torch.zeros((pre.channels, pre.crop, pre.crop), dtype=torch.uint8)

    def check(self, output: Any) -> None:
        """Learn from one warm-up output what the model answers; raise if it doesn't fit the task.

        Raises:
            CheckpointError: naming the model, the task and the output's shape.
            ConfigError: the labels don't fit the output.
        """

    def unfit(self, output: Any, expected: str) -> CheckpointError:
        return CheckpointError(
            f"model '{self.spec.name}': task '{self.name}' expects {expected}, but the model output "
            f"{describe_output(output)}"
        )

    @staticmethod
    def verify_runtime(eager: Any, runtime: Any, score_threshold: float = 0.5) -> str | None:
        """Another runtime's output (ONNX Runtime's) against eager's for the same input: None when they
        agree under this task's rule, else the reason. Each task sets it to a plain function named after
        its rule (messages say "ONNX output differs from eager (<name> rule)"), with staticmethod."""
        raise NotImplementedError

    @staticmethod
    def int8_gate(fp32: Sequence[Any], int8: Sequence[Any], gate: Any) -> tuple[dict[str, float], str | None]:
        """precision int8's accuracy gate (serve/precision.py): the task's split outputs of fp32 and int8 for
        the same held-out images, and the model's int8_gate settings -> the figures measured, and None when
        int8 passes, else the reason. Each task sets its own rule, with staticmethod."""
        raise NotImplementedError

    # --- the request path ------------------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, ...]:
        pre = self.spec.preprocess
        return (pre.channels, pre.crop, pre.crop)

    def decode_sides(self) -> dict[str, int | None]:
        """open_image's reduced-scale JPEG hints: the shorter side needed (min_side), the longer side cap (max_side)."""
        return {"min_side": draft_side(self.spec.preprocess), "max_side": None}

    def prepare(self, image: Image.Image, size: tuple[int, int]) -> Prepared:
        """Request thread: the decoded upright image (a JPEG maybe decoded at reduced scale) and the
        uploaded image's upright size -> the model's uint8 input and the way back."""
        raise NotImplementedError

    def parse_params(self, args: Mapping[str, str]) -> dict[str, Any]:
        """This task's query parameters, validated. Raises: InvalidRequestError."""
        return {}

    def query_parameters(self) -> list[dict]:
        """The OpenAPI description of the query parameters parse_params reads."""
        return []

    def collate(self, inputs: list[torch.Tensor]) -> Any:
        """Batcher thread: uint8 inputs of one shape -> the model's input, normalized, on its device."""
        batch = torch.stack(inputs)
        if self.device.type == "cuda":
            # uint8 crosses the bus (4x less than float32), from pinned memory, without blocking.
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return self.normalize(batch)

    def run(self, forward: Forward, inputs: list[torch.Tensor]) -> list[Any]:
        """Batcher thread: one forward for the inputs; one CPU output per input."""
        return self.split(forward(self.collate(inputs)), len(inputs))

    def run_float(self, forward: Forward, inputs: list[torch.Tensor]) -> list[Any]:
        """Batcher thread: as run, for already normalized float inputs (V2's FP32 input)."""
        return self.split(forward(torch.stack(inputs)), len(inputs))

    def split(self, output: Any, count: int) -> list[Any]:
        """The batch output as one CPU value per image."""
        raise NotImplementedError

    def finish(self, output: Any, prepared: Prepared, params: dict[str, Any]) -> Result:
        raise NotImplementedError

    def torchserve(self, outputs: Sequence[Any], prepared: Sequence[Prepared], params: dict[str, Any]) -> Any:
        """The answer in the shape of TorchServe's default handler for this task; a list for several images."""
        raise InvalidRequestError(f"task '{self.name}' has no TorchServe answer shape; use format=json")

    # --- V2 --------------------------------------------------------------------------------------

    def v2_outputs(self) -> list[dict]:
        """Metadata of each output: name, datatype, shape (-1 for any)."""
        raise NotImplementedError

    def v2_tensors(self, outputs: list[Any], prepared: list[Prepared] | None, params: dict[str, Any],
                   classification: dict[str, int]) -> list[V2Output]:
        """The V2 output tensors for a batch; `classification` maps output names to Triton's top-K."""
        raise NotImplementedError

    # --- description -----------------------------------------------------------------------------

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return str(index)

    def metadata(self) -> dict[str, Any]:
        """What /models/<name> says of the task."""
        return {"name": self.name, **self.options.model_dump()}

    def summary(self) -> str:
        """What the model answers, in a few words (python -m serve check)."""
        return self.name


def describe_output(output: Any) -> str:
    """A model output's structure in a few words: [1, 21, 64, 64], dict(out=[...]), list of 2 dicts..."""
    if isinstance(output, torch.Tensor):
        return f"a tensor {list(output.shape)}"
    if isinstance(output, Mapping):
        inner = ", ".join(f"{k}={list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                          for k, v in list(output.items())[:6])
        return f"a dict ({inner})"
    if isinstance(output, (list, tuple)):
        kinds = sorted({f"tensor {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__ for v in output})
        return f"a {type(output).__name__} of {len(output)} ({', '.join(kinds)})"
    return f"a {type(output).__name__}"


def describe_type(obj: Any) -> str:
    """An object's type in a few words: a Tensor, a list of ['dict'], a tuple of nothing..."""
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {sorted({type(o).__name__ for o in obj}) or 'nothing'}"
    return f"a {type(obj).__name__}"


def judged_tensors(eager: Any, runtime: Any) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """The tensor a verification rule judges in each output (a tuple's first; a dict's 'out', as
    torchvision segmentation returns, else its first), float32 on the CPU; and the reason when their
    shapes differ, else None."""
    e, o = _main_tensor(eager).float().cpu(), _main_tensor(runtime).float().cpu()
    if e.shape != o.shape:
        return e, o, f"output shape {list(o.shape)} differs from eager {list(e.shape)}"
    return e, o, None


def _main_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, Mapping):
        return output["out"] if "out" in output else next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def parse_number(args: Mapping[str, str], key: str, kind: type, low: float, high: float) -> Any:
    """A numeric query parameter within [low, high], or None when absent. Raises: InvalidRequestError."""
    raw = args.get(key)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidRequestError(f"{key} must be {'an integer' if kind is int else 'a number'}, got '{raw[:40]}'") from None
    if not low <= value <= high:
        raise InvalidRequestError(f"{key} must be between {low:g} and {high:g}, got {raw[:40]}")
    return value


def padded_tensor(image: Image.Image, max_aspect: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image as a uint8 tensor, padded with black below or to the right until its sides are within
    max_aspect of each other (models that resize internally turn a 10000 x 10 strip into a 0-pixel side);
    and the image's own (width, height) inside it."""
    tensor = image_tensor(image)
    width, height = image.size
    padded_w, padded_h = max(width, math.ceil(height / max_aspect)), max(height, math.ceil(width / max_aspect))
    if (padded_w, padded_h) != (width, height):
        canvas = torch.zeros((tensor.shape[0], padded_h, padded_w), dtype=torch.uint8)
        canvas[:, :height, :width] = tensor
        tensor = canvas
    return tensor, (width, height)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (RGB or L) as a uint8 tensor [C, H, W], without float math (request threads start no pools)."""
    channels = len(image.getbands())
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, channels).permute(2, 0, 1)
