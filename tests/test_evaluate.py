"""Tests of kd_landmarks.evaluation.evaluate: predictions travel back to original pixels exactly; files and metrics."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_landmarks import augment
from kd_landmarks import coords
from kd_landmarks import metrics
from kd_landmarks.evaluation import evaluate
import train_fixtures as fx


class _OracleModule:
  """Predicts, for each image, the ground truth in the eval crop's normalised coordinates (computed
  independently of evaluate.py's mapping) plus a known offset in normalised units."""

  def __init__(self, truth_norm, offset=0.0):
    self.truth_norm = truth_norm
    self.offset = offset

  def apply(self, variables, images, train=False):
    del variables, train
    # Images carry their row number in pixel (0, 0, 0) so that the oracle can look its answer up.
    rows = jnp.round(images[:, 0, 0, 0] * 255.0).astype(jnp.int32)
    return self.truth_norm[rows] + self.offset

  def __hash__(self):
    return id(self)


class _RowSource(fx.InMemorySource):
  def __getitem__(self, i):
    example = super().__getitem__(i)
    image = np.zeros_like(example["image"])
    image[:, :] = i  # A flat image survives the eval crop's bilinear resampling exactly.
    return dict(example, image=image)


def _truth_norm(source):
  images = np.stack([source[i]["image"] for i in range(len(source))])
  landmarks = np.stack([source[i]["landmarks"] for i in range(len(source))])
  _, sets, _ = augment.preprocess_eval(images, {"landmarks": landmarks}, out_size=fx.IMAGE_SIZE)
  return jnp.asarray(sets["landmarks"])


def test_oracle_predictions_map_back_to_original_pixels():
  source = _RowSource(5)
  module = _OracleModule(_truth_norm(source))
  result = evaluate.predict_source(module, {}, source, image_size=fx.IMAGE_SIZE, batch_size=2)
  gt_original = np.stack([source[i]["landmarks_original"] for i in range(5)])
  np.testing.assert_allclose(result["pred"], gt_original, atol=1e-3)  # Includes the padded last batch.
  np.testing.assert_allclose(result["pred_crop"], np.stack([source[i]["landmarks"] for i in range(5)]),
                             atol=1e-3)
  assert list(result["image_id"]) == [f"img{i}" for i in range(5)]
  np.testing.assert_array_equal(result["index"], np.arange(5))


def test_a_known_normalised_error_becomes_the_expected_pixel_error():
  # Offset 0.01 normalised = 0.01 * eval box side (crop px) * 2 (crop -> original scale) in original px.
  source = _RowSource(3)
  module = _OracleModule(_truth_norm(source), offset=0.01)
  result = evaluate.predict_source(module, {}, source, image_size=fx.IMAGE_SIZE, batch_size=4)
  landmarks = source[0]["landmarks"]
  side = coords.square_box_from_landmarks(landmarks)[2] * augment.EVAL_BOX_SCALE
  np.testing.assert_allclose(result["pred"][0] - result["gt"][0], 0.01 * side * 2.0, rtol=1e-3)


def test_split_metrics_by_hand():
  gt = np.zeros((2, 68, 2), np.float32)
  gt[:, 36] = (0.0, 0.0)
  gt[:, 45] = (100.0, 0.0)  # Inter-ocular distance 100 px.
  pred = gt.copy()
  pred[0] += (5.0, 0.0)     # Every point 5 px off: NME 0.05.
  pred[1] += (0.0, 20.0)    # 20 px off: NME 0.2, a failure at 0.1.
  result = metrics.split_metrics(pred, gt, dataset="300w")
  assert result["nme"] == pytest.approx(0.125)
  assert result["fr"] == pytest.approx(0.5)
  assert result["count"] == 2
  assert "nme_inter_pupil" in result
  cofw_gt = np.random.default_rng(0).uniform(0, 100, (1, 29, 2))
  assert "nme_inter_pupil" not in metrics.split_metrics(cofw_gt, cofw_gt, dataset="cofw")  # Table 3: 300W.


