"""classify: one image in, the top-k classes with their softmax probabilities out."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from serve.errors import ConfigError
from serve.preprocess import build_transform
from serve.tasks.base import Options, Prepared, Result, Task, V2Output, judged_tensors, parse_number

PROB_TOL = 1e-4
TIE_TOL = 1e-6
TOPK = 5


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


def probabilities(eager: Any, runtime: Any, score_threshold: float = 0.5) -> str | None:
    """Classify's verification rule: softmax probabilities within PROB_TOL (a score map averaged over space
    first), and the same top-TOPK in the same order for every image, where classes whose eager
    probabilities are within TIE_TOL (a tie) may change places. None when they agree, else the reason."""
    e, o, reason = judged_tensors(eager, runtime)
    if reason is not None:
        return reason
    if e.ndim > 2:  # a score map: averaged spatially into class scores, as the predictor does
        e, o = e.flatten(2).mean(-1), o.flatten(2).mean(-1)
    e, o = e.softmax(-1), o.softmax(-1)
    diff = (e - o).abs()
    if diff.max() > PROB_TOL:
        image, cls = divmod(int(diff.argmax()), e.shape[-1])
        return f"max |Δp| {diff.max():.1e} > {PROB_TOL:g} (image {image}, class {cls})"
    k = min(TOPK, e.shape[-1])
    for i in range(len(e)):
        top_e, top_o = e[i].topk(k).indices, o[i].topk(k).indices
        tie = (e[i][top_e] - e[i][top_o]).abs().max() <= TIE_TOL
        if not torch.equal(top_e, top_o) and not tie:
            return f"top-{k} differs for image {i}: eager {top_e.tolist()}, ONNX {top_o.tolist()}"
    return None


def top_classes(fp32: Sequence[torch.Tensor], int8: Sequence[torch.Tensor], gate: Any) -> tuple[dict, str | None]:
    """Classify's int8 gate: of the decisive images (fp32's top-1 probability ahead of its second by at least
    gate.top1_margin), the share whose int8 top-1 class is fp32's (>= gate.top1_agreement); of all images,
    the share whose fp32 top-1 class is among int8's top-5 (>= gate.top5_containment). A flip between
    classes fp32 itself nearly ties is a coin toss either way, not lost accuracy (docs/precision.md)."""
    e, o = torch.stack(list(fp32)), torch.stack(list(int8))
    best = e.topk(min(2, e.shape[-1]))
    top1 = best.indices[:, 0]
    margin = best.values[:, 0] - (best.values[:, 1] if e.shape[-1] > 1 else 0)
    same = o.argmax(-1) == top1
    decisive = margin >= gate.top1_margin
    agreeing = int(same[decisive].sum())
    agree = agreeing / int(decisive.sum()) if bool(decisive.any()) else 1.0
    k = min(TOPK, e.shape[-1])
    within = float((o.topk(k).indices == top1[:, None]).any(-1).float().mean())
    figures = {"images": len(e), "decisive": int(decisive.sum()), "top1_agreement": round(agree, 4),
               "top1_agreement_all": round(float(same.float().mean()), 4), f"top{k}_containment": round(within, 4),
               "max_prob_diff": round(float((e - o).abs().max()), 4)}
    if agree < gate.top1_agreement:
        return figures, (f"int8 top-1 agrees with fp32 on {agreeing} of {int(decisive.sum())} decisive held-out "
                         f"images ({agree:.1%} < top1_agreement {gate.top1_agreement:.1%})")
    if within < gate.top5_containment:
        return figures, (f"fp32's top-1 is in int8's top-{k} on {round(within * len(e))} of {len(e)} held-out "
                         f"images ({within:.1%} < top5_containment {gate.top5_containment:.1%})")
    return figures, None


class Classify(Task):
    name = "classify"
    verify_runtime = staticmethod(probabilities)
    int8_gate = staticmethod(top_classes)
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
