"""The native CPU kernels built for other CPUs' -march, timed on this one: what an AMD EPYC user compiles.

``-march=native`` means different code on different machines: ``znver2``/``znver3`` tuning on an AMD EPYC,
Haswell-class AVX2 elsewhere. Built that way with the kernels' old memcpy-based vector loads, GCC 12 went
through the stack and the BatchNorm kernels ran ~20x slower (the 27% loss of the native BatchNorm kernels on an
AMD EPYC); ``native/common.h`` loads through an unaligned vector type instead. This builds the kernels once per
``--marches`` value (each in its own process and cache directory), times the BatchNorm moments and backward
sums and the depthwise weight gradient at a MobileNetV2 layer's size, and prints each time and its
ratio to the ``-march=native`` build, in one run.

  taskset -c 0 python benchmarks/native_isa.py
  python benchmarks/native_isa.py --marches native,znver3 --repeats 50
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kd_landmarks.training import machine  # noqa: E402

_CHILD = """
import json, os, sys, time
import numpy as np
march, repeats = sys.argv[1], int(sys.argv[2])
os.environ["KD_LANDMARKS_NATIVE_MARCH"] = march
from kd_landmarks.cpu import native
assert native.available(), native.unavailable_reason()
import jax, jax.numpy as jnp
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(8, 112, 112, 96)).astype(np.float32))  # block 1's expand output, batch 8
dy = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
g = jnp.asarray(rng.normal(size=(8, 56, 56, 96)).astype(np.float32))    # its stride-2 depthwise output
c = jnp.ones(96)
kernels = {
    "bn moments": jax.jit(native.batch_norm_moments),
    "bn backward sums (relu6)": jax.jit(lambda dy, x: native.batch_norm_grad_sums(
        dy, x, mean=c * 0, inv=c, scale=c, bias=c * 0, activation="relu6")),
    "depthwise weight gradient": jax.jit(lambda x, g: native.depthwise_weight_gradient(x, g, (3, 3), 2, (0, 0))),
}
args = {"bn moments": (x,), "bn backward sums (relu6)": (dy, x), "depthwise weight gradient": (x, g)}
result = {}
for name, fn in kernels.items():
  jax.block_until_ready(fn(*args[name]))
  times = []
  for _ in range(repeats):
    start = time.perf_counter(); jax.block_until_ready(fn(*args[name])); times.append(time.perf_counter() - start)
  result[name] = 1000 * float(np.median(times))
print(json.dumps(result))
"""


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--marches", default="native,haswell,x86-64-v3,znver2,znver3")
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  print(f"CPU {machine.cpu_description()}", flush=True)
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for march in args.marches.split(","):
      env = dict(os.environ, KD_LANDMARKS_NATIVE_CACHE=os.path.join(tmp, march), PYTHONPATH=root)
      completed = subprocess.run([sys.executable, "-c", _CHILD, march, str(args.repeats)], env=env,
                                 capture_output=True, text=True)
      if completed.returncode != 0:
        print(f"-march={march}: failed: {completed.stderr.strip().splitlines()[-1:]}", flush=True)
        continue
      results[march] = json.loads(completed.stdout.strip().splitlines()[-1])
      print(f"-march={march}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in results[march].items()), flush=True)
  if "native" in results:
    for march, times in results.items():
      ratios = ", ".join(f"{k} {v / results['native'][k]:.2f}x" for k, v in times.items())
      print(f"-march={march} / -march=native: {ratios}")


if __name__ == "__main__":
  main()
