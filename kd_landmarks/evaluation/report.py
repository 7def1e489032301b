"""Paper-style evaluation report of a workdir: tables, CED curves and qualitative overlays.

``build_report(workdir)`` reads what the evaluate step wrote for every trained model directory
(``DIR/<model_dir>/model.json``, ``eval/metrics.json`` and ``eval/<split>.npz``) and writes

* ``DIR/report.md``: the paper's tables for the dataset (Table 1 COFW, Tables 2, 3, 7, 8 300W, Table 4 WFLW;
  whichever rows exist), our models side by side as the paper compares them (mnv2 trained with L2, mnv2_KD,
  the Tough teacher efn), each of our numbers next to the paper's published one (``paper_results``) for the
  real datasets, plus one table per evaluated split with every model;
  a "Teachers against students" table (the premise of distillation at a glance: each model's NME over the
  L2 student's) and a "Convergence" table from each model's ``validation_curve.json``;
* ``DIR/figures/validation_curves.png``: validation NME against training step, one curve per model;
* ``DIR/figures/ced_<split>.png``: cumulative error distribution curves (Fig. 10), one curve per model;
* ``DIR/figures/box_robustness_<split>.png``: the NME against the shift and the scale of the evaluation
  crop's box, one curve per model (``eval/box_robustness.json`` of the evaluate step);
* ``DIR/figures/qualitative_<split>.png``: the best, median and worst faces of a split (Figs. 11, 12, 14),
  each predicted landmark green, or red where its error divided by the inter-ocular distance is above
  the 0.1 failure threshold (the rule of the captions of Figs. 11, 12 and 14).

Units: metrics are computed as fractions (``kd_landmarks.metrics``) and printed as the paper prints them,
NME and FR in percent and AUC as a fraction.

Command line: ``python -m kd_landmarks.evaluation.report --workdir DIR [--data_dir D]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from kd_landmarks import coords
from kd_landmarks import datasets
from kd_landmarks import metrics
from kd_landmarks import provenance
from kd_landmarks.datasets import info as dataset_info
from kd_landmarks.datasets.images import STORED_CROP_SCALE, as_str
from kd_landmarks.datasets.info import WFLW_ATTRIBUTE_SPLITS
from kd_landmarks.evaluation import paper_results
from kd_landmarks.evaluation import stats
from kd_landmarks.training import checkpoint
from kd_landmarks.metrics import FAILURE_THRESHOLD, SELECTION_KEY

# Student loss (config name) -> the paper's name for the model it trains.
_LOSS_TO_METHOD = {
    "l2": "mnv2",
    "kd": "mnv2_kd",
    "kd_tough_only": "mnv2_tou",
    "kd_tolerant_only": "mnv2_tol",
    "l1": "mnv2_l1",
    "smooth_l1": "mnv2_smooth_l1",
}
_ROLE_TO_METHOD = {"teacher_tough": "efn", "teacher_tolerant": "efn_tolerant"}
_METHOD_LABELS = {
    "mnv2": "mnv2 (L2)",
    "mnv2_kd": "mnv2_KD",
    "mnv2_tou": "mnv2_Tou",
    "mnv2_tol": "mnv2_Tol",
    "mnv2_l1": "mnv2 (L1)",
    "mnv2_smooth_l1": "mnv2 (smooth L1)",
    "efn": "efn (Tough teacher)",
    "efn_tolerant": "efn (Tolerant teacher)",
}
# The order rows appear in, following the paper's tables (baseline, ablations, KD student, teacher).
_METHOD_ORDER = ("mnv2", "mnv2_l1", "mnv2_smooth_l1", "mnv2_tou", "mnv2_tol", "mnv2_kd", "efn",
                 "efn_tolerant")
# The models of the paper's main comparison (Tables 1, 2, 4 and Fig. 10).
_MAIN_METHODS = ("mnv2", "mnv2_kd", "efn")

_SPLIT_TITLES = {
    "test_common": "Common", "test_challenging": "Challenging", "test_full": "Full",
    "test": "Test set", "test_pose": "Pose", "test_expression": "Expression",
    "test_illumination": "Illumination", "test_makeup": "Make-Up", "test_occlusion": "Occlusion",
    "test_blur": "Blur",
}

# The training's default data directory inside a workdir (train.data_dir_of with no config.data_dir).
DEFAULT_DATA_SUBDIR = "data"

# Colours of the qualitative figures: landmark within / beyond the failure threshold.
GOOD_COLOR = (0.0, 0.85, 0.0)
BAD_COLOR = (1.0, 0.0, 0.0)
# Background beyond the stored crop, seen only when predictions fall outside it.
OUTSIDE_CROP_COLOR = (0.1, 0.1, 0.3)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A trained model directory and what the paper calls it."""
  dir_name: str
  path: Path
  method: str        # key into paper_results, e.g. 'mnv2_kd'
  label: str         # what the tables print
  network: str       # model.json 'model'
  role: str
  loss: str | None
  dataset: str
  loss_variant: str | None = None  # KD-Loss constants: 'paper' or 'author_code'
  seed_index: int = 0              # Student seed k of config.student_seeds (0 for older model.json).
  provenance: dict | None = None   # model.json 'provenance': what made the weights (None: not recorded).


@dataclasses.dataclass
class SplitEval:
  """One model's evaluation of one split. Metric values are fractions (None: not available)."""
  split: str
  count: int
  nme: float | None
  fr: float | None
  auc: float | None
  nme_inter_pupil: float | None = None
  # Per-image arrays from the npz (None when only metrics.json exists).
  nmes: np.ndarray | None = None
  pred: np.ndarray | None = None
  gt: np.ndarray | None = None
  image_id: np.ndarray | None = None
  # Where the images live: split and row of the stored dataset (differs for derived WFLW subsets).
  image_split: str | None = None
  # A custom set's visible points [N, K] and face boxes [N, 4] (metrics.NME_FIELDS), when the npz has them.
  nme_fields: dict | None = None
  image_rows: np.ndarray | None = None
  source: str = ""


# ----------------------------------------------------------------------------------------------------
# Reading the workdir.


# The paper's abbreviations name a network family; a config may train another (the demo's teachers are
# tiny MobileNetV2s), and the label must then not claim the paper's network.
_FAMILY_ABBREVIATIONS = {"mobilenet_v2": "mnv2", "efficientnet": "efn"}


def _method_label(method: str, network: str, loss: str | None) -> str:
  """The paper's name for ``method`` with the abbreviation of the network actually trained."""
  label = _METHOD_LABELS.get(method, f"student ({loss})")
  paper_abbreviation = "efn" if method.startswith("efn") else "mnv2"
  ours = next((abbreviation for family, abbreviation in _FAMILY_ABBREVIATIONS.items()
               if network.startswith(family)), network)
  return label.replace(paper_abbreviation, ours, 1) if ours != paper_abbreviation else label


