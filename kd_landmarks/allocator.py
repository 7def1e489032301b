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
does on CPU; ``benchmarks/models.py`` does for every framework it times, so the comparison is fair).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys

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


# Shared libraries of allocators that keep freed memory per thread and size class, in order of preference
# (Debian/Ubuntu packages libtcmalloc-minimal4, libgoogle-perftools4, libjemalloc2; the same names elsewhere).
FAST_ALLOCATORS = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib")
# Set in the re-executed process: never re-execute twice, and say in the log what happened.
REEXEC_MARK = "KD_LANDMARKS_ALLOCATOR_PRELOADED"


def find_fast_allocator() -> str | None:
  """The path of an installed tcmalloc or jemalloc (see FAST_ALLOCATORS), or None."""
  for name in FAST_ALLOCATORS:
    for directory in LIBRARY_DIRS:
      path = os.path.join(directory, name)
      if os.path.exists(path):
        return path
  return None


def preload_fast_allocator(program: str | None = None) -> str | None:
  """Re-executes this process with an installed tcmalloc/jemalloc in ``LD_PRELOAD`` (the allocator must be in
  place before the interpreter starts); returns why it did not where it does not.

  Why: glibc's malloc slows a long CPU training process down as its heap fragments. Measured on the demo's
  students (2-core Intel Xeon, 600 steps after the teachers' phases): 810-870 img/s with glibc (freed memory
  retained or not), 1,150-1,210 with tcmalloc, whose compilations also took 6 instead of 9-10 s. Call it
  before anything else starts threads: ``os.execve`` replaces the process (same pid, same arguments).
  ``program``: re-execute only when this process was started as ``python -m <program>``, never a notebook or
  a test runner that imported and called it.
  """
  main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if program is not None and getattr(main_spec, "name", None) != program:
    return f"not re-executed: this process was not started as python -m {program}"
  if os.environ.get(REEXEC_MARK):
    return f"{os.environ[REEXEC_MARK]} preloaded (re-executed with LD_PRELOAD)"
  if preloaded_allocator():
    return f"{preloaded_allocator()} already preloaded"
  if platform.system() != "Linux":
    return "not Linux: allocator left as it is"
  path = find_fast_allocator()
  if path is None:
    return ("no tcmalloc or jemalloc installed (Debian/Ubuntu: apt install libtcmalloc-minimal4); CPU training "
            "runs about 1.3x slower with glibc's malloc")
  env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [path, os.environ.get("LD_PRELOAD", "")])))
  env[REEXEC_MARK] = os.path.basename(path)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
  return None  # Not reached.
