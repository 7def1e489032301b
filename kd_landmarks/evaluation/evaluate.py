"""Evaluation in original-image pixels (Section 4.2): NME, FR@0.1, AUC@0.1 per split and WFLW subset.

A prediction travels back through every crop it came out of:
  normalised model output -> output pixels (``coords.to_pixels``) -> stored-crop pixels (the eval crop's
  ``out_to_input`` affine) -> original-image pixels (the example's ``crop_to_original`` affine).
Per model directory this writes ``eval/<split>.npz`` (pred, gt [N, K, 2] original px, image_id, attributes,
occluded; a custom set adds visible [N, K] and face_box [N, 4], which its NME reads) and ``eval/metrics.json`` {split: {nme, nme_inter_pupil (300w/synthetic), fr, auc, count},
"selection": {split, on_test, checkpoint, step}} (which split chose the checkpoint, and its step), which
the report reads, and the same figures to TensorBoard (``events/``).
"""
from __future__ import annotations

import functools
import json
import os
import time
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
from kd_landmarks import models
from kd_landmarks.training import parallel
from kd_landmarks.datasets import images
from kd_landmarks.datasets import info



# The box-robustness table: the evaluation crop's box shifted by these fractions of its side, along +x,
# -x, +y and -y, and its side scaled by these factors. The same 16 perturbations for every model.
BOX_SHIFTS = (0.05, 0.10, 0.15)
BOX_SCALES = (0.9, 0.95, 1.05, 1.1)


def box_perturbations() -> np.ndarray:
  """``[16, 3]`` (shift_x, shift_y, scale): each shift of ``BOX_SHIFTS`` along +x, -x, +y, -y, then each
  scale of ``BOX_SCALES``."""
  rows = [row for shift in BOX_SHIFTS for row in ((shift, 0.0, 1.0), (-shift, 0.0, 1.0), (0.0, shift, 1.0),
                                                  (0.0, -shift, 1.0))]
  rows += [(0.0, 0.0, scale) for scale in BOX_SCALES]
  return np.array(rows, dtype=np.float32)


def box_robustness_split(dataset: str) -> str:
  """The split the box-robustness table is measured on: the dataset's whole test set."""
  splits = info.get_info(dataset).splits
  return "test_full" if "test_full" in splits else "test"


def predict_crop_pixels(module, variables, images_uint8, landmarks_crop, *, image_size: int,
                        box_perturbation=None):
  """Predictions in stored-crop pixels for a batch, using the deterministic eval crop around the
  ground-truth box (as the paper evaluates), optionally with that box shifted and scaled
  (``augment.preprocess_eval``'s ``box_perturbation``)."""
  images, _, out_to_input = augment.preprocess_eval(
      images_uint8, {"landmarks": landmarks_crop}, reference="landmarks", out_size=image_size,
      box_perturbation=box_perturbation)
  prediction = module.apply(variables, images, train=False).astype(jnp.float32)
  prediction_out_px = coords.to_pixels(prediction, image_size)
  return coords.apply_affine(out_to_input.astype(jnp.float32), prediction_out_px)


@functools.lru_cache(maxsize=16)
def _compiled_predict(module, image_size, mesh, perturbed: bool = False):
  """The batch prediction compiled over ``mesh``; ``perturbed`` takes the box perturbation as a fourth,
  replicated argument (an argument, not a constant: one compile serves all 16)."""
  step = functools.partial(_predict_block, module=module, image_size=image_size)
  in_specs = (P(), P(parallel.AXIS), P(parallel.AXIS)) + ((P(),) if perturbed else ())
  return parallel.compile_step(step, mesh, in_specs=in_specs, out_specs=P(parallel.AXIS))


def _predict_block(variables, images, landmarks, perturbation=None, *, module, image_size):
  return predict_crop_pixels(module, variables, images, landmarks, image_size=image_size,
                             box_perturbation=perturbation)


# What one evaluation reads of each example; all but the image id are gathered from every process.
_EVAL_KEYS = ("image", "landmarks", "landmarks_original", "crop_to_original", "image_id", "attributes",
              "occluded", "index")
_GATHERED_DTYPES = {"mask": bool, "landmarks_original": np.float32, "crop_to_original": np.float32,
                    "attributes": np.int32, "occluded": np.int32, "index": np.int64}
