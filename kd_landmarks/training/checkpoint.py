"""Checkpoints of one trained model directory, and loading a trained model back for inference.

A model directory (``DIR/teacher_tough``, ``DIR/student_kd``, ...) holds:

* ``model.json``: what rebuilds the module without the config (model name, num_landmarks, image_size,
  dataset, overrides, dtype) plus the phase and loss it was trained with;
* ``checkpoints/``: orbax ``CheckpointManager`` of the full train state (step, params, batch_stats,
  optimiser state), saved periodically, the newest few kept; training resumes from the newest, unless
  model.json says it is another model (``check_resumable``);
* ``best/``: orbax ``CheckpointManager`` of the inference variables (params, batch_stats) only, keeping the
  one with the lowest validation NME.

Frozen teachers never enter a student's checkpoints: the student's train state holds only the student.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kd_landmarks import errors
from kd_landmarks import files
from kd_landmarks import models

MODEL_JSON = "model.json"
STATE_DIR = "checkpoints"
BEST_DIR = "best"
# Written when training finished; its mtime tells the teacher cache and the evaluation whether they are
# older than the model.
DONE_FILE = "train_done.json"
# model.json keys that rebuild the module; the loader refuses a file missing any of them.
REQUIRED_MODEL_KEYS = ("model", "num_landmarks", "image_size", "dataset", "overrides", "dtype")
# The keys a checkpoint belongs to: another value is another model (parameter tree, input or data), which
# training must not resume. Not 'dtype': it is the compute precision --platform sets, the parameters stay
# float32, and moving a run to platform=cpu is the advice for a bfloat16 overflow. Steps, learning rate,
# logging and the rest of 'config' may change across a resume.
RESUME_KEYS = ("model", "overrides", "num_landmarks", "image_size", "dataset")
# Where restore_state moves a train-state step it cannot read, so that training can save that step again.
UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(errors.UserError, RuntimeError):
  """No saved step of a model directory can be read; the message says which files and what to delete."""


class ModelJsonError(errors.UserError, ValueError):
  """model.json is not valid JSON, or describes another network than the checkpoint holds."""


def _one_line(error: BaseException) -> str:
  """An orbax / tensorstore error in one line (their messages run to dozens of lines)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = lines[0] if lines else ""
  return f"{type(error).__name__}: {text[:300]}"


def _bad_metadata(step_dir: str) -> str:
  """Names an empty or non-JSON orbax metadata file in ``step_dir`` (orbax's JSONDecodeError names none)."""
  for root, _, names in os.walk(step_dir):
    for name in names:
      if "METADATA" in name:
        path = os.path.join(root, name)
        try:
          with open(path) as f:
            json.load(f)
        except (OSError, ValueError):
          return f" ({path} is empty or not JSON)"
  return ""


def write_model_json(model_dir: str, meta: Mapping[str, Any]) -> str:
  """Writes ``model_dir/model.json`` (required keys: ``REQUIRED_MODEL_KEYS``). Returns its path."""
  missing = [key for key in REQUIRED_MODEL_KEYS if key not in meta]
  if missing:
    raise ValueError(f"model.json for {model_dir} lacks {missing}; it needs all of {REQUIRED_MODEL_KEYS}")
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, MODEL_JSON)
  with files.atomic_write(path) as f:  # A killed run never leaves half a model.json behind.
    json.dump(_jsonable(dict(meta)), f, indent=2, sort_keys=True)
  return path


def read_model_json(model_dir: str) -> dict:
  """Reads ``model_dir/model.json`` with an error naming what is missing and how to make it."""
  path = os.path.join(model_dir, MODEL_JSON)
  if not os.path.exists(path):
    raise errors.MissingFileError(
        f"{path} does not exist: {model_dir} is not a trained model directory. Train one with "
        "`python -m kd_landmarks.main --config configs/<dataset>.py --workdir DIR` and pass e.g. "
        "DIR/student_kd.")
  meta = _load_model_json(path)
  missing = [key for key in REQUIRED_MODEL_KEYS if key not in meta]
  if missing:
    raise ModelJsonError(f"{path} lacks the keys {missing}; retrain or add them by hand")
  return meta


def _load_model_json(path: str) -> dict:
  """json.load with an error naming the file and the fix (a bare JSONDecodeError names no file)."""
  try:
    with open(path) as f:
      meta = json.load(f)
  except ValueError as error:
    raise ModelJsonError(
        f"{path} is not valid JSON ({error}): delete it and re-run this model's training phase, which "
        "rewrites it from the config, or restore it from a copy") from None
  if not isinstance(meta, dict):
    raise ModelJsonError(f"{path} holds a {type(meta).__name__}, not a JSON object: delete it and re-run this "
                     "model's training phase, which rewrites it from the config")
  return meta


