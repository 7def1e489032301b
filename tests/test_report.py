"""Tests of kd_landmarks.evaluation.report and kd_landmarks.evaluation.paper_results.

Workdirs are made by hand: a perfect model (NME 0), a uniformly shifted one (every landmark moved by a
known fraction of the inter-ocular distance, so NME = that fraction, and FR / AUC follow by hand) and a
failing one. The markdown tables are parsed back and the cells compared with those hand values; the paper's
numbers are compared with the paper's own text.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd_landmarks import metrics
from kd_landmarks.evaluation import paper_results
from kd_landmarks.evaluation import report
from kd_landmarks.datasets import info as dataset_info

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "kd_loss_paper.txt"  # ../shared
INTER_OCULAR = 100.0  # pixels, fixed by where the fixtures put the outer eye corners


# ----------------------------------------------------------------------------------------------------
# Fixtures.


def make_faces(dataset, n, seed=0):
  """Ground truth [n, K, 2] in original pixels with outer eye corners exactly INTER_OCULAR apart."""
  info = dataset_info.get_info(dataset)
  rng = np.random.default_rng(seed)
  gt = rng.uniform(120.0, 280.0, size=(n, info.num_landmarks, 2))
  offsets = rng.uniform(0.0, 50.0, size=(n, 1, 2))  # faces at different places in their photos
  right, left = info.outer_eye_corners
  gt[:, right] = [150.0, 170.0]
  gt[:, left] = [150.0 + INTER_OCULAR, 170.0]
  return gt + offsets


def shifted(gt, fraction_of_inter_ocular):
  """Every landmark moved along x by the fraction of the inter-ocular distance: NME = that fraction."""
  return gt + np.array([fraction_of_inter_ocular * INTER_OCULAR, 0.0])


def write_model(workdir, dir_name, *, dataset, role, loss=None, splits, metrics_json=None, network=None,
                finished=True):
  """Writes DIR/<dir_name>/model.json, eval/<split>.npz ({split: (pred, gt[, attributes])}) and, for a
  ``finished`` model, train_done.json. The network defaults to the paper's: EfficientNet-B3 teachers,
  MobileNetV2 students."""
  if network is None:
    network = "efficientnet_b3" if dir_name.startswith("teacher") else "mobilenet_v2"
  model_dir = Path(workdir) / dir_name
  (model_dir / "eval").mkdir(parents=True)
  meta = {"model": network, "dataset": dataset, "num_landmarks": dataset_info.get_info(dataset).num_landmarks,
          "role": role, "loss": loss}
  (model_dir / "model.json").write_text(json.dumps(meta))
  if finished:
    (model_dir / "train_done.json").write_text(json.dumps({"step": 1}))
  for split, arrays in splits.items():
    pred, gt = arrays[:2]
    n, k = gt.shape[:2]
    attributes = arrays[2] if len(arrays) > 2 else np.zeros((n, 6), np.int32)
    np.savez(model_dir / "eval" / f"{split}.npz", pred=pred.astype(np.float32), gt=gt.astype(np.float32),
             image_id=np.array([f"img_{i:03d}.jpg" for i in range(n)]), attributes=attributes,
             occluded=np.zeros((n, k), np.int32))
  if metrics_json is not None:
    (model_dir / "eval" / "metrics.json").write_text(json.dumps(metrics_json))
  return model_dir


def parse_table(markdown, heading_prefix):
  """The markdown table under the first heading starting with heading_prefix: list of {column: cell}."""
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(heading_prefix))
  table = []
  for line in lines[start + 1:]:
    if line.startswith("#"):
      break
    if line.startswith("|"):
      table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
  header, rows = table[0], table[2:]
  return [dict(zip(header, row, strict=True)) for row in rows]


def row_of(rows, **match):
  found = [r for r in rows if all(r[k] == v for k, v in match.items())]
  assert len(found) == 1, (match, rows)
  return found[0]


def png_pixels(path):
  image = Image.open(path)
  image.verify()
  return np.asarray(Image.open(path).convert("RGB"))


def count_color(pixels, rgb, tolerance=40):
  return int((np.abs(pixels.astype(int) - np.array(rgb)).max(axis=-1) <= tolerance).sum())


GREEN = (0, 217, 0)  # report.GOOD_COLOR in 0-255
RED = (255, 0, 0)


@pytest.fixture
def cofw_workdir(tmp_path):
  gt = make_faces("cofw", 12)
  write_model(tmp_path, "student_kd", dataset="cofw", role="student", loss="kd",
              splits={"test": (gt.copy(), gt)})
  write_model(tmp_path, "student_l2", dataset="cofw", role="student", loss="l2",
              splits={"test": (shifted(gt, 0.05), gt)})
  # Half the faces fail (0.2 > 0.1), half are 0.04 off: NME 12 %, FR 50 %.
  mixed = np.concatenate([shifted(gt[:6], 0.2), shifted(gt[6:], 0.04)])
  write_model(tmp_path, "teacher_tough", dataset="cofw", role="teacher_tough", network="efficientnet_b3",
              splits={"test": (mixed, gt)})
  return tmp_path


def gray_crop_source(gt_by_row, crop_size=64):
  """get_image returning uniform gray crops whose crop_to_original frames each face (as the builder does)."""
  from kd_landmarks import coords

  def get_image(split, index):
    box = coords.square_box_from_landmarks(gt_by_row[index], scale=1.5)
    return {"image": np.full((crop_size, crop_size, 3), 128, np.uint8),
            "crop_to_original": coords.crop_affine(box, crop_size).astype(np.float32)}
  return get_image


# ----------------------------------------------------------------------------------------------------
# Tables.


def test_cofw_table1_has_hand_computed_values_next_to_the_paper(cofw_workdir):
  text = report.build_report(cofw_workdir).read_text()
  rows = parse_table(text, "### Table 1")
  kd = row_of(rows, Method="mnv2_KD")
  assert kd["NME (%)"] == "0.00" and kd["FR (%)"] == "0.00"
  assert kd["NME (%) (paper)"] == "4.11" and kd["FR (%) (paper)"] == "2.36"
  l2 = row_of(rows, Method="mnv2 (L2)")
  assert l2["NME (%)"] == "5.00" and l2["FR (%)"] == "0.00"
  assert l2["NME (%) (paper)"] == "5.04" and l2["FR (%) (paper)"] == "3.74"
  efn = row_of(rows, Method="efn (Tough teacher)")
  assert efn["Network"] == "efficientnet_b3"
  assert efn["NME (%)"] == "12.00" and efn["FR (%)"] == "50.00"
  assert efn["NME (%) (paper)"] == "3.81"


def test_per_split_table_auc_matches_the_ced_area_by_hand(cofw_workdir):
  text = report.build_report(cofw_workdir).read_text()
  rows = parse_table(text, "### Split `test`")
  # All NMEs equal e: CED is 0 below e and 1 from e on, so AUC@0.1 = (0.1 - e) / 0.1.
  assert float(row_of(rows, Method="mnv2_KD")["AUC"]) == pytest.approx(1.0, abs=2e-3)
  assert float(row_of(rows, Method="mnv2 (L2)")["AUC"]) == pytest.approx(0.5, abs=2e-3)
  # Half at 0.04 (area 0.6 each), half beyond 0.1 (area 0): 0.3.
  assert float(row_of(rows, Method="efn (Tough teacher)")["AUC"]) == pytest.approx(0.3, abs=2e-3)
  assert row_of(rows, Method="mnv2_KD")["Images"] == "12"


def test_kd_vs_l2_summary_states_the_difference(cofw_workdir):
  text = report.build_report(cofw_workdir).read_text()
  line = next(l for l in text.splitlines() if l.startswith("- `test`: mnv2_KD"))
  assert "0.00% vs mnv2 (L2) 5.00%" in line and "-5.00 points" in line and "**mnv2_KD lower**" in line
  # Every face is 5 points better: the interval has no width; one seed says so.
  assert "95% CI [-5.00, -5.00]" in line and "single seed × 12 faces" in line
  assert "Single-seed run" in text


def test_metrics_json_is_preferred_and_disagreement_is_reported(tmp_path):
  gt = make_faces("cofw", 4)
  # metrics.json says NME 0.0321 but omits AUC: the table shows 3.21 and the AUC recomputed from the npz.
  write_model(tmp_path, "student_kd", dataset="cofw", role="student", loss="kd",
              splits={"test": (shifted(gt, 0.05), gt)},
              metrics_json={"test": {"nme": 0.0321, "fr": 0.0, "count": 4}})
  # A model with metrics.json only (no npz): its values still make the table.
  write_model(tmp_path, "student_l2", dataset="cofw", role="student", loss="l2", splits={},
              metrics_json={"test": {"nme": 0.07, "fr": 0.25, "auc": 0.31, "count": 4}})
  text = report.build_report(tmp_path).read_text()
  rows = parse_table(text, "### Split `test`")
  kd = row_of(rows, Method="mnv2_KD")
  assert kd["NME (%)"] == "3.21"
  assert float(kd["AUC"]) == pytest.approx(0.5, abs=2e-3)
  l2 = row_of(rows, Method="mnv2 (L2)")
  assert (l2["NME (%)"], l2["FR (%)"], l2["AUC"]) == ("7.00", "25.00", "0.3100")
  warnings = text.split("## Warnings")[1]
  assert "student_kd/test" in warnings and "nme=0.0321" in warnings
  assert "student_l2/test`: student_l2/eval/metrics.json" in text  # the source of each row is named


def test_synthetic_report_has_no_paper_columns(tmp_path):
  gt = make_faces("synthetic", 6)
  write_model(tmp_path, "student_kd", dataset="synthetic", role="student", loss="kd",
              splits={"test": (shifted(gt, 0.03), gt)})
  write_model(tmp_path, "student_l2", dataset="synthetic", role="student", loss="l2",
              splits={"test": (shifted(gt, 0.02), gt)})
  text = report.build_report(tmp_path).read_text()
  assert "(paper)" not in text
  rows = parse_table(text, "### Split `test`")
  assert row_of(rows, Method="mnv2_KD")["NME (%)"] == "3.00"
  assert row_of(rows, Method="mnv2 (L2)")["NME (%)"] == "2.00"
  assert "**mnv2_KD higher**" in text


def test_300w_tables_2_3_7_8(tmp_path):
  splits = ("test_common", "test_challenging", "test_full")
  gts = {s: make_faces("300w", 5, seed=i) for i, s in enumerate(splits)}
  shifts = {"student_l2": 0.06, "student_kd": 0.03, "student_kd_tough_only": 0.05,
            "student_kd_tolerant_only": 0.04, "student_l1": 0.055, "teacher_tough": 0.02}
  for dir_name, shift in shifts.items():
    role = "teacher_tough" if dir_name.startswith("teacher") else "student"
    loss = None if role != "student" else dir_name[len("student_"):]
    write_model(tmp_path, dir_name, dataset="300w", role=role, loss=loss,
                splits={s: (shifted(gt, shift), gt) for s, gt in gts.items()})
  text = report.build_report(tmp_path).read_text()

  table2 = parse_table(text, "### Table 2")
  kd = row_of(table2, Method="mnv2_KD")
  assert (kd["Common"], kd["Challenging"], kd["Full"]) == ("3.00", "3.00", "3.00")
  assert (kd["Common (paper)"], kd["Challenging (paper)"], kd["Full (paper)"]) == ("3.56", "6.13", "4.06")
  assert row_of(table2, Method="efn (Tough teacher)")["Full (paper)"] == "3.82"
  assert {r["Method"] for r in table2} == {"mnv2 (L2)", "mnv2_KD", "efn (Tough teacher)"}

  # Table 3: the same shift over the inter-pupil distance (means of points 36-41 and 42-47), by hand.
  gt = gts["test_full"]
  pupil_distance = np.linalg.norm(gt[:, 36:42].mean(1) - gt[:, 42:48].mean(1), axis=-1)
  expected = np.mean(0.03 * INTER_OCULAR / pupil_distance) * 100
  kd3 = row_of(parse_table(text, "### Table 3"), Method="mnv2_KD")
  assert kd3["Full"] == f"{expected:.2f}" and kd3["Full (paper)"] == "5.66"

  table7 = parse_table(text, "### Table 7")
  nme_common = row_of(table7, Metric="NME (%)", Split="Common")
  assert nme_common["mnv2_Tou"] == "5.00" and nme_common["mnv2_Tou (paper)"] == "3.85"
  assert nme_common["mnv2_Tol"] == "4.00" and nme_common["mnv2_Tol (paper)"] == "3.73"
  auc_full = row_of(table7, Metric="AUC", Split="Full")
  assert float(auc_full["mnv2_KD"]) == pytest.approx(0.7, abs=2e-3)
  assert auc_full["mnv2_KD (paper)"] == "0.7900"
  assert "not AUC@0.1 of its own NME and FR" in text.split("### Table 7")[1].split("###")[0]
  # Every other student loss is compared with L2 and KD with every other loss, on each split.
  paired = [l for l in text.splitlines() if l.startswith("- `test_full`:")]
  assert len(paired) == 4 + 3  # KD vs L2, Tou, Tol, L1; then Tou, Tol, L1 vs L2
  # L1 5.5% vs L2 6%, on every face: the verdict names the whole label.
  assert any("mnv2 (L1) 5.50% vs mnv2 (L2) 6.00%" in l and "**mnv2 (L1) lower**" in l for l in paired)

  table8 = parse_table(text, "### Table 8")
  l1 = row_of(table8, Method="mnv2 (L1)")
  assert l1["Challenging"] == "5.50" and l1["Challenging (paper)"] == "6.38"
  assert {r["Method"] for r in table8} == {"mnv2 (L2)", "mnv2 (L1)", "mnv2_KD"}


def test_wflw_subsets_come_from_attributes_when_not_evaluated_separately(tmp_path):
  gt = make_faces("wflw", 8)
  attributes = np.zeros((8, 6), np.int32)
  attributes[:2, 0] = 1   # pose
  attributes[2:5, 5] = 1  # blur
  pred = shifted(gt, 0.02)
  pred[:2] = shifted(gt[:2], 0.2)  # the pose faces fail
  write_model(tmp_path, "student_kd", dataset="wflw", role="student", loss="kd",
              splits={"test": (pred, gt, attributes)})
  text = report.build_report(tmp_path).read_text()
  rows = parse_table(text, "### Table 4")
  nme = row_of(rows, Metric="NME (%)", Method="mnv2_KD")
  assert nme["Test set"] == f"{(2 * 20 + 6 * 2) / 8:.2f}" and nme["Test set (paper)"] == "8.57"
  assert nme["Pose"] == "20.00" and nme["Pose (paper)"] == "15.06"
  assert nme["Blur"] == "2.00"
  fr = row_of(rows, Metric="FR (%)", Method="mnv2_KD")
  assert fr["Pose"] == "100.00" and fr["Blur"] == "0.00" and fr["Test set"] == "25.00"
  assert "Expression" not in nme  # no face carries that attribute: no column rather than a made-up one


# ----------------------------------------------------------------------------------------------------
# Figures.


def test_figures_are_valid_pngs_with_green_for_a_perfect_model(tmp_path):
  gt = make_faces("cofw", 9)
  write_model(tmp_path, "student_kd", dataset="cofw", role="student", loss="kd",
              splits={"test": (gt + 0.5, gt)})
  report.build_report(tmp_path, get_image=gray_crop_source(gt))
  ced = png_pixels(tmp_path / "figures" / "ced_test.png")
  assert ced.shape[0] >= 300 and ced.shape[1] >= 400
  qualitative = png_pixels(tmp_path / "figures" / "qualitative_test.png")
  assert qualitative.shape[0] >= 150 and qualitative.shape[1] >= 600
  assert count_color(qualitative, GREEN) > 50
  assert count_color(qualitative, RED, tolerance=60) == 0
  # The crops' gray is shown, and every point lands inside its crop (mapped with the inverse of
  # crop_to_original), so no dark out-of-crop background appears.
  assert count_color(qualitative, (128, 128, 128), tolerance=3) > 1000
  assert count_color(qualitative, [round(255 * c) for c in report.OUTSIDE_CROP_COLOR], tolerance=3) == 0


def test_figures_show_red_for_a_failing_model_and_work_without_images(tmp_path):
  gt = make_faces("cofw", 6)
  write_model(tmp_path, "student_l2", dataset="cofw", role="student", loss="l2",
              splits={"test": (shifted(gt, 0.3), gt)})
  text = report.build_report(tmp_path).read_text()  # no get_image, no data_dir
  assert "drawn on grey" in text
  qualitative = png_pixels(tmp_path / "figures" / "qualitative_test.png")
  assert count_color(qualitative, RED, tolerance=60) > 50
  assert count_color(qualitative, GREEN) == 0
  assert "figures/ced_test.png" in text and "figures/qualitative_test.png" in text


def test_landmark_colouring_is_per_landmark_as_in_the_captions():
  gt = make_faces("cofw", 1)[0]
  pred = gt.copy()
  pred[3, 0] += 0.15 * INTER_OCULAR  # one landmark off by 0.15: the image's NME is only 0.15 / 29
  pred[4, 1] += 0.099 * INTER_OCULAR
  pred[5, 1] -= 0.101 * INTER_OCULAR
  failed = report.landmark_failures(pred, gt, dataset="cofw")
  assert failed.tolist() == [k in (3, 5) for k in range(29)]


def test_selected_rows_are_best_median_worst():
  nmes = np.array([0.5, 0.1, 0.3, 0.2, 0.4, 0.05, 0.6])
  picks = report._select_rows(nmes, 2)
  assert [g for g, _ in picks] == ["best"] * 2 + ["median"] * 2 + ["worst"] * 2
  assert [nmes[r] for _, r in picks] == [0.05, 0.1, 0.2, 0.3, 0.6, 0.5]


# ----------------------------------------------------------------------------------------------------
# Bad input.


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="kd_landmarks.main"):
    report.build_report(tmp_path)
  gt = make_faces("cofw", 3)
  model_dir = write_model(tmp_path, "student_kd", dataset="cofw", role="student", loss="kd",
                          splits={"test": (gt, gt)})
  np.savez(model_dir / "eval" / "test.npz", gt=gt)
  with pytest.raises(ValueError, match=r"test\.npz: missing field 'pred'"):
    report.build_report(tmp_path)
  bad = gt.copy()
  bad[1, 2, 0] = np.nan
  np.savez(model_dir / "eval" / "test.npz", pred=bad, gt=gt)
  with pytest.raises(ValueError, match=r"'pred' is not finite in rows \[1\]"):
    report.build_report(tmp_path)
  np.savez(model_dir / "eval" / "test.npz", pred=gt[:, :10], gt=gt[:, :10])
  with pytest.raises(ValueError, match="10 landmarks; the dataset has 29"):
    report.build_report(tmp_path)


def test_mixed_datasets_need_a_choice(tmp_path):
  write_model(tmp_path, "student_kd", dataset="cofw", role="student", loss="kd",
              splits={"test": (make_faces("cofw", 3),) * 2})
  write_model(tmp_path, "student_l2", dataset="synthetic", role="student", loss="l2",
              splits={"test": (make_faces("synthetic", 3),) * 2})
  with pytest.raises(ValueError, match="different datasets"):
    report.build_report(tmp_path)
  text = report.build_report(tmp_path, dataset="synthetic").read_text()
  assert "student_l2" in text and "student_kd" not in text


def test_command_line(tmp_path, capsys):
  write_model(tmp_path, "student_kd", dataset="synthetic", role="student", loss="kd",
              splits={"test": (make_faces("synthetic", 3),) * 2})
  report.main(["--workdir", str(tmp_path)])
  assert "report.md" in capsys.readouterr().out
  assert "student_kd" in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------------------------------
# The paper's numbers against the paper's text.


def _paper_lines():
  if not PAPER.exists():
    pytest.skip(f"{PAPER} not present")
  return PAPER.read_text().splitlines()


def _table_block(lines, caption_prefix):
  start = next(i for i, line in enumerate(lines) if line.startswith(caption_prefix))
  block = []
  for line in lines[start + 1:]:
    if block and not line.strip():
      break
    if line.strip():
      block.append(line)
  return block


def _numbers(line):
  return [float(x) for x in re.findall(r"(?<![\w.])\d+\.\d+", line)]


_PAPER_NAMES = {"mnv2": "mnv2", "mnv2_{KD}": "mnv2_kd", "mnv2 _{KD}": "mnv2_kd", "efn": "efn"}


def _own_rows(block):
  """{method key: [numbers]} for the rows of the paper's own models in a table block, in order."""
  rows = []
  for line in block:
    name = line.strip().split("\t")[0].strip() if not line.startswith("\t") else line.split("\t")[1].strip()
    if name in _PAPER_NAMES:
      rows.append((_PAPER_NAMES[name], _numbers(line)))
  return rows