# A custom set's fields, read (and gathered) when its examples have them: the annotated points and the face box.
_OPTIONAL_DTYPES = {"visible": bool, "face_box": np.float32}
assert tuple(_OPTIONAL_DTYPES) == metrics.NME_FIELDS


def predict_source(module, variables, source, *, image_size: int, batch_size: int, mesh=None,
                   desc: str = "predict", box_perturbations=None) -> dict:
  """Runs the model over a whole data source; returns numpy arrays for every example in order:
  pred_crop, pred (original px), gt (original px), image_id, attributes, occluded, index; with
  ``box_perturbations`` ``[P, 3]`` (:func:`box_perturbations`) also ``pred_perturbed`` ``[P, N, K, 2]``
  (original px), the predictions on the perturbed crops of the same batches (the data is read once)."""
  mesh = mesh or parallel.make_mesh()
  devices = mesh.devices.size
  # One fixed batch shape (a compile per shape costs seconds), rounded up to the device count (the size of a
  # batch changes no prediction: evaluation normalises with the running statistics); the input pipeline pads
  # the last batches and masks the padding.
  batch_size = parallel.padded_batch_size(batch_size, devices)
  optional = {key: dtype for key, dtype in _OPTIONAL_DTYPES.items() if key in source[0]}
  gathered_dtypes = dict(_GATHERED_DTYPES, **optional)
  predict = _compiled_predict(module, int(image_size), mesh)
  perturbed_keys = []
  if box_perturbations is not None:
    predict_perturbed = _compiled_predict(module, int(image_size), mesh, perturbed=True)
    box_perturbations = np.asarray(box_perturbations, np.float32).reshape(-1, 3)
    perturbed_keys = [f"pred_crop_perturbed{i}" for i in range(len(box_perturbations))]
  variables = parallel.replicate(variables, mesh)
  num_processes = jax.process_count()
  # Process p reads the p-th contiguous block of the split; a global batch is the processes' batches
  # side by side.
  batches = input_pipeline.make_eval_iterator(
      source, batch_size=batch_size // num_processes, num_processes=num_processes,
      process_index=jax.process_index(), keys=_EVAL_KEYS + tuple(optional))
  gathered, local_ids = [], []
  for batch in tqdm(batches, total=len(batches), desc=desc, unit="batch",
                    disable=jax.process_index() != 0, dynamic_ncols=True):
    inputs = parallel.shard_host_batch((batch["image"], batch["landmarks"].astype(np.float32)), mesh)
    outputs = {"pred_crop": predict(variables, *inputs)}
    for key, perturbation in zip(perturbed_keys, box_perturbations if perturbed_keys else ()):
      outputs[key] = predict_perturbed(variables, *inputs, parallel.replicate(perturbation, mesh))
    gathered.append(parallel.fetch_batch(dict({k: batch[k] for k in gathered_dtypes}, **outputs)))
    local_ids.append(batch["image_id"])

  def in_order(key):
    # [batch, process, row] -> [process, batch, row]: each process' block, blocks in split order.
    stacked = np.stack([np.asarray(g[key]) for g in gathered])
    stacked = stacked.reshape((len(gathered), num_processes, -1) + stacked.shape[2:])
    return np.swapaxes(stacked, 0, 1).reshape((-1,) + stacked.shape[3:])

  mask = in_order("mask").astype(bool)
  dtypes = dict(gathered_dtypes, pred_crop=np.float32)
  result = {key: in_order(key)[mask].astype(dtype) for key, dtype in dtypes.items() if key != "mask"}
  result["gt"] = result.pop("landmarks_original")
  if num_processes == 1:
    image_ids = np.concatenate(local_ids)[mask]
  else:  # Strings do not all-gather: every process reads the ids of the whole split.
    image_ids = [source[position]["image_id"] for position in range(len(source))]
  result["image_id"] = np.array([images.as_str(image_id) for image_id in image_ids])
  result["pred"] = coords.apply_affine(result["crop_to_original"].astype(np.float64),
                                       result["pred_crop"].astype(np.float64)).astype(np.float32)
  if perturbed_keys:
    result["pred_perturbed"] = np.stack([
        coords.apply_affine(result["crop_to_original"].astype(np.float64),
                            in_order(key)[mask].astype(np.float64)).astype(np.float32) for key in perturbed_keys])
  return result