def resumable_meta(model_dir: str) -> dict | None:
  """The model.json of a model with a saved step (what a run would resume), or None: no model.json, or
  no saved step."""
  path = os.path.join(model_dir, MODEL_JSON)
  if not os.path.exists(path) or not has_checkpoint(model_dir):
    return None
  return _load_model_json(path)


def check_resumable(model_dir: str, meta: Mapping[str, Any]) -> dict | None:
  """Raises :class:`errors.DataError` (a ValueError) when ``model_dir`` holds a checkpoint of another model
  than ``meta`` describes; returns the resumable model's model.json (:func:`resumable_meta`), or None.

  Compares the stored model.json with ``meta`` (what this run would write) on ``RESUME_KEYS``; a
  directory without model.json or without a saved step has nothing to resume and passes.
  """
  stored = resumable_meta(model_dir)
  if stored is None:
    return None
  # Through JSON, as model.json was written, so that a tuple in the overrides equals its stored list.
  configured = json.loads(json.dumps(_jsonable(dict(meta))))
  absent = "(absent)"
  differences = [f"  {key}: stored {stored.get(key, absent)!r}, configured {configured.get(key, absent)!r}"
                 for key in RESUME_KEYS if stored.get(key, absent) != configured.get(key, absent)]
  if differences:
    raise errors.DataError(
        f"{model_dir} holds a checkpoint of another model than this run trains, so training will not "
        "resume from it:\n" + "\n".join(differences) +
        f"\nUse a new --workdir, or delete {model_dir} to start over.")
  return stored


def stored_meta(model_dir: str) -> dict | None:
  """``model_dir/model.json`` as recorded, or None when there is none (a model not started)."""
  path = os.path.join(model_dir, MODEL_JSON)
  return _load_model_json(path) if os.path.exists(path) else None


def trained_steps(model_dir: str) -> int | None:
  """The step ``train_done.json`` records (training finished there), or None when it is absent."""
  path = os.path.join(model_dir, DONE_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return int(json.load(f)["step"])
  except (ValueError, KeyError, TypeError):  # A damaged marker: the model counts as unfinished.
    return None


# Beside the model directories of a workdir: models whose inputs changed, moved there before their
# directory is trained again (``move_aside``). Not a model directory itself, so no phase reads them.
SUPERSEDED_DIR = "superseded"


def move_aside(model_dir: str) -> str:
  """Moves ``model_dir`` to ``<its parent>/superseded/<name>-<UTC time>`` and returns the new path: kept, out
  of the way of the model trained in its place."""
  model_dir = os.path.normpath(model_dir)
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  base = os.path.join(os.path.dirname(model_dir), SUPERSEDED_DIR, f"{os.path.basename(model_dir)}-{stamp}")
  target, suffix = base, 1
  while os.path.exists(target):
    target, suffix = f"{base}-{suffix}", suffix + 1
  os.makedirs(os.path.dirname(target), exist_ok=True)
  os.replace(model_dir, target)
  return target


def has_checkpoint(model_dir: str) -> bool:
  """Whether ``model_dir`` holds a saved train state or best model (what a new run would build on)."""
  for directory, make_manager in ((STATE_DIR, state_manager), (BEST_DIR, best_manager)):
    if os.path.isdir(os.path.join(model_dir, directory)):
      with make_manager(model_dir, create=False) as manager:
        if manager.latest_step() is not None:
          return True
  return False


def state_manager(model_dir: str, *, max_to_keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
  """The manager of the full train state (periodic saves, resume)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(model_dir, STATE_DIR)), options=options)


def best_manager(model_dir: str, *, create: bool = True) -> ocp.CheckpointManager:
  """The manager keeping the inference variables with the lowest validation NME."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda metrics: float(metrics["val_nme"]), best_mode="min",
      keep_checkpoints_without_metrics=False, create=create, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(model_dir, BEST_DIR)), options=options)


# Beside each saved train state: a SHA-256 of its arrays. Orbax stores raw float data without a checksum,
# so a flipped bit in a checkpoint file restores silently as a wrong value (measured: 2.7e14 instead of ~1).
# It also records model.json's TRAINED_AS_KEYS as they were when the step was saved.
CHECKSUM_FILE = "kd_landmarks_checksum.json"
# What the weights cannot tell by their shapes: a fully convolutional network with global pooling has the
# same parameters at every input size, yet predicts wrongly at another one (a 64 px student fed 48 px crops
# is 5 px off on average). Kept with each saved step, since model.json is rewritten by each run and may be
# edited by hand; load_inference_variables compares the two.
TRAINED_AS_KEYS = ("image_size", "num_landmarks")


