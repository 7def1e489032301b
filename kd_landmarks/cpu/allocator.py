"""CPU memory: keep freed memory for reuse instead of returning it to the kernel after every step.

XLA's CPU runtime allocates one buffer for all of a step's temporaries (650 MB for the student's 224 px
train step at batch 8) and frees it when the step ends. glibc's malloc serves a request that large with a
fresh ``mmap`` and unmaps it on free, so every step faults in and zeroes 160,000 new pages: about 0.2 s
of a 0.7 s step on one core here (``strace`` shows the 650 MB ``mmap``/``munmap`` pair per step;
``getrusage`` the faults). PyTorch frees tensor by tensor and suffers less.

:func:`retain_freed_memory` sets three glibc ``mallopt`` parameters for the whole process: no ``mmap``
for large blocks (``M_MMAP_MAX=0``), no trimming of the heap's free top (``M_TRIM_THRESHOLD``), and one
arena (``M_ARENA_MAX=1``: a thread arena cannot grow past 64 MB and would fall back to ``mmap``). Freed
blocks then go back to malloc's free lists and the next step reuses the same, already mapped pages. The
cost: the process keeps its peak heap until it exits, which a training process reaches anyway. A
preloaded tcmalloc or jemalloc (``LD_PRELOAD``) already behaves this way, and then nothing is changed.

It applies to memory allocated after the call: call it before JAX runs anything (``kd_landmarks.main``
does for CPU training through :func:`kd_landmarks.cpu.prepare_process`; ``benchmarks/models.py`` does for
every framework it times, so the comparison is fair). tcmalloc is not loaded by this package: where one is
installed, ``LD_PRELOAD=libtcmalloc_minimal.so.4 python -m kd_landmarks.main ...`` uses it (docs/performance.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

# glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
INT_MAX = 2**31 - 1

_state = {"applied": None}


def preloaded_allocator() -> str | None:
  """'tcmalloc' or 'jemalloc' when LD_PRELOAD names one, else None."""
  preload = os.environ.get("LD_PRELOAD", "")
  for name in ("tcmalloc", "jemalloc"):
    if name in preload:
      return name
  return None


def retain_freed_memory() -> str:
  """Configures glibc's malloc to reuse freed memory (see the module docstring); returns what it did.

  Idempotent. Returns a one-line description for logs: 'glibc malloc: freed memory retained',
  '<name> preloaded: already retains freed memory', or why nothing could be done (not glibc).
  """
  if _state["applied"] is not None:
    return _state["applied"]
  preloaded = preloaded_allocator()
  if preloaded:
    result = f"{preloaded} preloaded: already retains freed memory"
  elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    result = f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'}): allocator left as it is"
  else:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = {"M_MMAP_MAX": (M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, INT_MAX),
                "M_ARENA_MAX": (M_ARENA_MAX, 1)}
    failed = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) != 1]
    if failed:
      result = f"glibc malloc: mallopt refused {', '.join(failed)}; allocator partly unchanged"
      logging.warning(result)
    else:
      result = "glibc malloc: freed memory retained (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=max, M_ARENA_MAX=1)"
  _state["applied"] = result
  return result