def test_evaluate_model_writes_the_files_the_report_reads(tmp_path, monkeypatch):
  from kd_landmarks.training import checkpoint
  source = _RowSource(4)
  module = _OracleModule(_truth_norm(source), offset=0.02)
  meta = dict(model="oracle", num_landmarks=fx.NUM_LANDMARKS, image_size=fx.IMAGE_SIZE, dataset="synthetic",
              overrides={}, dtype="float32")
  monkeypatch.setattr(checkpoint, "load_inference_variables",
                      lambda model_dir: (module, {}, dict(meta, checkpoint=("best", 7))))
  model_dir = str(tmp_path / "student_kd")
  metrics = evaluate.evaluate_model(model_dir, splits=["test"], load_split_fn=lambda split: source,
                                    batch_size=4)
  written = json.load(open(os.path.join(model_dir, "eval", "metrics.json")))
  assert written == metrics
  # Which split chose the checkpoint, and its step, travel from model.json into metrics.json.
  assert written["selection"] == {"checkpoint": "best", "step": 7, "split": "unknown", "on_test": False}
  assert written["test"]["count"] == 4 and written["test"]["nme"] > 0
  arrays = np.load(os.path.join(model_dir, "eval", "test.npz"))
  assert set(arrays) == {"pred", "gt", "image_id", "attributes", "occluded"}
  assert arrays["pred"].shape == arrays["gt"].shape == (4, fx.NUM_LANDMARKS, 2)
  # The TensorBoard series of the split's metrics (tags are stored verbatim in the event file).
  events = b"".join(open(os.path.join(model_dir, "events", name), "rb").read()
                    for name in os.listdir(os.path.join(model_dir, "events")))
  assert b"eval/test/nme" in events


def test_nme_percentiles_by_hand():
  # NMEs 0.001 .. 0.100: the q-th percentile sits at index q/100 * 99 between order statistics.
  percentiles = metrics.nme_percentiles(np.arange(1, 101) / 1000)
  assert percentiles == pytest.approx({"p50": 0.0505, "p90": 0.0901, "p95": 0.09505, "p99": 0.09901})


def test_box_perturbations_are_fixed_and_the_same_for_every_model():
  rows = evaluate.box_perturbations()
  assert rows.shape == (16, 3)
  np.testing.assert_allclose(rows[:4], [[0.05, 0, 1], [-0.05, 0, 1], [0, 0.05, 1], [0, -0.05, 1]])
  np.testing.assert_allclose(rows[-4:], [[0, 0, 0.9], [0, 0, 0.95], [0, 0, 1.05], [0, 0, 1.1]])
  assert evaluate.box_robustness_split("300w") == "test_full" and evaluate.box_robustness_split("cofw") == "test"


