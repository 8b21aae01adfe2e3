"""embed: a feature vector per image, the model's output or a named inner node of it
(`embed: {node: avgpool}`, through torchvision.models.feature_extraction), optionally L2-normalised."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from serve.errors import ConfigError
from serve.preprocess import build_transform
from serve.tasks.base import Options, Prepared, Result, Task, V2Output, judged_tensors

NODE_OUTPUT = "embedding"
EMBED_MIN_COSINE = 0.9999
EMBED_REL_TOL = 1e-4


class EmbedOptions(Options):
    node: str | None = Field(None, description="an inner node's output instead of the model's (a name from "
                                               "torchvision.models.feature_extraction.get_graph_node_names)")
    normalize: bool = Field(False, description="scale each vector to unit L2 norm")


class Embedding(Result):
    model: str
    embedding: list[float]
    dim: int


def vectors(eager: Any, runtime: Any, score_threshold: float = 0.5) -> str | None:
    """Embed's verification rule: per image, cosine similarity >= EMBED_MIN_COSINE, and max |difference|
    <= EMBED_REL_TOL x the largest |eager value|. None when they agree, else the reason."""
    e, o, reason = judged_tensors(eager, runtime)
    if reason is not None:
        return reason
    e, o = e.flatten(1), o.flatten(1)
    cosine = torch.nn.functional.cosine_similarity(e, o, dim=1)
    if cosine.min() < EMBED_MIN_COSINE:
        return f"cosine similarity {cosine.min():.6f} < {EMBED_MIN_COSINE} (image {int(cosine.argmin())})"
    limit = EMBED_REL_TOL * float(e.abs().max())
    worst = float((e - o).abs().max())
    if worst > limit:
        return f"max |Δ| {worst:.1e} > {EMBED_REL_TOL:g} x max |eager| = {limit:.1e}"
    return None


def cosines(fp32: Sequence[torch.Tensor], int8: Sequence[torch.Tensor], gate: Any) -> tuple[dict, str | None]:
    """Embed's int8 gate: every held-out image's int8 vector within cosine similarity gate.cosine of fp32's."""
    cosine = torch.nn.functional.cosine_similarity(torch.stack(list(fp32)), torch.stack(list(int8)), dim=1)
    figures = {"images": len(cosine), "min_cosine": round(float(cosine.min()), 5),
               "mean_cosine": round(float(cosine.mean()), 5)}
    if cosine.min() < gate.cosine:
        return figures, (f"an int8 embedding's cosine similarity to fp32's is {float(cosine.min()):.4f} "
                         f"(held-out image {int(cosine.argmin())}; the gate's cosine is {gate.cosine:g})")
    return figures, None


class Embed(Task):
    name = "embed"
    verify_runtime = staticmethod(vectors)
    int8_gate = staticmethod(cosines)
    Options = EmbedOptions
    Result = Embedding
    formats = ("json",)

    def __init__(self, spec, labels, device):
        super().__init__(spec, labels, device)
        self.transform = build_transform(spec.preprocess)
        self.dim: int | None = None

    def adapt(self, module: torch.nn.Module) -> torch.nn.Module:
        """With `node`, a module that answers that node's output (FX-traced from the loaded one).

        Raises:
            ConfigError: no such node, or the module can't be traced.
        """
        node = self.options.node
        if node is None:
            return module
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        where = f"model '{self.spec.name}': field 'embed.node'"
        try:
            _, nodes = get_graph_node_names(module)
        except Exception as exc:  # FX tracing of the user's module: any failure means no inner nodes
            raise ConfigError(f"{where}: the model can't be traced to reach inner nodes ({str(exc)[:200]})") from None
        if node not in nodes:
            close = [n for n in nodes if node in n or n in node][:8] or nodes[-8:]
            raise ConfigError(f"{where}: no node '{node}'; nodes include {close}")
        return create_feature_extractor(module, return_nodes={node: NODE_OUTPUT}).eval()

    def summary(self) -> str:
        return f"embed, {self.dim} dimensions"

    def needs_module(self) -> bool:
        return self.options.node is not None

    def check(self, output: Any) -> None:
        self.dim = self.split(output, 1)[0].shape[0]

    def prepare(self, image: Image.Image, size: tuple[int, int]) -> Prepared:
        return Prepared(self.transform(image), size)

    def split(self, output: Any, count: int) -> list[torch.Tensor]:
        if isinstance(output, dict) and isinstance(output.get(NODE_OUTPUT), torch.Tensor):
            output = output[NODE_OUTPUT]
        if isinstance(output, torch.Tensor) and output.ndim > 2 and all(d == 1 for d in output.shape[2:]):
            output = output.flatten(1)  # a pooled map [N, D, 1, 1]
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != count:
            raise self.unfit(output, f"a vector per image [{count}, dim] (or [{count}, dim, 1, 1]); "
                                     "for a feature map, pick a pooled node with embed: {node: ...}")
        output = output.float()
        if self.options.normalize:
            output = torch.nn.functional.normalize(output, dim=1)
        return list(output.cpu())

    def finish(self, output: torch.Tensor, prepared: Prepared, params: dict[str, Any]) -> Embedding:
        return Embedding(model=self.spec.name, embedding=output.tolist(), dim=output.shape[0])

    def v2_outputs(self) -> list[dict]:
        return [{"name": "embedding", "datatype": "FP32", "shape": [-1, self.dim or -1]}]

    def v2_tensors(self, outputs, prepared, params, classification) -> list[V2Output]:
        data = np.stack([o.numpy() for o in outputs]).astype(np.float32)
        return [V2Output("embedding", "FP32", data, data.shape)]

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "dim": self.dim}