def find_models(workdir: Path) -> list[ModelEntry]:
  """Every ``DIR/<model_dir>/model.json``, sorted in the paper's row order."""
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  entries = []
  for model_json in sorted(workdir.glob("*/model.json")):
    try:
      meta = json.loads(model_json.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{model_json}: not valid JSON ({e}); re-run the evaluate phase") from None
    dir_name = model_json.parent.name
    # Training writes the phase that trained the model ('teacher_tough', 'teacher_tolerant', 'student').
    role = meta.get("role") or meta.get("phase") or _role_from_dir(dir_name)
    loss = meta.get("loss")
    if role == "student" and loss is None and dir_name.startswith("student_"):
      loss = dir_name[len("student_"):]
    if role in _ROLE_TO_METHOD:
      method = _ROLE_TO_METHOD[role]
    elif role == "student":
      method = _LOSS_TO_METHOD.get(loss, f"student_{loss}")
    else:
      raise ValueError(f"{model_json}: field 'role' (or 'phase') is {role!r}; expected 'teacher_tough', "
                       "'teacher_tolerant' or 'student' (or name the directory so)")
    for field in ("model", "dataset"):
      if field not in meta:
        raise ValueError(f"{model_json}: missing field {field!r}; the evaluate step writes it")
    entries.append(ModelEntry(
        dir_name=dir_name, path=model_json.parent, method=method,
        label=_method_label(method, str(meta["model"]), loss), network=str(meta["model"]),
        role=role, loss=loss, loss_variant=meta.get("loss_variant"), dataset=str(meta["dataset"]).lower(),
        seed_index=int(meta.get("seed_index") or 0),
        provenance=meta.get("provenance") if isinstance(meta.get("provenance"), dict) else None))
  if not entries:
    raise FileNotFoundError(
        f"no trained model directories (DIR/<model_dir>/model.json) under {workdir}; train and evaluate "
        "first: python -m kd_landmarks.main --config configs/demo.py --workdir DIR")
  # Seeds of one model are told apart by "(seed k)"; two directories with the same paper name otherwise
  # (e.g. two KD variants) keep apart by directory name.
  group_counts = {}
  for e in entries:
    group_counts[_group_key(e)] = group_counts.get(_group_key(e), 0) + 1
  methods = [e.method for e in entries]
  entries = [dataclasses.replace(e, label=f"{e.label} (seed {e.seed_index})")
             if group_counts[_group_key(e)] > 1 and methods.count(e.method) == group_counts[_group_key(e)]
             else dataclasses.replace(e, label=f"{e.label} [{e.dir_name}]") if methods.count(e.method) > 1
             else e for e in entries]
  order = {m: i for i, m in enumerate(_METHOD_ORDER)}
  return sorted(entries, key=lambda e: (order.get(e.method, len(order)), e.dir_name))


def _group_key(entry: ModelEntry) -> tuple:
  """Models that differ only by their seed share this key (one row of the seed tables)."""
  return (entry.method, entry.loss_variant, entry.network, entry.dataset)


def _role_from_dir(dir_name: str) -> str:
  if dir_name in _ROLE_TO_METHOD:
    return dir_name
  if dir_name.startswith("student_"):
    return "student"
  return "unknown"


def load_npz(path: Path, *, num_landmarks: int | None) -> dict[str, np.ndarray]:
  """Reads and checks one ``eval/<split>.npz`` (``pred``, ``gt`` [N, K, 2] original-image pixels)."""
  with np.load(path, allow_pickle=False) as data:
    arrays = {key: data[key] for key in data.files}
  for field in ("pred", "gt"):
    if field not in arrays:
      raise ValueError(f"{path}: missing field {field!r} (has {sorted(arrays)}); re-run the evaluate phase")
    array = arrays[field]
    if array.ndim != 3 or array.shape[-1] != 2:
      raise ValueError(f"{path}: field {field!r} has shape {array.shape}; expected [N, K, 2]")
    if num_landmarks is not None and array.shape[1] != num_landmarks:
      raise ValueError(f"{path}: field {field!r} has {array.shape[1]} landmarks; the dataset has "
                       f"{num_landmarks}")
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=(1, 2)))
    if bad_rows.size:
      raise ValueError(f"{path}: field {field!r} is not finite in rows {bad_rows[:10].tolist()}"
                       f"{' ...' if bad_rows.size > 10 else ''}; the model diverged or the file is corrupt")
  if arrays["pred"].shape != arrays["gt"].shape:
    raise ValueError(f"{path}: 'pred' {arrays['pred'].shape} and 'gt' {arrays['gt'].shape} differ in shape")
  n = arrays["gt"].shape[0]
  if "image_id" not in arrays:
    arrays["image_id"] = np.array([str(i) for i in range(n)])
  arrays["image_id"] = arrays["image_id"].astype(str)
  for field in ("image_id", "attributes", "occluded") + metrics.NME_FIELDS:
    if field in arrays and arrays[field].shape[0] != n:
      raise ValueError(f"{path}: field {field!r} has {arrays[field].shape[0]} rows; 'gt' has {n}")
  return arrays


def _evaluate_arrays(arrays, *, dataset, split, image_split, image_rows, source):
  """Per-image NMEs and the split's metrics from prediction arrays, as the evaluate step computes them."""
  fields = metrics.nme_fields(arrays)
  nmes = metrics.image_nmes(arrays["pred"], arrays["gt"], dataset=dataset, **fields)
  values = metrics.split_metrics(arrays["pred"], arrays["gt"], dataset=dataset, nmes=nmes)
  return SplitEval(
      split=split, count=values["count"], nme=values["nme"], fr=values["fr"], auc=values["auc"],
      nme_inter_pupil=values.get("nme_inter_pupil"), nmes=nmes, pred=arrays["pred"], gt=arrays["gt"],
      image_id=arrays["image_id"], image_split=image_split, image_rows=image_rows, source=source,
      nme_fields=fields)


def load_model_results(model: ModelEntry, *, dataset: str, warnings: list[str]) -> dict[str, SplitEval]:
  """All splits evaluated for one model: metrics.json values, per-image data from the npz files.

  A metric missing from metrics.json is recomputed from the npz; where both exist and disagree the report
  keeps metrics.json's value and lists the disagreement under "Warnings".
  """
  eval_dir = model.path / "eval"
  metrics_path = eval_dir / "metrics.json"
  stored: dict[str, Any] = {}
  if metrics_path.exists():
    try:
      stored = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{metrics_path}: not valid JSON ({e}); re-run the evaluate phase") from None
    if not isinstance(stored, dict):
      raise ValueError(f"{metrics_path}: expected {{split: {{nme, fr, auc, count}}}}, got {type(stored)}")
  num_landmarks = dataset_info.get_info(dataset).num_landmarks if dataset in dataset_info.DATASETS else None
  npz_paths = {p.stem: p for p in sorted(eval_dir.glob("*.npz"))} if eval_dir.is_dir() else {}
  results: dict[str, SplitEval] = {}
  for split, path in npz_paths.items():
    arrays = load_npz(path, num_landmarks=num_landmarks)
    results[split] = _evaluate_arrays(
        arrays, dataset=dataset, split=split, image_split=split,
        image_rows=np.arange(arrays["gt"].shape[0]), source=str(path.relative_to(model.path.parent)))
    # The WFLW subsets by attribute flag, as the evaluate step derives them, unless stored separately.
    subsets = metrics.attribute_subsets(arrays.get("attributes"), dataset=dataset, split=split)
    for subset, rows in subsets.items():
      if subset in npz_paths:
        continue
      subset_arrays = {k: v[rows] for k, v in arrays.items()}
      column = WFLW_ATTRIBUTE_SPLITS.index(subset)
      results[subset] = _evaluate_arrays(
          subset_arrays, dataset=dataset, split=subset, image_split=split, image_rows=rows,
          source=f"{path.relative_to(model.path.parent)} (attribute {column})")
  for split, values in stored.items():
    if split == SELECTION_KEY:
      continue  # How the checkpoint was chosen (read_selection), not a split.
    if not isinstance(values, dict):
      raise ValueError(f"{metrics_path}: entry {split!r} should be an object {{nme, fr, auc, count}}")
    computed = results.get(split)
    if computed is None:
      results[split] = SplitEval(
          split=split, count=int(values.get("count", 0)), nme=_opt_float(values.get("nme")),
          fr=_opt_float(values.get("fr")), auc=_opt_float(values.get("auc")),
          nme_inter_pupil=_opt_float(values.get("nme_inter_pupil")),
          source=str(metrics_path.relative_to(model.path.parent)))
      continue
    for field in ("nme", "fr", "auc", "nme_inter_pupil", "count"):
      if values.get(field) is None:
        continue
      value = float(values[field])
      ours = getattr(computed, field)
      if ours is not None and not math.isclose(value, float(ours), rel_tol=1e-3, abs_tol=1e-6):
        warnings.append(f"{model.dir_name}/{split}: metrics.json {field}={value:.6g} but the npz gives "
                        f"{float(ours):.6g}; the tables show metrics.json's value")
      setattr(computed, field, int(value) if field == "count" else value)
    computed.source += " + metrics.json"
  return results