def tree_checksum(tree) -> str:
  """SHA-256 over every leaf's path, shape and bytes (host arrays). Integers are hashed as int64: orbax
  restores the step counter in the target's integer width, which may differ from the one saved."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.asarray(leaf)
    if np.issubdtype(array.dtype, np.integer):
      array = array.astype(np.int64)
    array = np.ascontiguousarray(array)
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


# How tensorstore ends the message of a failed file operation: "... No space left on device [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


class _DropLogsMatching(logging.Filter):
  """Drops error records whose message matches ``pattern`` (a failure that is raised and reported anyway)."""

  def __init__(self, pattern: re.Pattern):
    super().__init__()
    self.pattern = pattern

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and self.pattern.search(record.getMessage()))


@contextlib.contextmanager
def _saving(manager: ocp.CheckpointManager, step: int):
  """A full disk or a read-only folder while orbax saves ``step`` becomes one :class:`errors.WriteError`
  naming the step, and orbax's temporary step folder is removed (it is never read as a step, but it holds
  the space). tensorstore reports the failed write as a ValueError ending "[os_error_code='28']"
  (measured: a 1 MB state saved into a 200 kB tmpfs)."""
  step_dir = os.path.join(str(manager.directory), str(int(step)))
  # Orbax's writer thread also logs the failure with its traceback (absl's logger); it is reported below.
  quiet = _DropLogsMatching(_OS_ERROR_CODE)
  logging.getLogger("absl").addFilter(quiet)
  try:
    yield
  except (ValueError, OSError) as error:
    code = _OS_ERROR_CODE.search(str(error))
    os_error = error if isinstance(error, OSError) else OSError(int(code.group(1)), str(error)) if code else None
    if os_error is None or errors.write_error(os_error, step_dir) is None:
      raise
    for leftover in os.listdir(str(manager.directory)):
      if leftover.startswith(f"{int(step)}.orbax-checkpoint-tmp"):
        shutil.rmtree(os.path.join(str(manager.directory), leftover), ignore_errors=True)
    # Named by the step, not by tensorstore's chunk file inside orbax's temporary folder.
    raise errors.write_error(OSError(os_error.errno, os_error.strerror, step_dir), step_dir) from None
  finally:
    logging.getLogger("absl").removeFilter(quiet)


def save_state(manager: ocp.CheckpointManager, step: int, state_tree: Mapping[str, Any]) -> None:
  """Saves a train-state pytree (a dict) at ``step``, waits for it to be on disk, and writes the
  checksum :func:`restore_state` verifies. A full disk or a read-only folder is a :class:`errors.WriteError`
  naming the step; nothing of the step is left to be read back."""
  with _saving(manager, step):
    manager.save(int(step), args=ocp.args.StandardSave(dict(state_tree)), force=True)
    manager.wait_until_finished()
  _write_checksum(manager, step, state_tree)


def _write_checksum(manager: ocp.CheckpointManager, step: int, tree) -> None:
  step_dir = os.path.join(str(manager.directory), str(int(step)))
  # A best/ step that lost to a better one is gone already (max_to_keep=1).
  if jax.process_index() == 0 and os.path.isdir(step_dir):
    record = {"sha256": tree_checksum(dict(tree))}
    model_json = os.path.join(os.path.dirname(str(manager.directory)), MODEL_JSON)
    if os.path.exists(model_json):  # Training writes it before its first step is saved.
      try:
        meta = _load_model_json(model_json)
        record["trained_as"] = {key: meta[key] for key in TRAINED_AS_KEYS if key in meta}
      except ModelJsonError:  # Unreadable: the step is kept, its loader reports model.json.
        pass
    with files.atomic_write(os.path.join(step_dir, CHECKSUM_FILE)) as f:
      json.dump(record, f)


def _verify_checksum(step_dir: str, restored) -> None:
  """Raises ValueError when the restored arrays differ from what was saved (steps saved before the
  checksum existed are not checked)."""
  path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    expected = json.load(f).get("sha256")
  if tree_checksum(dict(restored)) != expected:
    raise ValueError(f"checksum mismatch: the arrays read back differ from those saved ({path}); a file of "
                     "this step was changed or damaged after it was written")


def restore_state(manager: ocp.CheckpointManager, target: Mapping[str, Any], step: int | None = None):
  """Restores the newest (or ``step``) train state into the structure of ``target``; None if none saved.

  Without ``step``: a newest step that cannot be read (truncated or corrupt file, empty ``_METADATA``) is
  reported in one line (its path and orbax's reason), moved to ``UNREADABLE_DIR`` beside the checkpoints so
  that training can save that step again, and the next older step is tried. When none can be read,
  raises :class:`CheckpointError` naming each and the directory to delete.
  """
  if step is not None:
    return manager.restore(step, args=ocp.args.StandardRestore(dict(target)))
  directory = str(manager.directory)
  failures = []
  for candidate in sorted(manager.all_steps(), reverse=True):
    step_dir = os.path.join(directory, str(candidate))
    try:
      restored = manager.restore(candidate, args=ocp.args.StandardRestore(dict(target)))
      _verify_checksum(step_dir, restored)
    except Exception as error:  # pylint: disable=broad-except  (orbax/tensorstore raise ValueError,
      # JSONDecodeError, OSError or their own types for a damaged step; each is reported, none swallowed)
      reason = _one_line(error) + _bad_metadata(step_dir)
      logging.warning("checkpoint %s cannot be read (%s); trying the next older one", step_dir, reason)
      failures.append((step_dir, reason))
      continue
    if failures:
      aside = os.path.join(os.path.dirname(directory), UNREADABLE_DIR)
      os.makedirs(aside, exist_ok=True)
      for bad_dir, _ in failures:
        os.replace(bad_dir, os.path.join(aside, f"{os.path.basename(bad_dir)}-{int(time.time())}"))
      manager.reload()
      logging.warning("resuming from step %d of %s; the unreadable newer step(s) were moved to %s",
                      candidate, directory, aside)
    return restored
  if failures:
    raise CheckpointError(
        f"no checkpoint in {directory} can be read: "
        + "; ".join(f"{path}: {reason}" for path, reason in failures)
        + f". Delete {directory} to train this model from the start (or restore those files).")
  return None


def save_best(manager: ocp.CheckpointManager, step: int, variables: Mapping[str, Any],
              val_nme: float) -> bool:
  """Offers inference variables scored by ``val_nme``; orbax keeps only the best. Returns True if saved."""
  if not np.isfinite(val_nme):
    return False  # A NaN score would be ranked arbitrarily; never let it displace a good model.
  with _saving(manager, step):
    saved = manager.save(int(step), args=ocp.args.StandardSave(dict(variables)),
                         metrics={"val_nme": float(val_nme)}, force=True)
    manager.wait_until_finished()
  if saved:
    _write_checksum(manager, step, variables)
  return bool(saved)


def build_model(meta, kernels: models.Kernels = models.PORTABLE):
  """The network ``meta`` (model.json) describes, computed with ``kernels`` (same parameters whatever they are)."""
  return models.create_model(meta["model"], num_landmarks=int(meta["num_landmarks"]), kernels=kernels,
                             dtype=dtype_of(meta["dtype"]), **dict(meta["overrides"]))


def load_inference_variables(model_dir: str):
  """Rebuilds a trained model for predict/export: returns ``(module, variables, meta)``.

  ``variables`` = {'params', 'batch_stats'} from the best checkpoint by validation NME, else from the
  newest train-state checkpoint. ``meta`` is model.json plus ``checkpoint`` = (kind, step).
  """
  meta = read_model_json(model_dir)
  module = build_model(meta)
  variables, source = _restore_variables(model_dir)
  _check_variables_match(module, variables, meta, model_dir)
  _check_trained_as(meta, model_dir, source)
  meta = dict(meta, checkpoint=source)
  return module, variables, meta


def _check_trained_as(meta, model_dir: str, source) -> None:
  """Raises :class:`ModelJsonError` naming model.json when its ``image_size`` or ``num_landmarks`` differ
  from those the restored step was saved with (``TRAINED_AS_KEYS``; steps saved without them pass)."""
  kind, step = source
  step_dir = os.path.join(model_dir, BEST_DIR if kind == "best" else STATE_DIR, str(step))
  record_path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.exists(record_path):
    return
  with open(record_path) as f:
    trained_as = json.load(f).get("trained_as") or {}
  path = os.path.join(model_dir, MODEL_JSON)
  for key in TRAINED_AS_KEYS:
    if key in trained_as and meta.get(key) != trained_as[key]:
      raise ModelJsonError(
          f"{path} says {key}={meta.get(key)!r} but the checkpoint {step_dir} was trained with "
          f"{key}={trained_as[key]!r}: set \"{key}\": {json.dumps(trained_as[key])} in {path} (or retrain)")


def _check_variables_match(module, variables, meta, model_dir: str) -> None:
  """Raises ValueError naming model.json's field when the checkpoint holds another network's parameters
  (instead of flax's ScopeParamShapeError deep inside the first forward pass). Shapes only: eval_shape."""
  size = int(meta["image_size"])
  rng = jax.random.PRNGKey(0)
  expected = jax.eval_shape(lambda: module.init({"params": rng, "dropout": rng},
                                                jnp.zeros((1, size, size, 3), jnp.float32), train=False))
  expected = {k: v for k, v in traverse_util.flatten_dict(dict(expected)).items() if k[0] in variables}
  stored = traverse_util.flatten_dict(dict(variables))
  path = os.path.join(model_dir, MODEL_JSON)
  num_landmarks = int(meta["num_landmarks"])
  for key in sorted(set(expected) | set(stored)):
    want = tuple(expected[key].shape) if key in expected else None
    got = tuple(np.shape(stored[key])) if key in stored else None
    if want == got:
      continue
    name = "/".join(map(str, key))
    if want and got and len(want) == len(got) and want[:-1] == got[:-1] and want[-1] == 2 * num_landmarks \
        and got[-1] % 2 == 0:
      raise ModelJsonError(
          f"{path} says num_landmarks={num_landmarks} but the checkpoint's output layer ({name}, shape "
          f"{got}) predicts {got[-1] // 2} landmarks: set \"num_landmarks\": {got[-1] // 2} in {path}")
    raise ModelJsonError(
        f"{path} does not describe the network in the checkpoint: {name} has shape {got} in the checkpoint "
        f"but {want} for model.json's model={meta['model']!r}, overrides={meta['overrides']}; restore "
        f"model.json from a copy or retrain {model_dir}")


def _restore_variables(model_dir: str):
  """Inference variables from ``best/`` if present, else from ``checkpoints/``, as numpy pytrees."""
  best_dir = os.path.join(model_dir, BEST_DIR)
  if os.path.isdir(best_dir):
    manager = best_manager(model_dir, create=False)
    step = manager.best_step()
    if step is None:
      step = manager.latest_step()
    if step is not None:
      restored = _restore_for_inference(manager, step, best_dir)
      return _variables_only(restored), ("best", int(step))
  state_dir = os.path.join(model_dir, STATE_DIR)
  if os.path.isdir(state_dir):
    manager = state_manager(model_dir, create=False)
    step = manager.latest_step()
    if step is not None:
      restored = _restore_for_inference(manager, step, state_dir)
      return _variables_only(restored), ("latest", int(step))
  raise errors.MissingFileError(
      f"no checkpoint in {best_dir} or {state_dir}: the model in {model_dir} was never saved. Train it "
      "(phase teacher_tough / teacher_tolerant / student) before predicting or exporting.")


def _restore_for_inference(manager, step: int, directory: str):
  step_dir = os.path.join(directory, str(step))
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    if os.path.basename(directory) == BEST_DIR:  # Plain dicts, as saved: the checksum's paths match.
      _verify_checksum(step_dir, restored)
    return restored
  except Exception as error:  # pylint: disable=broad-except  (see restore_state)
    raise CheckpointError(
        f"checkpoint {step_dir} cannot be read ({_one_line(error)}{_bad_metadata(step_dir)}); delete "
        f"{step_dir} to use the model's other checkpoint, or retrain it") from None


def _variables_only(restored: Mapping[str, Any]) -> dict:
  variables = {"params": restored["params"]}
  batch_stats = restored.get("batch_stats")
  if batch_stats:  # Models without batch norm have an empty collection; flax wants it absent then.
    variables["batch_stats"] = batch_stats
  return variables


def dtype_of(name: str):
  """model.json's dtype name as a JAX dtype."""
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ModelJsonError(f"unknown dtype {name!r} in model.json; use float32, bfloat16 or float16") from None


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_done(model_dir: str, step: int) -> None:
  """Marks training finished. Rewritten only when the step changes: its mtime tells the teacher cache
  and the evaluation whether they are older than the model."""
  path = os.path.join(model_dir, DONE_FILE)
  if jax.process_index() != 0:
    return
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f).get("step") == int(step):
        return
  with files.atomic_write(path) as f:  # Whole or absent: a half-written file would break every later run.
    json.dump({"step": int(step), "time": time.time()}, f)
