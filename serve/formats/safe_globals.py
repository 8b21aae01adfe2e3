"""What torch's weights_only unpickler may build besides tensors: objects whose unpickling runs no code.

torch.load(weights_only=True) refuses every pickled global it doesn't know. Training checkpoints
carry a few harmless ones next to the weights (timm's argparse.Namespace, numpy metrics); the
built-in list below lets exactly those through, and a model's `safe_globals` names more.

Why each built-in entry is harmless: torch only ever calls an allowed global with arguments that
are themselves unpickled under the same rules, and only sets state on instances of allowed types.
- argparse.Namespace: construction sets attributes, nothing else.
- pathlib pure/posix paths, datetime values, frozenset: C or pure-Python constructors over
  strings, bytes and numbers; no I/O, no callbacks.
- numpy: NOT numpy's own dtype/ndarray/_reconstruct/scalar. numpy.dtype.__setstate__ accepts any
  flags word (a float64 dtype can be made to claim it holds object pointers), which turns raw
  file bytes into pointers numpy later follows. Those names map instead to the small checked
  stand-ins below: a plain number dtype (bool, int, uint, float, complex) in either byte order,
  and scalars/arrays of it whose byte count matches their shape. Object, structured and
  subarray dtypes are refused.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import math
import pathlib
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pickle import UnpicklingError
from typing import Any

import numpy as np
import torch

from serve.errors import ConfigError
from serve.extras import extra_hint

# Plain number dtypes as numpy pickles them: ('f8', False, True), then (3, '<', None, ..., 0).
_NUMBER_DTYPE = re.compile(r"b1|[iu][1248]|f[248]|c(8|16)")
_PLAIN_STATE_TAIL = (None, None, None, -1, -1, 0)
# Modules whose classes can build code or reach the system; a config may not allow-list them.
BLOCKED_MODULES = frozenset({
    "builtins", "types", "functools", "operator", "ctypes", "code", "codeop", "subprocess", "os",
    "sys", "posix", "nt", "importlib", "pickle", "copyreg", "io", "socket", "shutil", "runpy",
})
# torch's allow-list is process-wide: one load at a time changes it.
_LOCK = threading.Lock()


class PickledDtype:
    """A pickled numpy dtype, checked: a plain number type and a byte order, nothing else."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        if not isinstance(spec, str) or not _NUMBER_DTYPE.fullmatch(spec):
            raise UnpicklingError(f"numpy dtype {spec!r:.40} is not a plain number type; not unpickled")
        self.spec = spec
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                and state[1] in ("<", ">", "|", "=") and state[2:] == _PLAIN_STATE_TAIL):
            raise UnpicklingError(f"numpy dtype state {state!r:.80} is not a plain number type's; not unpickled")
        self.byteorder = state[1]

    @property
    def dtype(self) -> np.dtype:
        dtype = np.dtype(self.spec)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype

    def __repr__(self) -> str:
        return repr(self.dtype)


class PickledArray:
    """A pickled numeric numpy array, checked; the array is `.array` (metadata only, never weights)."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise UnpicklingError("numpy array state is not (1, shape, dtype, fortran, bytes); not unpickled")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(dtype, PickledDtype) and isinstance(raw, bytes) and isinstance(fortran, bool)
                and isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise UnpicklingError("numpy array is not a plain number array; not unpickled")
        real = dtype.dtype
        if len(raw) != math.prod(shape) * real.itemsize:
            raise UnpicklingError(f"numpy array {list(shape)} of {real} does not match its {len(raw)} bytes")
        self.array = np.frombuffer(raw, real).reshape(shape, order="F" if fortran else "C").copy()

    def __repr__(self) -> str:
        return f"array{list(self.array.shape)} {self.array.dtype}" if self.array is not None else "array"


def numpy_scalar(dtype: Any, data: Any = None) -> np.generic:
    """numpy's scalar(dtype, bytes), for plain number dtypes only."""
    if not (isinstance(dtype, PickledDtype) and isinstance(data, bytes) and len(data) == dtype.dtype.itemsize):
        raise UnpicklingError("numpy scalar is not a plain number; not unpickled")
    return np.frombuffer(data, dtype.dtype)[0]