def read_selection(model: ModelEntry) -> dict | None:
  """metrics.json's record of the split and step that chose the evaluated checkpoint (None if absent)."""
  path = model.path / "eval" / "metrics.json"
  if not path.exists():
    return None
  try:
    value = json.loads(path.read_text()).get(SELECTION_KEY)
  except (json.JSONDecodeError, AttributeError):
    return None  # load_model_results reports the malformed file.
  return value if isinstance(value, dict) else None


def read_box_robustness(model: ModelEntry) -> dict | None:
  """``eval/box_robustness.json`` of the evaluate step (None when absent: evaluated before it existed, or
  with ``config.box_robustness`` off)."""
  path = model.path / metrics.EVAL_DIR / metrics.BOX_ROBUSTNESS_FILE
  if not path.exists():
    return None
  try:
    value = json.loads(path.read_text())
    rows = value["perturbations"]
    for row in rows:
      for key in ("shift_x", "shift_y", "scale", "nme"):
        float(row[key])
    str(value["split"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
    raise ValueError(f"{path}: malformed box-robustness file ({type(error).__name__}: {error}); re-run the "
                     "eval phase") from None
  return value


def box_robustness_columns(rows: Sequence[Mapping]) -> dict[str, float]:
  """The table's columns from the perturbation rows: ``shift 5%`` etc. (the mean NME over the box moved
  by that fraction of its side along +x, -x, +y and -y) and ``scale 0.9`` etc."""
  shifts: dict[float, list[float]] = {}
  columns: dict[str, float] = {}
  for row in rows:
    shift = max(abs(float(row["shift_x"])), abs(float(row["shift_y"])))
    if shift > 0:
      shifts.setdefault(round(shift, 6), []).append(float(row["nme"]))
  for shift in sorted(shifts):
    columns[f"shift {100 * shift:g}%"] = float(np.mean(shifts[shift]))
  for row in rows:
    if float(row["shift_x"]) == 0 and float(row["shift_y"]) == 0:
      columns[f"scale {float(row['scale']):g}"] = float(row["nme"])
  return columns


def selection_text(selection: dict | None) -> str:
  """The Models table's "Checkpoint" cell: which split chose it, at which step."""
  if selection is None:
    return "not recorded (re-run the eval phase)"
  step = selection.get("step")
  if selection.get("checkpoint") != "best" or selection.get("split") is None:
    return f"last step {step} (no validation)"
  split = selection.get("split")
  if selection.get("on_test"):
    return f"**selected on test** (`{split}`), step {step}"
  if split == "train_holdout":
    held = selection.get("holdout")
    return f"best on `train_holdout` ({held:g} of train, seed {selection.get('holdout_seed')}), step {step}" \
        if held is not None else f"best on `train_holdout`, step {step}"
  return f"best on `{split}`, step {step}"


def provenance_status(model: ModelEntry, selection: dict | None, configured=None) -> tuple[str, list[str]]:
  """The Models table's "Provenance" cell (the model's short fingerprint, marked **unfinished** or **inputs
  changed**) and the warnings that explain the marks.

  Unfinished: no ``train_done.json``, or one at fewer steps than the model was configured for. ``configured``:
  the provenance the current config would record for this model (``pipeline.configured_provenances``), or a
  line saying why it could not be computed; None when the report is built without a config.
  """
  recorded = model.provenance
  cell = f"`{provenance.short(recorded.get('fingerprint'))}`" if recorded else "not recorded"
  notes = []
  steps = checkpoint.trained_steps(str(model.path))
  planned = ((recorded or {}).get("config") or {}).get("num_train_steps")
  if steps is None or (planned is not None and steps < int(planned)):
    cell += " **unfinished**"
    facts = [f"{checkpoint.DONE_FILE} is missing" if steps is None else f"{checkpoint.DONE_FILE} says step {steps}"]
    facts += [f"{planned} steps configured"] if planned is not None else []
    facts += [f"step {selection['step']} evaluated"] if (selection or {}).get("step") is not None else []
    notes.append(f"{model.dir_name} is unfinished ({', '.join(facts)}): its numbers are those of a partly "
                 "trained model; run its training phase to finish it")
  if isinstance(configured, str):
    cell += " (inputs not checked)"
    notes.append(f"{model.dir_name}: its inputs could not be compared with the config's: {configured}")
  elif configured is not None:
    changed = provenance.differences(recorded, configured)
    if changed:
      cell += " **inputs changed**"
      notes.append(f"{model.dir_name} was made from other inputs than the config names now: {'; '.join(changed)}; "
                   "phase=all trains it again (config.changed_inputs=retrain)")
  return cell, notes


def _opt_float(value):
  return None if value is None else float(value)


def _detect_dataset(models: Sequence[ModelEntry]) -> str:
  datasets = sorted({m.dataset for m in models})
  if len(datasets) != 1:
    raise ValueError("the model directories were trained on different datasets: " +
                     ", ".join(f"{m.dir_name}={m.dataset}" for m in models) +
                     "; pass dataset=... to report one of them")
  return datasets[0]


def _ordered_splits(splits, dataset):
  known = dataset_info.get_info(dataset).splits if dataset in dataset_info.DATASETS else ()
  rank = {s: i for i, s in enumerate(known)}
  return sorted(splits, key=lambda s: (rank.get(s, len(rank)), s))


def _test_splits(splits, dataset):
  train = dataset_info.get_info(dataset).train_split if dataset in dataset_info.DATASETS else "train"
  return [s for s in splits if s != train]


# ----------------------------------------------------------------------------------------------------
# Tables.


def _fmt(value, metric):
  if value is None:
    return "—"
  if metric == "auc":
    return f"{value:.4f}"
  return f"{value:.2f}"


def _ours(result: SplitEval | None, metric: str):
  """Our value in the paper's unit (NME, FR in %; AUC fraction)."""
  if result is None:
    return None
  value = getattr(result, metric)
  if value is None:
    return None
  return value if metric == "auc" else 100.0 * value


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines + [""]


class _Tables:
  """Builds the markdown tables from {model: {split: SplitEval}}."""

  def __init__(self, dataset, models, results):
    self.dataset = dataset
    self.models = models
    self.results = results
    self.with_paper = paper_results.has_paper_results(dataset)

  def cell(self, model, split, metric):
    return _fmt(_ours(self.results[model.dir_name].get(split), metric), metric)

  def paper_cell(self, model, split, metric):
    return _fmt(paper_results.paper_value(self.dataset, model.method, split, metric), metric)

  def columns(self, model, split, metric):
    cells = [self.cell(model, split, metric)]
    if self.with_paper:
      cells.append(self.paper_cell(model, split, metric))
    return cells

  def header(self, name):
    return [name, f"{name} (paper)"] if self.with_paper else [name]

  def pick(self, methods):
    return [m for m in self.models if m.method in methods]

  def pick_with_splits(self, methods, splits):
    """The models of ``methods`` and those of ``splits`` that at least one of them was evaluated on."""
    models = self.pick(methods)
    return models, [s for s in splits if any(s in self.results[m.dir_name] for m in models)]

  def metric_by_split(self, title, methods, splits, metrics, *, split_in_header=True):
    """Rows: models; columns: (split, metric) pairs, each followed by the paper's value."""
    models, splits = self.pick_with_splits(methods, splits)
    if not models or not splits:
      return []
    header = ["Method", "Network"]
    for split in splits:
      for metric, unit in metrics:
        name = _SPLIT_TITLES.get(split, split) if split_in_header else ""
        header += self.header(f"{name} {unit}".strip())
    rows = []
    for model in models:
      row = [model.label, model.network]
      for split in splits:
        for metric, _ in metrics:
          row += self.columns(model, split, metric)
      rows.append(row)
    return [f"### {title}", ""] + _markdown_table(header, rows)

  def metric_rows(self, title, methods, splits, metrics):
    """The layout of Tables 4 and 7: rows (metric, model or split), columns splits or models."""
    models, splits = self.pick_with_splits(methods, splits)
    if not models or not splits:
      return []
    header = ["Metric", "Method"]
    for split in splits:
      header += self.header(_SPLIT_TITLES.get(split, split))
    rows = []
    for metric, name in metrics:
      for model in models:
        row = [name, model.label]
        for split in splits:
          row += self.columns(model, split, metric)
        rows.append(row)
    return [f"### {title}", ""] + _markdown_table(header, rows)

  def per_split(self, split):
    """Every model on one split: NME, FR, AUC (and inter-pupil NME where computed), image count."""
    models = [m for m in self.models if split in self.results[m.dir_name]]
    has_ip = any(self.results[m.dir_name][split].nme_inter_pupil is not None for m in models)
    header = ["Method", "Network", "Directory"] + self.header("NME (%)")
    if has_ip:
      header += self.header("NME inter-pupil (%)")
    header += self.header("FR (%)") + self.header("AUC") + ["Images"]
    rows = []
    for model in models:
      result = self.results[model.dir_name][split]
      row = [model.label, model.network, model.dir_name] + self.columns(model, split, "nme")
      if has_ip:
        row += self.columns(model, split, "nme_inter_pupil")
      row += self.columns(model, split, "fr") + self.columns(model, split, "auc") + [str(result.count)]
      rows.append(row)
    return [f"### Split `{split}`", ""] + _markdown_table(header, rows)


def _paper_tables(tables: _Tables, splits: Sequence[str]) -> list[str]:
  lines: list[str] = []
  ds = tables.dataset
  nme, fr, auc = ("nme", "NME (%)"), ("fr", "FR (%)"), ("auc", "AUC")
  if ds == "cofw":
    lines += tables.metric_by_split(
        "Table 1: COFW, 29 points, NME (%) and FR (%), inter-ocular", _MAIN_METHODS, ["test"],
        [("nme", "NME (%)"), ("fr", "FR (%)")], split_in_header=False)
  elif ds == "300w":
    subsets = ["test_common", "test_challenging", "test_full"]
    lines += tables.metric_by_split(
        "Table 2: 300W, 68 points, NME (%), inter-ocular", _MAIN_METHODS, subsets, [("nme", "")])
    lines += tables.metric_by_split(
        "Table 3: 300W, NME (%), inter-pupil", _MAIN_METHODS, subsets, [("nme_inter_pupil", "")])
  elif ds == "wflw":
    lines += tables.metric_rows(
        "Table 4: WFLW, 98 points, NME (%), FR (%) and AUC per subset", _MAIN_METHODS,
        ["test", *WFLW_ATTRIBUTE_SPLITS], [nme, fr, auc])
  # Tables 7 and 8 are 300W experiments in the paper; elsewhere their layout is kept for the full test set.
  if ds == "300w":
    ablation_splits = ["test_challenging", "test_common", "test_full"]
    loss_splits = ["test_common", "test_challenging", "test_full"]
    ablation_title = "Table 7: 300W, KD ablation, NME (%), FR (%) and AUC"
    loss_title = "Table 8: 300W, MobileNetV2 trained with different losses, NME (%)"
  else:
    ablation_splits = loss_splits = splits[:1]
    ablation_title = "KD ablation in the layout of Table 7 (which the paper reports on 300W)"
    loss_title = "Loss comparison in the layout of Table 8 (which the paper reports on 300W)"
  if any(m.method in ("mnv2_tou", "mnv2_tol") for m in tables.models):
    table = _transposed(tables, ablation_title, ("mnv2", "mnv2_tou", "mnv2_tol", "mnv2_kd"),
                        ablation_splits, [nme, fr, auc])
    if table and ds == "300w" and tables.with_paper:
      table += ["The paper's AUCs in this table are not AUC@0.1 of its own NME and FR: on the common subset "
                "they need its one failed face (FR 0.18% of 554) at ~1,100% NME, on the full set the failed "
                "faces at 141-235%; only the challenging-subset AUCs are plausible (docs/method.md).", ""]
    lines += table
  if any(m.method in ("mnv2_l1", "mnv2_smooth_l1") for m in tables.models):
    lines += tables.metric_by_split(loss_title, ("mnv2", "mnv2_l1", "mnv2_smooth_l1", "mnv2_kd"),
                                    loss_splits, [("nme", "")])
  return lines


def _transposed(tables: _Tables, title, methods, splits, metrics):
  """Table 7's layout: rows (metric, split), columns the models (ours, paper)."""
  models = tables.pick(methods)
  splits = [s for s in splits if any(s in tables.results[m.dir_name] for m in models)]
  if not models or not splits:
    return []
  header = ["Metric", "Split"]
  for model in models:
    header += tables.header(model.label)
  rows = []
  for metric, name in metrics:
    for split in splits:
      row = [name, _SPLIT_TITLES.get(split, split)]
      for model in models:
        row += tables.columns(model, split, metric)
      rows.append(row)
  return [f"### {title}", ""] + _markdown_table(header, rows)


# Student losses each paired comparison measures against (Sections 4.4, 4.7; Tables 7-8): KD against every
# baseline and ablation, and every other loss against L2.
_BASELINE_METHOD = "mnv2"
_KD_METHOD = "mnv2_kd"


def _groups(tables: _Tables) -> list[tuple[str, list[ModelEntry]]]:
  """The models grouped by everything but their seed, in row order: ``[(label, [entries by seed])]``."""
  groups: dict[tuple, list[ModelEntry]] = {}
  for model in tables.models:
    groups.setdefault(_group_key(model), []).append(model)
  result = []
  for members in groups.values():
    members = sorted(members, key=lambda m: m.seed_index)
    label = members[0].label
    for suffix in (f" (seed {members[0].seed_index})", f" [{members[0].dir_name}]"):
      label = label[:-len(suffix)] if label.endswith(suffix) else label
    result.append((label, members))
  return result


def _mean_std_cell(values, metric) -> str:
  scale = 1.0 if metric == "auc" else 100.0
  mean, std = stats.mean_std([scale * v for v in values])
  digits = 4 if metric == "auc" else 2
  return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _seed_lines(tables: _Tables, splits) -> list[str]:
  """Mean ± std over seeds (sample std, ddof 1) of NME, FR and AUC per model and test split."""
  groups = _groups(tables)
  if not groups:
    return []
  most = max(len(members) for _, members in groups)
  lines = ["## Seeds: mean ± std", ""]
  if most == 1:
    lines += ["Single-seed run: each model was trained with one seed, so the tables show no spread over "
              "training runs (set `--config.student_seeds=3` for mean ± std and paired intervals over seeds).",
              ""]
  else:
    lines += ["Mean ± sample standard deviation over the seeds of each model (NME and FR in %, AUC a fraction).",
              ""]
  for split in splits:
    rows = []
    for label, members in groups:
      found = [tables.results[m.dir_name].get(split) for m in members]
      found = [r for r in found if r is not None and r.nme is not None]
      if not found:
        continue
      cells = [_mean_std_cell([getattr(r, metric) for r in found], metric) if all(
          getattr(r, metric) is not None for r in found) else "—" for metric in ("nme", "fr", "auc")]
      rows.append([label, str(len(found)), *cells])
    if rows:
      lines += [f"### Seeds, split `{split}`", ""]
      lines += _markdown_table(["Method", "Seeds", "NME (%)", "FR (%)", "AUC"], rows)
  return lines


def _paired_nmes(tables: _Tables, group_a, group_b, split):
  """Per-image NMEs ``[S, N]`` of two groups on the seeds both have, images matched by id (or None)."""
  by_seed_a = {m.seed_index: tables.results[m.dir_name].get(split) for m in group_a}
  by_seed_b = {m.seed_index: tables.results[m.dir_name].get(split) for m in group_b}
  seeds = sorted(k for k in by_seed_a if k in by_seed_b and by_seed_a[k] is not None and by_seed_b[k] is not None
                 and by_seed_a[k].nmes is not None and by_seed_b[k].nmes is not None)
  if not seeds:
    return None
  ids = [str(i) for i in by_seed_a[seeds[0]].image_id]
  rows_a, rows_b = [], []
  for seed in seeds:
    a, b = by_seed_a[seed], by_seed_b[seed]
    row_a = {str(i): n for i, n in zip(a.image_id, a.nmes)}
    row_b = {str(i): n for i, n in zip(b.image_id, b.nmes)}
    ids = [i for i in ids if i in row_a and i in row_b]
    rows_a.append(row_a)
    rows_b.append(row_b)
  if not ids:
    return None
  return (np.array([[r[i] for i in ids] for r in rows_a]), np.array([[r[i] for i in ids] for r in rows_b]),
          seeds)


def _comparison_pairs(groups):
  by_method: dict[str, list] = {}
  for label, members in groups:
    if members[0].role == "student":
      by_method.setdefault(members[0].method, []).append((label, members))
  pairs = []
  for kd in by_method.get(_KD_METHOD, []):
    for method, entries in by_method.items():
      if method != _KD_METHOD:
        pairs += [(kd, other) for other in entries]
  for method, entries in by_method.items():
    if method not in (_KD_METHOD, _BASELINE_METHOD):
      pairs += [(entry, base) for entry in entries for base in by_method.get(_BASELINE_METHOD, [])]
  return pairs


def _paired_lines(tables: _Tables, splits) -> list[str]:
  """KD against each baseline, and each other loss against L2: mean per-image NME difference with a 95%
  bootstrap interval over seeds and test faces (kd_landmarks/evaluation/stats.py) and a one-line verdict."""
  pairs = _comparison_pairs(_groups(tables))
  if not pairs:
    return []
  lines = ["## Paired comparisons on the same test faces", "",
           f"A − B: mean over seeds and faces of the per-image NME difference (points of %), with a "
           f"{100 * stats.CONFIDENCE:.0f}% percentile bootstrap interval resampling seeds and faces "
           f"({stats.NUM_RESAMPLES} resamples); seed k of A is paired with seed k of B (same initialisation "
           "and batch order). \"lower\": the whole interval is below zero.", ""]
  for split in splits:
    for (label_a, group_a), (label_b, group_b) in pairs:
      paired = _paired_nmes(tables, group_a, group_b, split)
      if paired is None:
        continue
      nmes_a, nmes_b, seeds = paired
      result = stats.paired_comparison(nmes_a, nmes_b)
      verdict = {"lower": f"{label_a} lower", "higher": f"{label_a} higher",
                 "not distinguishable": "not distinguishable"}[result["verdict"]]
      scope = (f"{len(seeds)} seeds × {result['num_images']} faces" if len(seeds) > 1 else
               f"single seed × {result['num_images']} faces: the interval covers the test faces only, "
               "not training noise")
      lines.append(
          f"- `{split}`: {label_a} {100 * nmes_a.mean():.2f}% vs {label_b} {100 * nmes_b.mean():.2f}%: "
          f"{100 * result['mean']:+.2f} points, 95% CI [{100 * result['low']:+.2f}, {100 * result['high']:+.2f}] "
          f"({scope}): **{verdict}**.")
  return lines + [""]


def _box_robustness_lines(models, results, robustness, workdir: Path, figures_dir: Path) -> list[str]:
  """The box-robustness table (NME and its percentiles beside the mean, then the perturbed NMEs) and its
  figure, per split measured."""
  measured = [(m, robustness[m.dir_name]) for m in models if robustness.get(m.dir_name)]
  if not measured:
    return []
  lines = ["## Robustness to the face box", "",
           "The NME (%) when the evaluation crop's box (the landmark box x 1.05) is moved by a fraction of its "
           "side (each *shift* column: the mean over +x, −x, +y and −y) or its side is scaled about its centre; "
           "the same 16 perturbations for every model (`evaluate.box_perturbations`). P50–P99: percentiles of "
           "the per-image NME on the unperturbed crop.", ""]
  for split in sorted({value["split"] for _, value in measured}):
    entries = [(m, value) for m, value in measured if value["split"] == split]
    column_names = list(box_robustness_columns(entries[0][1]["perturbations"]))
    header = ["Method", "Directory", "NME (%)"] + [f"P{q}" for q in metrics.NME_PERCENTILES] + column_names
    rows, curves, seconds = [], [], 0.0
    for model, value in entries:
      columns = box_robustness_columns(value["perturbations"])
      result = results[model.dir_name].get(split)
      plain = None if result is None else result.nme
      if result is not None and result.nmes is not None:
        percentiles = metrics.nme_percentiles(result.nmes)
        cells = [f"{100 * percentiles[f'p{q}']:.2f}" for q in metrics.NME_PERCENTILES]
      else:
        cells = ["—"] * len(metrics.NME_PERCENTILES)
      rows.append([model.label, model.dir_name, _fmt(None if plain is None else 100 * plain, "nme")] + cells
                  + [_fmt(100 * columns[name], "nme") if name in columns else "—" for name in column_names])
      curves.append((f"{model.label} ({model.dir_name})", plain, columns))
      seconds += float(value.get("seconds_with_perturbations", 0.0))
    figure = plot_box_robustness(curves, figures_dir / f"box_robustness_{split}.png",
                                 title=f"NME against the face box, {split}")
    lines += [f"### Box robustness, split `{split}`", ""] + _markdown_table(header, rows)
    lines += [f"The evaluation pass with the perturbations took {seconds:.1f} s for these {len(entries)} "
              f"models together (plain crop + 16 perturbed, {entries[0][1].get('count', '?')} faces each).", "",
              f"![box robustness {split}]({figure.relative_to(workdir).as_posix()})", ""]
  return lines


def _premise_lines(tables: _Tables, splits) -> list[str]:
  """Teachers against students on each test split: the premise of KD (Section 3) is teachers well ahead
  of the student trained alone (L2). NME and FR are mean ± std over seeds; the last column divides each
  model's (mean) NME by the L2 student's mean NME."""
  groups = [(label, members) for label, members in _groups(tables)]
  teachers = [g for g in groups if g[1][0].role in _ROLE_TO_METHOD]
  students = [g for g in groups if g[1][0].role == "student"]
  if not teachers or not students:
    return []
  lines = ["## Teachers against students", "",
           "The premise of distillation: teachers well ahead of the student trained alone on the same faces. "
           "NME and FR in % (mean ± std over seeds where there are several); *NME / L2* is the model's mean "
           "NME over the L2 student's mean NME.", ""]
  for split in splits:
    means, rows = {}, []
    for label, members in teachers + students:
      found = [tables.results[m.dir_name].get(split) for m in members]
      found = [r for r in found if r is not None and r.nme is not None and r.fr is not None]
      if found:
        means[label] = float(np.mean([r.nme for r in found]))
        rows.append((label, members[0], found))
    l2 = next((means[label] for label, members in students
               if members[0].method == _BASELINE_METHOD and label in means), None)
    if not rows:
      continue
    table = [[label, "teacher" if first.role in _ROLE_TO_METHOD else "student", str(len(found)),
              _mean_std_cell([r.nme for r in found], "nme"), _mean_std_cell([r.fr for r in found], "fr"),
              f"{means[label] / l2:.2f}" if l2 else "—"] for label, first, found in rows]
    lines += [f"### Teachers against students, split `{split}`", ""]
    lines += _markdown_table(["Method", "Role", "Seeds", "NME (%)", "FR (%)", "NME / L2"], table)
  return lines


def read_validation_curve(model: ModelEntry) -> list[tuple[int, float]]:
  """``[(step, validation NME)]`` by step from the model directory's validation_curve.json ([] if absent)."""
  path = model.path / metrics.VALIDATION_CURVE_FILE
  if not path.exists():
    return []
  try:
    points = json.loads(path.read_text())
    return sorted((int(p["step"]), float(p["val_nme"])) for p in points)
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: expected [{{\"step\": s, \"val_nme\": v}}, ...] ({e}); training writes it") from None


def flattening(points: Sequence[tuple[int, float]]) -> float | None:
  """How much the validation NME still fell over the last quarter of the run: (NME at 3/4 of the last step,
  the last point at or before it, minus the last NME) over the last NME. Near 0: the curve has flattened;
  None with fewer than two points before 3/4 of the run."""
  if len(points) < 2:
    return None
  last_step, last_nme = points[-1]
  earlier = [nme for step, nme in points if step <= 0.75 * last_step]
  if not earlier:
    return None
  return (earlier[-1] - last_nme) / last_nme


def _convergence_lines(models, curves) -> list[str]:
  """Per model: validated steps, the best step and NME, and the fall over the last quarter of the run."""
  rows = []
  for model in models:
    points = curves.get(model.dir_name)
    if not points:
      continue
    best_step, best_nme = min(points, key=lambda p: (p[1], p[0]))
    fall = flattening(points)
    rows.append([model.label, str(len(points)), str(points[-1][0]), f"{100 * points[-1][1]:.2f}",
                 f"{100 * best_nme:.2f} (step {best_step})", "—" if fall is None else f"{100 * fall:.1f}%"])
  if not rows:
    return []
  return (["## Convergence", "",
           "Validation NME (%) on the held-out faces that choose the checkpoint, during training. *Last-quarter "
           "fall*: how much the validation NME fell between 3/4 of the run and its end, relative to the end "
           "(a few %: the curve has flattened; tens of %: stopped while still falling).", ""]
          + _markdown_table(["Method", "Validations", "Last step", "Last NME (%)", "Best NME (%)",
                             "Last-quarter fall"], rows))


# ----------------------------------------------------------------------------------------------------
# Figures.


def _new_figure(width, height, dpi=100):
  # A bare Figure with the Agg canvas: no pyplot global state, no display needed. Imported here: matplotlib
  # takes 0.6 s to import (measured) and only the figures need it.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(width, height), dpi=dpi)
  FigureCanvasAgg(figure)
  return figure


def plot_ced(curves: Sequence[tuple[str, SplitEval]], path: Path, *, title: str,
             threshold: float = FAILURE_THRESHOLD) -> Path:
  """Fig. 10: the cumulative distribution of per-image NME up to ``threshold``, one curve per model."""
  figure = _new_figure(6.4, 4.8, dpi=120)
  ax = figure.add_subplot(1, 1, 1)
  for label, result in curves:
    x, y = metrics.ced_curve(result.nmes, threshold=threshold, step=threshold / 1000)
    ax.plot(np.asarray(x), np.asarray(y), linewidth=2,
            label=f"{label}: FR {100 * result.fr:.2f}%, AUC {result.auc:.4f}")
  ax.set_xlim(0.0, threshold)
  ax.set_ylim(0.0, 1.0)
  ax.set_xlabel("NME")
  ax.set_ylabel("Proportion of images")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path)
  return path


def plot_box_robustness(curves: Sequence[tuple[str, float | None, dict[str, float]]], path: Path, *,
                        title: str) -> Path:
  """NME against the box's shift (left) and scale (right), one curve per model: (label, unperturbed NME,
  :func:`box_robustness_columns`)."""
  figure = _new_figure(9.6, 4.0, dpi=120)
  shift_ax, scale_ax = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
  for label, plain, columns in curves:
    shifts = [(0.0, plain)] + [(float(k.split()[1][:-1]), v) for k, v in columns.items() if k.startswith("shift")]
    scales = [(1.0, plain)] + [(float(k.split()[1]), v) for k, v in columns.items() if k.startswith("scale")]
    for ax, points in ((shift_ax, shifts), (scale_ax, scales)):
      points = sorted((x, 100 * y) for x, y in points if y is not None)
      ax.plot([x for x, _ in points], [y for _, y in points], marker="o", linewidth=1.5, label=label)
  shift_ax.set_xlabel("box shift (% of its side; mean of +x, -x, +y, -y)")
  scale_ax.set_xlabel("box side scale")
  for ax in (shift_ax, scale_ax):
    ax.set_ylabel("NME (%)")
    ax.grid(True, alpha=0.3)
  scale_ax.legend(loc="best", fontsize=7)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path)
  return path


def validation_figure(curves: Sequence[tuple[str, str, Sequence[tuple[int, float]]]], *, title: str):
  """Validation NME (%) against step, one line per model: ``curves`` is ``[(label, role, points)]``.
  Teachers are dashed; models of one method (its seeds) share a colour."""
  figure = _new_figure(7.2, 4.8, dpi=120)
  ax = figure.add_subplot(1, 1, 1)
  colours = {}
  for label, role, points in curves:
    group = label.split(" (seed ")[0]
    colour = colours.setdefault(group, f"C{len(colours) % 10}")
    steps, nmes = zip(*points)
    ax.plot(steps, 100.0 * np.asarray(nmes), color=colour, marker=".", linewidth=1.5,
            linestyle="--" if role in _ROLE_TO_METHOD else "-", label=label)
  ax.set_xlabel("Training step")
  ax.set_ylabel("Validation NME (%)")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(loc="upper right", fontsize=7)
  figure.tight_layout()
  return figure


def plot_validation_curves(curves, path: Path, *, title: str) -> Path:
  """Writes :func:`validation_figure` to ``path`` (PNG)."""
  figure = validation_figure(curves, title=title)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path)
  return path


def landmark_failures(pred, gt, *, dataset: str, threshold: float = FAILURE_THRESHOLD, visible=None,
                      face_box=None) -> np.ndarray:
  """Figs. 11/12/14 rule: landmark k fails when ||pred_k - gt_k|| / normalising distance > threshold.

  ``pred``, ``gt``: ``[..., K, 2]`` pixels. Returns bool ``[..., K]``. The distance is the one the NME uses
  (Section 4.2: inter-ocular; a custom set's own, ``kd_landmarks.metrics.normalizing_distance``); a missing
  point (``visible`` False) never fails.
  """
  gt = np.asarray(gt, dtype=np.float64)
  distance = metrics.normalizing_distance(gt, dataset=dataset, visible=visible, face_box=face_box)
  if np.any(distance <= 0):
    raise ValueError(f"ground truth whose {metrics.default_normalization(dataset)} distance is 0 (its normalising "
                     "landmarks or box coincide)")
  errors = np.linalg.norm(np.asarray(pred, dtype=np.float64) - gt, axis=-1)
  failed = errors / distance[..., None] > threshold
  return failed if visible is None else failed & np.asarray(visible, bool)


def _select_rows(nmes: np.ndarray, per_group: int) -> list[tuple[str, int]]:
  """``per_group`` best, median and worst rows by NME (fewer when the split is small), no repeats."""
  order = np.argsort(nmes, kind="stable")
  n = len(order)
  per_group = max(1, min(per_group, n // 3 if n >= 3 else 1))
  mid = max(0, n // 2 - per_group // 2)
  picks, seen = [], set()
  for group, rows in (("best", order[:per_group]), ("median", order[mid:mid + per_group]),
                      ("worst", order[::-1][:per_group])):
    for row in rows:
      if int(row) not in seen:
        seen.add(int(row))
        picks.append((group, int(row)))
  return picks


def _as_image(example) -> tuple[np.ndarray, np.ndarray]:
  """(image, crop -> original affine) from a stored example, a (image, affine) pair or a bare image."""
  if isinstance(example, Mapping):
    image = np.asarray(example["image"])
    affine = example.get("crop_to_original")
  elif isinstance(example, tuple):
    image, affine = example
    image = np.asarray(image)
  else:
    image, affine = np.asarray(example), None
  if affine is None:
    affine = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim == 3 and image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"get_image returned an image of shape {image.shape}; expected [H, W, 3]")
  return image, np.asarray(affine, dtype=np.float64)


def plot_qualitative(rows_of_models: Sequence[tuple[str, SplitEval]], path: Path, *, dataset: str,
                     title: str, get_image: Callable[[str, int], Any] | None, per_group: int = 2,
                     image_errors: list[str] | None = None) -> Path:
  """Figs. 11, 12, 14: a grid (rows: models; columns: best, median, worst faces of the first model).

  Each predicted landmark is green, or red where its error over the inter-ocular distance exceeds 0.1.
  Points are drawn on the stored crop (original pixels mapped with the inverse of ``crop_to_original``);
  without images they are drawn on a grey background in original-image pixels.
  """
  reference = rows_of_models[0][1]
  picks = _select_rows(reference.nmes, per_group)
  row_of_id = [{image_id: i for i, image_id in enumerate(result.image_id)} for _, result in rows_of_models]
  cell = 2.3
  figure = _new_figure(cell * len(picks), cell * len(rows_of_models) + 0.5, dpi=100)
  images: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}
  for column, (group, ref_row) in enumerate(picks):
    images[column] = None
    if get_image is None:
      continue
    where = f"{reference.image_split}[{int(reference.image_rows[ref_row])}]"
    try:
      example = get_image(reference.image_split, int(reference.image_rows[ref_row]))
      stored_id = example.get("image_id") if isinstance(example, Mapping) else None
      if stored_id is not None and as_str(stored_id) != str(reference.image_id[ref_row]):
        # Rows of the npz follow the split's order; a different id means the data changed since eval.
        raise ValueError(f"stored image_id {as_str(stored_id)!r} differs from the evaluation's "
                         f"{reference.image_id[ref_row]!r}; re-run the eval phase")
      images[column] = _as_image(example)
    except Exception as e:  # pylint: disable=broad-except
      # A missing image must not lose the figure: the face is drawn on grey and the report says why.
      if image_errors is not None:
        image_errors.append(f"{where}: {e}")
  for row, (label, result) in enumerate(rows_of_models):
    for column, (group, ref_row) in enumerate(picks):
      ax = figure.add_subplot(len(rows_of_models), len(picks), row * len(picks) + column + 1)
      image_id = reference.image_id[ref_row]
      model_row = row_of_id[row].get(image_id)
      ax.set_xticks([])
      ax.set_yticks([])
      if column == 0:
        ax.set_ylabel(label, fontsize=9)
      if model_row is None:
        ax.set_title(f"{group}: not evaluated", fontsize=7)
        continue
      pred, gt = result.pred[model_row], result.gt[model_row]
      fields = {key: value[model_row] for key, value in (result.nme_fields or {}).items()}
      failed = landmark_failures(pred, gt, dataset=dataset, **fields)
      colors = np.where(failed[:, None], np.array(BAD_COLOR), np.array(GOOD_COLOR))
      loaded = images[column]
      if loaded is not None:
        image, crop_to_original = loaded
        points = coords.apply_affine(coords.invert_affine(crop_to_original), pred.astype(np.float64))
        height, width = image.shape[:2]
        frame_lo, frame_hi = np.array([-0.5, -0.5]), np.array([width - 0.5, height - 0.5])
        ax.imshow(image, interpolation="bilinear")
        ax.set_facecolor(OUTSIDE_CROP_COLOR)
      else:
        # No image: original pixels, framed like the stored crop.
        cx, cy, side = coords.square_box_from_landmarks(gt, scale=STORED_CROP_SCALE)
        points = pred
        frame_lo = np.array([cx - side / 2, cy - side / 2])
        frame_hi = np.array([cx + side / 2, cy + side / 2])
        ax.set_facecolor((0.55, 0.55, 0.55))
      # Dense layouts (98 points) get smaller dots so that neighbours stay apart.
      marker_area = float(np.clip(600.0 / len(pred), 4.0, 18.0))
      # A thin dark rim keeps green dots visible on green or bright backgrounds.
      ax.scatter(points[:, 0], points[:, 1], s=marker_area, c=colors, edgecolors=(0, 0, 0, 0.6),
                 linewidths=0.3)
      # Keep far-off failures visible instead of letting the frame clip them.
      margin = 0.03 * (frame_hi - frame_lo)
      lo = np.minimum(points.min(axis=0) - margin, frame_lo)
      hi = np.maximum(points.max(axis=0) + margin, frame_hi)
      ax.set_xlim(lo[0], hi[0])
      ax.set_ylim(hi[1], lo[1])
      ax.set_title(f"{group}: NME {100 * result.nmes[model_row]:.2f}%", fontsize=8)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path)
  return path


def _default_get_image(dataset, data_dir):
  """``get_image`` over the stored dataset (each split opened once); ids are checked by the caller."""
  sources = {}

  def get_image(split, index):
    if split not in sources:
      sources[split] = datasets.load_split(dataset, split, data_dir)
    return sources[split][index]
  return get_image


# ----------------------------------------------------------------------------------------------------
# The report.


def build_report(workdir, *, dataset: str | None = None, data_dir=None,
                 get_image: Callable[[str, int], Any] | None = None, per_group: int = 2,
                 configured: Mapping[str, Any] | None = None) -> Path:
  """Writes ``DIR/report.md`` and ``DIR/figures/*.png``; returns the report's path.

  Args:
    workdir: the training workdir (``DIR/<model_dir>/{model.json, eval/metrics.json, eval/<split>.npz}``).
    dataset: which dataset to report; by default the one in the models' ``model.json`` (must agree).
    data_dir: where the prepared dataset lives, for the images of the qualitative figures; default
      ``DIR/data`` when it exists (where training prepares the synthetic data).
    get_image: ``(split, index) -> example``: a stored example (mapping with ``image`` and
      ``crop_to_original``), an ``(image, crop_to_original)`` pair, or an image in original pixels. Default:
      the stored dataset via ``kd_landmarks.datasets.load_split`` when ``data_dir`` is given.
    per_group: faces per group (best, median, worst) in the qualitative figures.
    configured: model directory name -> the provenance the current config would record for it (or why it
      could not be computed), from ``pipeline.configured_provenances``: a model whose recorded inputs differ
      is marked. Without it, only unfinished models are marked.
  """
  workdir = Path(workdir)
  models = find_models(workdir)
  dataset = (dataset or _detect_dataset(models)).lower()
  if dataset == dataset_info.CUSTOM:  # The scheme (normaliser, splits) is the prepared set's.
    datasets.register_custom(data_dir or workdir / DEFAULT_DATA_SUBDIR)
  dataset_info.get_info(dataset)  # a clear error for an unknown name
  models = [m for m in models if m.dataset == dataset]
  if not models:
    raise ValueError(f"no model directory under {workdir} was trained on {dataset!r}")
  warnings: list[str] = []
  results = {}
  for model in tqdm(models, desc="report: reading evaluations", leave=False):
    results[model.dir_name] = load_model_results(model, dataset=dataset, warnings=warnings)
  splits = _ordered_splits({s for r in results.values() for s in r}, dataset)
  test_splits = _test_splits(splits, dataset)
  for model in models:
    if not results[model.dir_name]:
      warnings.append(f"{model.dir_name}: no eval/metrics.json or eval/*.npz; run the eval phase")

  if get_image is None and data_dir is None and (workdir / DEFAULT_DATA_SUBDIR).is_dir():
    data_dir = workdir / DEFAULT_DATA_SUBDIR  # where training keeps the data when config.data_dir is unset
  if get_image is None and data_dir is not None:
    get_image = _default_get_image(dataset, str(data_dir))
  figures_dir = workdir / "figures"
  figure_lines = []
  image_errors: list[str] = []
  for split in tqdm(test_splits, desc="report: figures", leave=False):
    with_arrays = [(m.label, results[m.dir_name][split]) for m in models
                   if split in results[m.dir_name] and results[m.dir_name][split].nmes is not None]
    if not with_arrays:
      continue
    ced = plot_ced(with_arrays, figures_dir / f"ced_{split}.png",
                   title=f"CED, {dataset} {split}")
    figure_lines += [f"![CED {split}]({ced.relative_to(workdir).as_posix()})", ""]
    # The paper's qualitative figures compare mnv2_KD with mnv2; the teacher is added when present.
    label_to_method = {m.label: m.method for m in models}
    ranked = sorted(with_arrays, key=lambda pair: {"mnv2_kd": 0, "mnv2": 1, "efn": 2}.get(
        label_to_method[pair[0]], 3))
    # One row per method (its first seed), so that several seeds of KD do not crowd out L2 and the teacher.
    featured, shown = [], set()
    for label, result in ranked:
      if label_to_method[label] not in shown:
        shown.add(label_to_method[label])
        featured.append((label, result))
    featured = featured[:3]
    qualitative = plot_qualitative(
        featured, figures_dir / f"qualitative_{split}.png", dataset=dataset,
        title=f"{dataset} {split}: best / median / worst by {featured[0][0]} NME "
              f"(green: landmark error ≤ 0.1 of the NME's normaliser, red: > 0.1)",
        get_image=get_image, per_group=per_group, image_errors=image_errors)
    figure_lines += [f"![qualitative {split}]({qualitative.relative_to(workdir).as_posix()})", ""]

  curves = {m.dir_name: read_validation_curve(m) for m in models}
  curves = {name: points for name, points in curves.items() if points}
  curve_lines = []
  if curves:
    drawn = plot_validation_curves([(m.label, m.role, curves[m.dir_name]) for m in models if m.dir_name in curves],
                                   figures_dir / "validation_curves.png",
                                   title=f"Validation NME during training, {dataset}")
    curve_lines = [f"![validation curves]({drawn.relative_to(workdir).as_posix()})", ""]

  tables = _Tables(dataset, models, results)
  lines = [f"# Evaluation report: {dataset}", ""]
  if dataset_info.get_info(dataset).label:
    lines += [f"Custom set `{dataset_info.get_info(dataset).label}`, "
              f"{dataset_info.get_info(dataset).num_landmarks} points; missing points count in no metric.", ""]
  lines += [f"Workdir `{workdir}`. NME is normalised by {metrics.normalization_text(dataset)} and "
            "given in %, FR is the % of images with NME > 0.1, AUC is the area under the CED curve up to "
            "0.1 divided by 0.1, all in original-image pixels (Section 4.2)."]
  if tables.with_paper:
    lines += ["Columns marked *(paper)* hold the numbers published in Fard & Mahoor, CVIU 2022 for the "
              "model of the same name (MobileNetV2 student, EfficientNet-B3 teachers, 224 px)."]
  else:
    lines += ["The paper reports no numbers for this dataset, so no published numbers are shown."]
  lines += ["", "## Models", ""]
  lines += ["The checkpoint of each model is the best by validation NME on the split named under "
            "*Checkpoint* (by default a slice of the training split held out from all training; "
            "docs/method.md, \"Validation\"), or the last one where no validation ran.", ""]
  lines += ["*Provenance* is the fingerprint of what made each model (model.json's `provenance`: the config "
            "fields that change the weights, the prepared data's content, a student's teacher outputs; "
            "docs/training.md, \"Provenance\").", ""]
  selections = {m.dir_name: read_selection(m) for m in models}
  statuses = {m.dir_name: provenance_status(m, selections[m.dir_name], (configured or {}).get(m.dir_name))
              for m in models}
  for _, notes in statuses.values():
    warnings += notes
  lines += _markdown_table(
      ["Method", "Directory", "Network", "Role", "Loss", "Splits", "Checkpoint", "Provenance"],
      [[m.label, m.dir_name, m.network, m.role,
        (m.loss or "—") + (f" ({m.loss_variant})" if m.loss_variant and m.role == "student" else ""),
        ", ".join(_ordered_splits(results[m.dir_name], dataset)) or "—",
        selection_text(selections[m.dir_name]), statuses[m.dir_name][0]] for m in models])
  on_test = [m.dir_name for m in models if (selections[m.dir_name] or {}).get("on_test")]
  if on_test:
    warnings.append(f"selected on test: the checkpoints of {', '.join(on_test)} were chosen on a test split "
                    "(config.val_split), so their numbers on that split are optimistic")
  lines += _premise_lines(tables, test_splits)
  lines += _seed_lines(tables, test_splits)
  lines += _paired_lines(tables, test_splits)
  robustness = {m.dir_name: read_box_robustness(m) for m in models}
  lines += _box_robustness_lines(models, results, robustness, workdir, figures_dir)
  lines += _convergence_lines(models, curves) + curve_lines
  paper_lines = _paper_tables(tables, test_splits)
  if paper_lines:
    lines += ["## Tables in the paper's layout", ""] + paper_lines
  lines += ["## All models per split", ""]
  for split in splits:
    lines += tables.per_split(split)
  if figure_lines:
    lines += ["## Figures", "",
              "CED curves (Fig. 10) and qualitative results (Figs. 11, 12, 14): each predicted landmark is "
              "green, or red where its distance to the ground truth over the NME's normalising distance exceeds "
              "0.1 (the rule of the paper's captions, with the inter-ocular distance).", ""] + figure_lines
    if get_image is None:
      lines += ["No images were available (pass data_dir or get_image): landmarks are drawn on grey.", ""]
    elif data_dir is not None:
      lines += [f"Images: the stored crops of `{data_dir}`.", ""]
  if image_errors:
    warnings.append(f"{len(image_errors)} images could not be read and are drawn on grey; first: "
                    f"{image_errors[0]}")
  sources = [f"- `{m.dir_name}/{s}`: {r.source}" for m in models
             for s, r in sorted(results[m.dir_name].items())]
  lines += ["## Sources", ""] + sources + [""]
  if warnings:
    lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
  report_path = workdir / "report.md"
  report_path.write_text("\n".join(lines))
  return report_path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="training workdir holding the model directories")
  parser.add_argument("--dataset", default=None, help="dataset to report (default: from model.json)")
  parser.add_argument("--data_dir", default=None, help="prepared dataset, for the qualitative images")
  parser.add_argument("--per_group", type=int, default=2, help="faces per best/median/worst group")
  args = parser.parse_args(argv)
  path = build_report(args.workdir, dataset=args.dataset, data_dir=args.data_dir, per_group=args.per_group)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
