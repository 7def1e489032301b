"""Input pipeline throughput: ours (grain, kd_landmarks.training.input_pipeline) vs a plain numpy loop.

Prints examples/s and examples/s per CPU core of reading + batching training batches
(``make_train_iterator``), on a synthetic in-memory source and, with ``--data_dir``, on a prepared
array_record split (``python -m kd_landmarks.datasets prepare ...``). The baseline reads the same
examples in the same order with a Python loop and ``np.stack`` in the consuming thread.

With ``--augment`` it also times the on-device augmentation (``kd_landmarks.augment.augment``) at 224 px with
its portable kernels (the bilinear warp as one jax.numpy gather per tap, the noise in jax.numpy) and, on the CPU
where they build, with the native warp and batch noise that CPU training takes (``config.cpu_kernels``,
``kd_landmarks.cpu.kernels``).

  python benchmarks/input_pipeline.py --quick
  python benchmarks/input_pipeline.py --data_dir ~/kd_data --dataset synthetic --augment
  python benchmarks/input_pipeline.py --augment_only --augment_batch_size 64   # e.g. on a GPU
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np
from tqdm import tqdm


def synthetic_source(num_examples: int, image_size: int, num_landmarks: int = 68):
  """In-memory examples with the stored fields of contracts.md (random content)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_examples, image_size, image_size, 3), dtype=np.uint8)
  points = rng.uniform(0, image_size, (num_examples, num_landmarks, 2)).astype(np.float32)
  return [{"image": images[i], "landmarks": points[i], "soft_landmarks": points[i] + 1.0,
           "landmarks_original": points[i] * 2.0, "crop_to_original": np.eye(2, 3, dtype=np.float32),
           "image_id": f"synthetic/{i:06d}", "attributes": np.zeros(6, np.int32),
           "occluded": np.zeros(num_landmarks, np.int32), "index": np.int64(i)}
          for i in range(num_examples)]


def numpy_loop_batches(source, *, global_batch_size, seed, keys):
  """The baseline: the same batch order, read and stacked one example at a time in this thread."""
  from kd_landmarks.training import input_pipeline  # pylint: disable=g-import-not-at-top  (grain: host side only)
  for step in itertools.count():
    indices = input_pipeline.train_batch_indices(step, num_examples=len(source),
                                                 global_batch_size=global_batch_size, seed=seed)
    examples = [source[int(i)] for i in indices]
    yield {key: np.stack([np.asarray(example[key]) for example in examples]) for key in keys}


def examples_per_second(batches, *, num_batches, batch_size, desc, step_seconds=0.0):
  """Throughput of a consumer that takes each batch, then spends ``step_seconds`` (a stand-in for the
  training step, during which the GIL is free) before asking for the next."""
  next(batches)  # warm-up: thread start, first reads
  start = time.perf_counter()
  for _ in tqdm(range(num_batches), desc=desc, leave=False):
    next(batches)
    if step_seconds:
      time.sleep(step_seconds)
  return num_batches * batch_size / (time.perf_counter() - start)


def compare_pipelines(source, *, label, batch_size, num_batches, thread_counts, step_ms=0.0):
  from kd_landmarks.training import input_pipeline  # pylint: disable=g-import-not-at-top
  cores = os.cpu_count() or 1
  keys = ("image", "landmarks", "soft_landmarks", "index")
  step_seconds = step_ms / 1e3
  baseline = examples_per_second(numpy_loop_batches(source, global_batch_size=batch_size, seed=0, keys=keys),
                                 num_batches=num_batches, batch_size=batch_size, desc="numpy loop",
                                 step_seconds=step_seconds)
  step_note = f", consumer step {step_ms:g} ms" if step_ms else ""
  print(f"\n[{label}] {len(source)} examples, batch {batch_size}, {num_batches} batches, {cores} cores"
        f"{step_note}")
  print(f"  {'pipeline':<28}{'examples/s':>12}{'per core':>10}{'vs numpy':>10}")
  print(f"  {'numpy loop (baseline)':<28}{baseline:>12.0f}{baseline / cores:>10.0f}{1.0:>9.2f}x")
  for threads in thread_counts:
    iterator = input_pipeline.make_train_iterator(source, global_batch_size=batch_size, seed=0, keys=keys,
                                                  num_threads=threads)
    ours = examples_per_second(iterator, num_batches=num_batches, batch_size=batch_size,
                               desc=f"grain {threads} threads", step_seconds=step_seconds)
    name = f"ours, grain, {threads} threads"
    print(f"  {name:<28}{ours:>12.0f}{ours / cores:>10.0f}{ours / baseline:>9.2f}x")


