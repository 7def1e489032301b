"""The demo's training speed, as a user sees it: the portable kernels against the CPU kernels, same machine, same run.

Runs ``python -m kd_landmarks.main --config configs/demo.py`` (one seed per student loss unless ``--seeds``)
once per variant, each in its own fresh workdir (so each renders its data and compiles from scratch), in turn:

  portable     --config.cpu_kernels=False: the models' and the augmentation's portable kernels (grouped
               lax.conv depthwise, 1x1 lax.conv, flax's BatchNorm, the jax.numpy warp and noise) and glibc's
               malloc as it comes, what training on an accelerator computes
  cpu_kernels  the defaults: the CPU training kernels of kd_landmarks/cpu (native where a compiler builds
               them, else their XLA forms) and glibc's malloc keeping freed memory

and prints, per model, the first step's seconds (compilation included) and the training loop's img/s after it
(``train_speed.json``, validation and checkpoints included), which kernels trained it (``model.json``'s
``train_kernels``), the wall time of each variant, and the ratios.

The environment reaches both runs: ``LD_PRELOAD`` (e.g. tcmalloc), or another CPU's build timed here with
``KD_LANDMARKS_NATIVE_MARCH=znver3 XLA_FLAGS=--xla_cpu_max_isa=AVX2``. Arguments of the form
``--config.KEY=VALUE`` after the benchmark's own go to both runs.

  python benchmarks/demo.py                    # the demo's step counts, one seed per student loss
  python benchmarks/demo.py --steps_scale 0.25 # a quicker look (fewer steps: the first step weighs more)
  python benchmarks/demo.py --steps_scale 0.02 --config.synthetic.num_train=128 --config.synthetic.num_test=32
                                               # checks that it runs
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
    "portable": ["--config.cpu_kernels=False"],
    "cpu_kernels": [],
}


def run_variant(name, flags, workdir, args, extra) -> dict:
  command = [sys.executable, "-m", "kd_landmarks.main", "--config", "configs/demo.py", "--workdir", workdir,
             f"--config.student_seeds={args.seeds}",
             f"--config.teacher.num_train_steps={max(2, int(800 * args.steps_scale))}",
             f"--config.student.num_train_steps={max(2, int(600 * args.steps_scale))}", *flags, *extra]
  print(f"[{name}] {' '.join(command[1:])}", flush=True)
  started = time.time()
  completed = subprocess.run(command, cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wall = time.time() - started
  if completed.returncode != 0:
    sys.exit(f"[{name}] failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
  speeds, kernels = {}, {}
  for model in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, model, "train_speed.json")
    if os.path.exists(path):
      with open(path) as f:
        speeds[model] = json.load(f)
      with open(os.path.join(workdir, model, "model.json")) as f:
        kernels[model] = json.load(f).get("train_kernels", "?")
  for description in sorted(set(kernels.values())):
    print(f"[{name}] trained with: {description}", flush=True)
  return {"wall_seconds": wall, "models": speeds, "train_kernels": kernels}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=1, help="seeds per student loss (the demo's default is 3)")
  parser.add_argument("--steps_scale", type=float, default=1.0, help="scales the demo's step counts")
  parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, among {', '.join(VARIANTS)}")
  parser.add_argument("--json", default="", help="also write the figures here")
  args, extra = parser.parse_known_args(argv)
  unknown = [arg for arg in extra if not arg.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (only --config.KEY=VALUE goes to the runs)")
  names = [name for name in args.variants.split(",") if name]
  if not names or set(names) - set(VARIANTS):
    parser.error(f"--variants: choose among {', '.join(VARIANTS)}")
  print(f"CPU {machine.cpu_description()}", flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      results[name] = run_variant(name, VARIANTS[name], os.path.join(tmp, name), args, extra)
  models = sorted({model for result in results.values() for model in result["models"]})
  header = f"{'model':22s}" + "".join(f" | {name + ' first step s':>24s} | {name + ' img/s':>17s}" for name in results)
  print("\n" + header)
  for model in models:
    line = f"{model:22s}"
    for result in results.values():
      speed = result["models"].get(model, {})
      line += f" | {speed.get('first_step_seconds', float('nan')):24.1f} | {speed.get('images_per_second') or 0:17.0f}"
    print(line)
  for name, result in results.items():
    print(f"{name}: wall {result['wall_seconds']:.0f} s")
  if "portable" in results and "cpu_kernels" in results:
    portable, fast = results["portable"], results["cpu_kernels"]
    ratios = [fast["models"][m]["images_per_second"] / portable["models"][m]["images_per_second"]
              for m in models if m in portable["models"] and m in fast["models"]
              and fast["models"][m]["images_per_second"] and portable["models"][m]["images_per_second"]]
    if ratios:
      print(f"cpu_kernels / portable: img/s x{min(ratios):.2f}-{max(ratios):.2f} per model; wall time "
            f"x{portable['wall_seconds'] / fast['wall_seconds']:.2f} faster")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"cpu": machine.cpu_description(), "args": vars(args), "config_flags": extra, "results": results},
                f, indent=1)


if __name__ == "__main__":
  main()