def numpy_reconstruct(cls: Any, shape: Any = None, typecode: Any = None) -> PickledArray:
    """numpy's _reconstruct(ndarray, ...): an empty PickledArray that its checked state fills."""
    if cls is not PickledArray:
        raise UnpicklingError("numpy _reconstruct of something other than an ndarray; not unpickled")
    return PickledArray()


def _named(cls: type) -> tuple[type, str]:
    return cls, f"{cls.__module__}.{cls.__qualname__}"


BUILT_IN: tuple[tuple[Any, str], ...] = (
    _named(argparse.Namespace),
    _named(pathlib.PurePosixPath), _named(pathlib.PosixPath), _named(pathlib.PureWindowsPath),
    (pathlib.PurePosixPath, "pathlib.PurePosixPath"), (pathlib.PosixPath, "pathlib.PosixPath"),
    (pathlib.PureWindowsPath, "pathlib.PureWindowsPath"),
    (pathlib.PureWindowsPath, "pathlib.WindowsPath"),  # a Windows path, read on Linux, as its string form
    _named(datetime.date), _named(datetime.datetime), _named(datetime.time),
    _named(datetime.timedelta), _named(datetime.timezone),
    (frozenset, "builtins.frozenset"),
    (PickledDtype, "numpy.dtype"),
    (PickledArray, "numpy.ndarray"),
    (numpy_scalar, "numpy._core.multiarray.scalar"), (numpy_scalar, "numpy.core.multiarray.scalar"),
    (numpy_reconstruct, "numpy._core.multiarray._reconstruct"),
    (numpy_reconstruct, "numpy.core.multiarray._reconstruct"),
)
BUILT_IN_NAMES = tuple(sorted({name for _, name in BUILT_IN}))


def resolve_safe_globals(names: Sequence[str], model: str = "?") -> tuple[type, ...]:
    """Import each 'package.module:Name' a config allow-lists; each must be a class.

    Raises:
        ConfigError: a name doesn't import, isn't a class, or is in a blocked module.
    """
    found = []
    for name in names:
        where = f"model '{model}': field 'safe_globals': '{name}'"
        module_name = name.partition(":")[0]
        if module_name.split(".")[0] in BLOCKED_MODULES:
            raise ConfigError(f"{where}: module '{module_name}' can run code or reach the system; never allowed")
        target = import_reference(name, where)
        if not isinstance(target, type):
            raise ConfigError(f"{where}: is a {type(target).__name__}, not a class; only classes can be allowed")
        found.append(target)
    return tuple(found)


@contextmanager
def allowed(extra: Sequence[type] = ()) -> Iterator[None]:
    """Within the block, torch.load(weights_only=True) also builds the built-in list and `extra`."""
    with _LOCK, torch.serialization.safe_globals([*BUILT_IN, *extra]):
        yield


def refused_global(message: str) -> str | None:
    """The global torch's weights_only unpickler refused, from its error message, if it names one."""
    for pattern in (r"GLOBAL (\S+) was not an allowed global", r"unsupported GLOBAL (\S+) whose module",
                    r"but got <class '([^']+)'>", r"unrecognized function (\S+)"):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return None


def as_config_name(dotted: str) -> str:
    """'pkg.mod.Name' as a safe_globals entry 'pkg.mod:Name' (right for top-level classes)."""
    module, _, name = dotted.rpartition(".")
    return f"{module}:{name}" if module else dotted


def import_reference(reference: str, where: str) -> Any:
    """The object a 'package.module:Name[.attr]' reference names, imported.

    Raises:
        ConfigError: the module doesn't import or has no such attribute (prefixed with `where`).
    """
    module_name, _, attr_path = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import '{module_name}': {exc}{extra_hint(exc.name)}") from None
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise ConfigError(f"{where}: '{module_name}' has no attribute '{attr_path}'")
        target = getattr(target, attr)
    return target
