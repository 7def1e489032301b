"""Native CPU kernels for what XLA's CPU backend does slowly, called through the XLA FFI.

* ``depthwise_cpu.cc``: the depthwise-convolution weight gradient, which XLA computes as k*k separate
  passes over the activations (see :mod:`kd_landmarks.cpu.kernels`) and this kernel in one.
* ``batch_norm_cpu.cc``: training BatchNorm's reductions, the batch moments (forward) and
  ``sum(dz)``, ``sum(dz * xhat)`` (backward) in one pass each, accumulated in float64.
* ``augment_cpu.cc``: the augmentation's bilinear affine warp of uint8 crops (see
  :func:`kd_landmarks.augment.warp_image`), which XLA runs as four element-wise gathers, and its additive
  Gaussian noise (inverse normal CDF from a table, counter-based bits).

Only CPU training calls them (:mod:`kd_landmarks.cpu`); nothing else builds them.

The C++ sources ship with the package and are compiled on first use into one library with the machine's C++
compiler (``$CXX``, else ``c++``/``g++``) against the XLA FFI headers that jaxlib ships
(``jax.ffi.include_dir()``), then cached: nothing is downloaded. The cache key covers the sources, the
jax and jaxlib versions, the contents of the FFI headers compiled against, the compiler, the flags and the
CPU's instruction-set flags (``-march=native``).

* Concurrent first use (several processes or test workers) compiles once: the build holds a file lock
  (``fcntl.flock`` on ``<library>.lock``) and the others wait for it, then load its result.
* A cached library that fails to load (truncated, built for another machine) is deleted and rebuilt once.
* The cache is the first writable of ``$KD_LANDMARKS_NATIVE_CACHE``, ``$XDG_CACHE_HOME/kd_landmarks/native``
  (else ``~/.cache/kd_landmarks/native``) and ``<tempdir>/kd_landmarks-native-<uid>``, so a read-only home
  does not disable the kernels.
* Loading and registering the FFI targets happens once per process, under a lock (thread-safe).

Environment:
  KD_LANDMARKS_NATIVE_CACHE=DIR   where compiled libraries go (see above for the default).
  KD_LANDMARKS_NATIVE_MARCH=ARCH  build for another CPU than this one (-march=ARCH instead of -march=native,
                                  e.g. znver3 for an AMD EPYC's code, timed on this machine); in the cache key.

Where no compiler works, :func:`available` is False, :func:`unavailable_reason` says why, and CPU training
uses the XLA forms of the same kernels (:func:`kd_landmarks.cpu.training_kernels`).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

_DIRECTORY = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_DIRECTORY, name) for name in ("depthwise_cpu.cc", "batch_norm_cpu.cc", "augment_cpu.cc"))
HEADERS = (os.path.join(_DIRECTORY, "common.h"),)
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
ENV_MARCH = "KD_LANDMARKS_NATIVE_MARCH"
WEIGHT_GRADIENT_TARGET = "kd_landmarks_depthwise_weight_gradient"
MOMENTS_TARGET = "kd_landmarks_batch_norm_moments"
GRAD_SUMS_TARGET = "kd_landmarks_batch_norm_grad_sums"
WARP_TARGET = "kd_landmarks_affine_warp"
NOISE_TARGET = "kd_landmarks_gaussian_noise"
_SYMBOLS = {WEIGHT_GRADIENT_TARGET: "KdDepthwiseWeightGradient", MOMENTS_TARGET: "KdBatchNormMoments",
            GRAD_SUMS_TARGET: "KdBatchNormGradSums", WARP_TARGET: "KdAffineWarp", NOISE_TARGET: "KdGaussianNoise"}
WARP_FILL_MODES = {"constant": 0, "nearest": 1}
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


def compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def cache_dir_candidates() -> list[str]:
  """Where compiled libraries may go, in order of preference (the first writable one is used)."""
  if os.environ.get("KD_LANDMARKS_NATIVE_CACHE"):
    return [os.path.expanduser(os.environ["KD_LANDMARKS_NATIVE_CACHE"])]
  candidates = [os.path.join(os.path.expanduser("~"), ".cache", "kd_landmarks", "native"),
                os.path.join(tempfile.gettempdir(), f"kd_landmarks-native-{os.getuid()}")]
  if os.environ.get("XDG_CACHE_HOME"):  # The XDG base-directory rule: it replaces ~/.cache when set.
    candidates.insert(0, os.path.join(os.environ["XDG_CACHE_HOME"], "kd_landmarks", "native"))
  return candidates


def cache_dir() -> str:
  tried = []
  for directory in cache_dir_candidates():
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as error:
      tried.append(f"{directory} ({error.strerror})")
      continue
    if os.access(directory, os.W_OK | os.X_OK):
      return directory
    tried.append(f"{directory} (not writable)")
  raise NativeUnavailableError(f"no writable cache directory for the compiled kernels: {'; '.join(tried)}; "
                               "set KD_LANDMARKS_NATIVE_CACHE to a writable directory")


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def cxx_flags() -> tuple[str, ...]:
  """:data:`CXX_FLAGS` with ``-march=$KD_LANDMARKS_NATIVE_MARCH`` where that is set."""
  march = os.environ.get(ENV_MARCH, "native")
  return tuple(f"-march={march}" if flag == "-march=native" else flag for flag in CXX_FLAGS)


def cache_key(compiler: str) -> str:
  """Hash of everything the compiled library depends on: sources, jax and jaxlib versions, the FFI
  headers' contents under ``jax.ffi.include_dir()``, compiler, flags and the CPU."""
  digest = hashlib.sha256()
  header_root = jax.ffi.include_dir()
  headers = sorted(os.path.join(root, name) for root, _, names in os.walk(header_root) for name in names)
  for path in SOURCES + HEADERS + tuple(headers):
    with open(path, "rb") as f:
      digest.update(os.path.relpath(path, header_root).encode() + b"\0" + f.read() + b"\0")
  for part in (jax.__version__, _jaxlib_version(), " ".join(cxx_flags()), compiler, _cpu_flags(),
               platform.machine()):
    digest.update(part.encode() + b"\0")
  return digest.hexdigest()[:16]


