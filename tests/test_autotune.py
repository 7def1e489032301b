"""Tests for kd_landmarks.models.autotune: the measured CPU kernel choice, its cache and the rules."""
import json
import time

import numpy as np
import pytest

from kd_landmarks import pipeline
from kd_landmarks.models import autotune

# Scripted step times (ms) per implementation: the search must find the fastest combination.
COST = {"depthwise_impl": {"shifted_native": 4.0, "shifted_vjp": 2.0, "shifted": 6.0},
        "norm_impl": {"native": 3.0, "xla": 1.0},
        "pointwise_impl": {"dot": 1.0, "conv": 1.02}}


@pytest.fixture
def scripted(monkeypatch):
  """Replaces compilation and timing by sleeps of the scripted cost; records what was compiled."""
  compiled = []

  def fake_gradient(model, variables, images, dtype):
    del variables, images, dtype
    compiled.append(dict(model))
    seconds = sum(COST[field][model[field]] for field in autotune.KERNEL_FIELDS) / 1000
    return lambda: time.sleep(seconds)

  monkeypatch.setattr(autotune, "_train_gradient", fake_gradient)
  monkeypatch.setattr(autotune, "candidates", lambda: {f: list(COST[f]) for f in autotune.KERNEL_FIELDS})
  monkeypatch.setattr(autotune.jax, "jit", lambda f: lambda rng: {})  # No parameters to initialise.
  monkeypatch.setattr(autotune, "rule_choice", lambda: {"depthwise_impl": "shifted_native", "norm_impl": "native",
                                                        "pointwise_impl": "dot"})
  return compiled


def _choose(tmp_path, **kwargs):
  return autotune.choose(lambda **kernels: kernels, shape_class={"model": "m"}, image_size=16, batch_size=2,
                         cache_path=str(tmp_path / "choices.json"), progress=False, **kwargs)


def test_measurement_finds_the_fastest_and_caches_it(tmp_path, scripted):
  choice = _choose(tmp_path)
  # Greedy: depthwise (vjp, 2 ms) then norm (xla, 1 ms); conv is 2% slower than dot: under MIN_GAIN, dot stays.
  assert choice == {"depthwise_impl": "shifted_vjp", "norm_impl": "xla", "pointwise_impl": "dot"}
  assert len(scripted) == 5  # rules + 2 depthwise + 1 norm + 1 pointwise alternatives, each compiled once.
  entry, = json.load(open(tmp_path / "choices.json")).values()
  assert entry["choice"] == choice and entry["batch_size"] == 2 and entry["cpu"]["name"]
  assert entry["milliseconds"]["depthwise_impl=shifted_vjp,norm_impl=xla,pointwise_impl=dot"] == pytest.approx(
      4.0, abs=1.5)
  # Cached: the same shape class on this machine is not measured again; another batch size is.
  assert _choose(tmp_path) == choice and len(scripted) == 5
  autotune.choose(
      lambda **kernels: kernels, shape_class={"model": "m"}, image_size=16, batch_size=4,
      cache_path=str(tmp_path / "choices.json"), progress=False)
  assert len(scripted) == 10 and len(json.load(open(tmp_path / "choices.json"))) == 2


def test_configured_kernels_are_kept_and_rules_mode_never_measures(tmp_path, scripted):
  choice = _choose(tmp_path, requested={"norm_impl": "native"})
  assert choice["norm_impl"] == "native" and choice["depthwise_impl"] == "shifted_vjp"
  assert all(model["norm_impl"] == "native" for model in scripted)
  before = len(scripted)
  assert _choose(tmp_path, mode="rules") == autotune.rule_choice()
  assert len(scripted) == before
  with pytest.raises(ValueError, match="config.kernel_choice: unknown mode 'fast'"):
    _choose(tmp_path, mode="fast")


def test_a_damaged_cache_costs_a_measurement_not_the_run(tmp_path, scripted):
  (tmp_path / "choices.json").write_text("{ not json")
  assert _choose(tmp_path)["norm_impl"] == "xla"
  assert len(json.load(open(tmp_path / "choices.json"))) == 1


def test_choice_travels_between_processes_as_indices():
  choice = {"depthwise_impl": "shifted_vjp", "norm_impl": "xla", "pointwise_impl": "conv"}
  indices = autotune.to_indices(choice)
  assert indices.dtype == np.int32 and autotune.from_indices(indices) == choice


def test_training_uses_and_records_the_measured_kernels(tmp_path, monkeypatch):
  """pipeline.train_kernels: 'measure' gives what the measurement chose (written to model.json by _fit_model),
  'rules' the rules; the user's explicit override is never replaced."""
  monkeypatch.setenv("KD_LANDMARKS_NATIVE_CACHE", str(tmp_path / "cache"))
  measured = {"depthwise_impl": "shifted", "norm_impl": "xla", "pointwise_impl": "conv"}
  monkeypatch.setattr(autotune, "measure", lambda *a, **k: (dict(measured), {}))
  config = pipeline.config_lib.base_config()
  meta = dict(model="mobilenet_v2_tiny", num_landmarks=68, image_size=32, dtype="float32", overrides={})
  config.kernel_choice = "measure"
  assert pipeline.train_kernels(config, meta, 4) == measured
  config.kernel_choice = "rules"
  assert pipeline.train_kernels(config, meta, 4) == autotune.rule_choice()
  config.kernel_choice = "measure"
  explicit = dict(meta, overrides={"pointwise_impl": "dot"})
  monkeypatch.setattr(autotune, "measure", lambda *a, start, **k: ({**measured, "pointwise_impl": start["pointwise_impl"]}, {}))
  assert pipeline.train_kernels(config, explicit, 4)["pointwise_impl"] == "dot"
  # The model a training run builds carries the choice (the parameters do not depend on it).
  model = pipeline.build_model(meta, measured)
  assert (model.depthwise_impl, model.norm_impl, model.pointwise_impl) == ("shifted", "xla", "conv")
