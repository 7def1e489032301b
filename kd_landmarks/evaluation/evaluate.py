"""Evaluation in original-image pixels (Section 4.2): NME, FR@0.1, AUC@0.1 per split and WFLW subset.

A prediction travels back through every crop it came out of:
  normalised model output -> output pixels (``coords.to_pixels``) -> stored-crop pixels (the eval crop's
  ``out_to_input`` affine) -> original-image pixels (the example's ``crop_to_original`` affine).
Per model directory this writes ``eval/<split>.npz`` (pred, gt [N, K, 2] original px, image_id, attributes,
occluded) and ``eval/metrics.json`` {split: {nme, nme_inter_pupil (300w/synthetic), fr, auc, count},
"selection": {split, on_test, checkpoint, step}} (which split chose the checkpoint, and its step), which
the report reads, and the same figures to TensorBoard (``events/``).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from kd_landmarks import augment
from kd_landmarks.training import checkpoint
from kd_landmarks import coords
from kd_landmarks.training import input_pipeline
from kd_landmarks import metrics
from kd_landmarks.training import parallel
from kd_landmarks.datasets import images
from kd_landmarks.datasets import info



def predict_crop_pixels(module, variables, images_uint8, landmarks_crop, *, image_size: int):
  """Predictions in stored-crop pixels for a batch, using the deterministic eval crop around the
  ground-truth box (as the paper evaluates)."""
  images, _, out_to_input = augment.preprocess_eval(
      images_uint8, {"landmarks": landmarks_crop}, reference="landmarks", out_size=image_size)
  prediction = module.apply(variables, images, train=False).astype(jnp.float32)
  prediction_out_px = coords.to_pixels(prediction, image_size)
  return coords.apply_affine(out_to_input.astype(jnp.float32), prediction_out_px)


@functools.lru_cache(maxsize=16)
def _compiled_predict(module, image_size, mesh):
  step = functools.partial(_predict_block, module=module, image_size=image_size)
  return parallel.compile_step(step, mesh, in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
                               out_specs=P(parallel.AXIS))


def _predict_block(variables, images, landmarks, *, module, image_size):
  return predict_crop_pixels(module, variables, images, landmarks, image_size=image_size)


# What one evaluation reads of each example; all but the image id are gathered from every process.
_EVAL_KEYS = ("image", "landmarks", "landmarks_original", "crop_to_original", "image_id", "attributes",
              "occluded", "index")
_GATHERED_DTYPES = {"mask": bool, "landmarks_original": np.float32, "crop_to_original": np.float32,
                    "attributes": np.int32, "occluded": np.int32, "index": np.int64}


def predict_source(module, variables, source, *, image_size: int, batch_size: int, mesh=None,
                   desc: str = "predict") -> dict:
  """Runs the model over a whole data source; returns numpy arrays for every example in order:
  pred_crop, pred (original px), gt (original px), image_id, attributes, occluded, index."""
  mesh = mesh or parallel.make_mesh()
  devices = mesh.devices.size
  # One fixed batch shape (a compile per shape costs seconds): round up to the device count; the
  # pipeline pads the last batches and masks the padding.
  batch_size = max(devices, -(-batch_size // devices) * devices)
  parallel.check_batch_size(batch_size, mesh)
  predict = _compiled_predict(module, int(image_size), mesh)
  variables = parallel.replicate(variables, mesh)
  num_processes = jax.process_count()
  # Process p reads the p-th contiguous block of the split; a global batch is the processes' batches
  # side by side.
  batches = input_pipeline.make_eval_iterator(
      source, batch_size=batch_size // num_processes, num_processes=num_processes,
      process_index=jax.process_index(), keys=_EVAL_KEYS)
  gathered, local_ids = [], []
  for batch in tqdm(batches, total=len(batches), desc=desc, unit="batch",
                    disable=jax.process_index() != 0, dynamic_ncols=True):
    inputs = (batch["image"], batch["landmarks"].astype(np.float32))
    pred_crop = predict(variables, *parallel.shard_host_batch(inputs, mesh))
    gathered.append(parallel.fetch_batch(dict({k: batch[k] for k in _GATHERED_DTYPES}, pred_crop=pred_crop)))
    local_ids.append(batch["image_id"])

  def in_order(key):
    # [batch, process, row] -> [process, batch, row]: each process' block, blocks in split order.
    stacked = np.stack([np.asarray(g[key]) for g in gathered])
    stacked = stacked.reshape((len(gathered), num_processes, -1) + stacked.shape[2:])
    return np.swapaxes(stacked, 0, 1).reshape((-1,) + stacked.shape[3:])

  mask = in_order("mask").astype(bool)
  dtypes = dict(_GATHERED_DTYPES, pred_crop=np.float32)
  result = {key: in_order(key)[mask].astype(dtype) for key, dtype in dtypes.items() if key != "mask"}
  result["gt"] = result.pop("landmarks_original")
  if num_processes == 1:
    image_ids = np.concatenate(local_ids)[mask]
  else:  # Strings do not all-gather: every process reads the ids of the whole split.
    image_ids = [source[position]["image_id"] for position in range(len(source))]
  result["image_id"] = np.array([images.as_str(image_id) for image_id in image_ids])
  result["pred"] = coords.apply_affine(result["crop_to_original"].astype(np.float64),
                                       result["pred_crop"].astype(np.float64)).astype(np.float32)
  return result


def mean_nme(module, variables, *, source, dataset: str, image_size: int, batch_size: int, mesh=None) -> float:
  """Mean inter-ocular NME of ``variables`` on ``source`` (the validation score for the best checkpoint)."""
  result = predict_source(module, variables, source, image_size=image_size, batch_size=batch_size,
                          mesh=mesh, desc="validate")
  return float(np.mean(metrics.image_nmes(result["pred"], result["gt"], dataset=dataset)))


def eval_splits(config) -> list[str]:
  if config.eval_splits:
    return [s.strip() for s in config.eval_splits.split(",") if s.strip()]
  dataset = info.get_info(config.dataset)
  return [s for s in dataset.splits if s != dataset.train_split]


def evaluate_model(model_dir: str, *, splits, load_split_fn: Callable[[str], Any], batch_size: int,
                   mesh=None) -> dict:
  """Evaluates the best (else newest) checkpoint of ``model_dir`` on ``splits``; writes eval/ files."""
  module, variables, meta = checkpoint.load_inference_variables(model_dir)
  dataset = meta["dataset"]
  out_dir = os.path.join(model_dir, metrics.EVAL_DIR)
  is_chief = jax.process_index() == 0
  os.makedirs(out_dir, exist_ok=True)
  all_metrics = {}
  for split in splits:
    result = predict_source(module, variables, load_split_fn(split), image_size=int(meta["image_size"]),
                            batch_size=batch_size, mesh=mesh,
                            desc=f"eval {os.path.basename(os.path.normpath(model_dir))} {split}")
    all_metrics[split] = metrics.split_metrics(result["pred"], result["gt"], dataset=dataset)
    if is_chief:
      np.savez(os.path.join(out_dir, f"{split}.npz"), pred=result["pred"], gt=result["gt"],
               image_id=result["image_id"], attributes=result["attributes"], occluded=result["occluded"])
    # Subsets by attribute flag (Table 4), unless the builder stored them as their own splits.
    for subset, rows in metrics.attribute_subsets(result["attributes"], dataset=dataset, split=split).items():
      if subset not in splits:
        all_metrics[subset] = metrics.split_metrics(result["pred"][rows], result["gt"][rows], dataset=dataset)
  all_metrics = dict(all_metrics)
  all_metrics[metrics.SELECTION_KEY] = checkpoint_selection(meta)
  if is_chief:
    with open(os.path.join(out_dir, metrics.METRICS_FILE), "w") as f:
      json.dump(all_metrics, f, indent=2, sort_keys=True)
    _write_tensorboard(model_dir, all_metrics, step=meta["checkpoint"][1])
  return all_metrics


def checkpoint_selection(meta) -> dict:
  """What chose the evaluated checkpoint: ``{split, on_test, checkpoint: 'best'|'latest', step}``.

  ``split`` is the validation split of the best-by-NME checkpoint (``train_holdout`` by default), or None
  when the newest checkpoint is evaluated (no validation ran). model.json written before the selection was
  recorded gives split ``'unknown'``.
  """
  kind, step = meta["checkpoint"]
  recorded = dict(meta.get("selection") or {})
  selection = {"checkpoint": kind, "step": int(step)}
  if kind != "best":
    return dict(selection, split=None, on_test=False)
  return dict(recorded, **selection, split=recorded.get("split", "unknown"),
              on_test=bool(recorded.get("on_test", False)))


def is_current(model_dir: str) -> bool:
  """metrics.json exists and was written after training finished (so phase=all may skip it)."""
  metrics_path = os.path.join(model_dir, metrics.EVAL_DIR, metrics.METRICS_FILE)
  done_path = os.path.join(model_dir, checkpoint.DONE_FILE)
  return (os.path.exists(metrics_path) and os.path.exists(done_path)
          and os.path.getmtime(metrics_path) >= os.path.getmtime(done_path))


def _write_tensorboard(model_dir, all_metrics, step):
  from tensorboardX import SummaryWriter  # Optional dependency (TensorBoard logs).
  writer = SummaryWriter(os.path.join(model_dir, "events"))
  try:
    for split, values in all_metrics.items():
      if split == metrics.SELECTION_KEY:
        continue
      for name, value in values.items():
        writer.add_scalar(f"eval/{split}/{name}", value, step)
  finally:
    writer.close()