def library_path(compiler: str) -> str:
  return os.path.join(cache_dir(), f"kd_landmarks_cpu_{cache_key(compiler)}.so")


@contextlib.contextmanager
def _build_lock(library: str):
  """An exclusive file lock beside ``library``: concurrent first uses compile once, the others wait."""
  with open(library + ".lock", "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _build(compiler: str, *, discard: str | None = None) -> str:
  """Compiles the sources (once per cache key) into one shared library and returns its path.

  ``discard``: a cached library that failed to load; it is deleted (under the lock) and rebuilt, unless
  another process already replaced it.
  """
  library = library_path(compiler)
  with _build_lock(library):
    if discard is not None and os.path.exists(library) and _same_file(library, discard):
      os.remove(library)
    if os.path.exists(library):
      return library
    return _compile(compiler, library)


def _same_file(a: str, b: str) -> bool:
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


# Counts compiler runs (tests check that concurrent first use compiles once).
_compile_count = 0


def _compile(compiler: str, library: str) -> str:
  global _compile_count
  _compile_count += 1
  directory = os.path.dirname(library)
  # Build into a temporary name and rename: a process never loads a half-written library.
  handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
  os.close(handle)
  command = [compiler, *cxx_flags(), "-I", jax.ffi.include_dir(), *SOURCES, "-o", partial]
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


_LOCK = threading.Lock()
_result: tuple[bool, str] | None = None   # Set once the kernels are registered or cannot be.
# XLA refuses a second registration of a target name with another library ("Duplicate FFI handler
# registration"), which would break the CPU backend: register once per process, whatever _reset says.
_registered = False


def _open(path: str, compiler: str):
  """ctypes.CDLL of ``path``; a cached library that fails to load is rebuilt once."""
  try:
    return ctypes.CDLL(path)
  except OSError as error:
    logging.warning("the cached native library %s fails to load (%s); rebuilding it once", path, error)
    return ctypes.CDLL(_build(compiler, discard=path))


def _load() -> tuple[bool, str]:
  """Builds, loads and registers the kernels once per process: (available, reason if not). Thread-safe."""
  global _result, _registered
  with _LOCK:
    if _result is not None:
      return _result
    cxx = compiler()
    if cxx is None:
      return False, "no C++ compiler found (set $CXX or install g++)"
    try:
      library = _open(_build(cxx), cxx)
      if not _registered:
        for target, symbol in _SYMBOLS.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _registered = True
    except (NativeUnavailableError, OSError, subprocess.SubprocessError, AttributeError) as error:
      logging.warning("kd_landmarks native CPU kernels unavailable, using XLA's: %s", error)
      _result = (False, str(error))
      return _result
    _result = (True, "")
    return _result


def _reset() -> None:
  """Forgets the outcome of :func:`_load` (tests that change the environment)."""
  global _result
  with _LOCK:
    _result = None


_load.cache_clear = _reset  # The name tests and callers used when _load was an lru_cache.


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


WEIGHT_GRADIENT_METHODS = {"auto": 0, "rows": 1, "registers": 2}


def depthwise_weight_gradient(x, grad_out, kernel_size: tuple[int, int], stride: int,
                              pads: tuple[int, int], *, method: str = "auto"):
  """``[kh, kw, 1, C]`` float32: ``sum_{b,oh,ow} grad_out[b,oh,ow,c] * x[b, s*oh+i-pt, s*ow+j-pl, c]``.

  The weight gradient of :func:`kd_landmarks.models.depthwise.depthwise_conv` (padding ``pads`` =
  (top, left) of TensorFlow's SAME; padded positions contribute zero). ``x`` ``[B, H, W, C]`` and
  ``grad_out`` ``[B, ceil(H/s), ceil(W/s), C]``, both float32, on the CPU. ``method``: 'rows' (one pass per
  output row, for large images), 'registers' (all taps summed in registers per image and 8 channels, for
  images that fit in L2; 3x3 and 5x5 kernels) or 'auto' (by the image's size; depthwise_cpu.cc).
  """
  require("kd_landmarks.cpu.kernels.depthwise_conv_xla")
  if method not in WEIGHT_GRADIENT_METHODS:
    raise ValueError(f"depthwise_weight_gradient: method={method!r}; choose from {sorted(WEIGHT_GRADIENT_METHODS)}")
  kh, kw = kernel_size
  call = jax.ffi.ffi_call(WEIGHT_GRADIENT_TARGET,
                          jax.ShapeDtypeStruct((kh, kw, 1, x.shape[-1]), np.float32),
                          vmap_method="sequential")
  return call(x, grad_out, stride=np.int64(stride), kh=np.int64(kh), kw=np.int64(kw),
              pad_top=np.int64(pads[0]), pad_left=np.int64(pads[1]),
              method=np.int64(WEIGHT_GRADIENT_METHODS[method]))


def batch_norm_moments(x):
  """``(mean, variance)`` over all axes but the last of float32 ``x``, each ``[C]`` float32.

  Computed in one pass with float64 totals; the variance is ``E[x^2] - E[x]^2`` (as flax's BatchNorm
  computes it) and may be slightly negative for a constant channel: clip it before use.
  """
  require("kd_landmarks.cpu.kernels.batch_norm_train_xla")
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
  require("kd_landmarks.cpu.kernels.batch_norm_train_xla")
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


def affine_warp(images_uint8, out_to_input, out_size: int, *, fill_mode: str = "constant",
                fill_value: float = 0.0):
  """Bilinear resampling of uint8 ``[..., H, W, C]`` through float32 affines ``[..., 2, 3]`` into float32
  ``[..., out_size, out_size, C]`` in [0, 1]: :func:`kd_landmarks.augment.warp_image`'s 'gather' sampler in
  one native pass. ``fill_value`` is in [0, 1] (the image's 0..255 divided by 255); ``fill_mode``
  'constant' or 'nearest'. CPU only; no gradient (images are inputs). ``jax.vmap`` passes the batch through.
  """
  require("kd_landmarks.augment.warp_image")
  if fill_mode not in WARP_FILL_MODES:
    raise ValueError(f"affine_warp: fill_mode={fill_mode!r}; choose from {sorted(WARP_FILL_MODES)}")
  images_uint8 = jnp.asarray(images_uint8)
  out_to_input = jnp.asarray(out_to_input, jnp.float32)
  if images_uint8.dtype != jnp.uint8 or images_uint8.ndim < 3 or out_to_input.shape[-2:] != (2, 3) or (
      out_to_input.shape[:-2] != images_uint8.shape[:-3]):
    raise ValueError(f"affine_warp: uint8 images [..., H, W, C] and affines [..., 2, 3] with the same leading "
                     f"dimensions expected, got {images_uint8.dtype} {images_uint8.shape} and {out_to_input.shape}")
  shape = (*images_uint8.shape[:-3], out_size, out_size, images_uint8.shape[-1])
  # broadcast_all: under vmap the kernel gets the whole batch in one call (it loops over leading dimensions).
  call = jax.ffi.ffi_call(WARP_TARGET, jax.ShapeDtypeStruct(shape, np.float32), vmap_method="broadcast_all")
  return call(images_uint8, out_to_input, fill_mode=np.int64(WARP_FILL_MODES[fill_mode]),
              fill_value=np.float32(fill_value * 255.0))


def gaussian_noise(rng, images, noise_std):
  """``clip(images + noise_std[b] * z, 0, 1)`` with ``z`` ~ N(0, 1) per element: float32 ``images [B, ...]``,
  ``noise_std [B]``. ``z`` is the inverse normal CDF at 16-bit uniforms (tails at 4.33 sigma), from a
  counter-based generator keyed with 128 bits drawn from ``rng``: a pure function of (rng, shape). CPU only.
  """
  require("kd_landmarks.augment.standard_normal")
  images = jnp.asarray(images, jnp.float32)
  noise_std = jnp.asarray(noise_std, jnp.float32)
  if images.ndim < 1 or noise_std.shape != images.shape[:1]:
    raise ValueError(f"gaussian_noise: images [B, ...] and noise_std [B] expected, got {images.shape} and "
                     f"{noise_std.shape}")
  key_bits = jax.random.bits(rng, (4,), jnp.uint32)
  call = jax.ffi.ffi_call(NOISE_TARGET, jax.ShapeDtypeStruct(images.shape, np.float32), vmap_method="sequential")
  return call(images, noise_std, key_bits)
