"""The teachers' outputs as the tfds dataset kd_landmarks_teachers: written by phase=cache_teachers, read by plain
tfds (no kd_landmarks import), joined by index, and checked against the training split before the student trains."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import predict_fixtures
from kd_landmarks import errors
from kd_landmarks.training import checkpoint
from kd_landmarks.evaluation import evaluate
from kd_landmarks import models
from kd_landmarks import pipeline
from kd_landmarks.training import train
from kd_landmarks.datasets import builder
from kd_landmarks.datasets import teacher_cache as tc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = {"num_train": 6, "num_test": 2, "image_size": 32, "seed": 3}


def _predictions(num_examples=5, num_landmarks=68, seed=0):
  rng = np.random.default_rng(seed)
  tough = rng.uniform(0, 32, size=(num_examples, num_landmarks, 2)).astype(np.float32)
  tolerant = rng.uniform(0, 32, size=(num_examples, num_landmarks, 2)).astype(np.float32)
  return tough, tolerant


def _config(**overrides):
  spec = importlib.util.spec_from_file_location("cfg_demo", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None)
  for key, value in SYNTHETIC.items():
    config.synthetic[key] = value
  config.image_size = 32
  config.eval_batch_size = 4
  config.teacher.batch_size = config.student.batch_size = 4  # At most the tiny training split.
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("data")
  builder.prepare("synthetic", data_dir=path, synthetic_options=SYNTHETIC, show_progress=False)
  return str(path)


def test_rows_come_back_in_index_order(tmp_path):
  tough, tolerant = _predictions()
  order = np.array([3, 0, 4, 1, 2])  # e.g. the order a shuffled pipeline produced them in
  ids = [f"face_{i}" for i in order]
  folder = tc.write_teacher_outputs(tmp_path, dataset="synthetic", index=order, image_id=ids, tough=tough,
                                    tolerant=tolerant, metadata={"dataset": "synthetic"})
  assert folder == tmp_path / "kd_landmarks_teachers" / "synthetic" / "1.0.0"
  loaded = tc.load_teacher_outputs(tmp_path, dataset="synthetic")  # the data dir resolves to the folder
  for position, example_index in enumerate(order):
    np.testing.assert_array_equal(loaded.tough[example_index], tough[position])
    np.testing.assert_array_equal(loaded.tolerant[example_index], tolerant[position])
  assert loaded.image_id.tolist() == [f"face_{i}" for i in range(5)]
  assert loaded.tough.dtype == np.float32 and loaded.metadata == {"dataset": "synthetic"}
  # Written again (teachers retrained): replaced, not appended to.
  tc.write_teacher_outputs(tmp_path, dataset="synthetic", index=np.arange(2), image_id=["x", "y"],
                           tough=tough[:2], tolerant=tolerant[:2], metadata={})
  assert tc.load_teacher_outputs(folder, dataset="synthetic").image_id.tolist() == ["x", "y"]


@pytest.mark.parametrize("index, fragment", [
    (np.array([0, 1, 1, 3, 4]), "missing [2], duplicates [1]"),
    (np.array([1, 2, 3, 4, 5]), "outside [5]"),
    (np.array([0, 1, 2, 3]), "must have shape (5,)"),
    (np.array([0.0, 1, 2, 3, 4]), "must be integers"),
])
def test_bad_index_is_refused(tmp_path, index, fragment):
  tough, tolerant = _predictions()
  with pytest.raises(tc.TeacherCacheError) as error:
    tc.write_teacher_outputs(tmp_path, dataset="synthetic", index=index, image_id=list("abcde"), tough=tough,
                             tolerant=tolerant, metadata={})
  assert fragment in str(error.value) and "kd_landmarks_teachers" in str(error.value)
  assert not (tmp_path / "kd_landmarks_teachers").exists()


def test_bad_predictions_are_refused(tmp_path):
  tough, tolerant = _predictions()
  kwargs = dict(dataset="synthetic", index=np.arange(5), image_id=list("abcde"), metadata={})
  with pytest.raises(tc.TeacherCacheError, match=r"tough must be \[N, K, 2\]"):
    tc.write_teacher_outputs(tmp_path, tough=tough[..., :1], tolerant=tolerant, **kwargs)
  with pytest.raises(tc.TeacherCacheError, match="tolerant has 67 landmarks, expected 68"):
    tc.write_teacher_outputs(tmp_path, tough=tough, tolerant=tolerant[:, :67], **kwargs)
  bad = tolerant.copy()
  bad[2, 1, 0] = np.nan
  with pytest.raises(tc.TeacherCacheError, match="tolerant contains NaN"):
    tc.write_teacher_outputs(tmp_path, tough=tough, tolerant=bad, **kwargs)
  with pytest.raises(tc.TeacherCacheError, match="4 image ids for 5 predictions"):
    tc.write_teacher_outputs(tmp_path, tough=tough, tolerant=tolerant, **{**kwargs, "image_id": list("abcd")})


# Reads the teacher outputs with tfds alone and prints the rows as JSON; fails if kd_landmarks got imported.
_PLAIN_TFDS_READER = """
import json, sys
import tensorflow_datasets as tfds
teachers = tfds.builder_from_directory(sys.argv[1])
rows = teachers.as_data_source("train")
out = {"metadata": dict(teachers.info.metadata),
       "rows": [{"index": int(r["index"]), "image_id": r["image_id"].decode(), "tough": r["tough"].tolist(),
                 "tolerant": r["tolerant"].tolist()} for r in (rows[i] for i in range(len(rows)))]}
