"""CPU kernel choices by measurement: what a model's ``'auto'`` implementations become for training.

On CPU each model has three interchangeable implementations with identical mathematics and parameters:
``depthwise_impl`` (:mod:`kd_landmarks.models.depthwise`), ``norm_impl`` and ``pointwise_impl``
(:mod:`kd_landmarks.models.layers`). Which is fastest depends on the CPU, not only on the backend's name:
on the Intel Xeon (AVX-512) of README's Performance section the native BatchNorm kernels take the student's
train step from 0.92-0.95x to 1.12-1.15x PyTorch's, while on an AMD EPYC (AVX2 only) the same choice made
it 27% slower than XLA's reductions (issue 14's measurement; a code-generation trap of GCC's Zen tuning, fixed in
native/common.h, was behind it). A rule per backend cannot know such things about the machine at hand, so, as
cuDNN's autotuner and XLA's own do, the choice is measured there at first use and cached:

* the train-mode forward and backward of the model (what the kernels change) at the run's per-device batch,
  image size and dtype is timed for the rule-based choice (:func:`rule_choice`) and, one dimension at a
  time, for each alternative (greedy coordinate search: 5 compilations instead of 12 for the full grid);
  within a dimension the candidates are timed in turn, several rounds, and the median decides; a candidate
  replaces the current one only when at least ``MIN_GAIN`` faster, so that noise never flips a choice;
* the result is written to ``kernel_choices.json`` in the native kernels' cache directory, keyed by the
  machine (CPU name, core count, the native library's build key: sources, jax/jaxlib, compiler, ISA flags)
  and the shape class (model, its other fields, image size, per-device batch, dtype); a later run with the
  same key reads it without measuring.

Off CPU the rules hold (accelerators have one fast path each). ``choose(..., mode='rules')`` skips the
measurement. Pure choice of implementation: parameters, outputs and gradients are the same whichever wins
(tests/test_models.py checks the implementations against each other).
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kd_landmarks import machine
from kd_landmarks.models import depthwise
from kd_landmarks.models import layers
from kd_landmarks import native

KERNEL_FIELDS = ("depthwise_impl", "norm_impl", "pointwise_impl")
MODES = ("measure", "rules")
CACHE_FILE = "kernel_choices.json"
# A challenger must be this much faster (median) to replace the current choice: run-to-run noise of the
# step on a quiet 2-core machine is 1-3%, so smaller differences are not evidence.
MIN_GAIN = 0.03
ROUNDS = 5


def rule_choice() -> dict:
  """The choice without measurement: the models' ``'auto'`` rules on the current backend."""
  return {"depthwise_impl": depthwise.resolve_impl("auto"), "norm_impl": layers.resolve_norm_impl("auto"),
          "pointwise_impl": layers.resolve_pointwise_impl("auto")}


# Never timed on CPU: XLA's grouped convolution, whose CPU gradient is a generic loop, 6.2x slower than
# 'shifted_native' for the demo's student (165 vs 26 ms at 64 px, batch 32; 4-8x at 224 px in
# benchmarks/models.py), which benchmarks/kernels.py keeps showing next to the choice.
NOT_TIMED_ON_CPU = {"depthwise_impl": ("lax",)}


def candidates() -> dict:
  """The implementations worth timing on this CPU, per field (the native ones where they build)."""
  has_native = native.available()
  return {
      "depthwise_impl": [i for i in depthwise.DEPTHWISE_IMPLS
                         if i not in ("auto",) + NOT_TIMED_ON_CPU["depthwise_impl"]
                         and (has_native or i != "shifted_native")],
      "norm_impl": [i for i in layers.NORM_IMPLS if i != "auto" and (has_native or i != "native")],
      "pointwise_impl": [i for i in layers.POINTWISE_IMPLS if i != "auto"],
  }


def shape_class(model_name: str, num_landmarks: int, overrides: Mapping[str, Any] | None = None) -> dict:
  """What, besides the kernels, makes a network: part of the cache key (training and benchmarks share it)."""
  return {"model": model_name, "num_landmarks": int(num_landmarks),
          "overrides": {k: v for k, v in dict(overrides or {}).items() if k not in KERNEL_FIELDS}}


