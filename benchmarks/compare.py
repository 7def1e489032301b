"""Our student against the landmark detectors people use today, on the same real photos, in one run.

Per face, batch 1, one CPU thread each (paper Section 4.6, Fig. 13: 3.95 ms on a 6-core i7-6850K):
  (a) the JAX student (``jax.jit``),
  (b) the same student exported to ONNX (float32 and int8) in ONNX Runtime,
  (c) dlib's 68-point shape predictor (Kazemi & Sullivan 2014; model from ``face_recognition_models``),
  (d) MediaPipe's face landmark model (``face_landmark.tflite`` from the ``mediapipe==0.10.21`` wheel) in
      ai-edge-litert,
  (e) our student's TFLite export (float32 and int8, ``kd_landmarks.deploy.export --format tflite``) in the same
      ai-edge-litert interpreter as MediaPipe: the existing export's files, else a fresh export when
      TensorFlow is installed (extra ``tflite``), else skipped with that hint,
plus the face detector's time per photo, and the NME (inter-ocular, %) of (a), (b) and (c) against the
ground truth on every annotated photo given: the real fixture (kd_landmarks/data/takeo), ``--photos`` folders of
images with 300W ``.pts`` files, and with ``--data_dir`` a prepared 300W test split. MediaPipe predicts a
468-point mesh, not the 68 iBUG points, so it has no NME here. Every method gets the same detector box.

Latency columns: "ms/face" = cut the crop + run the model + map back (what a user pays per face);
"model ms" = the model call alone. Ratios are to the fastest "ms/face".

  python benchmarks/compare.py --quick                      # tiny untrained student, seconds
  python benchmarks/compare.py --workdir RUN                # RUN/student_kd, full size
  python benchmarks/compare.py --workdir RUN --data_dir ~/kd_data --max_faces 300
  python benchmarks/compare.py --fetch_mediapipe            # once: caches face_landmark.tflite

Without a trained student it times a randomly initialised full-size MobileNetV2 (flagged "untrained";
its NME is meaningless, its latency is the real one). MediaPipe's model is read from
``~/.cache/kd_landmarks/mediapipe/face_landmark.tflite``; ``--fetch_mediapipe`` fills the cache with
``pip download mediapipe==0.10.21 --no-deps`` (nothing else downloads anything).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import zipfile

# One thread for XLA too, so that every runtime is compared on one core (set before jax is imported).
if "--all_threads" not in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kd_landmarks import coords  # noqa: E402
from kd_landmarks.deploy import detect  # noqa: E402
from kd_landmarks.deploy import export  # noqa: E402
from kd_landmarks.training import machine  # noqa: E402
from kd_landmarks.deploy import predict  # noqa: E402
from benchmarks import timing  # noqa: E402

MEDIAPIPE_VERSION = "0.10.21"
MEDIAPIPE_MEMBER = "mediapipe/modules/face_landmark/face_landmark.tflite"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "kd_landmarks", "mediapipe")
MEDIAPIPE_PATH = os.path.join(CACHE_DIR, "face_landmark.tflite")
# MediaPipe crops its landmark model's input as the detection box enlarged 1.5x (face_landmark_front).
MEDIAPIPE_ROI_SCALE = 1.5
DEFAULT_PHOTOS = export.FIXTURE_DIR


def fetch_mediapipe_model() -> str:
  """Caches face_landmark.tflite from the mediapipe wheel (pip download, no install). Returns its path."""
  import subprocess

  os.makedirs(CACHE_DIR, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", f"mediapipe=={MEDIAPIPE_VERSION}", "--no-deps",
                    "-d", tmp], check=True)
    wheel = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl"))
    with zipfile.ZipFile(wheel) as archive, open(MEDIAPIPE_PATH, "wb") as f:
      f.write(archive.read(MEDIAPIPE_MEMBER))
  return MEDIAPIPE_PATH


# ---------------------------------------------------------------------------------------------- inputs


def annotated_photos(folders, data_dir=None, max_faces=None, dataset="300w", split="test_full"):
  """(name, RGB image, ground truth [68, 2] pixels) of every photo with a .pts, then the prepared split."""
  from kd_landmarks.datasets import images as image_io
  from kd_landmarks.datasets import readers

  photos = []
  for folder in folders:
    for name in sorted(os.listdir(folder)):
      stem, ext = os.path.splitext(name)
      pts = os.path.join(folder, stem + ".pts")
      if ext.lower() in predict.IMAGE_EXTENSIONS and os.path.exists(pts):
        photos.append((os.path.join(folder, name), image_io.read_image(os.path.join(folder, name)),
                       readers.read_pts(pts)))
  if data_dir:
    from kd_landmarks import datasets
    source = datasets.load_split(dataset, split, data_dir)
    count = len(source) if max_faces is None else min(len(source), max_faces)
    # The stored crops (1.5x the landmark box) are photos of one face each, with their annotation.
    for index in np.unique(np.linspace(0, len(source) - 1, count).round().astype(int)):
      example = source[int(index)]
      image_id = example["image_id"]
      image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
      photos.append((f"{dataset}/{split}/{image_id}", np.asarray(example["image"]),
                     np.asarray(example["landmarks"], np.float64)))
  return photos[:max_faces] if max_faces else photos


def untrained_student(model_name: str, image_size: int, num_landmarks: int = 68, seed: int = 0,
                      **overrides):
  """A randomly initialised student (He-normal kernels, unit batch statistics) without compiling
  ``module.init``: for latency only."""
  import jax
  import jax.numpy as jnp
  from kd_landmarks import models

  module = models.create_model(model_name, num_landmarks=num_landmarks, **overrides)
  shapes = jax.eval_shape(lambda rng: module.init(rng, jnp.zeros((1, image_size, image_size, 3)),
                                                  train=False), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      value = rng.normal(0.0, np.sqrt(2.0 / max(1, int(np.prod(leaf.shape[:-1])))), leaf.shape)
    elif "scale" in name or "var" in name:
      value = np.ones(leaf.shape)
    else:
      value = np.zeros(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  meta = {"model": model_name, "num_landmarks": num_landmarks, "image_size": image_size,
          "dataset": "300w", "overrides": dict(overrides), "dtype": "float32", "checkpoint": None}
  return module, variables, meta


# --------------------------------------------------------------------------------------------- timing


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
  return 1e3 * timing.median_seconds(fn, warmup=warmup, iterations=repeats)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir")
  parser.add_argument("--model", default="student_kd")
  parser.add_argument("--checkpoint", help="a model directory (overrides WORKDIR/MODEL)")
  parser.add_argument("--photos", nargs="*", default=[DEFAULT_PHOTOS],
                      help="folders of photos with 300W .pts annotations")
  parser.add_argument("--data_dir", help="also use a prepared test split from here")
  parser.add_argument("--dataset", default="300w", choices=["300w", "synthetic"],
                      help="a 68-point dataset (dlib's predictor has 68 points)")
  parser.add_argument("--split", help="default: test_full for 300w, test otherwise")
  parser.add_argument("--max_faces", type=int)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--detector", default=detect.DEFAULT_DETECTOR, choices=sorted(detect.DETECTORS))
  parser.add_argument("--quick", action="store_true", help="tiny student at 64 px, 3 repeats: a smoke run")
  parser.add_argument("--untrained_image_size", type=int, default=224,
                      help="without a trained student: the input size of the untrained one timed")
  parser.add_argument("--untrained_width_multiplier", type=float, default=1.0,
                      help="without a trained student: its MobileNetV2 width (the paper's: 1.0)")
  parser.add_argument("--no_int8", action="store_true", help="skip the int8 ONNX model")
  parser.add_argument("--fetch_mediapipe", action="store_true", help="download + cache MediaPipe's model")
  parser.add_argument("--all_threads", action="store_true", help="let every runtime use all cores")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)
  threads = os.cpu_count() if args.all_threads else 1
  repeats = 3 if args.quick else args.repeats

  import jax
  from kd_landmarks.training import checkpoint
  from kd_landmarks import metrics

  # --- the student: trained if there is one.
  model_dir = None
  if args.checkpoint or args.workdir:
    model_dir = predict.resolve_model_dir(args.workdir, args.model, args.checkpoint)
    module, variables, meta = checkpoint.load_inference_variables(model_dir)
    trained = True
  else:
    module, variables, meta = (untrained_student("mobilenet_v2_tiny", 64) if args.quick
                               else untrained_student("mobilenet_v2", args.untrained_image_size,
                                                      width_multiplier=args.untrained_width_multiplier))
    trained = False
  detector = detect.get_detector(args.detector)
  box_map = detect.load_box_map(model_dir, args.detector)
  predictor = predict.Predictor.from_module(module, variables, meta, detector=detector, box_map=box_map)
  size = predictor.image_size
  width = (meta.get("overrides") or {}).get("width_multiplier")
  student_name = (f"{meta['model']}{f' x{width:g}' if width not in (None, 1.0) else ''} @{size}px" +
                  ("" if trained else " (untrained)"))

  split = args.split or ("test_full" if args.dataset == "300w" else "test")
  photos = annotated_photos(args.photos, args.data_dir, 2 if args.quick and args.max_faces is None
                            else args.max_faces, dataset=args.dataset, split=split)
  if not photos:
    parser.error(f"no annotated photos (image + .pts) in {args.photos}")

  # --- (b) ONNX exports of the same variables: the model's own export (its int8 calibrated on training
  # data) when `python -m kd_landmarks.deploy.export` made one, else a fresh one.
  existing = os.path.join(model_dir, "export", "export.json") if model_dir else None
  report = None
  if existing and os.path.exists(existing):
    with open(existing) as f:
      report = json.load(f)
    if report.get("checkpoint") != list(meta.get("checkpoint") or []):
      report = None  # Exported from another checkpoint: stale.
  if report is not None:
    if "int8" not in report:
      args.no_int8 = True
    print(f"using the existing export {existing}", file=sys.stderr)
  else:
    export_dir = tempfile.mkdtemp(prefix="kd_compare_")
    print(f"exporting {student_name} to ONNX in {export_dir} ...", file=sys.stderr)
    report = export.export_onnx(module, variables, meta, export_dir, quantize=not args.no_int8)
  sessions = {"onnx fp32": export.ort_session(report["float32"]["path"], threads=threads)}
  if not args.no_int8:
    sessions["onnx int8"] = export.ort_session(report["int8"]["path"], threads=threads)
  litert_runners, litert_note = tflite_runners(report, module, variables, meta, threads=threads,
                                               quantize=not args.no_int8)

  # --- (c) dlib and (d) MediaPipe.
  import dlib
  shape_predictor = dlib.shape_predictor(detect.dlib_model_path("shape_predictor_68_face_landmarks.dat"))
  mediapipe = None
  if args.fetch_mediapipe and not os.path.exists(MEDIAPIPE_PATH):
    fetch_mediapipe_model()
  if os.path.exists(MEDIAPIPE_PATH):
    from ai_edge_litert.interpreter import Interpreter
    mediapipe = Interpreter(model_path=MEDIAPIPE_PATH, num_threads=threads)
    mediapipe.allocate_tensors()
    mp_input = mediapipe.get_input_details()[0]
    mp_size = int(mp_input["shape"][1])

  jax_apply = predictor.runner._apply  # pylint: disable=protected-access  (the compiled call predict uses)
  times = {name: [] for name in ["jax", *sessions, *litert_runners, "dlib", "mediapipe"]}
  model_times = {name: [] for name in times}
  nmes = {name: [] for name in ["jax", *sessions, *litert_runners, "dlib"]}
  detect_ms, missed = [], []
  for name, image, truth in tqdm(photos, desc="compare", unit="photo"):
    # predictor.detect: the detector as predict runs it (large photos shrunk for detection).
    detect_ms.append(median_ms(lambda: predictor.detect(image), max(1, repeats // 5), warmup=1))
    detection = detect.match_detection(predictor.detect(image), truth)
    if detection is None:
      missed.append(name)
      continue
    landmark_box = box_map(detection.centre_width)

    def run_jax():
      return predictor.landmarks_for_box(image, landmark_box)

    def run_onnx(session):
      crop, crop_to_image = predict.crop_for_landmark_box(image, landmark_box, image_size=size,
                                                          box_scale=predictor.box_scale)
      out = export.run_onnx(session, np.round(crop * 255.0).astype(np.uint8)[None])[0]
      return predict.landmarks_to_image(out, crop_to_image, size)

    x0, y0, x1, y1 = detection.box
    rect = dlib.rectangle(int(round(x0 + 0.5)), int(round(y0 + 0.5)), int(round(x1 - 0.5)),
                          int(round(y1 - 0.5)))

    def run_dlib():
      shape = shape_predictor(image, rect)
      return np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], np.float64)

    outputs = {"jax": run_jax(), "dlib": run_dlib()}
    times["jax"].append(median_ms(run_jax, repeats))
    crop, _ = predict.crop_for_landmark_box(image, landmark_box, image_size=size,
                                            box_scale=predictor.box_scale)
    crop_bytes = np.round(crop * 255.0).astype(np.uint8)[None]
    model_times["jax"].append(median_ms(lambda: jax_apply(variables, crop_bytes).block_until_ready(),
                                        repeats))
    for session_name, session in sessions.items():
      outputs[session_name] = run_onnx(session)
      times[session_name].append(median_ms(lambda: run_onnx(session), repeats))
      crop_uint8 = np.round(crop * 255.0).astype(np.uint8)[None]
      model_times[session_name].append(median_ms(lambda: export.run_onnx(session, crop_uint8), repeats))
    for runner_name, runner in litert_runners.items():

      def run_litert(runner=runner):
        crop, crop_to_image = predict.crop_for_landmark_box(image, landmark_box, image_size=size,
                                                            box_scale=predictor.box_scale)
        out = runner(np.round(crop * 255.0).astype(np.uint8)[None])[0]
        return predict.landmarks_to_image(out, crop_to_image, size)

      outputs[runner_name] = run_litert()
      times[runner_name].append(median_ms(run_litert, repeats))
      crop_uint8 = np.round(crop * 255.0).astype(np.uint8)[None]
      model_times[runner_name].append(median_ms(lambda runner=runner: runner(crop_uint8), repeats))
    times["dlib"].append(median_ms(run_dlib, repeats))
    model_times["dlib"].append(times["dlib"][-1])
    if mediapipe is not None:
      roi = (detection.centre_width[0], detection.centre_width[1], detection.centre_width[2])

      def run_mediapipe():
        mp_crop, _ = predict.crop_for_landmark_box(image, roi, image_size=mp_size,
                                                   box_scale=MEDIAPIPE_ROI_SCALE)
        mediapipe.set_tensor(mp_input["index"], mp_crop[None])
        mediapipe.invoke()
        return mediapipe.get_tensor(mediapipe.get_output_details()[0]["index"])

      mp_crop, _ = predict.crop_for_landmark_box(image, roi, image_size=mp_size,
                                                 box_scale=MEDIAPIPE_ROI_SCALE)

      def invoke_mediapipe():
        mediapipe.set_tensor(mp_input["index"], mp_crop[None])
        mediapipe.invoke()

      times["mediapipe"].append(median_ms(run_mediapipe, repeats))
      model_times["mediapipe"].append(median_ms(invoke_mediapipe, repeats))
    for method, landmarks in outputs.items():
      nmes[method].append(float(metrics.nme(landmarks, truth, dataset="300w")))

  faces = len(photos) - len(missed)
  rows = [("(a) JAX " + student_name, "jax"), *[(f"(b) {n} " + student_name, n) for n in sessions],
          ("(c) dlib shape_predictor_68", "dlib"),
          ("(d) MediaPipe face_landmark.tflite (468 pts)", "mediapipe"),
          *[(f"(e) {n} " + student_name, n) for n in litert_runners]]
  rows = [(label, key) for label, key in rows if times[key]]
  medians = {key: float(np.median(times[key])) for _, key in rows}
  fastest = min(medians.values())
  device = jax.devices()[0].device_kind
  print(f"\n{faces} face(s) in {len(photos)} photo(s) ({len(missed)} missed by {detector.name}); "
        f"batch 1, {threads} thread(s) per runtime, CPU: {machine.cpu_description()['name']} ({os.cpu_count()} cores, "
        f"jax {device}),"
        f" box map: {box_map.source}")
  print(f"{'method':58s} {'ms/face':>8s} {'model ms':>9s} {'x fastest':>9s} {'NME %':>7s}")
  results = []
  for label, key in rows:
    nme = f"{100 * np.mean(nmes[key]):.2f}" if nmes.get(key) else "-"
    print(f"{label:58s} {medians[key]:8.2f} {np.median(model_times[key]):9.2f} "
          f"{medians[key] / fastest:9.2f} {nme:>7s}")
    results.append({"method": label, "ms_per_face": medians[key],
                    "model_ms": float(np.median(model_times[key])),
                    "ratio_to_fastest": medians[key] / fastest,
                    "nme_percent": 100 * float(np.mean(nmes[key])) if nmes.get(key) else None})
  detection_ms = float(np.median(detect_ms))
  print(f"{'detection: ' + detector.name + ' (per photo)':58s} {detection_ms:8.2f}")
  best_ours = min(medians[k] for k in medians if k in ("jax", *sessions, *litert_runners))
  print(f"ours, detection + fastest student: {detection_ms + best_ours:.1f} ms/frame "
        f"= {1000 / (detection_ms + best_ours):.0f} fps for one face")
  if "mediapipe" in medians:
    onnx_best = min(medians[k] for k in sessions)
    onnx_model = min(float(np.median(model_times[k])) for k in sessions)
    print(f"exported student / MediaPipe: {onnx_best / medians['mediapipe']:.2f}x per face, "
          f"{onnx_model / float(np.median(model_times['mediapipe'])):.2f}x model only (target <= 1.5x)")
  else:
    print("MediaPipe skipped: run once with --fetch_mediapipe to cache its model")
  if "int8" in report:
    print(f"int8 ONNX file: {report['int8']['size_mb']:.2f} MB "
          f"(float32 {report['float32']['size_mb']:.2f} MB;"
          f" paper Table 6: {export.PAPER_MODEL_SIZE_MB} MB); int8 vs JAX: mean "
          f"{report['int8']['mean_px_error_vs_jax']:.2f} px of the {size} px crop")
  for key in ("tflite_float32", "tflite_int8"):
    if key in report:
      print(f"{key} file: {report[key]['size_mb']:.2f} MB; vs JAX: max "
            f"{report[key]['max_abs_error_vs_jax']:.2g} (normalised)" +
            (f", mean {report[key]['mean_px_error_vs_jax']:.2f} px" if "mean_px_error_vs_jax" in report[key]
             else ""))
  if litert_note:
    print(litert_note)
  if not trained:
    print("note: the student is untrained (no --workdir/--checkpoint): its NME is meaningless.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": results, "detection_ms": detection_ms, "faces": faces, "missed": missed,
                 "threads": threads, "trained": trained, "export": report}, f, indent=1)
  return 0


def tflite_runners(report: dict, module, variables, meta, *, threads: int, quantize: bool):
  """LiteRT runners of the student's .tflite files: from ``report`` (an existing export), else exported
  now beside the ONNX files when TensorFlow is installed. Returns (runners, note when skipped)."""
  try:
    from kd_landmarks.deploy import runtimes
    import ai_edge_litert  # noqa: F401  (extra 'tflite' or 'bench')
  except ImportError:
    return {}, "LiteRT rows skipped: pip install -e '.[tflite]'"
  if "tflite_float32" not in report:
    try:
      import tensorflow  # noqa: F401  (extra 'tflite')
    except ImportError:
      return {}, "TFLite rows skipped: no .tflite export and no TensorFlow (pip install -e '.[tflite]')"
    from kd_landmarks.deploy import export_tflite
    out_dir = tempfile.mkdtemp(prefix="kd_compare_tflite_")  # Never into a model's own export folder.
    print(f"exporting to TFLite in {out_dir} ...", file=sys.stderr)
    report.update(export_tflite.export_tflite(module, variables, meta, out_dir, quantize=quantize,
                                              name=os.path.splitext(os.path.basename(
                                                  report["float32"]["path"]))[0]))
  runners = {"litert fp32": runtimes.LiteRtRunner(report["tflite_float32"]["path"], threads=threads)}
  if quantize and "tflite_int8" in report:
    runners["litert int8"] = runtimes.LiteRtRunner(report["tflite_int8"]["path"], threads=threads)
  return runners, None


if __name__ == "__main__":
  sys.exit(main())
