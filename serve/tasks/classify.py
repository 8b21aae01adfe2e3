"""classify: one image in, the top-k classes with their softmax probabilities out."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from serve.errors import ConfigError
from serve.preprocess import build_transform
from serve.tasks.base import Options, Prepared, Result, Task, V2Output, parse_number


class ClassifyOptions(Options):
    spatial_average: bool = Field(
        False, description="average a [N, classes, h, w] score map over space into class scores "
                           "(fully convolutional nets such as the seed's MyModel)")


class ClassScore(Result):
    label: str
    index: int = Field(ge=0)
    probability: float = Field(ge=0, le=1)


class Classification(Result):
    model: str
    predictions: list[ClassScore]


class Classify(Task):
    name = "classify"
    runtime_rule = "probabilities"
    torchserve_handler = "image_classifier"
    Options = ClassifyOptions
    Result = Classification
    v2_classification = True

    def __init__(self, spec, labels, device):
        super().__init__(spec, labels, device)
        self.transform = build_transform(spec.preprocess)
        self.num_classes: int | None = None

    def check(self, output: Any) -> None:
        probs = self.split(output, 1)[0]
        self.num_classes = probs.shape[-1]
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ConfigError(
                f"model '{self.spec.name}': field 'labels': {len(self.labels)} labels, "
                f"but the model outputs {self.num_classes} classes"
            )

    def prepare(self, image: Image.Image, size: tuple[int, int]) -> Prepared:
        return Prepared(self.transform(image), size)

    def parse_params(self, args: Mapping[str, str]) -> dict[str, Any]:
        topk = parse_number(args, "topk", int, 1, self.num_classes or 1)
        return {"topk": topk or min(self.spec.topk, self.num_classes or self.spec.topk)}

    def query_parameters(self) -> list[dict]:
        return [{"name": "topk", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": self.num_classes or 1},
                 "description": "classify: number of classes to answer (1..the model's class count)"}]

    def summary(self) -> str:
        return f"classify, {self.num_classes} classes"

    def split(self, output: Any, count: int) -> list[torch.Tensor]:
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            output = output[0]  # (logits, aux...) as some nets return
        if not isinstance(output, torch.Tensor) or output.ndim < 2 or output.shape[0] != count:
            raise self.unfit(output, f"class scores [{count}, classes]")
        if output.ndim > 2 and all(d == 1 for d in output.shape[2:]):
            output = output.flatten(1)  # a 1 x 1 score map is plain class scores
        if output.ndim > 2:
            if not self.options.spatial_average:
                raise self.unfit(output, f"class scores [{count}, classes] (a score map [N, classes, h, w] "
                                         "is averaged only with classify: {spatial_average: true}; for a "
                                         "class per pixel use task: segment)")
            output = output.flatten(2).mean(-1)
        return list(output.float().softmax(-1).cpu())

    def finish(self, output: torch.Tensor, prepared: Prepared, params: dict[str, Any]) -> Classification:
        k = min(params["topk"], output.shape[-1])
        top = output.topk(k)
        return Classification(model=self.spec.name, predictions=[
            ClassScore(label=self.label(i), index=i, probability=round(p, 6))
            for p, i in zip(top.values.tolist(), top.indices.tolist())
        ])

    def torchserve(self, outputs, prepared, params) -> Any:
        """image_classifier's answer: {label: probability} for the top-k, best first."""
        results = [self.finish(o, p, params) for o, p in zip(outputs, prepared)]
        answers = [{c.label: c.probability for c in r.predictions} for r in results]
        return answers if len(answers) > 1 else answers[0]

    def v2_outputs(self) -> list[dict]:
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, self.num_classes or -1]}]

    def v2_tensors(self, outputs, prepared, params, classification) -> list[V2Output]:
        probs = np.stack([p.numpy() for p in outputs]).astype(np.float32)
        k = classification.get("probabilities", 0)
        if not k:
            return [V2Output("probabilities", "FP32", probs, probs.shape)]
        # Triton's classification extension: "probability:index:label", best first.
        k = min(k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        elements = []
        for row, indices in zip(probs, order):
            for index in indices.tolist():
                text = f"{float(row[index]):f}:{index}"
                if self.labels is not None:
                    text += f":{self.labels[index]}"
                elements.append(text)
        return [V2Output("probabilities", "BYTES", elements, (len(probs), k))]

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "num_classes": self.num_classes, "topk": self.spec.topk}
