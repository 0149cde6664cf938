"""Process memory settings for whole-volume work: freed large blocks are kept for reuse instead of unmapped, and
the objects made at start-up are kept out of the cyclic garbage collector's passes.

Every whole-volume step allocates and frees tensors of tens of MB many times over: each FFT, each product in a
conjugate-gradient iteration, each activation of the network's windows. glibc serves blocks above its mmap threshold
(128 kB at first, raised by frees to 32 MiB at most) with fresh ``mmap`` pages and unmaps them on ``free``, so
every such tensor is paid for again with page faults and zeroing: a 200×240×200 float32 ``empty_like(x).fill_(1)``
took 13.8 ms against 2.4 ms with reuse, and a 192×240×192 real FFT pair about 1.7× as long (one-off scratch
measurements on the 2-core Intel Xeon; ``python bench/bench_pipeline.py`` shows what it does to the pipeline). PyTorch's CPU tuning guide recommends
a caching allocator (jemalloc or tcmalloc through ``LD_PRELOAD``) for the same reason; those are system libraries
and need the environment set before Python starts, so the bundle asks glibc itself, through ``mallopt``, to keep
large freed blocks in its heap (``M_MMAP_THRESHOLD``) and not to return the heap's top to the system
(``M_TRIM_THRESHOLD``). The peak memory is what the work needs; the process keeps it until it exits.

Nothing changes on other C libraries (macOS, Windows, musl) or where the call fails: the work is only slower.

A ``monai.bundle run`` process holds a few hundred thousand objects from its imports (torch, MONAI, Ignite, scipy)
and its parsed configs, all alive until it exits. Python's cyclic collector walks them on every full collection and
once more while the interpreter shuts down, after the outputs are written: about 1 s of every command on this
project's 2-core Xeon (``python -c "import monai.bundle"`` ended 0.9–1.1 s after its last statement, 0.15–0.2 s with
``gc.freeze()``). :func:`freeze_startup_objects` moves the objects alive at that point into the collector's permanent
generation, as ``gc.freeze`` is meant for; objects made afterwards (networks, engines, volumes) are collected as
before. Done once per process, so that an in-process caller running several workflows freezes only what it had
before the first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

from .checks import as_bool

__all__ = ["keep_freed_memory", "freeze_startup_objects"]

logger = logging.getLogger(__name__)

#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap and are reused after ``free`` (largest whole-volume tensors: a few
#: hundred MB; a larger one is still mapped and unmapped on its own).
MMAP_THRESHOLD_BYTES = 1 << 30
#: Freed memory at the heap's top is kept up to this size.
TRIM_THRESHOLD_BYTES = (1 << 31) - 1

_applied: bool | None = None
_frozen = False


def keep_freed_memory(enabled: bool = True) -> bool:
    """Let glibc reuse freed large blocks for the rest of the process (see the module docstring).

    Arguments:
        enabled: ``False`` leaves the C library's defaults alone (the config's ``keep_freed_memory`` switch).

    Returns:
        whether the setting is in force (``False`` when disabled, not on Linux with glibc, or refused).
    """
    global _applied
    if not as_bool(enabled, "keep_freed_memory"):
        return bool(_applied)
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    _applied = bool(ok)
    logger.debug("glibc keeps freed blocks up to %d MiB for reuse: %s", MMAP_THRESHOLD_BYTES >> 20, _applied)
    return _applied


def freeze_startup_objects(enabled: bool = True) -> int:
    """Move the objects alive now (imports, parsed configs) into the garbage collector's permanent generation.

    Called last in the inference config's ``initialize`` (before the network, the engine and any volume exist); see
    the module docstring. Only the first call in a process freezes; objects frozen stay alive as they would anyway.

    Arguments:
        enabled: ``False`` leaves the collector alone (the config's ``freeze_startup_objects`` switch).

    Returns:
        the number of objects in the permanent generation after the call (``gc.get_freeze_count()``).
    """
    global _frozen
    if as_bool(enabled, "freeze_startup_objects") and not _frozen:
        _frozen = True
        gc.freeze()
        logger.debug("%d start-up objects kept out of the garbage collector's passes", gc.get_freeze_count())
    return gc.get_freeze_count()
