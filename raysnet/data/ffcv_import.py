"""FFCV, imported without its one slow line. Every raysnet module that uses FFCV imports this first.

`ffcv.fields.rgb_image` builds its two-entry table of image modes ('jpg' -> 0, 'raw' -> 1) as a
numba typed Dict when it is imported, which compiles numba's dictionary code: 4-5 s of CPU in
every process that imports FFCV (each Ray Train worker of each run and of each restart, each
prepare, the driver's dataset check) on the 2-core machine the README measures on. FFCV reads that
table only from Python (when it generates a pipeline's code, and in its writer), never inside
compiled code, so a plain dict with the same entries serves it exactly. numba.typed.Dict is
swapped for the import only and put back at once.
"""

from __future__ import annotations

import sys


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


_import()