def compare_augment_kernels(*, batch_size, stored_size, out_size, repeats):
  """Times augment() with the portable and the native kernels, the warp alone (photometric jitter and noise
  off) and the whole augmentation."""
  import jax  # pylint: disable=g-import-not-at-top  (only this section needs JAX)
  from kd_landmarks import augment  # pylint: disable=g-import-not-at-top
  from kd_landmarks.cpu import kernels, native  # pylint: disable=g-import-not-at-top
  from kd_landmarks.datasets import flips  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch_size, stored_size, stored_size, 3), dtype=np.uint8)
  points = rng.uniform(stored_size * 0.2, stored_size * 0.8, (batch_size, 68, 2)).astype(np.float32)
  sets = {"landmarks": points, "soft_landmarks": points}
  platform = jax.devices()[0].platform
  print(f"\n[augment on {platform}] batch {batch_size}, {stored_size} px -> {out_size} px, median of {repeats}")
  warp_only = augment.AugmentConfig(photometric=False, noise=False)
  variants = {"portable warp": (warp_only, augment.PORTABLE),
              "portable warp + photometric + noise": (augment.AugmentConfig(), augment.PORTABLE)}
  if platform == "cpu" and native.available():  # CPU custom calls.
    native_kernels = augment.AugmentKernels(warp=kernels.warp_native, batch_noise=kernels.batch_noise_native)
    variants.update({"native warp": (warp_only, native_kernels),
                     "native warp + photometric + noise": (augment.AugmentConfig(), native_kernels)})
  else:
    print(f"  (native kernels not timed: "
          f"{native.unavailable_reason() if platform == 'cpu' else 'they run on the CPU only'})")
  timings = {}
  for name, (config, augment_kernels) in variants.items():
    fn = jax.jit(lambda key, x, s, c=config, k=augment_kernels: augment.augment(
        key, x, s, out_size=out_size, flip_permutation=flips.flip_permutation(68), config=c, kernels=k))
    images_on_device, sets_on_device = jax.device_put((images, sets))
    jax.block_until_ready(fn(jax.random.key(0), images_on_device, sets_on_device))  # compile
    runs = []
    for seed in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(jax.random.key(seed), images_on_device, sets_on_device))
      runs.append(time.perf_counter() - start)
    timings[name] = float(np.median(runs))
  for name, seconds in timings.items():
    base = timings[name.replace("native", "portable")]
    print(f"  {name:<36}{seconds * 1e3:>9.2f} ms/batch {batch_size / seconds:>9.0f} images/s "
          f"{base / seconds:>6.2f}x vs portable")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
  parser.add_argument("--data_dir", help="a prepared data dir (python -m kd_landmarks.datasets prepare)")
  parser.add_argument("--dataset", default="synthetic")
  parser.add_argument("--split", default="train")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_batches", type=int, default=50)
  parser.add_argument("--step_ms", type=float, default=0.0,
                      help="also measure with a consumer busy this long per batch (a simulated train step)")
  parser.add_argument("--num_examples", type=int, default=4096, help="in-memory source size")
  parser.add_argument("--augment", action="store_true",
                      help="also time the augmentation, portable and native kernels")
  parser.add_argument("--augment_only", action="store_true", help="only time the augmentation (no grain)")
  parser.add_argument("--augment_batch_size", type=int, default=16)
  args = parser.parse_args()

  if args.quick:
    batch_size, num_batches, num_examples, image_size = 16, 8, 256, 96
    thread_counts = (0, 2)
  else:
    batch_size, num_batches, num_examples, image_size = (args.batch_size, args.num_batches,
                                                         args.num_examples, 320)
    thread_counts = (0, 2, 4, 8)
  if args.augment_only:
    compare_augment_kernels(batch_size=args.augment_batch_size, stored_size=320, out_size=224, repeats=10)
    return
  memory_source = synthetic_source(num_examples, image_size)
  compare_pipelines(memory_source, label=f"in-memory, {image_size} px", batch_size=batch_size,
                    num_batches=num_batches, thread_counts=thread_counts)
  if args.step_ms:
    compare_pipelines(memory_source, label=f"in-memory, {image_size} px", batch_size=batch_size,
                      num_batches=num_batches, thread_counts=thread_counts, step_ms=args.step_ms)
  if args.data_dir:
    from kd_landmarks import datasets  # pylint: disable=g-import-not-at-top  (tfds import is slow)
    source = datasets.load_split(args.dataset, args.split, args.data_dir)
    num_batches_on_disk = min(num_batches, max(1, len(source) // batch_size - 1))
    compare_pipelines(source, label=f"array_record {args.dataset}/{args.split}", batch_size=batch_size,
                      num_batches=num_batches_on_disk, thread_counts=thread_counts)
    if args.step_ms:
      compare_pipelines(source, label=f"array_record {args.dataset}/{args.split}", batch_size=batch_size,
                        num_batches=num_batches_on_disk, thread_counts=thread_counts, step_ms=args.step_ms)
  if args.augment:
    if args.quick:
      compare_augment_kernels(batch_size=2, stored_size=96, out_size=64, repeats=3)
    else:
      compare_augment_kernels(batch_size=args.augment_batch_size, stored_size=320, out_size=224, repeats=5)


if __name__ == "__main__":
  main()
