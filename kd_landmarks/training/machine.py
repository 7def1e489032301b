"""The machine a figure was measured on: the CPU's name and the instruction sets that change results
(``export.json`` records it for int8 files; the benchmarks print it beside every speed figure)."""
from __future__ import annotations

import os
import platform


def cpu_description() -> dict:
  """What CPU this process runs on, and whether it has the VNNI dot-product instructions (``export.json``
  records it: ONNX Runtime's u8s8 kernels compute differently with and without them), AVX2 and AVX-512 (the
  benchmarks print it beside every figure)."""
  name, flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
          name = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
        if name and flags:
          break
  except OSError:  # Not Linux: the name only.
    pass
  name = name or platform.processor() or platform.machine()
  return {"name": name, "machine": platform.machine(), "cores": len(os.sched_getaffinity(0)),
          "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags,
          "avx_vnni": "avx_vnni" in flags, "vnni": bool({"avx512_vnni", "avx_vnni"} & flags)}
