"""Checkpoint selection off the test splits: the held-out slice of the training split (datasets/holdout.py)
and its wiring into the training phases (pipeline.train_and_val_sources, model.json, metrics.json)."""
import pathlib

import numpy as np
import pytest

import fixtures_formats as ff
from kd_landmarks.training import input_pipeline
from kd_landmarks import pipeline
from kd_landmarks.training import train
from kd_landmarks.datasets import builder
from kd_landmarks.datasets import holdout
from kd_landmarks.datasets import info

COUNTS_300W = {"afw": 3, "helen/trainset": 3, "lfpw/trainset": 2, "helen/testset": 2, "lfpw/testset": 1,
               "ibug": 1}


def _config(dataset, data_dir, **overrides):
  import importlib.util
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    config.dataset = dataset
    config.data_dir = str(data_dir)
    for key, value in overrides.items():
      config[key] = value
  return config


def _ids(source):
  return [source[i]["image_id"] for i in range(len(source))]


@pytest.fixture(scope="module")
def built_300w(tmp_path_factory):
  manual_dir = tmp_path_factory.mktemp("manual_300w")
  ff.write_300w(manual_dir, COUNTS_300W, takeo_in="ibug")
  data_dir = tmp_path_factory.mktemp("data")
  builder.prepare("300w", data_dir=data_dir, manual_dir=manual_dir, show_progress=False, allow_partial=True)
  return data_dir


def test_holdout_size_and_positions():
  assert holdout.holdout_size(1200, 0.05) == 60      # the demo: 5% of 1,200
  assert holdout.holdout_size(3148, 0.05) == 157     # 300W's training split
  assert holdout.holdout_size(10, 0.01) == 1         # at least one face
  assert holdout.holdout_size(100, 7) == 7           # a count
  assert holdout.holdout_size(100, 0) == 0
  first = holdout.holdout_positions(1200, 0.05, seed=0)
  assert len(set(first.tolist())) == 60 and np.all(np.diff(first) > 0) and first.max() < 1200
  np.testing.assert_array_equal(first, holdout.holdout_positions(1200, 0.05, seed=0))  # fixed
  assert not np.array_equal(first, holdout.holdout_positions(1200, 0.05, seed=1))      # seeded
  with pytest.raises(ValueError, match="config.val_holdout"):
    holdout.holdout_size(10, 10)
  with pytest.raises(ValueError, match="config.val_holdout"):
    holdout.holdout_size(10, 2.5)


def test_default_slice_is_disjoint_from_training_and_every_test_split(built_300w, tmp_path, monkeypatch):
  """300W fixture (8 training faces, three test splits), val_holdout 0.25: the two faces the training phase
  validates on are training-split faces that no training batch of several epochs ever contains, and no
  test split holds them (by image id)."""
  config = _config("300w", built_300w, val_holdout=0.25)
  captured = {}
  monkeypatch.setattr(train, "fit", lambda setup: captured.setdefault("setup", setup))
  pipeline.train_teacher(config, str(tmp_path), "tough")
  setup = captured["setup"]
  val_source = setup.validate_fn.keywords["source"]
  val_ids = set(_ids(val_source))
  all_train_ids = set(_ids(builder.load_split("300w", "train", built_300w)))
  assert len(val_ids) == 2 and val_ids <= all_train_ids
  assert len(setup.train_source) == 6 and set(_ids(setup.train_source)) == all_train_ids - val_ids
  # Every example a training batch reads, over several epochs, by image id and by stored index.
  batches = input_pipeline.make_train_iterator(setup.train_source, global_batch_size=3, seed=setup.seed,
                                               num_steps=10, keys=("image_id", "index"), prefetch_batches=1)
  seen = {str(i) for _ in range(10) for i in next(batches)["image_id"]}
  batches.close()
  assert seen == all_train_ids - val_ids
  for split in info.get_info("300w").splits[1:]:
    assert not val_ids & set(_ids(builder.load_split("300w", split, built_300w))), split
  # Recorded for the report, with the same slice for every seed of every role.
  assert setup.meta["selection"] == {"split": "train_holdout", "on_test": False, "holdout": 0.25,
                                     "holdout_seed": 0, "of_split": "train"}
  for seed in (1, 7):
    with config.unlocked():
      config.seed = seed
    pipeline.train_student(config, str(tmp_path), "l2", seed_index=1)
    assert set(_ids(captured["setup"].validate_fn.keywords["source"])) == val_ids


def test_a_named_val_split_is_used_on_purpose_and_flagged(built_300w, tmp_path, monkeypatch):
  config = _config("300w", built_300w, val_split="test_common")
  captured = {}
  monkeypatch.setattr(train, "fit", lambda setup: captured.setdefault("setup", setup))
  pipeline.train_teacher(config, str(tmp_path), "tolerant")
  setup = captured["setup"]
  assert len(setup.train_source) == 8  # nothing held out
  assert _ids(setup.validate_fn.keywords["source"]) == _ids(builder.load_split("300w", "test_common", built_300w))
  assert setup.meta["selection"] == {"split": "test_common", "on_test": True}
  with config.unlocked():
    config.val_split = "validation"
  with pytest.raises(ValueError, match="config.val_split='validation'"):
    pipeline.selection(config)
  with config.unlocked():
    config.val_split, config.val_holdout = "", 0.0
  with pytest.raises(ValueError, match="config.val_holdout is 0"):
    pipeline.selection(config)


def test_student_seeds_have_their_own_directories_and_seeds():
  config = _config("synthetic", "/nonexistent", student_seeds=3)
  assert pipeline.student_seeds(config) == 3
  assert [pipeline.student_dir_name("kd", k) for k in range(3)] == ["student_kd", "student_kd_seed1",
                                                                     "student_kd_seed2"]
  seeds = [pipeline.training_seed(config, "student", k) for k in range(3)]
  assert seeds == [2, 1002, 2002]
  assert pipeline.training_seed(config, "landmarks") == 0 and pipeline.training_seed(config, "soft_landmarks") == 1
  with config.unlocked():
    config.student_seeds = 0
  with pytest.raises(ValueError, match="config.student_seeds"):
    pipeline.student_seeds(config)


def test_the_training_subset_joins_a_whole_split_teacher_cache_by_index():
  """The cache has a row per example of the whole split; the subset's batches get the rows of their own
  stored index (row i of the cache = example i), and never a held-out example's row."""
  import train_fixtures as fx
  source = fx.InMemorySource(12)
  train_source, val_source = holdout.split_train_holdout(source, 0.25, seed=0)
  assert (len(train_source), len(val_source), train_source.num_indexed) == (9, 3, 12)
  cache = {"tough": np.arange(12, dtype=np.float32)[:, None, None] * np.ones((1, fx.NUM_LANDMARKS, 2), np.float32)}
  cache["tolerant"] = -cache["tough"]
  batches = input_pipeline.make_train_iterator(train_source, global_batch_size=3, seed=1, num_steps=6,
                                               keys=("index",), teacher_cache=cache, prefetch_batches=1)
  seen = set()
  for _ in range(6):
    batch = next(batches)
    np.testing.assert_array_equal(batch["tough"][:, 0, 0], batch["index"])
    np.testing.assert_array_equal(batch["tolerant"][:, 0, 0], -batch["index"])
    seen |= set(batch["index"].tolist())
  batches.close()
  assert seen == set(train_source.positions.tolist()) and not seen & set(val_source.positions.tolist())
