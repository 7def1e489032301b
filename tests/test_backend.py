"""Tests of kd_landmarks.training.backend: the platform is resolved at run time from what JAX has, dtype and prefetch
follow it however it was set, and a platform JAX lacks stops at once naming the extra to install."""
import os
import subprocess
import sys

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from kd_landmarks.training import backend
from kd_landmarks import config_lib
from kd_landmarks import pipeline
from kd_landmarks import augment
from kd_landmarks import models
from kd_landmarks.cpu import kernels as cpu_kernels
from kd_landmarks.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(*argv):
  """The config exactly as kd_landmarks.main gets it: absl flags + ml_collections' config_flags."""
  values, argv = flags.FlagValues(), ["prog", *argv]
  # sys_argv: config_flags finds the --config.x overrides in it (main: sys.argv).
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_settings_follow_the_platform_and_explicit_values_win():
  config = config_lib.base_config()
  assert (config.platform, config.dtype, config.prefetch) == ("auto", "auto", -1)
  got = {p: backend.resolve_settings(config, p) for p in ("cpu", "gpu", "tpu")}
  assert [(c.platform, c.dtype, c.prefetch) for c in got.values()] == [
      ("cpu", "float32", 2), ("gpu", "bfloat16", 4), ("tpu", "bfloat16", 4)]
  assert config.dtype == "auto" and config.platform == "auto"  # The input is left as it was.
  config.dtype, config.prefetch = "float32", 7
  kept = backend.resolve_settings(config, "gpu")
  assert (kept.dtype, kept.prefetch) == ("float32", 7)
  config.dtype = "fp16"
  with pytest.raises(ValueError, match=r"config.dtype: unknown dtype 'fp16'"):
    backend.resolve_settings(config, "cpu")


def test_config_arg_and_config_flag_give_the_same_resolved_config():
  """':platform=gpu' and '--config.platform=gpu' through absl/config_flags: the same config, and the same
  bfloat16 / prefetch 4 once resolved (before, only the ':platform=' form set them)."""
  by_arg = _parse("--config=configs/300w.py:platform=gpu")
  by_flag = _parse("--config=configs/300w.py", "--config.platform=gpu")
  assert by_arg.to_dict() == by_flag.to_dict()
  assert by_flag.platform == "gpu" and by_flag.dtype == "auto"
  for config in (by_arg, by_flag):
    resolved = backend.resolve_settings(config, config.platform)
    assert (resolved.dtype, resolved.prefetch) == ("bfloat16", 4)
  with pytest.raises(AttributeError):  # The resolved copy stays locked against key typos.
    backend.resolve_settings(by_flag, "gpu").dtpye = "float32"


def test_select_on_this_cpu_only_jax():
  assert jax.default_backend() == "cpu"
  assert backend.select("auto") == "cpu" and backend.select("cpu") == "cpu"
  for platform, extra in (("gpu", '".[gpu]"'), ("tpu", '".[tpu]"')):
    with pytest.raises(backend.PlatformUnavailableError, match=f"no {platform} backend") as error:
      backend.select(platform)
    assert f"pip install -e {extra}" in str(error.value) and "'cpu'" in str(error.value)
  with pytest.raises(ValueError, match="unknown platform 'ipu'"):
    backend.select("ipu")


def test_training_kernels_follow_the_platform_and_config_cpu_kernels(monkeypatch):
  """CPU training with cpu_kernels: the CPU kernels (native where they build); off, or on an accelerator: the
  portable ones, which evaluation and export use too."""
  assert backend.select("auto") == "cpu"
  config = config_lib.base_config()
  chosen = train.training_kernels(config)
  assert chosen.model.pointwise_conv is cpu_kernels.pointwise_conv_dot
  assert chosen.model.depthwise_conv in (cpu_kernels.depthwise_conv_native, cpu_kernels.depthwise_conv_xla)
  assert chosen.model.batch_norm_train in (cpu_kernels.batch_norm_train_native, cpu_kernels.batch_norm_train_xla)
  config.cpu_kernels = False
  assert train.training_kernels(config).model is models.PORTABLE
  assert train.training_kernels(config).augment is augment.PORTABLE
  config.cpu_kernels = True
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert train.training_kernels(config).model is models.PORTABLE


def test_pipeline_stops_before_any_work_on_a_missing_backend(tmp_path):
  config = config_lib.apply_arg(config_lib.base_config(), "platform=tpu,phase=eval")
  with pytest.raises(backend.PlatformUnavailableError, match=r'pip install -e "\.\[tpu\]"'):
    pipeline.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def _main(*args):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "kd_landmarks.main", *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=300, env=env)


def _resolved_line(stderr):
  lines = [line.split("] ", 1)[1] for line in stderr.splitlines() if "backend.py" in line and "] platform " in line]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def test_main_gpu_request_on_a_cpu_only_jax_stops_naming_the_extra(tmp_path):
  for i, form in enumerate((["--config", "configs/300w.py:platform=gpu"],
                            ["--config", "configs/300w.py", "--config.platform=gpu"])):
    workdir = tmp_path / f"w{i}"
    result = _main(*form, "--workdir", str(workdir))
    assert result.returncode != 0
    # One line, no traceback.
    assert "error: config.platform='gpu' but JAX has no gpu backend" in result.stderr
    assert "Traceback" not in result.stderr
    assert 'pip install -e ".[gpu]"' in result.stderr
    assert not os.path.exists(workdir)  # Nothing ran.


def test_main_logs_the_same_resolved_platform_for_both_forms(tmp_path):
  lines = []
  for i, form in enumerate((["--config", "configs/300w.py:phase=eval,platform=cpu"],
                            ["--config", "configs/300w.py:phase=eval", "--config.platform=cpu"],
                            ["--config", "configs/300w.py:phase=eval"])):
    result = _main(*form, "--workdir", str(tmp_path / f"w{i}"))
    assert "no trained model" in result.stderr  # Got past the resolution to the eval phase.
    lines.append(_resolved_line(result.stderr))
  assert lines[0] == lines[1] == lines[2]
  assert lines[0].startswith("platform cpu: 1 x cpu") and "dtype float32, prefetch 2" in lines[0]
