"""How the native CPU kernels are built, cached and loaded: one compile for concurrent
first use, a cache key covering jaxlib and the FFI headers, a broken cached library rebuilt once, a cache
outside a read-only home, no compile for inference, and CI failing instead of skipping."""
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_native_kernels
from kd_landmarks.cpu import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_compiler(tmp_path, body):
  """A 'C++ compiler' script: logs each run to compiles.log, then runs ``body`` with $LIBRARY the -o path."""
  log = tmp_path / "compiles.log"
  script = tmp_path / "fakecxx"
  script.write_text("#!/bin/bash\n"
                    'while [ "$#" -gt 0 ]; do if [ "$1" = "-o" ]; then LIBRARY="$2"; fi; shift; done\n'
                    f'echo run >> "{log}"\n{body}\n')
  script.chmod(0o755)
  return str(script), log


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
  """An empty cache directory and a forgotten load outcome; restored afterwards."""
  cache = tmp_path / "cache"
  monkeypatch.setenv("KD_LANDMARKS_NATIVE_CACHE", str(cache))
  native._reset()  # pylint: disable=protected-access
  yield cache
  native._reset()  # pylint: disable=protected-access


def test_concurrent_first_use_compiles_once(tmp_path, fresh_native):
  compiler, log = _fake_compiler(tmp_path, 'sleep 2; echo library > "$LIBRARY"')
  env = dict(os.environ, PYTHONPATH=ROOT, CXX=compiler, JAX_PLATFORMS="cpu")
  code = "from kd_landmarks.cpu import native; print(native._build(native.compiler()))"
  processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(3)]
  paths = {process.communicate(timeout=120)[0].strip() for process in processes}
  assert all(process.returncode == 0 for process in processes)
  assert log.read_text().splitlines() == ["run"]  # One compile; the other two waited for it.
  (path,) = paths
  assert os.path.dirname(path) == str(fresh_native) and open(path).read() == "library\n"


def test_threads_share_one_load_and_a_broken_library_is_rebuilt_once(tmp_path, fresh_native, monkeypatch):
  # The "compiler" writes a file that is no shared library: the first load fails, one rebuild, then the
  # kernels are reported unavailable, to every thread alike.
  compiler, log = _fake_compiler(tmp_path, 'echo "not an ELF file" > "$LIBRARY"')
  monkeypatch.setenv("CXX", compiler)
  results = []
  threads = [threading.Thread(target=lambda: results.append(native._load())) for _ in range(4)]  # pylint: disable=protected-access
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert len(results) == 4 and len(set(results)) == 1 and results[0][0] is False
  assert "invalid ELF header" in results[0][1] or "file too short" in results[0][1]
  assert log.read_text().splitlines() == ["run", "run"]  # The build and one rebuild, not one per thread.


def test_cached_library_that_fails_to_load_is_rebuilt(tmp_path, fresh_native, monkeypatch):
  # A real library to "compile" (copy): the one the default cache holds for the real compiler.
  monkeypatch.delenv("KD_LANDMARKS_NATIVE_CACHE")
  native._reset()  # pylint: disable=protected-access
  require_native_kernels()
  real = native.library_path(native.compiler())
  monkeypatch.setenv("KD_LANDMARKS_NATIVE_CACHE", str(fresh_native))
  compiler, log = _fake_compiler(tmp_path, f'cp "{real}" "$LIBRARY"')
  broken = native.library_path(compiler)
  os.makedirs(os.path.dirname(broken), exist_ok=True)
  with open(broken, "wb") as f:
    f.write(b"\x7fELF truncated")
  library = native._open(broken, compiler)  # pylint: disable=protected-access
  assert hasattr(library, "KdBatchNormMoments")
  assert log.read_text().splitlines() == ["run"]
  assert open(broken, "rb").read() == open(real, "rb").read()


def test_cache_key_covers_jaxlib_and_the_ffi_headers(tmp_path, monkeypatch):
  headers = tmp_path / "include"
  shutil.copytree(jax.ffi.include_dir(), headers)
  monkeypatch.setattr(jax.ffi, "include_dir", lambda: str(headers))
  key = native.cache_key("/usr/bin/c++")
  header = next(path for path in headers.rglob("*.h"))
  original = header.read_bytes()
  header.write_bytes(original + b"\n// another jaxlib's header\n")
  assert native.cache_key("/usr/bin/c++") != key
  header.write_bytes(original)
  assert native.cache_key("/usr/bin/c++") == key
  monkeypatch.setattr(native, "_jaxlib_version", lambda: "0.0.1")
  assert native.cache_key("/usr/bin/c++") != key


def test_cache_falls_back_when_home_is_not_writable(tmp_path, monkeypatch):
  monkeypatch.delenv("KD_LANDMARKS_NATIVE_CACHE", raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("HOME", str(blocker / "home"))  # Not creatable: its parent is a file.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  assert native.cache_dir() == str(tmp_path / "tmp" / f"kd_landmarks-native-{os.getuid()}")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert native.cache_dir() == str(tmp_path / "xdg" / "kd_landmarks" / "native")
  monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "xdg"))
  monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))
  with pytest.raises(native.NativeUnavailableError, match=r"no writable cache directory .*a_file/xdg.*"
                     r"a_file/home/.cache.*set KD_LANDMARKS_NATIVE_CACHE"):
    native.cache_dir()


def test_inference_never_compiles_the_kernels(tmp_path, fresh_native, monkeypatch):
  import train_fixtures as fx
  from kd_landmarks.evaluation import evaluate
  from kd_landmarks import models
  from kd_landmarks.deploy import predict

  def no_compile(compiler, library):
    raise AssertionError(f"inference compiled {library}")
  monkeypatch.setattr(native, "_compile", no_compile)
  # Inference builds the models with their portable kernels (models.PORTABLE): nothing asks for the native ones.
  module = models.create_model("mobilenet_v2_tiny", num_landmarks=fx.NUM_LANDMARKS)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
  # Loading a trained model traces it for the shapes check (checkpoint.load_inference_variables).
  from kd_landmarks.training import checkpoint
  checkpoint._check_variables_match(module, variables, {"image_size": 16, "num_landmarks": 68,  # pylint: disable=protected-access
                                                        "model": "mobilenet_v2_tiny", "overrides": {}}, "m")
  nme = evaluate.mean_nme(module, variables, source=fx.InMemorySource(4), dataset="synthetic", image_size=16,
                          batch_size=4)
  assert np.isfinite(nme)
  predictor = predict.Predictor.from_module(module, variables, {"image_size": 16, "num_landmarks": 68},
                                           box_scale=1.05)
  points = predictor.landmarks_for_box(np.zeros((40, 40, 3), np.uint8), (20.0, 20.0, 16.0))
  assert points.shape == (68, 2)
  assert not list(fresh_native.glob("*.so"))
  assert native._result is None  # pylint: disable=protected-access  (nothing even asked whether they build)


def test_ci_fails_instead_of_skipping_when_the_kernels_do_not_build(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", "false")  # A "compiler" that always fails, and an empty cache.
  monkeypatch.setenv("KD_LANDMARKS_NATIVE_CACHE", str(tmp_path))
  native._reset()  # pylint: disable=protected-access
  try:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: native kernels unavailable: compiling"):
      require_native_kernels()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="native kernels unavailable"):
      require_native_kernels()
  finally:
    monkeypatch.delenv("CXX")
    monkeypatch.delenv("KD_LANDMARKS_NATIVE_CACHE")
    native._reset()  # pylint: disable=protected-access