def test_box_robustness_table_of_an_oracle_by_hand(tmp_path, monkeypatch):
  # The oracle predicts each face's truth in the *unperturbed* crop's normalised coordinates. On a crop
  # whose box moved by d of its side s (s = 1.05 x the landmark box), every landmark lands d * s off:
  # NME = |d| * s / iod. On a crop scaled by c about the box centre m, landmark k lands (c - 1)(x_k - m)
  # off: NME = |c - 1| * mean_k |x_k - m| / iod. (Stored-crop pixels; the crop -> original scale cancels.)
  from kd_landmarks.evaluation import report
  from kd_landmarks.training import checkpoint
  import test_report
  source = _RowSource(6)
  module = _OracleModule(_truth_norm(source))
  meta = dict(model="oracle", num_landmarks=fx.NUM_LANDMARKS, image_size=fx.IMAGE_SIZE, dataset="synthetic",
              overrides={}, dtype="float32", role="student", loss="kd")
  monkeypatch.setattr(checkpoint, "load_inference_variables",
                      lambda model_dir: (module, {}, dict(meta, checkpoint=("best", 7))))
  model_dir = tmp_path / "student_kd"
  model_dir.mkdir()
  (model_dir / "model.json").write_text(json.dumps(meta))
  evaluate.evaluate_model(str(model_dir), splits=["test"], load_split_fn=lambda split: source, batch_size=4)

  landmarks = np.stack([source[i]["landmarks"] for i in range(6)]).astype(np.float64)
  lo, hi = landmarks.min(axis=1), landmarks.max(axis=1)
  centre, side = (lo + hi) / 2, (hi - lo).max(axis=1) * 1.05
  iod = np.linalg.norm(landmarks[:, 36] - landmarks[:, 45], axis=-1)
  spread = np.linalg.norm(landmarks - centre[:, None], axis=-1).mean(axis=1)
  expected = {f"shift {p}%": np.mean(p / 100 * side / iod) for p in (5, 10, 15)}
  expected |= {f"scale {c:g}": np.mean(abs(c - 1) * spread / iod) for c in (0.9, 0.95, 1.05, 1.1)}

  written = json.loads((model_dir / "eval" / "box_robustness.json").read_text())
  assert written["split"] == "test" and written["count"] == 6 and len(written["perturbations"]) == 16
  for row in written["perturbations"]:
    shift = max(abs(row["shift_x"]), abs(row["shift_y"]))
    hand = (np.mean(shift * side / iod) if shift else np.mean(abs(row["scale"] - 1) * spread / iod))
    assert row["nme"] == pytest.approx(hand, rel=2e-3), row

  text = report.build_report(tmp_path).read_text()
  (row,) = test_report.parse_table(text, "### Box robustness, split `test`")
  assert row["NME (%)"] == "0.00" and row["P50"] == row["P99"] == "0.00"   # the oracle itself is exact
  for column, value in expected.items():
    assert row[column] == f"{100 * value:.2f}", column
  assert (tmp_path / "figures" / "box_robustness_test.png").stat().st_size > 0


def test_evaluation_takes_the_kernels_it_is_given_and_they_compute_the_same(tmp_path, monkeypatch):
  """The pipeline evaluates with its training kernels (faster on a CPU): the metrics equal the portable
  kernels' within float32 rounding, and the kernels asked for are the ones the model ran with."""
  from kd_landmarks import cpu
  from kd_landmarks import models
  from kd_landmarks.training import checkpoint
  source = fx.InMemorySource(6)
  module = models.create_model("mobilenet_v2_tiny", num_landmarks=fx.NUM_LANDMARKS)
  variables = jax.jit(lambda x: module.init(jax.random.PRNGKey(0), x, train=False))(
      jnp.zeros((1, fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3)))
  meta = dict(model="mobilenet_v2_tiny", num_landmarks=fx.NUM_LANDMARKS, image_size=fx.IMAGE_SIZE,
              dataset="synthetic", overrides={}, dtype="float32", checkpoint=("latest", 3))
  monkeypatch.setattr(checkpoint, "load_inference_variables", lambda model_dir: (module, variables, meta))
  applied = []
  original_apply = type(module).apply

  def recording_apply(self, *args, **kwargs):
    applied.append(self.kernels)
    return original_apply(self, *args, **kwargs)

  monkeypatch.setattr(type(module), "apply", recording_apply)
  results = {}
  cpu_kernels = cpu.training_kernels(use_native=False).model
  for name, kernels in (("portable", models.PORTABLE), ("cpu", cpu_kernels)):
    applied.clear()
    results[name] = evaluate.evaluate_model(str(tmp_path / name), splits=["test"], load_split_fn=lambda s: source,
                                            batch_size=4, box_robustness_on=False, kernels=kernels)
    assert applied and all(k is kernels for k in applied), name
  for field in ("nme", "fr", "auc"):
    np.testing.assert_allclose(results["cpu"]["test"][field], results["portable"]["test"][field], rtol=1e-4,
                               atol=1e-6)
