"""Evaluation in original-image pixels (Section 4.2): NME, FR@0.1, AUC@0.1 per split and WFLW subset.

A prediction travels back through every crop it came out of:
  normalised model output -> output pixels (``coords.to_pixels``) -> stored-crop pixels (the eval crop's
  ``out_to_input`` affine) -> original-image pixels (the example's ``crop_to_original`` affine).
Per model directory this writes ``eval/<split>.npz`` (pred, gt [N, K, 2] original px, image_id, attributes,
occluded) and ``eval/metrics.json`` {split: {nme, nme_inter_pupil (300w/synthetic), fr, auc, count}}, which
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

from kd_landmarks import checkpoint
from kd_landmarks import coords
from kd_landmarks import parallel

EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
FAILURE_THRESHOLD = 0.1  # FR and AUC at 0.1 (Section 4.2).
# WFLW's attribute columns, in the order of the stored `attributes` field (contracts.md).
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
INTER_PUPIL_DATASETS = ("300w", "synthetic")  # Table 3 reports 300W with inter-pupil normalisation too.


def predict_crop_pixels(module, variables, images_uint8, landmarks_crop, *, image_size: int):
  """Predictions in stored-crop pixels for a batch, using the deterministic eval crop around the
  ground-truth box (as the paper evaluates)."""
  from kd_landmarks import augment
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


def predict_source(module, variables, source, *, image_size: int, batch_size: int, mesh=None,
                   desc: str = "predict") -> dict:
  """Runs the model over a whole data source; returns numpy arrays for every example in order:
  pred_crop, pred (original px), gt (original px), image_id, attributes, occluded, index."""
  from tqdm import tqdm
  mesh = mesh or parallel.make_mesh()
  devices = mesh.devices.size
  # One fixed batch shape (a compile per shape costs seconds): round up to the device count, pad the tail.
  batch_size = max(devices, -(-batch_size // devices) * devices)
  parallel.check_batch_size(batch_size, mesh)
  predict = _compiled_predict(module, int(image_size), mesh)
  variables = parallel.replicate(variables, mesh)
  rows = parallel.host_batch_slice(batch_size)
  num_examples = len(source)
  collected = {k: [] for k in ("pred_crop", "gt", "crop_to_original", "image_id", "attributes", "occluded",
                               "index")}
  for start in tqdm(range(0, num_examples, batch_size), desc=desc, unit="batch",
                    disable=jax.process_index() != 0, dynamic_ncols=True):
    indices = np.arange(start, start + batch_size)
    valid = indices < num_examples
    indices = np.minimum(indices, num_examples - 1)  # Pad by repeating the last example; masked below.
    local_examples = _get_examples(source, indices[rows])
    images = np.stack([np.asarray(e["image"]) for e in local_examples])
    landmarks = np.stack([np.asarray(e["landmarks"], np.float32) for e in local_examples])
    pred_local = predict(variables, *parallel.shard_host_batch((images, landmarks), mesh))
    pred_crop = np.asarray(parallel.fetch_batch(pred_local))[valid]
    examples = _get_examples(source, indices[valid]) if jax.process_count() > 1 else \
        [e for e, v in zip(local_examples, valid) if v]
    collected["pred_crop"].append(pred_crop)
    collected["gt"].append(np.stack([np.asarray(e["landmarks_original"], np.float32) for e in examples]))
    collected["crop_to_original"].append(np.stack([np.asarray(e["crop_to_original"], np.float32)
                                                   for e in examples]))
    collected["image_id"].append(np.array([_as_str(e["image_id"]) for e in examples]))
    collected["attributes"].append(np.stack([np.asarray(e["attributes"], np.int32) for e in examples]))
    collected["occluded"].append(np.stack([np.asarray(e["occluded"], np.int32) for e in examples]))
    collected["index"].append(np.array([int(e["index"]) for e in examples], np.int64))
  result = {k: np.concatenate(v) for k, v in collected.items()}
  result["pred"] = coords.apply_affine(result["crop_to_original"].astype(np.float64),
                                       result["pred_crop"].astype(np.float64)).astype(np.float32)
  return result


def _get_examples(source, indices):
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def _as_str(value) -> str:
  value = np.asarray(value).item() if not isinstance(value, (str, bytes)) else value
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def split_metrics(pred, gt, *, dataset: str) -> dict:
  """NME (inter-ocular; plus inter-pupil for 300W-style data), FR@0.1 and AUC@0.1 of one split."""
  from kd_landmarks import metrics
  nmes = np.asarray(metrics.nme(pred, gt, dataset=dataset, normalization="inter_ocular"))
  failure_rate, auc = metrics.failure_rate_and_auc(nmes, threshold=FAILURE_THRESHOLD)
  result = {"nme": float(np.mean(nmes)), "fr": float(failure_rate), "auc": float(auc), "count": int(len(nmes))}
  if dataset in INTER_PUPIL_DATASETS:
    result["nme_inter_pupil"] = float(np.mean(metrics.nme(pred, gt, dataset=dataset,
                                                          normalization="inter_pupil")))
  return result


def mean_nme(module, variables, *, source, dataset: str, image_size: int, batch_size: int, mesh=None) -> float:
  """Mean inter-ocular NME of ``variables`` on ``source`` (the validation score for the best checkpoint)."""
  from kd_landmarks import metrics
  result = predict_source(module, variables, source, image_size=image_size, batch_size=batch_size,
                          mesh=mesh, desc="validate")
  return float(np.mean(metrics.nme(result["pred"], result["gt"], dataset=dataset,
                                   normalization="inter_ocular")))


def eval_splits(config) -> list[str]:
  from kd_landmarks.datasets import info
  if config.eval_splits:
    return [s.strip() for s in config.eval_splits.split(",") if s.strip()]
  dataset = info.get_info(config.dataset)
  return [s for s in dataset.splits if s != dataset.train_split]


def evaluate_model(model_dir: str, *, splits, load_split_fn: Callable[[str], Any], batch_size: int,
                   mesh=None) -> dict:
  """Evaluates the best (else newest) checkpoint of ``model_dir`` on ``splits``; writes eval/ files."""
  module, variables, meta = checkpoint.load_inference_variables(model_dir)
  dataset = meta["dataset"]
  out_dir = os.path.join(model_dir, EVAL_DIR)
  is_chief = jax.process_index() == 0
  os.makedirs(out_dir, exist_ok=True)
  all_metrics = {}
  for split in splits:
    result = predict_source(module, variables, load_split_fn(split), image_size=int(meta["image_size"]),
                            batch_size=batch_size, mesh=mesh,
                            desc=f"eval {os.path.basename(os.path.normpath(model_dir))} {split}")
    all_metrics[split] = split_metrics(result["pred"], result["gt"], dataset=dataset)
    if is_chief:
      np.savez(os.path.join(out_dir, f"{split}.npz"), pred=result["pred"], gt=result["gt"],
               image_id=result["image_id"], attributes=result["attributes"], occluded=result["occluded"])
    if dataset == "wflw" and split == "test":
      # Subsets by attribute flag (Table 4), unless the builder stored them as their own splits.
      for column, name in enumerate(WFLW_ATTRIBUTES):
        subset = f"test_{name}"
        if subset in splits:
          continue
        mask = result["attributes"][:, column] > 0
        if mask.any():
          all_metrics[subset] = split_metrics(result["pred"][mask], result["gt"][mask], dataset=dataset)
  all_metrics = dict(all_metrics)
  if is_chief:
    with open(os.path.join(out_dir, METRICS_FILE), "w") as f:
      json.dump(all_metrics, f, indent=2, sort_keys=True)
    _write_tensorboard(model_dir, all_metrics, step=meta["checkpoint"][1])
  return all_metrics


def is_current(model_dir: str) -> bool:
  """metrics.json exists and was written after training finished (so phase=all may skip it)."""
  from kd_landmarks import train
  metrics_path = os.path.join(model_dir, EVAL_DIR, METRICS_FILE)
  done_path = os.path.join(model_dir, train.DONE_FILE)
  return (os.path.exists(metrics_path) and os.path.exists(done_path)
          and os.path.getmtime(metrics_path) >= os.path.getmtime(done_path))


def _write_tensorboard(model_dir, all_metrics, step):
  from tensorboardX import SummaryWriter
  writer = SummaryWriter(os.path.join(model_dir, "events"))
  try:
    for split, values in all_metrics.items():
      for name, value in values.items():
        writer.add_scalar(f"eval/{split}/{name}", value, step)
  finally:
    writer.close()
