"""Provenance: each model records what made it (model.json's "provenance"), a re-run compares before it
keeps or resumes a model, and the report marks a model that is unfinished or whose inputs changed.

The pipeline tests change one input at a time on one tiny workdir (synthetic faces at 32 px, tiny MobileNetV2,
2-3 steps) and check which models were trained again, kept, or refused."""
import glob
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

import fixtures_formats as ff
from kd_landmarks import errors
from kd_landmarks import pipeline
from kd_landmarks import provenance
from kd_landmarks.datasets import builder
from kd_landmarks.datasets import teacher_cache
from kd_landmarks.evaluation import report
from kd_landmarks.training import checkpoint
from test_main import _config
from test_report import parse_table, row_of

MODELS = ("teacher_tough", "teacher_tolerant", "student_l2", "student_kd")
TINY = {"synthetic.num_train": 24, "synthetic.num_test": 8, "synthetic.image_size": 32, "image_size": 32,
        "teacher_model": "mobilenet_v2_tiny", "student_model": "mobilenet_v2_tiny",
        "teacher.batch_size": 8, "teacher.num_train_steps": 2, "student.batch_size": 8,
        "student.num_train_steps": 2, "checkpoint_every_steps": 2, "log_every_steps": 2, "eval_batch_size": 8,
        "student_seeds": 1, "student_loss": "l2,kd", "box_robustness": False}


# ------------------------------------------------------------------------------------------ fingerprints