assert not [m for m in sys.modules if m.startswith("kd_landmarks")], "kd_landmarks was imported"
print(json.dumps(out))
"""


def test_cache_teachers_writes_a_dataset_that_plain_tfds_reads(tmp_path, data_dir):
  """A tiny cache_teachers run (two random tiny teachers on 6 synthetic faces); a subprocess that never imports
  kd_landmarks reads the rows, which equal each teacher's predictions on the train split joined by index."""
  workdir = tmp_path / "run"
  config = _config(data_dir=data_dir)
  for seed, teacher in enumerate(pipeline.TEACHERS):
    model_dir = predict_fixtures.write_model_dir(workdir / f"teacher_{teacher}", image_size=32, seed=seed)
    checkpoint.write_done(model_dir, 7 + seed)
  folder = pipeline.cache_teachers(config, str(workdir))
  assert folder == str(workdir / "teacher_cache" / "kd_landmarks_teachers" / "synthetic" / "1.0.0")
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  result = subprocess.run([sys.executable, "-c", _PLAIN_TFDS_READER, folder], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  read = json.loads(result.stdout.strip().splitlines()[-1])
  # Expected: each teacher run directly on the train split, with the kernels the pipeline computes with (the
  # same function as the portable ones up to float32 summation order, tests/test_models.py); the split's
  # position is its `index`.
  source = pipeline.load_split(config, str(workdir), "train")
  kernels = train.training_kernels(config).model
  expected = {}
  for teacher in pipeline.TEACHERS:
    module, variables, _ = checkpoint.load_inference_variables(str(workdir / f"teacher_{teacher}"))
    expected[teacher] = evaluate.predict_source(models.with_kernels(module, kernels), variables, source,
                                                image_size=32, batch_size=4)
  assert sorted(row["index"] for row in read["rows"]) == list(range(6))
  for row in read["rows"]:
    example = source[row["index"]]
    assert row["image_id"] == example["image_id"]
    for teacher in pipeline.TEACHERS:
      position = int(np.flatnonzero(expected[teacher]["index"] == row["index"])[0])
      np.testing.assert_allclose(row[teacher], expected[teacher]["pred_crop"][position], atol=1e-5)
  assert np.abs(np.array(read["rows"][0]["tough"]) - np.array(read["rows"][0]["tolerant"])).max() > 1e-3
  metadata = read["metadata"]
  assert metadata["dataset"] == "synthetic" and metadata["num_examples"] == 6
  assert metadata["dataset_version"] == str(builder.KdLandmarks.VERSION)
  assert metadata["preparation"]["synthetic"] == SYNTHETIC and metadata["soft_landmarks"]["keep"] == 0.95
  assert metadata["teachers"]["tough"]["checkpoint"] == {"kind": "best", "step": 1}
  assert metadata["teachers"]["tolerant"]["model"] == predict_fixtures.TINY_MODEL
  assert metadata["teachers"]["tolerant"]["image_size"] == 32
  assert metadata["teachers"]["tolerant"]["target"] == "soft_landmarks"
  # The student phase accepts it, and phase=all sees it as current.
  loaded = pipeline._load_checked_cache(config, str(workdir), folder)  # pylint: disable=protected-access
  np.testing.assert_array_equal(loaded.tough[read["rows"][2]["index"]], np.float32(read["rows"][2]["tough"]))
  assert pipeline._cache_is_current(str(workdir), config)  # pylint: disable=protected-access


def _forge(cache_dir, config, data_dir, *, dataset="synthetic", num_rows=6, index=None, **metadata_changes):
  """A cache as cache_teachers would write it for `config`'s train split, then changed as asked."""
  source = pipeline.load_split(config, "unused", "train")
  teacher_meta = {"model": "mobilenet_v2_tiny", "checkpoint": ("best", 5), "image_size": 32, "dtype": "float32",
                  "model_dir": "/elsewhere/teacher"}
  metadata = pipeline._cache_metadata(config, source, {t: teacher_meta for t in pipeline.TEACHERS})  # pylint: disable=protected-access
  metadata.update(dataset=dataset, num_examples=num_rows, **metadata_changes)
  num_landmarks = 29 if dataset == "cofw" else 68
  tough, tolerant = _predictions(num_rows, num_landmarks)
  rows = {"index": np.arange(num_rows) if index is None else np.asarray(index), "image_id": ["id"] * num_rows,
          "tough": tough, "tolerant": tolerant}
  return tc._write_rows(cache_dir, dataset, rows, metadata)  # pylint: disable=protected-access


@pytest.mark.parametrize("case, forge, fragment", [
    ("other dataset", dict(dataset="cofw"), "dataset 'cofw' (the training split: 'synthetic')"),
    ("other split size", dict(num_rows=5), "num_examples 5 (the training split: 6)"),
    ("missing index", dict(index=[0, 1, 2, 3, 4, 4]), "missing [5], duplicates [4]"),
    ("older dataset version", dict(dataset_version="0.9.0"), f"dataset_version '0.9.0' (the training split: '{builder.KdLandmarks.VERSION}')"),
    ("other preparation", dict(preparation={"stored_crop_size": 64}), "preparation option stored_crop_size 64"),
])
def test_mismatched_cache_fails_before_training(tmp_path, data_dir, case, forge, fragment):
  """A colleague's cache (--config.teacher_cache_dir) made on something else than the training split."""
  del case
  config = _config(data_dir=data_dir, phase="student", student_loss="kd")
  folder = _forge(tmp_path / "colleague", config, data_dir, **forge)
  config.teacher_cache_dir = str(folder)
  workdir = tmp_path / "run"
  with pytest.raises(tc.TeacherCacheMismatchError) as error:
    pipeline.run(config, str(workdir))
  message = str(error.value)
  assert fragment in message and str(folder) in message and "phase=cache_teachers" in message
  assert "teacher_cache_dir" in message  # ...and that the colleague's cache is the one to replace
  assert not (workdir / "student_kd").exists()  # Nothing trained, not even a model directory.


def test_workdir_cache_of_an_older_dataset_version_names_the_rebuild_command(tmp_path, data_dir):
  config = _config(data_dir=data_dir, phase="student", student_loss="kd")
  workdir = tmp_path / "run"
  _forge(workdir / "teacher_cache", config, data_dir, dataset_version="0.9.0")
  with pytest.raises(tc.TeacherCacheMismatchError,
                     match=rf"dataset_version '0.9.0'.*Rebuild them: `python -m kd_landmarks.main --config "
                           rf"<config>:phase=cache_teachers --workdir {workdir}"):
    pipeline.run(config, str(workdir))
  assert not (workdir / "student_kd").exists()
  assert not pipeline._cache_is_current(str(workdir), config)  # pylint: disable=protected-access


def test_colleagues_matching_cache_is_accepted_given_as_a_data_dir(tmp_path, data_dir):
  config = _config(data_dir=data_dir, teacher_cache_dir=str(tmp_path / "colleague"))
  folder = _forge(tmp_path / "colleague", config, data_dir)
  assert pipeline.teacher_outputs_path(config, "unused") == folder
  loaded = pipeline._load_checked_cache(config, "unused", folder)  # pylint: disable=protected-access
  assert loaded.tough.shape == (6, 68, 2) and loaded.metadata["teachers"]["tough"]["model_dir"] == "/elsewhere/teacher"
  with pytest.raises(ValueError, match="set one of them"):
    pipeline.validate_config(_config(teacher_cache_dir="x", teachers_online=True))


def test_missing_cache_mentions_the_old_npz(tmp_path, data_dir):
  workdir = tmp_path / "run"
  (workdir / "teacher_cache").mkdir(parents=True)
  (workdir / "teacher_cache" / "train.npz").write_bytes(b"old")
  with pytest.raises(FileNotFoundError, match=r"train.npz is the .npz cache of earlier versions.*phase=cache_teachers"):
    pipeline.run(_config(data_dir=data_dir, phase="student", student_loss="kd"), str(workdir))


def _readme_snippet() -> str:
  with open(os.path.join(ROOT, "docs", "datasets.md")) as f:
    text = f.read()
  after = text.split("<!-- snippet: read-with-tfds -->", 1)[1]
  return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_snippet_reads_faces_and_teacher_outputs(tmp_path, data_dir):
  """The README's tfds + grain snippet, run as written (its two paths swapped for ours) in a process that
  never imports kd_landmarks: the batch's teacher rows are those written for each face's index."""
  source = pipeline.load_split(_config(data_dir=data_dir), "unused", "train")
  tough, tolerant = _predictions(len(source))
  order = np.array([4, 2, 0, 5, 1, 3])
  ids = [source[int(i)]["image_id"] for i in order]
  tc.write_teacher_outputs(tmp_path / "teacher_cache", dataset="synthetic", index=order, image_id=ids,
                           tough=tough, tolerant=tolerant, metadata={"teachers": {"tough": {"model": "m"}}})
  snippet = _readme_snippet()
  paths = 'DATA_DIR, WORKDIR = "runs/demo/data", "runs/demo"'
  assert paths in snippet
  snippet = snippet.replace(paths, f"DATA_DIR, WORKDIR = {data_dir!r}, {str(tmp_path)!r}")
  snippet += """
import json, sys
assert not [m for m in sys.modules if m.startswith("kd_landmarks")], "kd_landmarks was imported"
print(json.dumps({k: batch[k].tolist() for k in ("index", "tough", "tolerant", "landmarks")}
                 | {"image_shape": list(batch["image"].shape)}))
"""
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert "'model': 'm'" in lines[0]  # the metadata print
  batch = json.loads(lines[-1])
  assert batch["image_shape"] == [4, 32, 32, 3] and len(set(batch["index"])) == 4
  for row, index in enumerate(batch["index"]):
    position = int(np.flatnonzero(order == index)[0])  # where that face's predictions were given
    np.testing.assert_array_equal(np.float32(batch["tough"][row]), tough[position])
    np.testing.assert_array_equal(np.float32(batch["tolerant"][row]), tolerant[position])
    np.testing.assert_array_equal(np.float32(batch["landmarks"][row]), source[index]["landmarks"])


@pytest.mark.parametrize("given, current, expected", [
    (True, False, ["student:kd:0", "eval", "report"]),  # another's cache: no teachers, no cache phase
    (False, True, ["teacher:tough", "teacher:tolerant", "student:kd:0", "eval", "report"]),
    (False, False, ["teacher:tough", "teacher:tolerant", "cache", "student:kd:0", "eval", "report"]),
])
def test_phase_all_with_a_given_cache_trains_no_teachers(tmp_path, monkeypatch, given, current, expected):
  calls = []
  monkeypatch.setattr(pipeline, "preflight", lambda c, w: None)  # The phases' order only; no data here.
  monkeypatch.setattr(pipeline, "train_teacher", lambda c, w, teacher: calls.append(f"teacher:{teacher}"))
  monkeypatch.setattr(pipeline, "cache_teachers", lambda c, w: calls.append("cache"))
  monkeypatch.setattr(pipeline, "_cache_is_current", lambda w, c: current)
  monkeypatch.setattr(pipeline, "train_student",
                      lambda c, w, loss, seed_index=0: calls.append(f"student:{loss}:{seed_index}"))
  monkeypatch.setattr(pipeline, "evaluate_all", lambda c, w, skip_current: calls.append("eval"))
  monkeypatch.setattr(pipeline, "write_report", lambda c, w: calls.append("report"))
  config = _config(student_loss="kd", teacher_cache_dir=str(tmp_path / "given") if given else "",
                   write_report=True, student_seeds=1)
  pipeline.run(config, str(tmp_path / "run"))
  assert calls == expected


def test_damaged_teacher_outputs_are_named_and_rewritten_over(tmp_path):
  # Probe: a corrupt dataset_info.json in the teacher outputs gave a ParseError naming no file, and rebuilding
  # them failed on it too; a truncated record file was found only when read.
  tough, tolerant = _predictions()
  kwargs = dict(dataset="synthetic", index=np.arange(5), image_id=list("abcde"), metadata={})
  folder = tc.write_teacher_outputs(tmp_path, tough=tough, tolerant=tolerant, **kwargs)
  (folder / "dataset_info.json").write_text('{"name": ')
  with pytest.raises(tc.TeacherCacheError) as raised:
    tc.load_teacher_outputs(tmp_path, dataset="synthetic", rebuild="`rebuild command`")
  assert errors.one_line(raised.value).startswith(f"{folder}/dataset_info.json (or features.json, metadata.json "
                                                  "beside it) cannot be read (Failed to load JSON: ")
  assert errors.one_line(raised.value).endswith("the teacher outputs are damaged. Rebuild them: `rebuild command`")
  tc.write_teacher_outputs(tmp_path, tough=tough, tolerant=tolerant, **kwargs)  # Rewritten over the damage.
  np.testing.assert_array_equal(tc.load_teacher_outputs(tmp_path, dataset="synthetic").tough, tough)
  (record_file,) = folder.glob("*.array_record*")
  record_file.write_bytes(record_file.read_bytes()[:100])
  with pytest.raises(tc.TeacherCacheError, match=rf"^{record_file} cannot be read \(.*truncated or damaged\): the "
                     "train split of kd_landmarks_teachers/synthetic cannot be read; the teacher outputs are "
                     "damaged. Rebuild them: `rebuild command`$"):
    tc.load_teacher_outputs(tmp_path, dataset="synthetic", rebuild="`rebuild command`")


def test_mismatched_cache_through_main_is_one_line(tmp_path, data_dir):
  # Probe: a mismatched teacher cache gave 26-31 lines of traceback through `python -m kd_landmarks.main`.
  config = _config(data_dir=data_dir)
  folder = _forge(tmp_path / "colleague", config, data_dir, num_rows=5)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  overrides = [f"--config.{key}={value}" for key, value in (
      ("data_dir", data_dir), ("teacher_cache_dir", folder), ("student_loss", "kd"), ("image_size", 32),
      ("student.batch_size", 4),
      *((f"synthetic.{key}", value) for key, value in SYNTHETIC.items()))]
  result = subprocess.run([sys.executable, "-m", "kd_landmarks.main", "--config", "configs/demo.py:phase=student",
                           "--workdir", str(tmp_path / "run"), *overrides],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert result.returncode == errors.EXIT_CODE and "Traceback" not in result.stderr, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: {folder}: the teacher outputs do not match the training split: num_examples 5 "
                         "(the training split: 6)"), line
  assert not (tmp_path / "run" / "student_kd").exists()
