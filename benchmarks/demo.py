"""The demo's training speed, as a user sees it: before and after the CPU speed-ups, same machine, same run.

Runs ``python -m kd_landmarks.main --config configs/demo.py`` (one seed per student loss unless
``--seeds``) once per variant, each in its own fresh workdir (so each compiles from scratch), in turn:

  before   --config.input_cache_mb=0 --config.kernel_choice=rules --config.preload_allocator=False
           --config.augment.sampler=gather --config.augment.noise_impl=jnp (the split decoded from disk every
           epoch, the kernels by rule, glibc's malloc, the augmentation in jax.numpy: what the demo did up to
           8ae7448, the same augmentation draws)
  after    the defaults (the split held decoded in memory, the kernels measured on this machine and cached,
           tcmalloc preloaded where installed, the augmentation's warp and noise in native kernels)

Another CPU's build, timed here: KD_LANDMARKS_NATIVE_MARCH=znver3 XLA_FLAGS=--xla_cpu_max_isa=AVX2 (the
environment reaches both runs).

The kernel-choice cache is left as it is: delete kernel_choices.json in the native kernels' cache directory
(~/.cache/kd_landmarks/cpu/native) to include the one-time measurement in the 'after' wall time.

and prints, per model, the first step's seconds (compilation included) and the training loop's img/s after it
(``train_speed.json``, validation and checkpoints included), the wall time of each variant, and the ratios.

  python benchmarks/demo.py                    # ~6 min on 2 cores
  python benchmarks/demo.py --steps_scale 0.25 # a quicker look (fewer steps: the first step weighs more)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kd_landmarks.training import machine  # noqa: E402

VARIANTS = {
    "before": ["--config.input_cache_mb=0", "--config.kernel_choice=rules", "--config.preload_allocator=False",
               "--config.augment.sampler=gather", "--config.augment.noise_impl=jnp"],
    "after": [],
}


def run_variant(name, flags, workdir, args) -> dict:
  command = [sys.executable, "-m", "kd_landmarks.main", "--config", "configs/demo.py", "--workdir", workdir,
             f"--config.student_seeds={args.seeds}",
             f"--config.teacher.num_train_steps={int(800 * args.steps_scale)}",
             f"--config.student.num_train_steps={int(600 * args.steps_scale)}", *flags]
  print(f"[{name}] {' '.join(command[1:])}", flush=True)
  started = time.time()
  completed = subprocess.run(command, cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wall = time.time() - started
  if completed.returncode != 0:
    sys.exit(f"[{name}] failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
  measured = [line.split("kernel choice for ", 1)[1] for line in completed.stderr.splitlines()
              if "kernel choice for " in line]
  for line in measured:
    print(f"[{name}] kernel choice for {line}", flush=True)
  speeds = {}
  for model in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, model, "train_speed.json")
    if os.path.exists(path):
      with open(path) as f:
        speeds[model] = json.load(f)
  return {"wall_seconds": wall, "models": speeds, "kernel_choice": measured}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=1, help="seeds per student loss (the demo's default is 3)")
  parser.add_argument("--steps_scale", type=float, default=1.0, help="scales the demo's step counts")
  parser.add_argument("--variants", default="before,after")
  parser.add_argument("--json", default="", help="also write the figures here")
  args = parser.parse_args(argv)
  print(f"CPU {machine.cpu_description()}", flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.variants.split(","):
      results[name] = run_variant(name, VARIANTS[name], os.path.join(tmp, name), args)
  models = sorted({model for result in results.values() for model in result["models"]})
  header = f"{'model':22s}" + "".join(f" | {name + ' first step s':>18s} | {name + ' img/s':>12s}" for name in results)
  print("\n" + header)
  for model in models:
    line = f"{model:22s}"
    for result in results.values():
      speed = result["models"].get(model, {})
      line += f" | {speed.get('first_step_seconds', float('nan')):18.1f} | {speed.get('images_per_second') or 0:12.0f}"
    print(line)
  for name, result in results.items():
    print(f"{name}: wall {result['wall_seconds']:.0f} s")
  if "before" in results and "after" in results:
    before, after = results["before"], results["after"]
    ratios = [after["models"][m]["images_per_second"] / before["models"][m]["images_per_second"]
              for m in models if m in before["models"] and m in after["models"]]
    print(f"after / before: img/s x{min(ratios):.2f}-{max(ratios):.2f} per model; wall time "
          f"x{before['wall_seconds'] / after['wall_seconds']:.2f} faster")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"cpu": machine.cpu_description(), "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
