"""The paper's published numbers for its own models (Fard & Mahoor, CVIU 2022), for side-by-side reports.

Transcribed from Tables 1, 2, 3, 4, 7 and 8 of the paper (only the rows of the paper's own models: the
MobileNetV2 baseline ``mnv2`` trained with L2, the KD student ``mnv2_KD``, the Tough teacher ``efn``
(EfficientNet-B3), the ablation students ``mnv2_Tou`` / ``mnv2_Tol`` of Table 7 and the loss baselines of
Table 8). Units as printed in the paper: NME and FR in percent, AUC as a fraction.

Method keys are the ones :mod:`kd_landmarks.evaluation.report` derives from a trained model's ``model.json``:
``mnv2`` (student, L2), ``mnv2_kd`` (student, KD-Loss), ``mnv2_tou`` / ``mnv2_tol`` (KD-Loss with one
teacher), ``mnv2_l1``, ``mnv2_smooth_l1`` (Table 8 baselines) and ``efn`` (the Tough teacher).
Split names are those of :mod:`kd_landmarks.datasets.info`.

Where two tables print the same cell (e.g. mnv2 on 300W in Tables 2, 7 and 8) they agree, so each cell is
stored once; ``tests/test_report.py`` checks every value here against the paper's text.
"""
from __future__ import annotations

# Table 1: COFW, 29 points, inter-ocular NME (%) and FR@0.1 (%).
TABLE1_COFW = {
    "mnv2": {"nme": 5.04, "fr": 3.74},
    "mnv2_kd": {"nme": 4.11, "fr": 2.36},
    "efn": {"nme": 3.81, "fr": 1.97},
}

# Table 2: 300W, 68 points, inter-ocular NME (%) on (common, challenging, full).
TABLE2_300W = {
    "mnv2": {"test_common": 3.93, "test_challenging": 6.84, "test_full": 4.50},
    "mnv2_kd": {"test_common": 3.56, "test_challenging": 6.13, "test_full": 4.06},
    "efn": {"test_common": 3.34, "test_challenging": 5.80, "test_full": 3.82},
}

# Table 3: 300W, the paper's own rows. Its inter-ocular block repeats Table 2; the inter-pupil block only
# reports mnv2_KD.
TABLE3_300W_INTER_PUPIL = {
    "mnv2_kd": {"test_common": 4.97, "test_challenging": 8.90, "test_full": 5.66},
}

# Table 4: WFLW, 98 points, NME (%), FR@0.1 (%) and AUC@0.1 on the full test set and its six subsets.
_WFLW_SPLITS = ("test", "test_pose", "test_expression", "test_illumination", "test_makeup",
                "test_occlusion", "test_blur")


def _wflw_row(values):
  return dict(zip(_WFLW_SPLITS, values, strict=True))


TABLE4_WFLW = {
    "nme": {
        "mnv2": _wflw_row((9.07, 16.06, 9.16, 8.72, 9.11, 10.46, 9.88)),
        "mnv2_kd": _wflw_row((8.57, 15.06, 8.81, 8.15, 8.75, 9.92, 9.40)),
        "efn": _wflw_row((7.86, 14.15, 7.97, 7.60, 8.43, 9.28, 8.69)),
    },
    "fr": {
        "mnv2": _wflw_row((27.12, 86.50, 27.70, 23.35, 25.24, 36.27, 33.63)),
        "mnv2_kd": _wflw_row((24.08, 81.59, 27.38, 19.91, 22.33, 33.42, 29.10)),
        "efn": _wflw_row((19.68, 70.55, 19.42, 16.04, 23.30, 29.21, 23.80)),
    },
    "auc": {
        "mnv2": _wflw_row((0.3758, 0.0321, 0.3200, 0.4015, 0.3651, 0.3092, 0.3166)),
        "mnv2_kd": _wflw_row((0.4134, 0.0530, 0.3570, 0.4377, 0.3940, 0.3390, 0.3521)),
        "efn": _wflw_row((0.4755, 0.0905, 0.4366, 0.4944, 0.4493, 0.3842, 0.4067)),
    },
}

