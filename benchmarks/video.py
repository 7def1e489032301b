"""Landmarks on video, measured on synthetic clips whose ground truth is known exactly.

Two clips of one face rendered by kd_landmarks/datasets/synthetic.py, placed in a larger frame and moved per
frame by a known affine (``video.warped_clip``: the drawn face and its landmarks move together):

  * static: the face at rest, fresh Gaussian sensor noise on every frame (jitter at rest);
  * moving: the face travels one Lissajous loop across the frame while turning (in-plane rotation) and
    changing size, with the same noise (lag and error in motion).

For the student of ``--workdir/--model`` in JAX, ONNX float32 and ONNX int8 (exported into a temporary
folder with kd_landmarks.deploy.export; a backend whose package is missing is skipped with the reason),
with and without the One Euro smoothing, it prints: NME per frame (mean, inter-ocular), jitter
(frame-to-frame landmark displacement not explained by the ground truth's motion, over the inter-ocular
distance), lag (frames the track trails the ground truth's motion: ``video.lag_frames``), and frames per
second on the moving clip with the detector on every frame against tracking (detector on the first frame,
every 30 and when tracking is lost). Frames are held in memory: the timing covers detection, crops, the
model, smoothing and bookkeeping, not decoding. One thread per runtime.

``--sweep`` prints the One Euro grid (min_cutoff x beta) on the JAX tracks: smoothing runs offline on the raw
tracks (the tracker cuts its crops from raw landmarks, so the result is the same as online).

  python benchmarks/video.py --workdir runs/demo [--model student_kd] [--sweep] [--out video.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

# One thread for XLA too, so that every runtime is compared on one core (set before jax is imported).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kd_landmarks import coords  # noqa: E402
from kd_landmarks import datasets  # noqa: E402
from kd_landmarks.datasets import synthetic  # noqa: E402
from kd_landmarks.deploy import detect  # noqa: E402
from kd_landmarks.deploy import predict  # noqa: E402
from kd_landmarks.deploy import video  # noqa: E402
from kd_landmarks.training import checkpoint  # noqa: E402

FRAME_SIZE = (240, 320)  # height, width
NOISE_STD = 6.0          # grey levels, per frame
SWEEP_MIN_CUTOFF = (0.3, 0.5, 1.0, 2.0, 4.0)
SWEEP_BETA = (0.0, 0.3, 1.0, 3.0, 10.0)
MAX_LAG_FRAMES = 1.0     # the sweep's constraint on the moving clip


def cpu_name() -> str:
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown CPU"


def commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def pick_face(detector, *, face_size: int, first: int = 0, tries: int = 40):
  """The first synthetic test face (from ``first``) that the detector finds in the frame, at rest."""
  for index in range(first, first + tries):
    example = synthetic.render_example("test", index, image_size=face_size)
    frames, truth = video.warped_clip(example["image"], example["landmarks"], [placement(example)],
                                      size=FRAME_SIZE)
    if detect.match_detection(detector.detect(frames[0]), truth[0], min_iou=0.4) is not None:
      return index, example
  raise RuntimeError(f"{detector.name} found none of the synthetic test faces {first}..{first + tries - 1}")


def placement(example, *, shift=(0.0, 0.0), angle=0.0, scale=1.0) -> np.ndarray:
  """The affine putting the rendered face's landmark box centre at the frame centre (+ shift), turned by
  ``angle`` degrees and scaled about that centre."""
  cx, cy, _ = coords.square_box_from_landmarks(example["landmarks"])
  frame_centre = np.array([(FRAME_SIZE[1] - 1) / 2, (FRAME_SIZE[0] - 1) / 2])
  return video.similarity(angle, scale, shift=frame_centre - np.array([cx, cy]) + np.asarray(shift),
                          centre=(cx, cy))


# The moving clip's loop: x, y amplitudes (px), in-plane turn (degrees) and size change; over 120 frames
# the face's centre moves at up to 2.1 px per frame (3% of the face's side, 0.9 sides per second at 30 fps).
PATH_AMPLITUDE = (40.0, 20.0)
PATH_TURN_DEGREES = 10.0
PATH_SCALE = 0.08


def make_clips(example, frames: int):
  still = [placement(example)] * frames
  phase = 2 * math.pi * np.arange(frames) / frames
  moving = [placement(example, shift=(PATH_AMPLITUDE[0] * math.sin(p), PATH_AMPLITUDE[1] * math.sin(2 * p)),
                      angle=PATH_TURN_DEGREES * math.sin(p), scale=1 + PATH_SCALE * math.sin(p)) for p in phase]
  clips = {}
  for name, affines, seed in (("static", still, 1), ("moving", moving, 2)):
    clips[name] = video.warped_clip(example["image"], example["landmarks"], affines, noise_std=NOISE_STD,
                                    seed=seed, size=FRAME_SIZE)
  return clips


def run_track(predictor, frames, *, rule, smoothing, fps=30.0):
  """(results, seconds): the tracker over in-memory frames."""
  tracker = video.VideoTracker(predictor, rule=rule, smoothing=smoothing)
  start = time.perf_counter()
  results = [tracker.update(frame, index / fps) for index, frame in enumerate(frames)]
  return results, time.perf_counter() - start


def face_track(results, truth, *, raw=False):
  """[T, K, 2] of the face nearest the ground truth per frame (NaN where no face); the missing count."""
  track = np.full(truth.shape, np.nan)
  for t, result in enumerate(results):
    if result.faces:
      errors = [np.linalg.norm((f.raw_landmarks if raw else f.landmarks) - truth[t], axis=-1).mean()
                for f in result.faces]
      face = result.faces[int(np.argmin(errors))]
      track[t] = face.raw_landmarks if raw else face.landmarks
  return track, int(np.isnan(track[:, 0, 0]).sum())


def measure(track, truth) -> dict:
  """NME, jitter and lag on the frames with a face (jitter on consecutive pairs of such frames)."""
  valid = ~np.isnan(track[:, 0, 0])
  nme = video.per_frame_nme(track[valid], truth[valid])
  pairs = valid[1:] & valid[:-1]
  iod = np.linalg.norm(truth[:, 45] - truth[:, 36], axis=-1)
  residual = np.diff(track, axis=0) - np.diff(truth, axis=0)
  jitter = float((np.linalg.norm(residual[pairs], axis=-1) / iod[1:][pairs][:, None]).mean())
  velocity = np.gradient(truth, axis=0)
  moving = float((velocity ** 2).sum()) > 0
  lag = (float(((truth - track)[valid] * velocity[valid]).sum() / (velocity[valid] ** 2).sum()) if moving
         else None)
  return {"nme": float(nme.mean()), "jitter": jitter, "lag_frames": lag, "missing": int((~valid).sum())}


def smooth_offline(raw_track, smoothing, fps=30.0):
  """The One Euro filter over a raw track, as the tracker runs it (scale: the landmark box side)."""
  one_euro = smoothing.new_filter()
  out = np.full(raw_track.shape, np.nan)
  for t, points in enumerate(raw_track):
    if not np.isnan(points[0, 0]):
      out[t] = one_euro(points, t / fps, scale=float(coords.square_box_from_landmarks(points)[2]))
  return out


def backends(model_dir, meta, module, variables, export_dir, detector, box_map):
  """(name, predictor or None, note) for JAX, ONNX float32, ONNX int8."""
  yield "JAX", predict.Predictor.from_module(module, variables, meta, detector=detector, box_map=box_map), ""
  try:
    import onnxruntime  # noqa: F401  (optional: extra 'export')
    from kd_landmarks.deploy import export
  except ImportError as error:
    for name in ("ONNX float32", "ONNX int8"):
      yield name, None, f"skipped: {error} (pip install -e '.[export]')"
    return
  data_dir = os.path.join(os.path.dirname(os.path.normpath(model_dir)), "data")
  calibration = None
  if os.path.isdir(data_dir):
    calibration = export.dataset_crops(meta["dataset"], "train", data_dir, int(meta["image_size"]))
  report = export.export_onnx(module, variables, meta, export_dir, quantize=True,
                              calibration_images=calibration)
  for name, key in (("ONNX float32", "float32"), ("ONNX int8", "int8")):
    runner = predict.runtimes.OnnxRunner(report[key]["path"], threads=1)
    yield name, predict.Predictor(runner, detector=detector, box_map=box_map), ""


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--model", default=predict.DEFAULT_MODEL)
  parser.add_argument("--detector", default="dlib_hog", choices=sorted(detect.DETECTORS))
  parser.add_argument("--frames", type=int, default=120, help="frames per clip (30 fps)")
  parser.add_argument("--face_size", type=int, default=128, help="the rendered face image's side, px")
  parser.add_argument("--face", type=int, default=0, help="first synthetic test index to try")
  parser.add_argument("--box_map_images", type=int, default=200,
                      help="training faces to fit the detector's box map on (0: the model's own or default)")
  parser.add_argument("--sweep", action="store_true", help="print the One Euro grid on the JAX tracks")
  parser.add_argument("--out", help="write every figure as JSON here")
  args = parser.parse_args(argv)

  model_dir = os.path.join(args.workdir, args.model)
  module, variables, meta = checkpoint.load_inference_variables(model_dir)
  detector = detect.get_detector(args.detector)
  data_dir = os.path.join(args.workdir, "data")
  if args.box_map_images and os.path.isdir(data_dir):
    source = datasets.load_split(meta["dataset"], "train", data_dir)
    picks = np.linspace(0, len(source) - 1, min(len(source), args.box_map_images)).round().astype(int)
    box_map, fit = detect.fit_box_map(detector, (source[int(i)] for i in picks),
                                      source=f"fitted on {meta['dataset']}/train", progress=False)
  else:
    box_map, fit = detect.load_box_map(model_dir, args.detector), None
  index, example = pick_face(detector, face_size=args.face_size, first=args.face)
  clips = make_clips(example, args.frames)
  print(f"CPU: {cpu_name()}; commit {commit()}; model {model_dir} ({meta.get('model')}, {meta['image_size']} px); "
        f"detector {args.detector}, box map {box_map.source}"
        + (f" ({fit['matched']} of {fit['images']} faces)" if fit else "")
        + f"; synthetic test face {index}, frames {FRAME_SIZE[1]}x{FRAME_SIZE[0]}, {args.frames} per clip, "
        f"noise {NOISE_STD} grey levels")
  smoothing = video.Smoothing()
  rows, figures = [], {"cpu": cpu_name(), "commit": commit(), "model_dir": model_dir, "face_index": index,
                       "smoothing": smoothing.to_json(), "backends": {}}
  tracking_rule = video.TrackingRule()
  every_frame = video.TrackingRule(redetect_every=1)
  with tempfile.TemporaryDirectory() as export_dir:
    for name, predictor, note in backends(model_dir, meta, module, variables, export_dir, detector, box_map):
      if predictor is None:
        print(f"{name}: {note}")
        figures["backends"][name] = {"skipped": note}
        continue
      run_track(predictor, clips["static"][0][:3], rule=tracking_rule, smoothing=None)  # compile, warm up
      entry = {}
      raw_tracks = {}
      for clip_name, (frames, truth) in clips.items():
        results, seconds = run_track(predictor, frames, rule=tracking_rule, smoothing=smoothing)
        raw, _ = face_track(results, truth, raw=True)
        smoothed, _ = face_track(results, truth)
        raw_tracks[clip_name] = raw
        entry[clip_name] = {"raw": measure(raw, truth), "smoothed": measure(smoothed, truth),
                            "tracking_fps": len(frames) / seconds,
                            "detector_frames": sum(r.detector_ran for r in results)}
      _, seconds = run_track(predictor, clips["moving"][0], rule=every_frame, smoothing=smoothing)
      entry["moving"]["detector_every_frame_fps"] = args.frames / seconds
      figures["backends"][name] = entry
      if name == "JAX":
        figures["jax_raw_tracks"] = raw_tracks
      for smoothed in (False, True):
        key = "smoothed" if smoothed else "raw"
        static, moving = entry["static"][key], entry["moving"][key]
        rows.append([name, "One Euro" if smoothed else "off", f"{100 * static['nme']:.2f}",
                     f"{100 * moving['nme']:.2f}", f"{100 * static['jitter']:.3f}", f"{100 * moving['jitter']:.3f}",
                     f"{moving['lag_frames']:+.2f}", f"{entry['moving']['detector_every_frame_fps']:.1f}",
                     f"{entry['moving']['tracking_fps']:.1f} ({entry['moving']['detector_frames']} det.)",
                     str(static["missing"] + moving["missing"])])
  header = ["backend", "smoothing", "NME static (%)", "NME moving (%)", "jitter static (% IOD)",
            "jitter moving (% IOD)", "lag moving (frames)", "fps, detector every frame",
            "fps, tracking", "frames without face"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(row) + " |")

  if args.sweep and "jax_raw_tracks" in figures:
    static_truth, moving_truth = clips["static"][1], clips["moving"][1]
    raw = figures["jax_raw_tracks"]
    base = measure(raw["static"], static_truth)["jitter"]
    print(f"\nOne Euro sweep (JAX tracks): static jitter (% IOD; raw {100 * base:.3f}) / moving lag (frames)")
    print("| min_cutoff \\ beta | " + " | ".join(f"{b:g}" for b in SWEEP_BETA) + " |")
    print("|" + "---|" * (len(SWEEP_BETA) + 1))
    grid, best = [], None
    for min_cutoff in SWEEP_MIN_CUTOFF:
      cells = []
      for beta in SWEEP_BETA:
        setting = video.Smoothing(min_cutoff, beta)
        static = measure(smooth_offline(raw["static"], setting), static_truth)
        moving = measure(smooth_offline(raw["moving"], setting), moving_truth)
        grid.append({"min_cutoff": min_cutoff, "beta": beta, "static_jitter": static["jitter"],
                     "moving_lag_frames": moving["lag_frames"], "moving_nme": moving["nme"],
                     "moving_jitter": moving["jitter"]})
        cells.append(f"{100 * static['jitter']:.3f} / {moving['lag_frames']:+.2f}")
        if abs(moving["lag_frames"]) < MAX_LAG_FRAMES and (best is None or static["jitter"] < best["static_jitter"]):
          best = grid[-1]
      print(f"| {min_cutoff:g} | " + " | ".join(cells) + " |")
    print(f"lowest static jitter with |lag| < {MAX_LAG_FRAMES} frame: {best}")
    figures["sweep"] = {"grid": grid, "best": best}
  figures.pop("jax_raw_tracks", None)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(figures, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