def choose(build_model: Callable[..., Any], *, shape_class: Mapping[str, Any], image_size: int,
           batch_size: int, dtype=jnp.float32, requested: Mapping[str, str] | None = None,
           mode: str = "measure", cache_path: str | None = None, progress: bool = True) -> dict:
  """Concrete ``{field: impl}`` for the fields of ``KERNEL_FIELDS`` left at ``'auto'`` in ``requested``.

  Args:
    build_model: ``build_model(**kernel_fields)`` -> a flax module taking ``[B, S, S, 3]`` images.
    shape_class: what, besides the kernels, makes the model (name, overrides): part of the cache key.
    image_size, batch_size, dtype: the per-device input the training step sees.
    requested: the model's kernel fields as configured; fields not 'auto' are kept as they are.
    mode: 'measure' (time on this machine at first use, then cached) or 'rules' (no measurement).
    cache_path: the JSON cache (default: ``kernel_choices.json`` in the native kernels' cache directory).
  """
  if mode not in MODES:
    raise ValueError(f"config.kernel_choice: unknown mode {mode!r}; choose from {MODES}")
  requested = {field: str(dict(requested or {}).get(field, "auto")) for field in KERNEL_FIELDS}
  free = [field for field in KERNEL_FIELDS if requested[field] == "auto"]
  fixed = {field: impl for field, impl in requested.items() if impl != "auto"}
  rules = {**rule_choice(), **fixed}
  if mode == "rules" or not free or jax.default_backend() != "cpu":
    return rules
  key = cache_key(shape_class=shape_class, image_size=image_size, batch_size=batch_size, dtype=dtype,
                  fixed=fixed)
  path = cache_path or default_cache_path()
  stored = _read_cache(path).get(key) if path else None
  if stored is not None:
    return {**stored["choice"], **fixed}
  started = time.time()
  choice, times = measure(build_model, image_size=image_size, batch_size=batch_size, dtype=dtype,
                          start=rules, free=free, progress=progress)
  logging.info("kernel choice for %s at %d px, batch %d: %s (measured in %.0f s; the rules would give %s)",
               shape_class.get("model", "model"), image_size, batch_size, choice, time.time() - started,
               {field: rules[field] for field in free})
  if path:
    _update_cache(path, key, {"choice": choice, "rules": rules, "milliseconds": times,
                              "shape_class": dict(shape_class), "image_size": image_size,
                              "batch_size": batch_size, "dtype": jnp.dtype(dtype).name,
                              "cpu": machine.cpu_description(), "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
  return choice


def measure(build_model, *, image_size: int, batch_size: int, dtype, start: Mapping[str, str], free,
            rounds: int = ROUNDS, progress: bool = False) -> tuple[dict, dict]:
  """Greedy coordinate search over the ``free`` fields from ``start``; returns (choice, {combo: ms})."""
  images = jax.random.uniform(jax.random.PRNGKey(0), (batch_size, image_size, image_size, 3), jnp.float32)
  compiled = {}
  times: dict[str, float] = {}
  # The parameters do not depend on the implementations: initialised once, with XLA's (no native build).
  plain = {"depthwise_impl": "shifted", "norm_impl": "xla", "pointwise_impl": "dot"}
  variables = jax.jit(lambda rng: build_model(**plain).init(rng, images[:1], train=False))(jax.random.PRNGKey(0))
  all_candidates = candidates()
  current = dict(start)
  for field in free:
    options = [current] + [{**current, field: impl} for impl in all_candidates[field] if impl != current[field]]
    if len(options) == 1:
      continue
    new = [option for option in options if combo_name(option) not in compiled]
    if progress:
      logging.info("kernel choice: compiling %s", ", ".join(combo_name(option) for option in new))
    # XLA compiles with the GIL released: the candidates of a field compile at once (wall time ~halved on 2
    # cores); the timings below run one at a time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(new) or 1) as pool:
      for option, run in zip(new, pool.map(
          lambda option: _train_gradient(build_model(**option), variables, images, dtype), new)):
        compiled[combo_name(option)] = run
    for option in new:
      compiled[combo_name(option)]()  # Warm-up outside the timings.
    samples = {combo_name(option): [] for option in options}
    for _ in range(rounds):
      for option in options:  # In turn, so that a slow spell of the machine hits every candidate alike.
        run = compiled[combo_name(option)]
        begin = time.perf_counter()
        run()
        samples[combo_name(option)].append(time.perf_counter() - begin)
    medians = {name: float(np.median(values)) for name, values in samples.items()}
    times.update({name: round(1000 * value, 3) for name, value in medians.items()})
    best = min(options, key=lambda option: medians[combo_name(option)])
    if medians[combo_name(best)] < (1 - MIN_GAIN) * medians[combo_name(current)]:
      current = best
  return current, times


def to_indices(choice: Mapping[str, str]) -> np.ndarray:
  """``choice`` as positions in the implementation tuples (what a multi-process broadcast can carry)."""
  return np.array([_IMPLS[field].index(choice[field]) for field in KERNEL_FIELDS], np.int32)


def from_indices(indices) -> dict:
  return {field: _IMPLS[field][int(i)] for field, i in zip(KERNEL_FIELDS, np.asarray(indices))}


_IMPLS = {"depthwise_impl": depthwise.DEPTHWISE_IMPLS, "norm_impl": layers.NORM_IMPLS,
          "pointwise_impl": layers.POINTWISE_IMPLS}


def combo_name(choice: Mapping[str, str]) -> str:
  return ",".join(f"{field}={choice[field]}" for field in KERNEL_FIELDS)


def cache_key(*, shape_class, image_size, batch_size, dtype, fixed) -> str:
  """Machine and shape class, hashed: the same key on the same machine and software, another elsewhere."""
  cpu = machine.cpu_description()
  try:
    build = native.cache_key(native.compiler() or "none")
  except Exception as error:  # pylint: disable=broad-except (an unhashable toolchain must not stop training)
    build = f"unavailable: {type(error).__name__}"
  parts = {"cpu": cpu["name"], "cores": cpu["cores"], "native_build": build, "jax": jax.__version__,
           "shape_class": dict(shape_class), "image_size": int(image_size), "batch_size": int(batch_size),
           "dtype": jnp.dtype(dtype).name, "fixed": dict(fixed)}
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def default_cache_path() -> str | None:
  """``kernel_choices.json`` in the native kernels' cache directory; None where none is writable."""
  try:
    return os.path.join(native.cache_dir(), CACHE_FILE)
  except native.NativeUnavailableError:
    return None


def _train_gradient(model, variables, images, dtype) -> Callable[[], None]:
  """A no-argument function running the train-mode forward and backward of ``model`` on ``images``."""
  params, batch_stats = variables["params"], variables.get("batch_stats", {})

  def loss(params, batch_stats, x):
    y, updates = model.apply({"params": params, "batch_stats": batch_stats}, x.astype(dtype), train=True,
                             mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
    return jnp.mean(jnp.square(y.astype(jnp.float32))), updates

  gradient = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, batch_stats, images).compile()
  return lambda: jax.block_until_ready(gradient(params, batch_stats, images))


def _read_cache(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as error:  # A damaged cache costs a measurement, never a run.
    logging.warning("kernel choice cache %s unreadable (%s); measuring again", path, error)
    return {}


def _update_cache(path: str, key: str, entry: dict) -> None:
  """Adds ``entry`` under ``key``; concurrent writers (test workers, the processes of a host) serialise on a
  lock file and each re-reads before writing, so that no entry is lost."""
  try:
    with open(path + ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      entries = _read_cache(path)
      entries[key] = entry
      temporary = f"{path}.{os.getpid()}.tmp"
      with open(temporary, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
      os.replace(temporary, path)
  except OSError as error:
    logging.warning("kernel choice not cached (%s): it will be measured again next time", error)
