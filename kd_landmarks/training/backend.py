"""The platform a run uses, resolved once at start from what JAX actually has, and what follows from it.

``config.platform`` is ``'auto'`` (the default: ``jax.default_backend()``), ``'cpu'``, ``'gpu'`` or ``'tpu'``;
``config.dtype`` ``'auto'`` (float32 on CPU, bfloat16 compute on accelerators; parameters stay float32) or an
explicit dtype; ``config.prefetch`` ``-1`` (auto: 2 host batches ahead on CPU, 4 on accelerators) or a count.
:func:`resolve` turns them into concrete values at run time, from the resolved platform, so that
``configs/300w.py:platform=gpu`` and ``--config.platform=gpu`` give the same run (the config file only records
the request). Asking for ``gpu``/``tpu`` where JAX has no such backend stops at once, naming the extra to
install. ``cpu`` restricts JAX to its CPU backend (``jax_platforms``) before any device is used, so that on a
GPU host the arrays, the mesh and the choice of the CPU training kernels (``config.cpu_kernels``, which reads
``jax.default_backend()``) all agree on the CPU.
"""
from __future__ import annotations

import copy
import logging

import jax
import ml_collections
from jax._src import xla_bridge  # Private, but JAX has no public "are backends initialised" query.

from kd_landmarks import config_lib
from kd_landmarks import errors

# What to install for a backend JAX lacks (setup.py's extras; README "Installing for a GPU or a TPU").
INSTALL_HINTS = {
    "gpu": 'pip install -e ".[gpu]"  (NVIDIA, CUDA 12 wheels; ".[cuda13]" for a CUDA 13 driver)',
    "tpu": 'pip install -e ".[tpu]"  (Cloud TPU VM)',
}
DTYPES = ("float32", "bfloat16", "float16")
ACCELERATOR_DTYPE = "bfloat16"
PREFETCH = {"cpu": 2, "gpu": 4, "tpu": 4}   # Host batches read ahead: deeper where the step is fast.
# jax.default_backend() names: the CUDA/ROCm clients report 'gpu' on current JAX; older ones their own name.
_BACKEND_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


class PlatformUnavailableError(errors.UserError, RuntimeError):
  """config.platform asks for a backend this JAX installation does not have."""


def select(requested: str) -> str:
  """The concrete platform for ``requested`` ('auto', 'cpu', 'gpu', 'tpu'); initialises JAX's backends.

  'cpu' restricts JAX to the CPU first (when nothing has initialised a backend yet). 'gpu'/'tpu' must be
  JAX's default backend, else :class:`PlatformUnavailableError` names the extra to install.
  """
  if requested not in config_lib.PLATFORMS:
    raise ValueError(f"config.platform: unknown platform {requested!r}; choose from {config_lib.PLATFORMS}")
  if requested == "cpu" and not _backends_initialized():
    jax.config.update("jax_platforms", "cpu")
  actual = default_backend()
  if requested in ("auto", actual):
    return actual
  present = sorted({_BACKEND_ALIASES.get(b, b) for b in _backend_names()})
  restricted = jax.config.jax_platforms
  if requested == "cpu":  # Backends were initialised before select() could restrict them (in-process use).
    raise PlatformUnavailableError(
        f"config.platform='cpu' but JAX already runs on {actual!r} in this process; start a new process "
        "with JAX_PLATFORMS=cpu, or use platform=auto")
  why = f" (JAX_PLATFORMS={restricted!r} restricts it)" if restricted else ""
  raise PlatformUnavailableError(
      f"config.platform={requested!r} but JAX has no {requested} backend{why}: it has {present}, default "
      f"{actual!r} (jax {jax.__version__}). Install it with: {INSTALL_HINTS[requested]}; or run with "
      f"--config.platform=auto (or :platform={actual}) to use what is there.")


def resolve_settings(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``platform`` and the dtype and prefetch that follow from it.

  Pure (no JAX call): an explicit dtype or prefetch (``--config.dtype=float32`` to rule out a bfloat16
  overflow on a GPU) is kept; 'auto' / -1 become the platform's defaults.
  """
  if platform not in PREFETCH:
    raise ValueError(f"resolve_settings: platform must be one of {tuple(PREFETCH)}, got {platform!r}")
  dtype = str(config.dtype)
  if dtype != "auto" and dtype not in DTYPES:
    raise ValueError(f"config.dtype: unknown dtype {dtype!r}; choose 'auto' or one of {DTYPES}")
  resolved = copy.deepcopy(config)  # Keeps the lock: a typo stays an error in what the run reads.
  resolved.platform = platform
  if dtype == "auto":
    resolved.dtype = "float32" if platform == "cpu" else ACCELERATOR_DTYPE
  if int(config.prefetch) < 0:
    resolved.prefetch = PREFETCH[platform]
  return resolved


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """:func:`select` then :func:`resolve_settings`: the config a run uses. Idempotent."""
  return resolve_settings(config, select(str(config.platform)))


def default_backend() -> str:
  name = jax.default_backend()
  return _BACKEND_ALIASES.get(name, name)


def describe() -> str:
  """'gpu: 8 x NVIDIA H200 (1 process, 8 local)' for the start-up log."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f"{default_backend()}: {len(devices)} x {', '.join(kinds)} ({jax.process_count()} process(es), "
          f"{jax.local_device_count()} local)")


def log_resolved(config: ml_collections.ConfigDict) -> str:
  """Logs (and returns) the resolved platform, devices, dtype and prefetch."""
  line = f"platform {describe()}; dtype {config.dtype}, prefetch {config.prefetch}"
  logging.info("%s", line)
  return line


def _backends_initialized() -> bool:
  return xla_bridge.backends_are_initialized()


def _backend_names() -> list[str]:
  return list(xla_bridge.backends())
