"""Quantisation: an fp32 ONNX model -> its static int8 copy (ONNX Runtime's quantize_static), and the timing
of the two side by side.

Both import onnxruntime: call them only in a process that may (a forked child before the fork of
workers, serve/runtimes/onnx/isolate.py; or a worker). The recipe's choices are measured in
docs/precision.md.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from serve.runtimes.onnx.export import INPUT_NAME

# How many times a timing pair runs after its warm-up; the median of each side is compared.
TIMING_REPS = 7


@dataclass(frozen=True)
class Recipe:
    """How the fp32 model is quantised (part of the cache key). docs/precision.md measures each choice on
    the default model."""

    name: str = "all int8"
    method: str = "minmax"  # the calibration: minmax, entropy or percentile
    per_channel: bool = True  # a scale per output channel of each weight
    quant_format: str = "qdq"  # qdq (QuantizeLinear/DequantizeLinear pairs) or qoperator (QLinearConv ...)
    activations: str = "uint8"
    weights: str = "int8"
    # Nodes left in fp32, by rule: "first_conv" (the stem, fed raw pixels), "early_convs" (the first eighth
    # of the Conv nodes: the high-resolution layers where int8's rounding starts), "last_gemm" (the classifier),
    # an op type ("Add", ...), a node name, or a part of node names starting with "/" ("/_blocks.0/").
    keep_fp32: tuple[str, ...] = ()
    pre_process: bool = True  # onnxruntime's quant_pre_process (shape inference, graph optimisations) first
    reduce_range: bool | None = None  # 7-bit weights; None: only where the CPU has no VNNI
    extra: dict = field(default_factory=dict)  # quantize_static's extra_options

    def key(self) -> dict:
        return {**asdict(self), "reduce_range": self.resolved_reduce_range()}

    def resolved_reduce_range(self) -> bool:
        return (not has_vnni()) if self.reduce_range is None else self.reduce_range


def has_vnni() -> bool:
    """Whether this CPU has a dot-product int8 instruction (AVX512-VNNI, AVX-VNNI, AMX; any ARM with int8
    dot products counts too). Without one, uint8 x int8 products saturate 16-bit sums and ONNX Runtime
    recommends reduce_range (7-bit weights)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: leave ranges full (the gate still judges the result)
    if " asimddp" in flags or "aarch64" in flags:
        return True
    return any(f" {name}" in flags for name in ("avx512_vnni", "avx_vnni", "amx_int8"))


def quantize(model: bytes, calibration: list[np.ndarray], recipe: Recipe, input_name: str = INPUT_NAME) -> bytes:
    """The int8 model: fp32 `model` quantised with `recipe`, its activation ranges calibrated on each
    array of `calibration` (one model input each, already through the model's own preprocessing)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.inputs = iter(calibration)

        def get_next(self):
            array = next(self.inputs, None)
            return None if array is None else {input_name: array}

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory(prefix="serve-int8-") as tmp:
        source, prepared, output = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        source.write_bytes(model)
        if recipe.pre_process:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            source = prepared
        graph = onnx.load(str(source)).graph
        quantize_static(
            str(source), str(output), Reader(), calibrate_method=methods[recipe.method],
            quant_format=QuantFormat.QDQ if recipe.quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=recipe.per_channel, reduce_range=recipe.resolved_reduce_range(),
            activation_type=types[recipe.activations], weight_type=types[recipe.weights],
            nodes_to_exclude=kept_nodes(graph, recipe.keep_fp32), extra_options=dict(recipe.extra),
            calibration_providers=["CPUExecutionProvider"])
        return output.read_bytes()


def kept_nodes(graph, rules: tuple[str, ...]) -> list[str]:
    """The names of the graph's nodes the rules leave in fp32."""
    kept: list[str] = []
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    gemms = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    for rule in rules:
        if rule == "first_conv":
            kept += convs[:1]
        elif rule == "early_convs":
            kept += convs[:max(1, -(-len(convs) // 8))]
        elif rule == "last_gemm":
            kept += gemms[-1:]
        elif rule.startswith("/"):  # a part of the exporter's node names: "/_blocks.0/" is a whole block
            kept += [n.name for n in graph.node if rule in n.name]
        else:
            kept += [n.name for n in graph.node if rule in (n.op_type, n.name)]
    return sorted(set(kept))


def time_pair(first, second, batch: np.ndarray, reps: int = TIMING_REPS) -> tuple[float, float]:
    """The median seconds of first(batch) and of second(batch), run in turns after one warm-up each (so
    drift in the machine's load hits both alike)."""
    first(batch), second(batch)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            fn(batch)
            out.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])
