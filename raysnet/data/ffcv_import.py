"""FFCV, imported without its one slow line. Every raysnet module that uses FFCV imports this first.

`ffcv.fields.rgb_image` builds its two-entry table of image modes ('jpg' -> 0, 'raw' -> 1) as a
numba typed Dict when it is imported, which compiles numba's dictionary code: 4-5 s of CPU in
every process that imports FFCV (each Ray Train worker of each run and of each restart, each
prepare, the driver's dataset check) on the 2-core machine the README measures on. FFCV reads that
table only from Python (when it generates a pipeline's code, and in its writer), never inside
compiled code, so a plain dict with the same entries serves it exactly. numba.typed.Dict is
swapped for the import only and put back at once.

Every FFCV loader also compiles its pipeline with numba: the memory reader, the decoder, each
transform, about a second of CPU per loader here, again for every loader a process builds (the
training and validation loaders, each resolution of a progressive schedule, each mode of an
evaluation) though their functions are the same. numba freezes a function's closure variables into
the compiled code, so an operation is the same compiled function whenever its code and the values
it closes over are the same; `_SharedCompiles` keeps one per such key in the process:
- the memory reader (compiled for one explicit signature, from no closure);
- each pipeline operation as a whole, with the helpers it closes over (the JPEG decoder, the
  resize) keyed by their own code and closures. A helper itself is never shared between two
  different operations: numba's typing of one helper called from several operations with other
  argument types did not finish (a decoder's `imdecode` shared by two decoders hung a loader).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

import numpy as np


class _SharedCompiles:
    """FFCV's `Compiler.compile`, remembering what it compiled (see the module's docstring)."""

    def __init__(self, compile_: Callable):
        self.compile_ = compile_
        self.keys: dict[int, tuple[Any, Any]] = {}  # id(compiled) -> (its key, the compiled function)
        self.shared: dict[Any, Any] = {}  # key -> compiled function
        self.operations = threading.local()  # set while FFCV compiles a stage's operations

    def key(self, code: Callable, signature: Any, parallel: bool) -> Any:
        cells = tuple(cell.cell_contents for cell in getattr(code, "__closure__", None) or ())
        return getattr(code, "__code__", code), tuple(self.frozen(c) for c in cells), str(signature), parallel

    def frozen(self, value: Any) -> Any:
        """A closure variable as part of a key: what numba freezes (numbers, strings, arrays) by
        value, a function this compiled by its own key, anything else by identity (kept alive)."""
        if value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
            return type(value), value
        if isinstance(value, tuple):
            return tuple, tuple(self.frozen(v) for v in value)
        if isinstance(value, np.ndarray):
            return np.ndarray, value.dtype.str, value.shape, value.tobytes()
        if id(value) in self.keys:
            return self.keys[id(value)][0]
        self.keys[id(value)] = (("id", id(value)), value)
        return self.keys[id(value)][0]

    def __call__(self, cls, code: Callable, signature: Any = None) -> Callable:
        if not cls.is_enabled:
            return code
        key = self.key(code, signature, getattr(code, "is_parallel", False) and cls.num_threads > 1)
        shareable = signature is not None or getattr(self.operations, "active", False)
        if shareable and key in self.shared:
            return self.shared[key]
        compiled = self.compile_(code, signature)
        self.keys[id(compiled)] = (key, compiled)
        if shareable:
            self.shared[key] = compiled
        return compiled

    def stage(self, codegen_stage: Callable) -> Callable:
        """FFCV's `Graph.codegen_stage`, which compiles a stage's operations (their helpers were
        compiled before, when each operation generated its code)."""
        def wrapped(*args, **kwargs):
            self.operations.active = True
            try:
                return codegen_stage(*args, **kwargs)
            finally:
                self.operations.active = False
        return wrapped


def _import() -> None:
    if "ffcv" in sys.modules:
        return
    import numba.typed

    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        import ffcv  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.graph import Graph

    shared = _SharedCompiles(Compiler.compile)
    Compiler.compile = classmethod(shared.__call__)
    Graph.codegen_stage = shared.stage(Graph.codegen_stage)


_import()
