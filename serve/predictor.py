"""Predictor: one loaded model with its labels and transform; image bytes or tensors in, top-k out."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from serve.config import ModelSpec
from serve.cores import SMALL_FORWARD_MS
from serve.errors import CheckpointError, ConfigError, InvalidRequestError
from serve.loader import LoadedModel
from serve.memory import PixelBudget, release_after
from serve.preprocess import build_normalizer, build_transform, draft_side, load_image, open_image


@dataclass(frozen=True)
class ClassScore:
    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Prediction:
    model: str
    classes: tuple[ClassScore, ...]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "predictions": [
                {"label": c.label, "index": c.index, "probability": round(c.probability, 6)} for c in self.classes
            ],
        }


class Predictor:
    """Runs one model: decode and transform an image, forward a batch, turn probabilities into labels."""

    def __init__(self, spec: ModelSpec, loaded: LoadedModel, labels: tuple[str, ...] | None, pixels: PixelBudget):
        """`pixels`: the process's decode budget, shared by its models; its limit is also the largest
        image accepted."""
        self.spec = spec
        self.loaded = loaded
        self.labels = labels
        self.pixels = pixels
        self.transform = build_transform(spec.preprocess)
        self.normalize = build_normalizer(spec.preprocess, loaded.device)
        self.num_classes: int | None = None
        self.forward_ms: float | None = None  # batch-1 CPU forward on one thread, timed at warm-up

    @property
    def input_shape(self) -> tuple[int, int, int]:
        pre = self.spec.preprocess
        return (pre.channels, pre.crop, pre.crop)

    def warm_up(self) -> None:
        """Forward one blank image, learn the class count, check the labels against it, turn ready.

        Call it on the thread that runs predict_batch: even building the blank input (150k values)
        starts an OpenMP thread team on the calling thread.

        Raises:
            CheckpointError: the output is not [N, classes, ...].
            ConfigError: the labels don't match the class count.
        """
        blank = torch.zeros(self.input_shape, dtype=torch.uint8)
        probs = self.predict_batch([blank])[0]
        self.num_classes = probs.shape[-1]
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ConfigError(
                f"model '{self.spec.name}': field 'labels': {len(self.labels)} labels, "
                f"but the model outputs {self.num_classes} classes"
            )
        if self.loaded.device.type == "cpu":
            self.forward_ms = self._time_forward(blank)

    def _time_forward(self, blank: torch.Tensor, runs: int = 5) -> float:
        """The fastest batch-1 forward on one torch thread, in ms of this thread's CPU time (so other
        processes' load doesn't inflate it), after warm-up's first forward paid the one-time set-up.
        A model plainly above SMALL_FORWARD_MS stops early. The thread count is put back afterwards."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: the forward runs on this one, all of it in thread_time
        try:
            times: list[float] = []
            for _ in range(runs):
                started = time.thread_time()
                self.predict_batch([blank])
                times.append((time.thread_time() - started) * 1000)
                if times[-1] > 10 * SMALL_FORWARD_MS or (len(times) >= 2 and min(times) > 2 * SMALL_FORWARD_MS):
                    break
            return min(times)
        finally:
            torch.set_num_threads(threads)

    def single_threaded(self, batch_size: int) -> bool:
        """A CPU batch too small for a second thread to pay for OpenMP's spin-waiting (serve/cores.py)."""
        return self.forward_ms is not None and self.forward_ms * batch_size < SMALL_FORWARD_MS

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Decode and transform one image into the model's uint8 input tensor [C, H, W].

        Raises:
            InvalidImageError, ImageTooLargeError: see decode_image.
        """
        mode = self.spec.preprocess.mode
        image = open_image(data, self.pixels.limit, mode, min_side=draft_side(self.spec.preprocess))
        pixels = image.width * image.height
        with self.pixels.hold(pixels):  # from the first decoded pixel until only the small tensor is left
            tensor = self.transform(load_image(image, mode))
            del image
        release_after(pixels)
        return tensor

    def predict_batch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Forward a list of uint8 [C, H, W] tensors as one batch; return one probability vector each, on the CPU.

        Raises:
            CheckpointError: the model's output can't be read as class scores.
        """
        batch = torch.stack(inputs)
        if self.loaded.device.type == "cuda":
            # uint8 crosses the bus (4x less than float32), from pinned memory, without blocking.
            batch = batch.pin_memory().to(self.loaded.device, non_blocking=True)
        with torch.inference_mode():
            return self.forward(self.normalize(batch))

    def forward_many(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """forward for a list of normalized float tensors [C, H, W] (a batch the batcher gathered)."""
        return self.forward(torch.stack(inputs))

    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Forward an already normalized float batch [N, C, H, W]; return one probability vector each, on the CPU.

        Raises:
            CheckpointError: the model's output can't be read as class scores.
        """
        device = self.loaded.device
        with torch.inference_mode():
            x = batch.to(device)
            if self.spec.half and device.type == "cuda":
                x = x.half()
            if self.spec.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            output = self.loaded.module(x)
        if isinstance(output, (tuple, list)):
            output = output[0]
        if not isinstance(output, torch.Tensor) or output.ndim < 2 or output.shape[0] != len(batch):
            shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise CheckpointError(f"model '{self.spec.name}' output {shape} is not [batch, classes, ...]")
        if output.ndim > 2:
            # Fully convolutional nets end in a score map: average it spatially into class scores.
            output = output.flatten(2).mean(-1)
        return list(output.float().softmax(-1).cpu())

    def describe(self, probs: torch.Tensor, k: int | None = None) -> Prediction:
        """Turn one probability vector into the top-k labelled classes."""
        k = min(k or self.spec.topk, probs.shape[-1])
        top = probs.topk(k)
        classes = tuple(
            ClassScore(self.label(i), i, p) for p, i in zip(top.values.tolist(), top.indices.tolist())
        )
        return Prediction(self.spec.name, classes)

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels is not None else str(index)

    def check_topk(self, k: int) -> int:
        """Raises: InvalidRequestError: k outside 1..classes."""
        if not 1 <= k <= (self.num_classes or 1):
            raise InvalidRequestError(f"topk must be between 1 and {self.num_classes}, got {k}")
        return k

    def metadata(self) -> dict:
        spec, pre = self.spec, self.spec.preprocess
        return {
            "name": spec.name,
            "architecture": spec.architecture or "whole-model pickle",
            "device": str(self.loaded.device),
            "ready": True,  # a model is served only once loaded and warm (Registry._build_and_install)
            "input": {
                "shape": list(self.input_shape),
                "mode": pre.mode,
                "resize": pre.resize,
                "crop": pre.crop,
                "mean": list(pre.mean),
                "std": list(pre.std),
                "interpolation": pre.interpolation,
            },
            "num_classes": self.num_classes,
            "num_labels": len(self.labels) if self.labels is not None else 0,
            "topk": spec.topk,
            "checkpoint": {
                "file": spec.checkpoint.name,
                "sha256": self.loaded.sha256,
                "layout": self.loaded.layout,
                "skipped_keys": len(self.loaded.skipped_keys),
            },
            "load_time_s": round(self.loaded.load_time_s, 3),
        }
