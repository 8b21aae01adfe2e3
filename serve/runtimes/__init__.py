"""Runtimes: what runs a model's forward pass. RUNTIMES maps each `runtime:` name to its builder."""
from __future__ import annotations

from serve.runtimes.eager import EagerRuntime

RUNTIMES = {"eager": EagerRuntime}
