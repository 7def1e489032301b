"""Video: predict on clips (tracking, the detector's schedule, identities), One Euro smoothing, the stability
measures, the CLI. The face is a bright disc that video_fixtures' model and detector find exactly, so every
expected number follows from the clip's construction."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from conftest import require_video
from kd_landmarks.deploy import predict
from kd_landmarks.deploy import video
import video_fixtures as vf

RATE = 30.0


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _one_face_track(records):
  assert all(len(r["faces"]) == 1 for r in records)
  return np.array([r["faces"][0]["landmarks"] for r in records])


def _sine_path(frames, amplitude=(15.0, 8.0), period=60):
  # Starts and ends at rest position after whole periods: a constant offset cancels in the lag.
  return [(amplitude[0] * math.sin(2 * math.pi * t / period), amplitude[1] * math.sin(4 * math.pi * t / period))
          for t in range(frames)]


# ------------------------------------------------------------------------------ One Euro, by hand


def test_one_euro_is_the_papers_filter_by_hand():
  # Casiez et al. 2012: alpha = 1 / (1 + tau / dt), tau = 1 / (2 pi cutoff). At 30 fps and 1 Hz:
  # tau = 0.1591549, alpha = 1 / (1 + 4.774648) = 0.1731707.
  dt = 1 / 30
  still = video.OneEuroFilter(min_cutoff=1.0, beta=0.0)
  assert still(np.array([0.0]), 0.0) == pytest.approx([0.0])
  assert still(np.array([1.0]), dt) == pytest.approx([0.1731707], abs=1e-7)
  # Next step, input still 1: 0.1731707 + 0.1731707 * (1 - 0.1731707) = 0.3163533.
  assert still(np.array([1.0]), 2 * dt) == pytest.approx([0.3163533], abs=1e-7)
  # With beta: speed 30/s smoothed with d_cutoff 1 Hz -> 0.1731707 * 30 = 5.195122; over scale 2 face units
  # and beta 0.5 the cutoff is 1 + 0.5 * 5.195122 / 2 = 2.298780 Hz, tau = 0.06923451,
  # alpha = 1 / (1 + 2.0770354) = 0.3249881.
  moving = video.OneEuroFilter(min_cutoff=1.0, beta=0.5)
  moving(np.array([0.0, 0.0]), 0.0, scale=2.0)
  np.testing.assert_allclose(moving(np.array([1.0, 0.0]), dt, scale=2.0), [0.3249881, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match="min_cutoff > 0 Hz"):
    video.Smoothing(min_cutoff=0.0)


# ------------------------------------------------------------------------------ stability measures


def test_jitter_and_lag_measures_by_hand():
  frames = 30
  truth = np.stack([vf.disc_landmarks((50.0 + 2.0 * t, 40.0), 14.0) for t in range(frames)])
  iod = np.linalg.norm(truth[0, 45] - truth[0, 36])
  # Alternating +-d along x on top of the truth: every frame-to-frame residual is 2d long.
  d = 0.5
  shaken = truth + d * ((-1.0) ** np.arange(frames))[:, None, None] * np.array([1.0, 0.0])
  assert video.jitter(shaken, truth) == pytest.approx(2 * d / iod)
  assert video.jitter(truth + 3.0, truth) == pytest.approx(0.0)  # an offset is not jitter
  # Two frames behind on a straight line at constant speed: lag 2.
  delayed = np.concatenate([truth[:1], truth[:1], truth[:-2]])
  assert video.lag_frames(delayed[2:], truth[2:]) == pytest.approx(2.0)
  assert video.lag_frames(truth, truth) == pytest.approx(0.0)


def test_tracking_rule_names_each_reason():
  rule = video.TrackingRule(max_scale_change=0.15, max_shift=0.15, min_inside=0.5)
  frame = (100, 200, 3)
  assert rule.lost_reason((50, 50, 40), (52, 51, 42), frame) is None
  assert rule.lost_reason((50, 50, 40), (50, 50, 46.5), frame).startswith("scale changed x1.16")
  assert rule.lost_reason((50, 50, 40), (50, 50, 34.5), frame).startswith("scale changed x0.86")
  assert rule.lost_reason((50, 50, 40), (56.1, 50, 40), frame) == "moved 0.15 of its side"
  assert rule.lost_reason((50, 50, 40), (50, 50, 40), frame) is None
  # A box of side 40 centred 5 px left of the frame's edge (-0.5): 15 of its 40 px inside.
  assert rule.lost_reason((-5.5, 50, 40), (-5.5, 50, 40), frame) == "0.38 of the face inside the frame"
  assert [rule.scheduled(i) for i in range(0, 61, 15)] == [True, False, True, False, True]
  assert not video.TrackingRule(redetect_every=0).scheduled(0)


def test_warped_clip_moves_drawn_face_and_landmarks_together():
  # The disc's centroid in each frame (measured on the pixels) is where the ground truth says it is.
  centre, radius = (60.0, 50.0), 12.0
  image = vf.disc_image((100, 120), [centre], radius)
  affines = [video.similarity(10.0, 1.1, shift=(7.5, -3.25), centre=centre), video.similarity(shift=(-20, 5))]
  frames, truth = video.warped_clip(image, vf.disc_landmarks(centre, radius), affines)
  for frame, points, affine in zip(frames, truth, affines):
    weight = np.clip((frame.mean(-1) - vf.BACKGROUND) / (vf.DISC - vf.BACKGROUND), 0, 1)
    ys, xs = np.mgrid[0:frame.shape[0], 0:frame.shape[1]]
    measured = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
    expected = affine[:, :2] @ np.array(centre) + affine[:, 2]
    np.testing.assert_allclose(measured, expected, atol=0.05)
    # The landmarks of the moved disc: its centre moved, its radius scaled by the affine's scale.
    scale = np.sqrt(abs(np.linalg.det(affine[:, :2])))
    if affine[0, 1] == 0:  # no rotation: the template keeps its orientation
      np.testing.assert_allclose(points, vf.disc_landmarks(expected, radius * scale), atol=1e-9)


# ------------------------------------------------------------------------------ tracking, in memory


def test_detector_runs_on_first_scheduled_and_lost_frames_only():
  # 12 frames, 1 px per frame to the right, and a jump of 12 px (0.36 of the landmark box's side 33.6)
  # into frame 7: the rule names frames 0, 5, 10 (every 5) and 7 (lost), and nothing else.
  shifts = [(t + (12.0 if t >= 7 else 0.0), 0.0) for t in range(12)]
  frames, truth = vf.disc_clip(shifts)
  detector = vf.DiscDetector()
  results = list(vf.disc_predictor(detector).predict_video(list(frames), redetect_every=5, smoothing=False))
  assert len(results) == 12
  assert [r.index for r in results if r.detector_ran] == [0, 5, 7, 10]
  assert detector.calls == 4
  assert [bool(r.lost) for r in results] == [i == 7 for i in range(12)]
  assert results[7].lost[0].startswith("face 0: ")
  assert [r.faces[0].source for r in results] == [
      "detection" if i in (0, 5, 7, 10) else "tracking" for i in range(12)]
  assert {r.faces[0].track_id for r in results} == {0}   # the jumped face is matched back to its identity
  # Tracked and detected frames alike are on the face: within 2% of the inter-ocular distance.
  pred = np.stack([r.faces[0].landmarks for r in results])
  assert video.per_frame_nme(pred, truth).max() < 0.02
  # Times: index / fps.
  assert [r.time for r in results[:3]] == pytest.approx([0.0, 1 / 30, 2 / 30])


def test_several_faces_keep_their_identity_and_a_new_face_gets_a_new_one():
  # Two discs moving apart; a third appears at frame 6 and is seen at the next scheduled detection (8).
  centres = [(40.0, 50.0), (120.0, 70.0)]
  frames = []
  for t in range(12):
    moved = [(40.0 - t, 50.0), (120.0 + t, 70.0)] + ([(80.0, 150.0)] if t >= 6 else [])
    frames.append(vf.disc_image((200, 200), moved, 14.0))
  detector = vf.DiscDetector()
  results = list(vf.disc_predictor(detector).predict_video(frames, redetect_every=4, smoothing=True))
  assert [r.index for r in results if r.detector_ran] == [0, 4, 8]

  def ids_by_x(result):
    return [face.track_id for face in sorted(result.faces, key=lambda f: f.landmarks[:, 0].mean())]

  first = ids_by_x(results[0])
  assert sorted(first) == [0, 1]
  for result in results[:8]:
    assert len(result.faces) == 2 and ids_by_x(result) == first
  for result in results[8:]:
    faces = sorted(result.faces, key=lambda f: f.landmarks[:, 1].mean())
    assert len(faces) == 3 and faces[-1].track_id == 2   # the lowest disc: the new identity
    assert ids_by_x(type(result)(0, 0, False, faces[:2])) == first
  del centres


# ------------------------------------------------------------------------------ a clip file through predict


def _write_clip(path, frames):
  return video.write_video(str(path), frames, fps=RATE)


def _decoded_frame_count(path):
  import av  # Only after require_video(): the extra may be missing.
  with av.open(str(path)) as container:
    return sum(1 for _ in container.decode(video=0))


def test_predict_on_a_video_file_writes_a_record_per_frame_and_an_overlay(tmp_path):
  require_video()
  shifts = [(t + (12.0 if t >= 7 else 0.0), 0.0) for t in range(12)]
  frames, _ = vf.disc_clip(shifts)
  clip = _write_clip(tmp_path / "clip.mp4", frames)
  detector = vf.DiscDetector()
  summary = predict.predict_files(vf.disc_predictor(detector), [clip], str(tmp_path / "out"),
                                  rule=video.TrackingRule(redetect_every=5), smoothing=None, progress=False)
  (record,) = summary["images"]
  assert record["status"] == "ok" and record["frames"] == 12 and record["detector_frames"] == 4
  records = _records(tmp_path / "out" / "clip.jsonl")
  assert len(records) == _decoded_frame_count(clip) == 12
  assert [r["frame"] for r in records] == list(range(12))
  assert [r["time"] for r in records] == pytest.approx([i / RATE for i in range(12)], abs=1e-6)
  # The h264 coding does not move the disc: the same frames as in memory, the same schedule.
  assert [r["frame"] for r in records if r["detector_ran"]] == [0, 5, 7, 10] and detector.calls == 4
  face = records[3]["faces"][0]
  assert face["source"] == "tracking" and face["id"] == 0 and face["score"] is None
  assert len(face["landmarks"]) == 68 and len(face["box"]) == 4 and len(face["crop_box"]) == 3
  assert records[5]["faces"][0]["source"] == "detection" and records[5]["faces"][0]["score"] > 0
  assert _decoded_frame_count(tmp_path / "out" / "clip.mp4") == 12
  assert summary["video"]["smoothing"] is None and summary["video"]["tracking"]["redetect_every"] == 5


def test_tracked_landmarks_agree_with_detection_on_every_frame(tmp_path):
  require_video()
  # Detector on every frame against detector on the first only, on the same decoded clip: the tracked
  # crops frame the face differently, the landmarks agree within 1% of the inter-ocular distance
  # (measured: 0.1% at most).
  frames, truth = vf.disc_clip(_sine_path(30))
  clip = _write_clip(tmp_path / "moving.mp4", frames)
  tracks = {}
  for every in (1, 0):
    out = tmp_path / f"every{every}"
    predict.predict_files(vf.disc_predictor(), [clip], str(out), smoothing=None, progress=False,
                          rule=video.TrackingRule(redetect_every=every))
    records = _records(out / "moving.jsonl")
    assert [r["detector_ran"] for r in records] == [True] * 30 if every else [i == 0 for i in range(30)]
    tracks[every] = _one_face_track(records)
  iod = np.linalg.norm(truth[:, 45] - truth[:, 36], axis=-1)
  difference = np.linalg.norm(tracks[1] - tracks[0], axis=-1).mean(axis=-1) / iod
  assert difference[1:].max() < 0.01


def test_smoothing_lowers_jitter_at_rest_and_keeps_lag_in_motion(tmp_path):
  require_video()
  static_frames, static_truth = vf.disc_clip([(0.0, 0.0)] * 40, noise_std=12.0, seed=3)
  moving_frames, moving_truth = vf.disc_clip(_sine_path(60), noise_std=12.0, seed=4)
  clips = {"static": _write_clip(tmp_path / "static.mp4", static_frames),
           "moving": _write_clip(tmp_path / "moving.mp4", moving_frames)}
  measured = {}
  for name, smoothing in (("raw", None), ("smooth", video.Smoothing())):
    out = tmp_path / name
    predict.predict_files(vf.disc_predictor(), list(clips.values()), str(out), smoothing=smoothing,
                          rule=video.TrackingRule(redetect_every=0), progress=False)
    measured[name] = {
        "static": video.stability(_one_face_track(_records(out / "static.jsonl")), static_truth),
        "moving": video.stability(_one_face_track(_records(out / "moving.jsonl")), moving_truth)}
  raw, smooth = measured["raw"], measured["smooth"]
  # Measured with the defaults (min_cutoff 1 Hz, beta 3): static jitter 0.127% -> 0.023% of the
  # inter-ocular distance (5.5x lower); lag 0.003 -> 0.96 frames at up to 1.4 face sides per second.
  assert raw["static"]["jitter"] > 0
  assert smooth["static"]["jitter"] < raw["static"]["jitter"] / 4
  assert abs(smooth["moving"]["lag_frames"]) < 1.2
  assert abs(raw["moving"]["lag_frames"]) < 0.1


def test_a_folder_of_frames_is_one_clip(tmp_path):
  require_video()  # the overlay is an .mp4
  frames, _ = vf.disc_clip([(t, 0.0) for t in range(5)])
  folder = tmp_path / "frames"
  folder.mkdir()
  for index, frame in enumerate(frames):
    Image.fromarray(frame).save(folder / f"frame_{index:04d}.png")
  (folder / "notes.txt").write_text("not a frame")
  summary = predict.predict_files(vf.disc_predictor(), [str(folder)], str(tmp_path / "out"),
                                  frame_folders=True, fps=10.0, progress=False)
  assert summary["counts"] == {"ok": 1, "no_face": 0, "error": 0, "skipped": 0}
  records = _records(tmp_path / "out" / "frames.jsonl")
  assert [r["time"] for r in records] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


# ------------------------------------------------------------------------------ the command line


@pytest.fixture
def disc_cli(monkeypatch):
  detector = vf.DiscDetector()
  monkeypatch.setattr(predict.Predictor, "load", classmethod(
      lambda cls, path, **kwargs: vf.disc_predictor(detector)))
  return detector


def test_cli_flags_reach_the_tracker(disc_cli, tmp_path, capsys):
  require_video()
  frames, _ = vf.disc_clip(_sine_path(9), noise_std=12.0)
  clip = _write_clip(tmp_path / "clip.mp4", frames)
  assert predict.main(["--checkpoint", "unused", clip, "--out", str(tmp_path / "raw"), "--redetect_every", "4",
                       "--no_smoothing"]) == 0
  raw = _records(tmp_path / "raw" / "clip.jsonl")
  assert [r["frame"] for r in raw if r["detector_ran"]] == [0, 4, 8] and disc_cli.calls == 3
  assert predict.main(["--checkpoint", "unused", clip, "--out", str(tmp_path / "smooth"), "--min_cutoff", "0.5",
                       "--beta", "0"]) == 0
  smooth = _records(tmp_path / "smooth" / "clip.jsonl")
  assert [r["frame"] for r in smooth if r["detector_ran"]] == [0]   # the default schedule: every 30
  # Without smoothing the output is the detector-and-tracker's raw landmarks; with it, frame 1 is the One
  # Euro step by hand (beta 0: alpha = 1 / (1 + (1 / (2 pi 0.5)) * 30) = 0.0947931) from frame 0, which
  # is the same detection in both runs.
  raw_track, smooth_track = _one_face_track(raw), _one_face_track(smooth)
  np.testing.assert_allclose(smooth_track[0], raw_track[0], atol=1e-3)
  summary = json.loads((tmp_path / "smooth" / "summary.json").read_text())
  assert summary["video"]["smoothing"] == {"min_cutoff": 0.5, "beta": 0.0, "d_cutoff": 1.0}
  alpha = 1 / (1 + 30 / (2 * math.pi * 0.5))
  np.testing.assert_allclose(smooth_track[1], raw_track[0] + alpha * (raw_track[1] - raw_track[0]), atol=2e-3)
  assert "1 input(s) with faces" in capsys.readouterr().out


def test_cli_bad_video_input_is_one_line_and_exit_codes_tell(disc_cli, tmp_path, capsys):
  require_video()  # without PyAV the record says so instead (the next test)
  (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
  assert predict.main(["--checkpoint", "unused", str(tmp_path / "broken.mp4"), "--out", str(tmp_path / "o")]) == 1
  captured = capsys.readouterr()
  summary = json.loads((tmp_path / "o" / "summary.json").read_text())
  (record,) = summary["images"]
  assert record["status"] == "error" and record["reason"].startswith(str(tmp_path / "broken.mp4"))
  assert f"  error: {record['reason']}" in captured.out
  assert captured.err.strip().splitlines()[-1] == "error: all 1 input(s) failed (none could be read as an image or video)"
  # Settings: one line naming the value, before any work.
  assert predict.main(["--checkpoint", "unused", str(tmp_path / "broken.mp4"), "--out", str(tmp_path / "p"),
                       "--beta", "-1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == ("error: One Euro smoothing needs min_cutoff > 0 Hz, beta >= 0 and d_cutoff > 0 Hz; got "
                 "min_cutoff=1.0, beta=-1.0, d_cutoff=1.0") and not (tmp_path / "p").exists()
  assert predict.main(["--checkpoint", "unused", "x.mp4", "--out", str(tmp_path / "p"), "--redetect_every",
                       "-2"]) == 2
  assert "redetect_every must be >= 0" in capsys.readouterr().err
  # An --out that is the frame folder itself is refused: the overlays would become frames of the clip.
  folder = tmp_path / "frames"
  folder.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "f0.png")
  assert predict.main(["--checkpoint", "unused", str(folder), "--frame_folders", "--out", str(folder)]) == 2
  assert capsys.readouterr().err.startswith(f"error: --out {folder} is the frame folder {folder}")
  assert os.listdir(folder) == ["f0.png"]


def test_missing_video_extra_is_an_error_record_naming_the_extra(disc_cli, tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_av(name, *args, **kwargs):
    if name == "av" or name.startswith("av."):
      raise ImportError("No module named 'av'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_av)
  (tmp_path / "clip.mp4").write_bytes(b"\x00" * 16)
  assert predict.main(["--checkpoint", "unused", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "o")]) == 1
  (record,) = json.loads((tmp_path / "o" / "summary.json").read_text())["images"]
  assert record["reason"] == f"reading the video {tmp_path / 'clip.mp4'} needs PyAV: pip install 'kd_landmarks[video]'"
