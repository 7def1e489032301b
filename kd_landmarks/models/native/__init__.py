"""Native CPU kernels for what XLA's CPU backend does slowly, called through the XLA FFI.

* ``depthwise_cpu.cc``: the depthwise-convolution weight gradient, which XLA computes as k*k separate
  passes over the activations (see :mod:`kd_landmarks.models.depthwise`) and this kernel in one.
* ``batch_norm_cpu.cc``: training BatchNorm's reductions, the batch moments (forward) and
  ``sum(dz)``, ``sum(dz * xhat)`` (backward) in one pass each, accumulated in float64
  (see :func:`kd_landmarks.models.layers.batch_norm_act_train`).

The C++ sources ship with the package and are compiled on first use into one library with the machine's C++
compiler (``$CXX``, else ``c++``/``g++``) against the XLA FFI headers that jaxlib ships
(``jax.ffi.include_dir()``), then cached: nothing is downloaded. The cache key covers the source, the
jaxlib version, the flags and the CPU's instruction-set flags (``-march=native``).

Environment:
  KD_LANDMARKS_NATIVE=0           never build or use the kernels (the XLA implementations are used).
  KD_LANDMARKS_NATIVE_CACHE=DIR   where compiled libraries go (default ~/.cache/kd_landmarks/native).

Where no compiler works, :func:`available` is False, :func:`unavailable_reason` says why, and
``depthwise_impl='auto'`` and ``norm_impl='auto'`` fall back to the XLA implementations.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

_DIRECTORY = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_DIRECTORY, name) for name in ("depthwise_cpu.cc", "batch_norm_cpu.cc"))
HEADERS = (os.path.join(_DIRECTORY, "common.h"),)
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
WEIGHT_GRADIENT_TARGET = "kd_landmarks_depthwise_weight_gradient"
MOMENTS_TARGET = "kd_landmarks_batch_norm_moments"
GRAD_SUMS_TARGET = "kd_landmarks_batch_norm_grad_sums"
_SYMBOLS = {WEIGHT_GRADIENT_TARGET: "KdDepthwiseWeightGradient", MOMENTS_TARGET: "KdBatchNormMoments",
            GRAD_SUMS_TARGET: "KdBatchNormGradSums"}
# Activations whose derivative the BatchNorm backward kernel recomputes (codes of batch_norm_cpu.cc).
GRAD_SUMS_ACTIVATIONS = {None: 0, "relu6": 1, "swish": 2}


class NativeUnavailableError(RuntimeError):
  """The native kernels were asked for explicitly but cannot be built or loaded here."""


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cache_dir() -> str:
  return os.path.expanduser(os.environ.get("KD_LANDMARKS_NATIVE_CACHE", "~/.cache/kd_landmarks/native"))


def _build(compiler: str) -> str:
  """Compiles the sources (once per cache key) into one shared library and returns its path."""
  texts = []
  for path in SOURCES + HEADERS:
    with open(path, "rb") as f:
      texts.append(f.read())
  key = hashlib.sha256(b"\0".join([
      *texts, jax.__version__.encode(), " ".join(CXX_FLAGS).encode(), compiler.encode(),
      _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
  directory = _cache_dir()
  library = os.path.join(directory, f"kd_landmarks_cpu_{key}.so")
  if os.path.exists(library):
    return library
  os.makedirs(directory, exist_ok=True)
  # Build into a temporary name and rename: concurrent processes never load a half-written library.
  handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
  os.close(handle)
  command = [compiler, *CXX_FLAGS, "-I", jax.ffi.include_dir(), *SOURCES, "-o", partial]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
      raise NativeUnavailableError(
          f"compiling {' and '.join(SOURCES)} failed ({' '.join(command)}):\n{result.stderr.strip()[-2000:]}")
    os.replace(partial, library)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return library


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
  """Builds, loads and registers the kernels once per process: (available, reason if not)."""
  if os.environ.get("KD_LANDMARKS_NATIVE", "1") == "0":
    return False, "disabled by KD_LANDMARKS_NATIVE=0"
  compiler = _compiler()
  if compiler is None:
    return False, "no C++ compiler found (set $CXX or install g++)"
  try:
    library = ctypes.CDLL(_build(compiler))
    for target, symbol in _SYMBOLS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  except (NativeUnavailableError, OSError, subprocess.SubprocessError, AttributeError) as error:
    logging.warning("kd_landmarks native CPU kernels unavailable, using XLA's: %s", error)
    return False, str(error)
  return True, ""


def available() -> bool:
  """Whether the native CPU kernels are built and registered (builds them on the first call)."""
  return _load()[0]


def unavailable_reason() -> str:
  """Why :func:`available` is False ('' when it is True)."""
  return _load()[1]


def require(alternative: str) -> None:
  """Raises :class:`NativeUnavailableError` with the reason and ``alternative`` when the kernels cannot be used."""
  ok, reason = _load()
  if not ok:
    raise NativeUnavailableError(
        f"native CPU kernels unavailable: {reason}. Use {alternative} (pure XLA) instead.")


def require_requested(setting: str, *, off_cpu: str, fallback: str) -> None:
  """Checks a native implementation asked for by name (``setting``, e.g. ``"norm_impl='native'"``).

  Raises ValueError naming ``off_cpu`` on a non-CPU backend (the kernels are CPU custom calls), and
  :class:`NativeUnavailableError` naming ``fallback`` where the kernels cannot be built.
  """
  backend = jax.default_backend()
  if backend != "cpu":
    raise ValueError(f"{setting} is CPU-only (its kernels are CPU custom calls); use {off_cpu} on {backend}")
  require(fallback)


def depthwise_weight_gradient(x, grad_out, kernel_size: tuple[int, int], stride: int,
                              pads: tuple[int, int]):
  """``[kh, kw, 1, C]`` float32: ``sum_{b,oh,ow} grad_out[b,oh,ow,c] * x[b, s*oh+i-pt, s*ow+j-pl, c]``.

  The weight gradient of :func:`kd_landmarks.models.depthwise.depthwise_conv` (padding ``pads`` =
  (top, left) of TensorFlow's SAME; padded positions contribute zero). ``x`` ``[B, H, W, C]`` and
  ``grad_out`` ``[B, ceil(H/s), ceil(W/s), C]``, both float32, on the CPU.
  """
  require("depthwise_impl='shifted_vjp'")
  kh, kw = kernel_size
  call = jax.ffi.ffi_call(WEIGHT_GRADIENT_TARGET,
                          jax.ShapeDtypeStruct((kh, kw, 1, x.shape[-1]), np.float32),
                          vmap_method="sequential")
  return call(x, grad_out, stride=np.int64(stride), kh=np.int64(kh), kw=np.int64(kw),
              pad_top=np.int64(pads[0]), pad_left=np.int64(pads[1]))


def batch_norm_moments(x):
  """``(mean, variance)`` over all axes but the last of float32 ``x``, each ``[C]`` float32.

  Computed in one pass with float64 totals; the variance is ``E[x^2] - E[x]^2`` (as flax's BatchNorm
  computes it) and may be slightly negative for a constant channel: clip it before use.
  """
  require("norm_impl='xla'")
  channels = x.shape[-1]
  call = jax.ffi.ffi_call(MOMENTS_TARGET, jax.ShapeDtypeStruct((2, channels), np.float32),
                          vmap_method="sequential")
  moments = call(x.reshape(-1, channels))
  return moments[0], moments[1]


def batch_norm_grad_sums(grad_y, x, *, mean, inv, scale, bias, activation):
  """``(sum(dz), sum(dz * xhat))`` over all axes but the last, each ``[C]`` float32, in one pass.

  ``xhat = (x - mean) * inv``, ``z = xhat * scale + bias`` and ``dz = grad_y * act'(z)`` for
  ``activation`` in :data:`GRAD_SUMS_ACTIVATIONS` (relu6's derivative is 0 at the kinks, as
  ``jax.nn.relu6``'s; swish's from a vectorised exp with about float32 rounding). ``grad_y`` and ``x`` float32 of one shape; the rest ``[C]``.
  """
  require("norm_impl='xla'")
  if activation not in GRAD_SUMS_ACTIVATIONS:
    raise ValueError(f"batch_norm_grad_sums supports activations {list(GRAD_SUMS_ACTIVATIONS)}, "
                     f"got {activation!r}")
  channels = x.shape[-1]
  a = inv * scale
  stats = jnp.stack([a, bias - mean * a, mean, inv]).astype(jnp.float32)
  call = jax.ffi.ffi_call(GRAD_SUMS_TARGET, jax.ShapeDtypeStruct((2, channels), np.float32),
                          vmap_method="sequential")
  sums = call(grad_y.reshape(-1, channels), x.reshape(-1, channels), stats,
              activation=np.int64(GRAD_SUMS_ACTIVATIONS[activation]))
  return sums[0], sums[1]
