"""What each CPU training kernel (``config.cpu_kernels``, kd_landmarks/cpu) buys on the demo's training loop.

Times the demo teacher's compiled train step (mobilenet_v2_tiny, 96 px stored crops augmented to 64 px,
batch 32, the demo's augmentation, L2) as ``fit`` runs it, for each configuration below, every one in a
fresh process (each compiles its own step from scratch), the configurations taken in turn round after
round so that a slow spell of a shared machine slows all of them alike:

  portable            --config.cpu_kernels=False: the models' portable kernels (lax grouped and 1x1
                      convolutions, flax BatchNorm), the jax.numpy augmentation
  cpu_xla             the CPU kernels in their XLA forms (what a machine without a C++ compiler gets)
  cpu                 the default: the CPU kernels with every native piece
  cpu - <piece>       the default with one piece put back to its XLA or portable form

and prints img/s (median over rounds) and each configuration's ratio to the default. A piece earns its place
where the default is faster than the default without it.

  python benchmarks/cpu_kernels.py                 # ~6 min on 2 cores (3 rounds)
  python benchmarks/cpu_kernels.py --rounds 1 --steps 60
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> the pieces of the default put back to their XLA / portable form (see configuration()).
CONFIGURATIONS = {
    "portable": None,
    "cpu_xla": ("native",),
    "cpu": (),
    "cpu - native depthwise gradient": ("native_depthwise",),
    "cpu - native BatchNorm": ("native_norm",),
    "cpu - native augmentation": ("native_augment",),
    "cpu - 1x1 as dot": ("dot",),
    "cpu - shifted depthwise": ("shifted_depthwise",),
    "cpu - closed-form BatchNorm": ("closed_form_norm",),
}
BATCH, STORED, OUT, LANDMARKS = 32, 96, 64, 68


def configuration(removed):
  """(models.Kernels, augment.AugmentKernels) of a configuration."""
  from kd_landmarks import augment  # pylint: disable=g-import-not-at-top  (in the worker process only)
  from kd_landmarks import cpu
  from kd_landmarks import models
  from kd_landmarks.cpu import kernels
  if removed is None:
    return models.PORTABLE, augment.PORTABLE
  default = cpu.training_kernels(use_native="native" not in removed)
  model, augment_kernels = default.model, default.augment
  fields = {}
  if "native_depthwise" in removed:
    fields["depthwise_conv"] = kernels.depthwise_conv_xla
  if "shifted_depthwise" in removed:
    fields["depthwise_conv"] = models.PORTABLE.depthwise_conv
  if "native_norm" in removed:
    fields["batch_norm_train"] = kernels.batch_norm_train_xla
  if "closed_form_norm" in removed:
    fields["batch_norm_train"] = None
  if "dot" in removed:
    fields["pointwise_conv"] = models.PORTABLE.pointwise_conv
  model = models.Kernels(**{**{f: getattr(model, f) for f in ("depthwise_conv", "pointwise_conv",
                                                                "batch_norm_train")}, **fields})
  if "native_augment" in removed:
    augment_kernels = augment.PORTABLE
  return model, augment_kernels


def worker(name: str, steps: int, warmup: int) -> dict:
  """Runs in its own process: compiles the step of configuration ``name`` and times ``steps`` steps."""
  removed = CONFIGURATIONS[name]
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from kd_landmarks import config_lib, losses, models  # pylint: disable=g-import-not-at-top
  from kd_landmarks.datasets import flips  # pylint: disable=g-import-not-at-top
  from kd_landmarks.training import parallel, train  # pylint: disable=g-import-not-at-top
  model_kernels, augment_kernels = configuration(removed)
  demo = config_lib.base_config()
  demo.augment.max_rotation_degrees = 15.0  # configs/demo.py
  model = models.create_model("mobilenet_v2_tiny", num_landmarks=LANDMARKS, kernels=model_kernels, bn_momentum=0.9)
  spec = train.StepSpec(target="landmarks", loss_fn=losses.get_student_loss("l2"), loss_variant="paper",
                        image_size=OUT, flip_permutation=flips.flip_permutation(LANDMARKS),
                        augment_config=config_lib.AugmentConfig(**demo.augment.to_dict()),
                        learning_rate_fn=lambda step: 3e-3, augment_kernels=augment_kernels)
  state = train.create_train_state(jax.random.PRNGKey(0), model, OUT, optax.adam(3e-3))
  mesh = parallel.make_mesh()
  step = train.compile_train_step(spec, mesh)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(4):  # Faces of 40-56 px in the 96 px crop, as the synthetic set's.
    centre = rng.uniform(44, 52, (BATCH, 1, 2))
    points = centre + rng.uniform(-24, 24, (BATCH, LANDMARKS, 2))
    host = {"image": rng.integers(0, 256, (BATCH, STORED, STORED, 3), dtype=np.uint8),
            "landmarks": points.astype(np.float32)}
    batches.append(parallel.shard_host_batch(train.step_batch(spec, host), mesh))
  started = time.perf_counter()
  state, metrics = step(state, batches[0], jax.random.PRNGKey(1))
  jax.block_until_ready(metrics)
  first = time.perf_counter() - started
  for i in range(warmup):
    state, metrics = step(state, batches[i % 4], jax.random.fold_in(jax.random.PRNGKey(2), i))
  jax.block_until_ready(metrics)
  started = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, batches[i % 4], jax.random.fold_in(jax.random.PRNGKey(3), i))
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - started
  return {"name": name, "first_step_seconds": round(first, 2), "images_per_second": round(steps * BATCH / seconds, 1)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=150, help="timed steps per configuration and round")
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker, args.steps, args.warmup)))
    return {}
  from kd_landmarks.training import machine  # pylint: disable=g-import-not-at-top  (no JAX)
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CONFIGURATIONS)
  unknown = sorted(set(names) - set(CONFIGURATIONS))
  if unknown:
    sys.exit(f"error: unknown configuration(s) {unknown}; choose from {list(CONFIGURATIONS)}")
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # glibc's malloc, as a fresh machine has.
  results = {name: [] for name in names}
  for round_index in range(args.rounds):
    for name in names:
      output = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, "--steps",
                               str(args.steps), "--warmup", str(args.warmup)], capture_output=True, text=True,
                              env=env, cwd=ROOT)
      if output.returncode != 0:
        sys.exit(f"error: configuration {name!r} failed:\n{output.stderr[-3000:]}")
      record = json.loads(output.stdout.strip().splitlines()[-1])
      results[name].append(record)
      print(f"round {round_index + 1}/{args.rounds} {name:34s} {record['images_per_second']:8.1f} img/s "
            f"(first step {record['first_step_seconds']} s)", flush=True)
  summary = {name: statistics.median(r["images_per_second"] for r in records) for name, records in results.items()}
  reference = summary.get("cpu")
  cpu = machine.cpu_description()
  print(f"\nCPU: {cpu['name']}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; "
        f"median of {args.rounds} round(s), {args.steps} steps of batch {BATCH} each\n")
  print("| configuration | demo teacher loop img/s | ratio to cpu |")
  print("|---|---|---|")
  for name, value in summary.items():
    ratio = f"{value / reference:.2f}" if reference else "-"
    print(f"| {name} | {value:.0f} | {ratio} |")
  report = {"cpu": cpu, "rounds": args.rounds, "steps": args.steps, "batch": BATCH, "median_images_per_second": summary,
            "runs": results}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