def box_robustness(pred_perturbed, gt, perturbations, *, dataset: str, visible=None, face_box=None) -> list[dict]:
  """Per perturbation: its (shift_x, shift_y, scale), the mean NME and its percentiles."""
  rows = []
  for (shift_x, shift_y, scale), pred in zip(np.asarray(perturbations, np.float64), pred_perturbed):
    nmes = metrics.image_nmes(pred, gt, dataset=dataset, visible=visible, face_box=face_box)
    rows.append({"shift_x": round(float(shift_x), 6), "shift_y": round(float(shift_y), 6),
                 "scale": round(float(scale), 6), "nme": float(nmes.mean()), **metrics.nme_percentiles(nmes)})
  return rows


def mean_nme(module, variables, *, source, dataset: str, image_size: int, batch_size: int, mesh=None) -> float:
  """Mean inter-ocular NME of ``variables`` on ``source`` (the validation score for the best checkpoint)."""
  result = predict_source(module, variables, source, image_size=image_size, batch_size=batch_size,
                          mesh=mesh, desc="validate")
  return float(np.mean(metrics.image_nmes(result["pred"], result["gt"], dataset=dataset, **metrics.nme_fields(result))))


def eval_splits(config) -> list[str]:
  if config.eval_splits:
    return [s.strip() for s in config.eval_splits.split(",") if s.strip()]
  dataset = info.get_info(config.dataset)
  return [s for s in dataset.splits if s != dataset.train_split]


def evaluate_model(model_dir: str, *, splits, load_split_fn: Callable[[str], Any], batch_size: int,
                   mesh=None, box_robustness_on: bool = True, kernels: models.Kernels = models.PORTABLE) -> dict:
  """Evaluates the best (else newest) checkpoint of ``model_dir`` on ``splits``; writes eval/ files.

  ``kernels`` computes the model (:class:`kd_landmarks.models.Kernels`: the same function of the same
  variables whichever set; the pipeline passes the ones its training used, faster on a CPU).

  With ``box_robustness_on``, the split of :func:`box_robustness_split` (when evaluated) is also predicted
  on the 16 perturbed crops of :func:`box_perturbations`; ``eval/box_robustness.json`` receives the split,
  the rows of :func:`box_robustness` and the seconds they added."""
  module, variables, meta = checkpoint.load_inference_variables(model_dir)
  module = models.with_kernels(module, kernels)
  dataset = meta["dataset"]
  out_dir = os.path.join(model_dir, metrics.EVAL_DIR)
  is_chief = jax.process_index() == 0
  os.makedirs(out_dir, exist_ok=True)
  all_metrics = {}
  robustness_split = box_robustness_split(dataset) if box_robustness_on else None
  for split in splits:
    perturbations = box_perturbations() if split == robustness_split else None
    start = time.perf_counter()
    result = predict_source(module, variables, load_split_fn(split), image_size=int(meta["image_size"]),
                            batch_size=batch_size, mesh=mesh, box_perturbations=perturbations,
                            desc=f"eval {os.path.basename(os.path.normpath(model_dir))} {split}")
    nme_fields = metrics.nme_fields(result)  # A custom set's visible points and face boxes, else empty.
    if perturbations is not None and is_chief:
      robustness = {"split": split, "count": int(len(result["gt"])),
                    "seconds_with_perturbations": round(time.perf_counter() - start, 2),
                    "perturbations": box_robustness(result["pred_perturbed"], result["gt"], perturbations,
                                                    dataset=dataset, **nme_fields)}
      with open(os.path.join(out_dir, metrics.BOX_ROBUSTNESS_FILE), "w") as f:
        json.dump(robustness, f, indent=1)
    all_metrics[split] = metrics.split_metrics(result["pred"], result["gt"], dataset=dataset, **nme_fields)
    if is_chief:
      np.savez(os.path.join(out_dir, f"{split}.npz"), pred=result["pred"], gt=result["gt"],
               image_id=result["image_id"], attributes=result["attributes"], occluded=result["occluded"],
               **nme_fields)
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