def test_fingerprint_is_of_the_values_not_their_spelling():
  inputs = {"config": {"optimizer": {"learning_rate": 1e-3, "b1": 0.9}, "overrides": {"width": (1, 3)}},
            "data": {"splits": {"train": {"content": "ab" * 32}}}}
  respelled = {"data": {"splits": {"train": {"content": "ab" * 32}}},
               "config": {"overrides": {"width": [1, 3]}, "optimizer": {"b1": 0.9, "learning_rate": 0.001}}}
  assert provenance.fingerprint(inputs) == provenance.fingerprint(respelled)
  assert provenance.fingerprint(inputs) == hashlib.sha256(json.dumps(
      respelled, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
  changed = json.loads(json.dumps(inputs))
  changed["config"]["optimizer"]["learning_rate"] = 1e-12
  changed["data"]["splits"]["train"]["content"] = "cd" * 32
  assert provenance.fingerprint(changed) != provenance.fingerprint(inputs)
  # Each changed input by its path, a SHA-256 by its first characters; nothing for equal inputs.
  assert provenance.differences(dict(inputs, fingerprint="x"), dict(changed, fingerprint="y")) == [
      "config.optimizer.learning_rate 0.001 -> 1e-12", "data.splits.train.content abababababab -> cdcdcdcdcdcd"]
  assert provenance.differences(inputs, respelled) == []
  assert provenance.differences(None, inputs) == [
      "inputs not recorded (trained before model.json recorded its provenance)"]


def _write_shard(path, records):
  from array_record.python import array_record_module
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


def _example(**features):
  from tensorflow_datasets.proto import tf_example_pb2
  example = tf_example_pb2.Example()
  for key, values in features.items():
    example.features.feature[key].float_list.value.extend(values)
  return example.SerializeToString()


def test_records_fingerprint_follows_the_examples_not_their_bytes_or_folder(tmp_path):
  """Protobuf writes a map's entries in an order that follows the writing process's hash seed: the same
  example can be two byte strings. Concatenated serialisations of one-feature examples parse as one example
  with both features, in the order given, which makes both byte strings here."""
  first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
  for folder in (first, second, third):
    folder.mkdir()
  a, b = _example(landmarks=[1.0, 2.0]), _example(index=[3.0])
  name = "x-train.array_record-00000-of-00001"
  _write_shard(first / name, [a + b, _example(index=[4.0])])
  _write_shard(second / name, [b + a, _example(index=[4.0])])
  assert (first / name).read_bytes() != (second / name).read_bytes()  # The bytes differ...
  fingerprint = provenance.records_fingerprint([first / name])
  assert provenance.records_fingerprint([second / name]) == fingerprint  # ...the examples do not.
  # By hand: each example in key order ("index" < "landmarks"), its length before it.
  from tensorflow_datasets.proto import tf_example_pb2
  canonical = []
  for record in (a + b, _example(index=[4.0])):
    example = tf_example_pb2.Example()
    example.ParseFromString(record)
    canonical.append(example.SerializeToString(deterministic=True))
  assert canonical[0].index(b"index") < canonical[0].index(b"landmarks")
  records = hashlib.sha256(b"".join(len(c).to_bytes(8, "little") + c for c in canonical)).hexdigest()
  assert fingerprint == hashlib.sha256(f"{name}\t{records}\n".encode()).hexdigest()
  # One value changed: another fingerprint.
  _write_shard(third / name, [a + b, _example(index=[4.5])])
  assert provenance.records_fingerprint([third / name]) != fingerprint


# ---------------------------------------------------------------------------------------------- pipeline


def test_an_unknown_changed_inputs_policy_is_one_config_error():
  with pytest.raises(errors.ConfigError, match=r"config.changed_inputs='discard'; choose from \('retrain', 'keep'\)"):
    pipeline.validate_config(_config(changed_inputs="discard"))


def _run(workdir, **changes):
  pipeline.run(_config(**{**TINY, **changes}), str(workdir))


def _state(workdir):
  """Per model: model.json's bytes and train_done.json's mtime (what a retrain or a rewrite changes)."""
  state = {}
  for name in MODELS:
    model_dir = os.path.join(workdir, name)
    if os.path.exists(os.path.join(model_dir, checkpoint.MODEL_JSON)):
      with open(os.path.join(model_dir, checkpoint.MODEL_JSON), "rb") as f:
        done = os.path.join(model_dir, checkpoint.DONE_FILE)
        state[name] = (f.read(), os.path.getmtime(done) if os.path.exists(done) else None)
  return state


def _recorded(workdir, name) -> dict:
  return checkpoint.stored_meta(os.path.join(workdir, name))["provenance"]


def _superseded(workdir) -> dict:
  """Model directory name -> the recorded provenance of each copy moved aside (oldest first)."""
  moved = {}
  for path in sorted(glob.glob(os.path.join(workdir, checkpoint.SUPERSEDED_DIR, "*"))):
    name = os.path.basename(path).split("-", 1)[0]  # <model>-<UTC time>[-<n>]
    moved.setdefault(name, []).append(checkpoint.stored_meta(path)["provenance"])
  return moved


def _models_table(workdir):
  text = open(os.path.join(workdir, "report.md")).read()
  return parse_table(text, "## Models"), text.split("## Warnings")[1] if "## Warnings" in text else ""


@pytest.mark.slow
def test_each_input_changed_in_turn_retrains_or_keeps_what_depends_on_it(tmp_path):
  workdir = tmp_path / "run"
  _run(workdir)
  first = _state(workdir)
  assert set(first) == set(MODELS)
  records = {name: _recorded(workdir, name) for name in MODELS}
  train = builder.load_split("synthetic", "train", workdir / "data")
  cache = teacher_cache.load_teacher_outputs(workdir / pipeline.CACHE_DIR, dataset="synthetic")
  for name, record in records.items():
    assert record["fingerprint"] == provenance.fingerprint({k: v for k, v in record.items() if k != "fingerprint"})
    assert record["data"]["splits"]["train"] == {"num_examples": 24, "content": train.content_fingerprint()}
    assert record["config"]["optimizer"]["learning_rate"] == 1e-2 and record["config"]["num_train_steps"] == 2
  # The KD student names the teacher outputs it read, and they the teachers that made them.
  assert records["student_kd"]["teachers"]["outputs"] == cache.content
  for teacher in pipeline.TEACHERS:
    assert records["student_kd"]["teachers"]["teachers"][teacher]["fingerprint"] == \
        records[f"teacher_{teacher}"]["fingerprint"] == cache.metadata["teachers"][teacher]["fingerprint"]
  assert "teachers" not in records["student_l2"]  # The L2 baseline reads no teacher.
  rows, warnings = _models_table(workdir)
  for name in MODELS:
    assert row_of(rows, Directory=name)["Provenance"] == f"`{records[name]['fingerprint'][:12]}`"
  assert not warnings

  # Fields that do not change the weights (logging, checkpoint cadence, evaluation batch): all kept as
  # they are, model.json not rewritten, nothing moved aside, the teacher outputs not rebuilt.
  info_file = teacher_cache.dataset_dir(workdir / pipeline.CACHE_DIR, "synthetic") / "dataset_info.json"
  cache_time = os.path.getmtime(info_file)
  _run(workdir, log_every_steps=1, checkpoint_every_steps=1, keep_checkpoints=3, eval_batch_size=4)
  assert _state(workdir) == first and not _superseded(workdir)
  assert os.path.getmtime(info_file) == cache_time

  # A teacher retrained: the other teacher deleted, the Tough one trained longer. The student phase on its
  # own refuses the workdir's teacher outputs, which the old Tough teacher made.
  shutil.rmtree(workdir / "teacher_tolerant")
  _run(workdir, phase="teacher_tough", **{"teacher.num_train_steps": 3})
  assert _superseded(workdir)["teacher_tough"] == [records["teacher_tough"]]
  retrained = _recorded(workdir, "teacher_tough")
  assert retrained["config"]["num_train_steps"] == 3 and checkpoint.trained_steps(str(workdir / "teacher_tough")) == 3
  with pytest.raises(teacher_cache.TeacherCacheMismatchError, match=(
      f"made by the tough teacher {records['teacher_tough']['fingerprint'][:12]}, but .*teacher_tough now "
      f"holds {retrained['fingerprint'][:12]}")):
    _run(workdir, phase="student", **{"teacher.num_train_steps": 3})
  # phase=all: the Tolerant teacher trained, the outputs rebuilt, the KD student trained again on them (its
  # old copy moved aside, differing in its teachers only); the L2 student, which reads no teacher, kept.
  _run(workdir, **{"teacher.num_train_steps": 3})
  after = _state(workdir)
  assert after["student_l2"] == first["student_l2"]
  assert _superseded(workdir)["student_kd"] == [records["student_kd"]]
  student_kd = _recorded(workdir, "student_kd")
  changed = provenance.differences(records["student_kd"], student_kd)
  assert changed and all(line.startswith("teachers.") for line in changed), changed
  cache = teacher_cache.load_teacher_outputs(workdir / pipeline.CACHE_DIR, dataset="synthetic")
  assert student_kd["teachers"]["outputs"] == cache.content != records["student_kd"]["teachers"]["outputs"]
  for teacher in pipeline.TEACHERS:
    assert cache.metadata["teachers"][teacher]["fingerprint"] == _recorded(workdir, f"teacher_{teacher}")["fingerprint"]
  records = {name: _recorded(workdir, name) for name in MODELS}

  # A config field that changes the weights, on a finished student (phase=student, learning rate 1e-12):
  # moved aside and trained again; model.json records the rate its new weights were trained with.
  tiny_lr = {"teacher.num_train_steps": 3, "optimizer.learning_rate": 1e-12}
  _variables = lambda name: checkpoint.load_inference_variables(str(workdir / name))[1]
  old_params = _variables("student_l2")["params"]
  _run(workdir, phase="student", student_loss="l2", **tiny_lr)
  assert _superseded(workdir)["student_l2"] == [records["student_l2"]]
  assert _recorded(workdir, "student_l2")["config"]["optimizer"]["learning_rate"] == 1e-12
  assert checkpoint.trained_steps(str(workdir / "student_l2")) == 2
  assert _recorded(workdir, "student_kd") == records["student_kd"]
  new_params = _variables("student_l2")["params"]
  assert any(not np.allclose(a, b) for a, b in zip(jax_leaves(old_params), jax_leaves(new_params)))
  # The report of this config marks the models trained at another rate: the teachers and the KD student.
  _run(workdir, phase="report", **tiny_lr)
  rows, warnings = _models_table(workdir)
  for name in MODELS:
    marked = "**inputs changed**" in row_of(rows, Directory=name)["Provenance"]
    assert marked == (name != "student_l2"), (name, row_of(rows, Directory=name))
  assert "teacher_tough was made from other inputs than the config names now: config.optimizer.learning_rate " \
         "0.01 -> 1e-12" in warnings

  # Kept on purpose: phase=all at the teachers' rate with changed_inputs=keep keeps the L2 student as it is
  # (model.json still at 1e-12), and the report marks it alone.
  state = _state(workdir)
  _run(workdir, changed_inputs="keep", **{"teacher.num_train_steps": 3})
  assert _state(workdir) == state and len(_superseded(workdir)["student_l2"]) == 1
  rows, warnings = _models_table(workdir)
  for name in MODELS:
    marked = "**inputs changed**" in row_of(rows, Directory=name)["Provenance"]
    assert marked == (name == "student_l2"), (name, row_of(rows, Directory=name))

  # Unfinished: without train_done.json the report says so; 'keep' will not finish it on other inputs.
  os.remove(workdir / "student_l2" / checkpoint.DONE_FILE)
  _run(workdir, phase="report", **tiny_lr)
  rows, warnings = _models_table(workdir)
  assert row_of(rows, Directory="student_l2")["Provenance"].endswith("` **unfinished**")
  assert "**unfinished**" not in row_of(rows, Directory="student_kd")["Provenance"]
  assert "student_l2 is unfinished (train_done.json is missing, 2 steps configured, step 2 evaluated)" in warnings
  with pytest.raises(pipeline.ChangedInputsError) as raised:
    _run(workdir, phase="student", changed_inputs="keep", **{"teacher.num_train_steps": 3})
  message = errors.one_line(raised.value)
  assert isinstance(raised.value, errors.UserError) and str(raised.value) == message
  assert "student_l2 is unfinished and its inputs changed since it started (config.optimizer.learning_rate " \
         "1e-12 -> 0.01" in message and "--config.changed_inputs=retrain" in message


def jax_leaves(tree):
  return jax.tree_util.tree_leaves(tree)


@pytest.mark.slow
def test_a_re_prepared_dataset_with_one_edited_point_retrains_the_model(tmp_path):
  manual_dir, data_dir = tmp_path / "manual", tmp_path / "data"
  ff.write_300w(manual_dir, {"afw": 4, "helen/trainset": 4, "helen/testset": 1, "lfpw/testset": 1, "ibug": 1})
  builder.prepare("300w", data_dir=data_dir, manual_dir=manual_dir, show_progress=False, allow_partial=True)
  settings = {**TINY, "dataset": "300w", "data_dir": str(data_dir), "phase": "teacher_tough",
              "teacher.batch_size": 4, "val_holdout": 0.25}
  workdir = tmp_path / "run"
  pipeline.run(_config(**settings), str(workdir))
  before = _recorded(workdir, "teacher_tough")
  # One coordinate of one annotation moved by 5 px; prepared again.
  pts = sorted((manual_dir / "afw").glob("*.pts"))[0]
  lines = pts.read_text().splitlines()
  x, y = lines[3].split()
  lines[3] = f"{float(x) + 5:.6f} {y}"
  pts.write_text("\n".join(lines) + "\n")
  builder.prepare("300w", data_dir=data_dir, manual_dir=manual_dir, show_progress=False, allow_partial=True,
                  overwrite=True)
  pipeline.run(_config(**settings), str(workdir))
  after = _recorded(workdir, "teacher_tough")
  assert _superseded(workdir)["teacher_tough"] == [before]
  assert provenance.differences(before, after) == [
      f"data.splits.train.content {before['data']['splits']['train']['content'][:12]} -> "
      f"{after['data']['splits']['train']['content'][:12]}"]