def test_paper_tables_1_2_3_match_the_paper_text():
  lines = _paper_lines()
  table1 = dict(_own_rows(_table_block(lines, "Table 1:")))
  for method, (nme, fr) in table1.items():
    assert paper_results.TABLE1_COFW[method] == {"nme": nme, "fr": fr}
  assert set(table1) == set(paper_results.TABLE1_COFW)

  table2 = dict(_own_rows(_table_block(lines, "Table 2:")))
  for method, values in table2.items():
    assert [paper_results.TABLE2_300W[method][s] for s in ("test_common", "test_challenging",
                                                           "test_full")] == values
  assert set(table2) == set(paper_results.TABLE2_300W)

  table3 = _table_block(lines, "Table 3:")
  pupil_block = table3[next(i for i, l in enumerate(table3) if l.startswith("inter-pupil")):]
  (method, values), = _own_rows(pupil_block)
  assert [paper_results.TABLE3_300W_INTER_PUPIL[method][s] for s in ("test_common", "test_challenging",
                                                                     "test_full")] == values


def test_paper_table4_matches_the_paper_text():
  block = _table_block(_paper_lines(), "Table 4:")
  rows = _own_rows(block)
  assert len(rows) == 9  # mnv2, mnv2_KD, efn for each of NME, FR, AUC
  for index, (method, values) in enumerate(rows):
    metric = ("nme", "fr", "auc")[index // 3]
    stored = paper_results.TABLE4_WFLW[metric][method]
    assert [stored[s] for s in paper_results._WFLW_SPLITS] == values, (metric, method)


def test_paper_tables_7_8_match_the_paper_text():
  lines = _paper_lines()
  block = _table_block(lines, "Table 7:")
  methods = ["mnv2", "mnv2_tou", "mnv2_tol", "mnv2_kd"]
  split_names = {"Challenging": "test_challenging", "Common": "test_common", "Full": "test_full"}
  checked = 0
  metric = None
  for line in block[1:]:
    cells = [c.strip() for c in line.split("\t")]
    metric = {"NME": "nme", "FR": "fr", "AUC": "auc"}.get(cells[0], metric)
    split = split_names[cells[1]]
    for method, value in zip(methods, _numbers(line), strict=True):
      assert paper_results.TABLE7_300W_ABLATION[metric][method][split] == value
      checked += 1
  assert checked == 3 * 3 * 4

  block = _table_block(lines, "Table 8:")
  names = {"L2 Loss": "mnv2", "L1 Loss": "mnv2_l1", "smooth L1": "mnv2_smooth_l1", "KD Loss": "mnv2_kd"}
  for line in block[1:]:
    method = next(v for k, v in names.items() if line.startswith(k))
    # The smooth-L1 row's citation year must not be read as a number: take the last three.
    values = _numbers(line)[-3:]
    assert [paper_results.TABLE8_300W_LOSSES[method][s] for s in ("test_common", "test_challenging",
                                                                  "test_full")] == values


def test_paper_value_lookup():
  assert paper_results.paper_value("300W", "mnv2_kd", "test_full", "nme") == 4.06
  assert paper_results.paper_value("300w", "mnv2_tol", "test_challenging", "fr") == 4.44
  assert paper_results.paper_value("wflw", "efn", "test_pose", "auc") == 0.0905
  assert paper_results.paper_value("synthetic", "mnv2_kd", "test", "nme") is None
  assert paper_results.paper_value("cofw", "mnv2_kd", "test", "auc") is None
  assert not paper_results.has_paper_results("synthetic") and paper_results.has_paper_results("cofw")
  with pytest.raises(ValueError, match="unknown metric"):
    paper_results.paper_value("cofw", "mnv2", "test", "nmee")


def test_an_image_whose_id_differs_from_the_evaluation_is_not_used(tmp_path):
  gt = make_faces("cofw", 3)
  write_model(tmp_path, "student_kd", dataset="cofw", role="student", loss="kd",
              splits={"test": (gt, gt)})

  def wrong_image(split, index):
    return {"image": np.zeros((32, 32, 3), np.uint8), "crop_to_original": np.eye(2, 3),
            "image_id": np.bytes_(b"another.jpg")}
  text = report.build_report(tmp_path, get_image=wrong_image).read_text()
  assert "could not be read" in text and "'another.jpg' differs" in text
  with Image.open(tmp_path / "figures" / "qualitative_test.png") as figure:  # Drawn, not an empty file.
    assert min(figure.size) > 100 and np.ptp(np.asarray(figure.convert("L"))) > 0


def test_ablation_and_loss_layouts_on_a_dataset_the_paper_did_not_ablate(tmp_path):
  gt = make_faces("synthetic", 4)
  for dir_name, shift in (("student_l2", 0.06), ("student_kd", 0.03), ("student_kd_tolerant_only", 0.04),
                          ("student_l1", 0.05)):
    write_model(tmp_path, dir_name, dataset="synthetic", role="student", loss=dir_name[len("student_"):],
                splits={"test": (shifted(gt, shift), gt)})
  text = report.build_report(tmp_path).read_text()
  assert "### Table 7" not in text and "### Table 8" not in text  # those are the paper's 300W tables
  ablation = parse_table(text, "### KD ablation in the layout of Table 7")
  nme = row_of(ablation, Metric="NME (%)", Split="Test set")
  assert (nme["mnv2 (L2)"], nme["mnv2_Tol"], nme["mnv2_KD"]) == ("6.00", "4.00", "3.00")
  assert "mnv2_Tou" not in nme  # not trained: no column
  losses = parse_table(text, "### Loss comparison in the layout of Table 8")
  assert row_of(losses, Method="mnv2 (L1)")["Test set"] == "5.00"


def test_images_come_from_the_prepared_dataset_in_the_workdir(tmp_path):
  """End to end with the tfds builder: DIR/data is found, crops are read and ids are checked."""
  from kd_landmarks.datasets import builder
  from kd_landmarks.datasets import load_split
  builder.prepare("synthetic", data_dir=tmp_path / "data", show_progress=False, num_workers=1,
                  synthetic_options={"num_train": 2, "num_test": 6, "image_size": 64})
  source = load_split("synthetic", "test", tmp_path / "data")
  examples = [source[i] for i in range(len(source))]
  gt = np.stack([e["landmarks_original"] for e in examples]).astype(np.float64)
  model_dir = write_model(tmp_path, "student_kd", dataset="synthetic", role="student", loss="kd",
                          splits={"test": (gt, gt)})
  # The evaluate step's ids are the stored ones.
  with np.load(model_dir / "eval" / "test.npz") as data:
    arrays = dict(data)
  arrays["image_id"] = np.array([str(e["image_id"]) for e in examples])
  np.savez(model_dir / "eval" / "test.npz", **arrays)
  text = report.build_report(tmp_path).read_text()
  assert "Images: the stored crops of" in text and "## Warnings" not in text
  qualitative = png_pixels(tmp_path / "figures" / "qualitative_test.png")
  assert count_color(qualitative, GREEN) > 50 and count_color(qualitative, RED, tolerance=60) == 0
  # Photos, not the flat grey drawn without images: tens of thousands of distinct colours (a grey-only
  # figure of the same layout has a few thousand, from anti-aliased dots and text).
  assert len(np.unique(qualitative.reshape(-1, 3), axis=0)) > 20000


def test_agrees_with_what_the_evaluate_step_writes(tmp_path):
  """metrics.json as kd_landmarks.evaluation.evaluate writes it (WFLW subsets by attribute) matches our npz recompute."""
  evaluate = pytest.importorskip("kd_landmarks.evaluation.evaluate")
  rng = np.random.default_rng(3)
  gt = make_faces("wflw", 10)
  pred = gt + rng.normal(scale=6.0, size=gt.shape)
  attributes = (rng.uniform(size=(10, 6)) < 0.4).astype(np.int32)
  stored = {"test": metrics.split_metrics(pred, gt, dataset="wflw")}
  for column, name in enumerate(dataset_info.WFLW_ATTRIBUTES):
    mask = attributes[:, column] != 0
    if mask.any():
      stored[f"test_{name}"] = metrics.split_metrics(pred[mask], gt[mask], dataset="wflw")
  write_model(tmp_path, "student_kd", dataset="wflw", role="student", loss="kd",
              splits={"test": (pred, gt, attributes)}, metrics_json=stored)
  text = report.build_report(tmp_path).read_text()
  assert "## Warnings" not in text
  rows = parse_table(text, "### Table 4")
  nme = row_of(rows, Metric="NME (%)", Method="mnv2_KD")
  for split, values in stored.items():
    assert nme[report._SPLIT_TITLES[split]] == f"{100 * values['nme']:.2f}"


def test_wflw_subsets_of_the_report_are_those_of_the_evaluate_step(tmp_path, monkeypatch):
  """Each WFLW attribute subset: the report's recompute from the npz alone, the evaluate step's metrics.json
  and numpy by hand name the same faces and give the same NME, FR and count."""
  evaluate = pytest.importorskip("kd_landmarks.evaluation.evaluate")
  from kd_landmarks.training import checkpoint
  rng = np.random.default_rng(5)
  n = 16
  gt = make_faces("wflw", n).astype(np.float32)
  # About 0.1 inter-ocular off on average, so that each subset has faces on both sides of the threshold.
  pred = (gt + rng.normal(scale=8.0, size=gt.shape)).astype(np.float32)
  attributes = (rng.uniform(size=(n, 6)) < 0.4).astype(np.int32)
  attributes[:, 1] = 0  # no expression face: neither side may report that subset
  fake_eval = {"pred": pred, "gt": gt, "image_id": np.array([f"img_{i:03d}.jpg" for i in range(n)]),
               "attributes": attributes, "occluded": np.zeros(gt.shape[:2], np.int32)}
  monkeypatch.setattr(checkpoint, "load_inference_variables",
                      lambda model_dir: (None, {}, {"dataset": "wflw", "image_size": 64,
                                                    "checkpoint": ("best", 1)}))
  monkeypatch.setattr(evaluate, "predict_source", lambda *args, **kwargs: fake_eval)
  model_dir = write_model(tmp_path, "student_kd", dataset="wflw", role="student", loss="kd", splits={})
  # The fake predictions have no perturbed crops: the box-robustness pass is off here.
  written = evaluate.evaluate_model(str(model_dir), splits=["test"], load_split_fn=lambda split: None,
                                    batch_size=4, box_robustness_on=False)
  (model_dir / "eval" / "metrics.json").unlink()  # the report must recompute from test.npz alone

  right, left = dataset_info.get_info("wflw").outer_eye_corners
  inter_ocular = np.linalg.norm(gt[:, right].astype(np.float64) - gt[:, left], axis=-1)
  by_hand = np.linalg.norm(pred.astype(np.float64) - gt, axis=-1).mean(axis=-1) / inter_ocular
  expected = {f"test_{name}": by_hand[attributes[:, column] == 1]
              for column, name in enumerate(dataset_info.WFLW_ATTRIBUTES) if attributes[:, column].any()}
  assert "test_expression" not in expected and len(expected) >= 4
  assert set(written) == {"test", "selection", *expected}
  # A model.json without a selection record (written before it existed) says so rather than guessing.
  assert written["selection"] == {"checkpoint": "best", "step": 1, "split": "unknown", "on_test": False}
  recomputed = report.load_model_results(report.find_models(tmp_path)[0], dataset="wflw", warnings=[])
  assert set(recomputed) == {"test", *expected}
  nme_row = row_of(parse_table(report.build_report(tmp_path).read_text(), "### Table 4"),
                   Metric="NME (%)", Method="mnv2_KD")
  for subset, nmes in expected.items():
    assert 0 < np.mean(nmes > 0.1) < 1 or len(nmes) < 3, subset
    assert written[subset]["count"] == recomputed[subset].count == len(nmes)
    assert written[subset]["nme"] == pytest.approx(np.mean(nmes), rel=1e-6)
    assert recomputed[subset].nme == pytest.approx(np.mean(nmes), rel=1e-6)
    assert written[subset]["fr"] == recomputed[subset].fr == pytest.approx(np.mean(nmes > 0.1))
    assert written[subset]["auc"] == pytest.approx(recomputed[subset].auc, rel=1e-6)
    assert nme_row[report._SPLIT_TITLES[subset]] == f"{100 * np.mean(nmes):.2f}"


def test_model_json_as_training_writes_it(tmp_path):
  """Training records the phase (not a 'role') and loss 'l2' for teachers; the variant is shown."""
  gt = make_faces("synthetic", 3)
  for dir_name, phase, loss in (("teacher_tough", "teacher_tough", "l2"),
                                ("teacher_tolerant", "teacher_tolerant", "l2"),
                                ("student_kd", "student", "kd")):
    model_dir = write_model(tmp_path, dir_name, dataset="synthetic", role=None, loss=loss,
                            splits={"test": (gt, gt)})
    meta = json.loads((model_dir / "model.json").read_text())
    del meta["role"]
    meta.update(phase=phase, loss_variant="author_code")
    (model_dir / "model.json").write_text(json.dumps(meta))
  rows = parse_table(report.build_report(tmp_path).read_text(), "## Models")
  assert [r["Method"] for r in rows] == ["mnv2_KD", "efn (Tough teacher)", "efn (Tolerant teacher)"]
  assert row_of(rows, Directory="student_kd")["Loss"] == "kd (author_code)"
  assert row_of(rows, Directory="teacher_tough")["Loss"] == "l2"


def test_labels_name_the_network_actually_trained():
  # The demo trains tiny MobileNetV2 teachers: the report must not call them 'efn'.
  assert report._method_label("efn", "mobilenet_v2_tiny", "l2") == "mnv2 (Tough teacher)"
  assert report._method_label("efn", "efficientnet_b3", "l2") == "efn (Tough teacher)"
  assert report._method_label("mnv2_kd", "mobilenet_v2", "kd") == "mnv2_KD"
  assert report._method_label("mnv2_kd", "efficientnet_b0", "kd") == "efn_KD"


def _set_seed(model_dir, seed_index):
  meta = json.loads((model_dir / "model.json").read_text())
  meta["seed_index"] = seed_index
  (model_dir / "model.json").write_text(json.dumps(meta))


def test_seeds_give_mean_std_and_a_paired_interval_by_hand(tmp_path, monkeypatch):
  """Three seeds: KD faces off by 2, 3, 4 % of the inter-ocular distance, L2 by 5, 6, 7 %. NME mean +- std
  (ddof 1): KD 3.00 +- 1.00, L2 6.00 +- 1.00; every paired difference is -3 points, so the interval is
  [-3, -3] and KD is lower. Seeds are labelled, not told apart by directory."""
  gt = make_faces("cofw", 10)
  for seed, (kd, l2) in enumerate(((0.02, 0.05), (0.03, 0.06), (0.04, 0.07))):
    suffix = "" if seed == 0 else f"_seed{seed}"
    _set_seed(write_model(tmp_path, f"student_kd{suffix}", dataset="cofw", role="student", loss="kd",
                          splits={"test": (shifted(gt, kd), gt)}), seed)
    _set_seed(write_model(tmp_path, f"student_l2{suffix}", dataset="cofw", role="student", loss="l2",
                          splits={"test": (shifted(gt, l2), gt)}), seed)
  text = report.build_report(tmp_path).read_text()
  rows = parse_table(text, "### Seeds, split `test`")
  assert row_of(rows, Method="mnv2_KD") == {"Method": "mnv2_KD", "Seeds": "3", "NME (%)": "3.00 ± 1.00",
                                            "FR (%)": "0.00 ± 0.00", "AUC": row_of(rows, Method="mnv2_KD")["AUC"]}
  assert row_of(rows, Method="mnv2 (L2)")["NME (%)"] == "6.00 ± 1.00"
  # AUC@0.1 of a face at NME e is 1 - e / 0.1: seeds 0.8, 0.7, 0.6 -> 0.7 +- 0.1.
  auc_mean, auc_std = (float(v) for v in row_of(rows, Method="mnv2_KD")["AUC"].split(" ± "))
  assert auc_mean == pytest.approx(0.7, abs=2e-3) and auc_std == pytest.approx(0.1, abs=2e-3)
  line = next(l for l in text.splitlines() if l.startswith("- `test`: mnv2_KD"))
  assert "3.00% vs mnv2 (L2) 6.00%" in line and "-3.00 points" in line
  assert "95% CI [-3.00, -3.00]" in line and "3 seeds × 10 faces" in line and "**mnv2_KD lower**" in line
  models = parse_table(text, "## Models")
  assert row_of(models, Directory="student_kd_seed2")["Method"] == "mnv2_KD (seed 2)"
  # The overlay compares KD with L2 (first seeds), not three seeds of KD.
  drawn = []
  monkeypatch.setattr(report, "plot_qualitative",
                      lambda rows, path, **kwargs: drawn.append([label for label, _ in rows]) or path)
  report.build_report(tmp_path)
  assert drawn == [["mnv2_KD (seed 0)", "mnv2 (L2) (seed 0)"]]
  assert "Single-seed run" not in text


def test_report_names_the_split_that_chose_each_checkpoint(tmp_path):
  gt = make_faces("cofw", 4)
  held = {"split": "train_holdout", "on_test": False, "checkpoint": "best", "step": 600, "holdout": 0.05,
          "holdout_seed": 0, "of_split": "train"}
  write_model(tmp_path, "student_kd", dataset="cofw", role="student", loss="kd",
              splits={"test": (gt, gt)}, metrics_json={"selection": held})
  write_model(tmp_path, "student_l2", dataset="cofw", role="student", loss="l2", splits={"test": (gt, gt)},
              metrics_json={"selection": {"split": "test", "on_test": True, "checkpoint": "best", "step": 400}})
  write_model(tmp_path, "teacher_tough", dataset="cofw", role="teacher_tough", splits={"test": (gt, gt)},
              metrics_json={"selection": {"split": None, "on_test": False, "checkpoint": "latest", "step": 9}})
  text = report.build_report(tmp_path).read_text()
  models = parse_table(text, "## Models")
  assert row_of(models, Directory="student_kd")["Checkpoint"] == \
      "best on `train_holdout` (0.05 of train, seed 0), step 600"
  assert row_of(models, Directory="student_l2")["Checkpoint"] == "**selected on test** (`test`), step 400"
  assert row_of(models, Directory="teacher_tough")["Checkpoint"] == "last step 9 (no validation)"
  assert "selected on test: the checkpoints of student_l2" in text.split("## Warnings")[1]
  # The selection record is not mistaken for a split.
  assert "### Split `selection`" not in text


# ----------------------------------------------------------------------------------------------------
# Teachers against students, and the validation curves.


def _write_curve(model_dir, points):
  (model_dir / metrics.VALIDATION_CURVE_FILE).write_text(
      json.dumps([{"step": step, "val_nme": nme} for step, nme in points]))


def test_teachers_against_students_table_by_hand(tmp_path):
  """Teachers 2 % and 3 % off, L2 students 5 % and 7 % (mean 6), KD 4 % and 4 %: NME / L2 is 2/6, 3/6,
  6/6, 4/6. Half the Tolerant teacher's faces fail (0.2 and 0.04 off: NME 12 %, FR 50 %)."""
  gt = make_faces("synthetic", 10)
  write_model(tmp_path, "teacher_tough", dataset="synthetic", role="teacher_tough", network="mobilenet_v2_035",
              splits={"test": (shifted(gt, 0.02), gt)})
  mixed = np.concatenate([shifted(gt[:5], 0.2), shifted(gt[5:], 0.04)])
  write_model(tmp_path, "teacher_tolerant", dataset="synthetic", role="teacher_tolerant",
              network="mobilenet_v2_035", splits={"test": (mixed, gt)})
  for seed, (l2, kd) in enumerate(((0.05, 0.04), (0.07, 0.04))):
    suffix = "" if seed == 0 else f"_seed{seed}"
    _set_seed(write_model(tmp_path, f"student_l2{suffix}", dataset="synthetic", role="student", loss="l2",
                          splits={"test": (shifted(gt, l2), gt)}), seed)
    _set_seed(write_model(tmp_path, f"student_kd{suffix}", dataset="synthetic", role="student", loss="kd",
                          splits={"test": (shifted(gt, kd), gt)}), seed)
  text = report.build_report(tmp_path).read_text()
  rows = parse_table(text, "### Teachers against students, split `test`")
  assert [r["Method"] for r in rows] == ["mnv2 (Tough teacher)", "mnv2 (Tolerant teacher)", "mnv2 (L2)",
                                         "mnv2_KD"]
  assert row_of(rows, Method="mnv2 (Tough teacher)") == {
      "Method": "mnv2 (Tough teacher)", "Role": "teacher", "Seeds": "1", "NME (%)": "2.00", "FR (%)": "0.00",
      "NME / L2": "0.33"}
  assert row_of(rows, Method="mnv2 (Tolerant teacher)")["NME (%)"] == "12.00"
  assert row_of(rows, Method="mnv2 (Tolerant teacher)")["FR (%)"] == "50.00"
  assert row_of(rows, Method="mnv2 (Tolerant teacher)")["NME / L2"] == "2.00"
  assert row_of(rows, Method="mnv2 (L2)") == {
      "Method": "mnv2 (L2)", "Role": "student", "Seeds": "2", "NME (%)": "6.00 ± 1.41", "FR (%)": "0.00 ± 0.00",
      "NME / L2": "1.00"}
  assert row_of(rows, Method="mnv2_KD")["NME / L2"] == "0.67"
  # The section comes before the seed tables (the premise at a glance) and has no curves without files.
  assert text.index("## Teachers against students") < text.index("## Seeds")
  assert "## Convergence" not in text and not (tmp_path / "figures" / "validation_curves.png").exists()


def test_no_teachers_no_premise_table(cofw_workdir):
  import shutil
  shutil.rmtree(cofw_workdir / "teacher_tough")
  assert "## Teachers against students" not in report.build_report(cofw_workdir).read_text()


def test_validation_curves_figure_and_convergence_table(tmp_path):
  """One curve per model directory that recorded validations, in the data it was given; the table's
  last-quarter fall is (NME at or before 3/4 of the last step - last NME) / last NME."""
  gt = make_faces("synthetic", 4)
  tough = write_model(tmp_path, "teacher_tough", dataset="synthetic", role="teacher_tough",
                      network="mobilenet_v2_035", splits={"test": (gt, gt)})
  l2 = write_model(tmp_path, "student_l2", dataset="synthetic", role="student", loss="l2",
                   splits={"test": (shifted(gt, 0.05), gt)})
  write_model(tmp_path, "student_kd", dataset="synthetic", role="student", loss="kd",
              splits={"test": (shifted(gt, 0.04), gt)})  # No curve recorded: no line, no row.
  # Still falling: at 300 (= 3/4 of 400) 0.12, last 0.08 -> 50 %. Flat: 0.0505 at 600, 0.05 at 800 -> 1 %.
  _write_curve(l2, [(100, 0.2), (200, 0.15), (300, 0.12), (400, 0.08)])
  _write_curve(tough, [(800, 0.05), (200, 0.1), (400, 0.06), (600, 0.0505)])  # Any order on disk.
  text = report.build_report(tmp_path).read_text()
  rows = parse_table(text, "## Convergence")
  assert [r["Method"] for r in rows] == ["mnv2 (L2)", "mnv2 (Tough teacher)"]
  assert row_of(rows, Method="mnv2 (L2)") == {
      "Method": "mnv2 (L2)", "Validations": "4", "Last step": "400", "Last NME (%)": "8.00",
      "Best NME (%)": "8.00 (step 400)", "Last-quarter fall": "50.0%"}
  assert row_of(rows, Method="mnv2 (Tough teacher)")["Last-quarter fall"] == "1.0%"
  assert row_of(rows, Method="mnv2 (Tough teacher)")["Best NME (%)"] == "5.00 (step 800)"
  png = tmp_path / "figures" / "validation_curves.png"
  assert "![validation curves](figures/validation_curves.png)" in text
  assert png_pixels(png).shape[2] == 3 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The data behind the figure: two lines, steps and NME in % as recorded, the teacher dashed.
  figure = report.validation_figure(
      [(m.label, m.role, report.read_validation_curve(m)) for m in report.find_models(tmp_path)
       if report.read_validation_curve(m)], title="t")
  lines = figure.axes[0].get_lines()
  assert len(lines) == 2
  by_label = {line.get_label(): line for line in lines}
  np.testing.assert_allclose(by_label["mnv2 (L2)"].get_xdata(), [100, 200, 300, 400])
  np.testing.assert_allclose(by_label["mnv2 (L2)"].get_ydata(), [20.0, 15.0, 12.0, 8.0])
  np.testing.assert_allclose(by_label["mnv2 (Tough teacher)"].get_xdata(), [200, 400, 600, 800])
  assert by_label["mnv2 (Tough teacher)"].get_linestyle() == "--"
  assert by_label["mnv2 (L2)"].get_linestyle() == "-"


def test_flattening_needs_a_point_before_three_quarters():
  assert report.flattening([(100, 0.1)]) is None
  assert report.flattening([(400, 0.1), (500, 0.09)]) is None   # 400 > 0.75 * 500
  assert report.flattening([(300, 0.11), (400, 0.1)]) == pytest.approx(0.1)