# Table 7: 300W ablation, NME (%), FR@0.1 (%), AUC@0.1 per subset.
TABLE7_300W_ABLATION = {
    "nme": {
        "mnv2": {"test_challenging": 6.84, "test_common": 3.93, "test_full": 4.50},
        "mnv2_tou": {"test_challenging": 6.59, "test_common": 3.85, "test_full": 4.39},
        "mnv2_tol": {"test_challenging": 6.41, "test_common": 3.73, "test_full": 4.25},
        "mnv2_kd": {"test_challenging": 6.13, "test_common": 3.56, "test_full": 4.06},
    },
    "fr": {
        "mnv2": {"test_challenging": 7.40, "test_common": 0.18, "test_full": 1.59},
        "mnv2_tou": {"test_challenging": 5.92, "test_common": 0.18, "test_full": 1.30},
        "mnv2_tol": {"test_challenging": 4.44, "test_common": 0.18, "test_full": 1.01},
        "mnv2_kd": {"test_challenging": 3.70, "test_common": 0.18, "test_full": 0.87},
    },
    "auc": {
        "mnv2": {"test_challenging": 0.5425, "test_common": 0.8102, "test_full": 0.7578},
        "mnv2_tou": {"test_challenging": 0.5509, "test_common": 0.8146, "test_full": 0.7630},
        "mnv2_tol": {"test_challenging": 0.5736, "test_common": 0.8230, "test_full": 0.7742},
        "mnv2_kd": {"test_challenging": 0.6029, "test_common": 0.8356, "test_full": 0.7900},
    },
}

# Table 8: 300W, MobileNetV2 trained with different losses, inter-ocular NME (%).
TABLE8_300W_LOSSES = {
    "mnv2": {"test_common": 3.93, "test_challenging": 6.84, "test_full": 4.50},
    "mnv2_l1": {"test_common": 3.67, "test_challenging": 6.38, "test_full": 4.20},
    "mnv2_smooth_l1": {"test_common": 3.66, "test_challenging": 6.33, "test_full": 4.18},
    "mnv2_kd": {"test_common": 3.56, "test_challenging": 6.13, "test_full": 4.06},
}

# The metric names :func:`paper_value` understands, with their units.
METRICS = {"nme": "%", "nme_inter_pupil": "%", "fr": "%", "auc": "fraction"}


def _build_lookup():
  """Flattens the tables into {(dataset, method, split, metric): value}, checking that repeats agree."""
  lookup = {}

  def put(dataset, method, split, metric, value):
    key = (dataset, method, split, metric)
    if key in lookup and lookup[key] != value:
      raise AssertionError(f"paper tables disagree on {key}: {lookup[key]} vs {value}")
    lookup[key] = value

  for method, row in TABLE1_COFW.items():
    for metric, value in row.items():
      put("cofw", method, "test", metric, value)
  for method, row in TABLE2_300W.items():
    for split, value in row.items():
      put("300w", method, split, "nme", value)
  for method, row in TABLE3_300W_INTER_PUPIL.items():
    for split, value in row.items():
      put("300w", method, split, "nme_inter_pupil", value)
  for metric, rows in TABLE4_WFLW.items():
    for method, row in rows.items():
      for split, value in row.items():
        put("wflw", method, split, metric, value)
  for metric, rows in TABLE7_300W_ABLATION.items():
    for method, row in rows.items():
      for split, value in row.items():
        put("300w", method, split, metric, value)
  for method, row in TABLE8_300W_LOSSES.items():
    for split, value in row.items():
      put("300w", method, split, "nme", value)
  return lookup


_LOOKUP = _build_lookup()


def paper_value(dataset: str, method: str, split: str, metric: str) -> float | None:
  """The paper's published value, or None where the paper reports none (e.g. any synthetic dataset).

  NME and FR are in percent, AUC a fraction (as printed). ``metric`` is one of :data:`METRICS`.
  """
  if metric not in METRICS:
    raise ValueError(f"unknown metric: {metric!r}; choose from {sorted(METRICS)}")
  return _LOOKUP.get((dataset.lower(), method, split, metric))


def has_paper_results(dataset: str) -> bool:
  """Whether the paper reports numbers for this dataset (False for ``synthetic``)."""
  return any(key[0] == dataset.lower() for key in _LOOKUP)
