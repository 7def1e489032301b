"""Official-format readers (300W .pts, COFW v7.3 .mat, WFLW txt) and the face-crop geometry."""
import pathlib

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

import fixtures_formats as ff
from kd_landmarks import coords
from kd_landmarks.datasets import images
from kd_landmarks.datasets import readers

COUNTS_300W = {"afw": 2, "helen/trainset": 2, "lfpw/trainset": 1, "helen/testset": 1, "lfpw/testset": 1,
               "ibug": 1}


# --------------------------------------------------------------------------------------------- .pts


def test_read_pts_takeo_matches_independent_parse_minus_one():
  landmarks = readers.read_pts(ff.TAKEO_DIR / "takeo.pts")
  assert landmarks.shape == (68, 2) and landmarks.dtype == np.float32
  # First point of the file is "32.310345 99.612347" (1-based) -> 0-based.
  np.testing.assert_allclose(landmarks[0], [31.310345, 98.612347], atol=1e-5)
  np.testing.assert_allclose(landmarks, ff.read_takeo_landmarks(), atol=1e-5)


def _write(tmp_path, text, name="face.pts"):
  path = tmp_path / name
  path.write_text(text)
  return path


@pytest.mark.parametrize("text, fragment", [
    ("version: 1\nn_points: 2\n{\n1 2\n3 four\n}\n", ":5: coordinates must be numbers"),
    ("version: 1\nn_points: 2\n{\n1 2\n3 4 5\n}\n", ":5: expected 'x y'"),
    ("version: 1\nn_points: 3\n{\n1 2\n3 4\n}\n", "n_points 3 but the file lists 2"),
    ("version: 1\nn_points: 2\n{\n1 2\n3 4\n", "no closing '}'"),
    ("version: 1\n{\n1 2\n}\n", "no 'n_points:' line"),
    ("version: 1\nn_points: two\n{\n}\n", ":2: n_points must be an integer"),
    ("version 1\nn_points: 1\n{\n1 2\n}\n", ":1: expected a 'key: value' header line"),
    ("version: 1\nn_points: 1\n1 2\n", ":3: expected a 'key: value' header line or '{'"),
    ("version: 1\nn_points: 1\n", "no '{' line"),
    ("version: 1\nn_points: 1\n{\n1 nan\n}\n", ":4: non-finite"),
])
def test_malformed_pts_names_file_and_line(tmp_path, text, fragment):
  path = _write(tmp_path, text)
  with pytest.raises(readers.DatasetFormatError) as error:
    readers.read_pts(path)
  assert str(path) in str(error.value)
  assert fragment in str(error.value)


def test_pts_round_trip_of_generated_points(tmp_path):
  points = np.array([[0.0, 0.0], [10.25, 3.5], [99.0, 42.125]], np.float32)
  path = _write(tmp_path, ff.pts_text(points))
  np.testing.assert_allclose(readers.read_pts(path), points, atol=1e-5)


# --------------------------------------------------------------------------------------------- 300W


def test_300w_splits_follow_the_protocol(tmp_path):
  written = ff.write_300w(tmp_path, COUNTS_300W, takeo_in="ibug")
  splits = {split: readers.read_300w(tmp_path, split, allow_partial=True) for split in readers.SOURCES_300W}
  ids = {split: [example.image_id for example in examples] for split, examples in splits.items()}
  assert all(i.split("/")[0] in ("afw", "helen", "lfpw") and "testset" not in i for i in ids["train"])
  assert len(ids["train"]) == 5
  assert sorted(ids["test_common"]) == ["helen/testset/helen_testset_0000.jpg",
                                        "lfpw/testset/lfpw_testset_0000.png"]
  assert ids["test_challenging"] == ["ibug/ibug_0000.jpg", "ibug/takeo.ppm"]
  assert ids["test_full"] == ids["test_common"] + ids["test_challenging"]
  for examples in splits.values():
    for example in examples:
      np.testing.assert_allclose(example.landmarks, written[example.image_id], atol=1e-4)
  takeo = splits["test_challenging"][1]
  assert takeo.load_image().shape == (225, 150, 3)


def test_300w_official_counts_required_without_allow_partial(tmp_path):
  ff.write_300w(tmp_path, COUNTS_300W)
  with pytest.raises(readers.DatasetFormatError) as error:
    readers.read_300w(tmp_path, "train")
  message = str(error.value)
  assert "has 5 examples but the official data has 3148" in message
  assert "afw: 2 of 337" in message and "--allow_partial" in message


def test_300w_missing_folder_names_the_expected_path(tmp_path):
  ff.write_300w(tmp_path, {"afw": 1})
  with pytest.raises(readers.DatasetFormatError) as error:
    readers.read_300w(tmp_path, "train")
  assert str(tmp_path / "helen" / "trainset") in str(error.value)
  assert "ibug.doc.ic.ac.uk" in str(error.value)


def test_missing_manual_dir_names_path_and_source(tmp_path):
  for dataset, source in (("300w", "ibug.doc.ic.ac.uk"), ("cofw", "caltech"), ("wflw", "wywu.github.io")):
    with pytest.raises(readers.DatasetFormatError) as error:
      readers.read_split(dataset, tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(error.value)
    assert source in str(error.value)


def test_300w_wrong_landmark_count_names_file(tmp_path):
  ff.write_300w(tmp_path, {"ibug": 1})
  pts = tmp_path / "ibug" / "ibug_0000.pts"
  pts.write_text(ff.pts_text(np.ones((67, 2), np.float32)))
  with pytest.raises(readers.DatasetFormatError, match="67 landmarks but 300w has 68") as error:
    readers.read_300w(tmp_path, "test_challenging", allow_partial=True)
  assert str(pts) in str(error.value)


def test_300w_pts_without_image_is_an_error(tmp_path):
  ff.write_300w(tmp_path, {"ibug": 2})
  (tmp_path / "ibug" / "ibug_0001.jpg").unlink()
  with pytest.raises(readers.DatasetFormatError, match="no image next to it") as error:
    readers.read_300w(tmp_path, "test_challenging", allow_partial=True)
  assert "ibug_0001.pts" in str(error.value)


def test_empty_split_is_an_error_even_when_partial(tmp_path):
  (tmp_path / "ibug").mkdir()
  with pytest.raises(readers.DatasetFormatError, match="'test_challenging' is empty"):
    readers.read_300w(tmp_path, "test_challenging", allow_partial=True)


def test_unreadable_image_names_the_file(tmp_path):
  ff.write_300w(tmp_path, {"ibug": 1})
  image_path = tmp_path / "ibug" / "ibug_0000.jpg"
  image_path.write_bytes(b"not a jpeg")
  (example,) = readers.read_300w(tmp_path, "test_challenging", allow_partial=True)
  with pytest.raises(images.ImageReadError) as error:
    example.load_image()
  assert str(image_path) in str(error.value)


# --------------------------------------------------------------------------------------------- COFW


def test_cofw_v73_fixture_is_a_matlab_hdf5_file_with_cell_references(tmp_path):
  ff.write_cofw(tmp_path, num_train=2, num_test=1)
  path = tmp_path / "COFW_train_color.mat"
  assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
  with h5py.File(path, "r") as f:
    assert f["IsTr"].dtype == h5py.ref_dtype and f["IsTr"].shape == (1, 2)
    assert f["IsTr"].attrs["MATLAB_class"] == b"cell"
    assert f["phisTr"].shape == (87, 2)  # MATLAB's 2 x 87, transposed on disk.
    first = f[f["IsTr"][0, 0]]
    assert first.shape == (3, 72, 64)    # MATLAB's 64 x 72 x 3 (H x W x C), transposed on disk.


def test_cofw_reader_recovers_images_landmarks_and_occlusion(tmp_path):
  written = ff.write_cofw(tmp_path, num_train=3, num_test=2)
  for split in ("train", "test"):
    examples = readers.read_cofw(tmp_path, split, allow_partial=True)
    assert len(examples) == len(written[split])
    for example, (image, landmarks, flags) in zip(examples, written[split]):
      np.testing.assert_array_equal(example.load_image(), image)  # incl. the greyscale one, as RGB
      np.testing.assert_allclose(example.landmarks, landmarks, atol=1e-4)
      np.testing.assert_array_equal(example.occluded, flags)
  assert examples[0].image_id == "COFW_test_color.mat/IsT/0"


def test_cofw_older_mat_files_are_read_with_scipy(tmp_path):
  written = ff.write_cofw(tmp_path / "v73", num_train=2, num_test=1)
  cells = np.empty((2, 1), dtype=object)
  phis = []
  for i, (image, landmarks, flags) in enumerate(written["train"]):
    cells[i, 0] = image
    phis.append(np.concatenate([landmarks[:, 0] + 1, landmarks[:, 1] + 1, flags]))
  (tmp_path / "v5").mkdir()
  scipy.io.savemat(tmp_path / "v5" / "COFW_train_color.mat",
                   {"IsTr": cells, "phisTr": np.array(phis), "bboxesTr": np.zeros((2, 4))})
  examples = readers.read_cofw(tmp_path / "v5", "train", allow_partial=True)
  for example, (image, landmarks, _) in zip(examples, written["train"]):
    np.testing.assert_array_equal(example.load_image(), image)
    np.testing.assert_allclose(example.landmarks, landmarks, atol=1e-4)


def test_cofw_bad_files(tmp_path):
  # Probe: an empty manual dir gave tfds's bare AssertionError; now one line naming the dir and the fix.
  with pytest.raises(readers.DatasetFormatError, match=rf"cofw: --manual_dir {tmp_path} is empty; extract the "
                     r"official cofw archives into it .*python -m kd_landmarks.datasets layout"):
    readers.read_cofw(tmp_path, "train", allow_partial=True)
  (tmp_path / "README.txt").write_text("not the data")
  with pytest.raises(readers.DatasetFormatError, match="COFW_train_color.mat but it does not exist"):
    readers.read_cofw(tmp_path, "train", allow_partial=True)
  ff.write_matlab_v73(tmp_path / "COFW_train_color.mat", {"IsTr": [np.zeros((4, 4, 3), np.uint8)],
                                                         "phisTr": np.zeros((1, 87))})
  with pytest.raises(readers.DatasetFormatError, match="no variable 'bboxesTr'"):
    readers.read_cofw(tmp_path, "train", allow_partial=True)
  ff.write_matlab_v73(tmp_path / "COFW_train_color.mat", {"IsTr": [np.zeros((4, 4, 3), np.uint8)],
                                                         "phisTr": np.zeros((1, 84)),
                                                         "bboxesTr": np.zeros((1, 4))})
  with pytest.raises(readers.DatasetFormatError, match="N x 87"):
    readers.read_cofw(tmp_path, "train", allow_partial=True)
  ff.write_cofw(tmp_path, num_train=2, num_test=1)
  with pytest.raises(readers.DatasetFormatError, match="has 2 examples but the official data has 1345"):
    readers.read_cofw(tmp_path, "train")


# --------------------------------------------------------------------------------------------- WFLW

TEST_FLAGS = [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 1, 0], [1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]]


def test_wflw_reader_splits_subsets_and_face_ids(tmp_path):
  written = ff.write_wflw(tmp_path, num_train=3, test_flags=TEST_FLAGS)
  train = readers.read_wflw(tmp_path, "train", allow_partial=True)
  assert [e.image_id for e in train] == [t[0] for t in written["train"]]
  test = readers.read_wflw(tmp_path, "test", allow_partial=True)
  # The last two faces share one photo: face indices 0 and 1 of the same path.
  assert test[-2].image_id.endswith("#0") and test[-1].image_id.endswith("#1")
  assert test[-2].image_id[:-2] == test[-1].image_id[:-2]
  for example, (image_id, landmarks, flags) in zip(test, written["test"]):
    assert example.image_id == image_id
    np.testing.assert_allclose(example.landmarks, landmarks, atol=1e-5)
    np.testing.assert_array_equal(example.attributes, flags)
    assert example.load_image().shape == (88, 96, 3)
  for column, attribute in enumerate(readers.WFLW_ATTRIBUTES):
    subset = readers.read_wflw(tmp_path, f"test_{attribute}", allow_partial=True) if any(
        row[column] for row in TEST_FLAGS) else []
    expected = [t[0] for t in written["test"] if t[2][column]]
    assert [e.image_id for e in subset] == expected


def test_wflw_malformed_lines_name_file_and_line(tmp_path):
  ff.write_wflw(tmp_path, num_train=3, test_flags=TEST_FLAGS)
  path = tmp_path / readers.WFLW_ANNOTATION_DIR / "list_98pt_rect_attr_train.txt"
  lines = path.read_text().splitlines()
  for broken, fragment in ((lines[1].split(" ", 1)[1], "expected 206 numbers"),
                           ("x" + lines[1], "could not convert"),
                           (lines[1].replace(" 0 0 0 0 0 0 ", " 0 0 2 0 0 0 "), "must be 0 or 1")):
    path.write_text("\n".join([lines[0], broken, lines[2]]) + "\n")
    with pytest.raises(readers.DatasetFormatError) as error:
      readers.read_wflw(tmp_path, "train", allow_partial=True)
    assert f"{path}:2:" in str(error.value) and fragment in str(error.value)


def test_wflw_missing_annotations_and_counts(tmp_path):
  (tmp_path / "WFLW_images").mkdir()
  with pytest.raises(readers.DatasetFormatError, match="list_98pt_rect_attr_test.txt but it does not exist"):
    readers.read_wflw(tmp_path, "test_blur", allow_partial=True)
  ff.write_wflw(tmp_path, num_train=3, test_flags=TEST_FLAGS)
  with pytest.raises(readers.DatasetFormatError, match="'test_pose' has 2 examples but the official data has 326"):
    readers.read_wflw(tmp_path, "test_pose")
  with pytest.raises(readers.DatasetFormatError, match="'test_makeup' has 1 examples"):
    readers.read_wflw(tmp_path, "test_makeup")


# --------------------------------------------------------------------------------------- crop geometry


def _blob_image(height, width, centre, sigma=2.0):
  y, x = np.mgrid[0:height, 0:width]
  blob = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma ** 2))
  return np.repeat((blob * 255).round().astype(np.uint8)[:, :, None], 3, axis=2)


def _centroid(image):
  weights = image[:, :, 0].astype(np.float64)
  y, x = np.mgrid[0:image.shape[0], 0:image.shape[1]]
  return np.array([(weights * x).sum(), (weights * y).sum()]) / weights.sum()


@pytest.mark.parametrize("dot, landmark_box, size", [
    ((40.3, 55.7), ((20.0, 30.0), (70.0, 80.0)), 64),     # shrink: stored side 75 px -> 64 px
    ((12.0, 20.5), ((2.0, 4.0), (30.0, 34.0)), 96),       # enlarge, box partly outside (black padding)
    ((150.25, 30.0), ((120.0, 10.0), (158.0, 50.0)), 48),  # box over the right edge
])
def test_crop_puts_a_dot_where_the_affine_says(dot, landmark_box, size):
  """A blob drawn at a sub-pixel position lands where the inverse of crop_to_original maps it."""
  image = _blob_image(90, 160, dot, sigma=3.0)
  affine = images.stored_crop_affine(np.array(landmark_box), size=size)
  crop = images.crop_face(image, affine, size)
  expected = coords.apply_affine(coords.invert_affine(affine), np.array([dot]))[0]
  scale = affine[0, 0]
  np.testing.assert_allclose(_centroid(crop), expected, atol=0.05 + 0.05 / scale)


def test_crop_pads_outside_the_photo_with_black():
  image = np.full((40, 50, 3), 255, np.uint8)
  affine = images.stored_crop_affine(np.array([[-10.0, -10.0], [20.0, 20.0]]), size=30)  # box from -17.5
  crop = images.crop_face(image, affine, 30)
  in_photo = coords.apply_affine(affine, np.array([[29.0, 29.0], [0.0, 0.0]]))
  assert (in_photo[0] > 0).all() and (in_photo[1] < -1).all()
  assert crop[-1, -1].min() == 255 and crop[0, 0].max() == 0


def test_crop_landmark_round_trip_within_a_hundredth_of_a_pixel():
  rng = np.random.default_rng(3)
  for _ in range(20):
    landmarks = ff.random_face_landmarks(rng, 68, width=int(rng.integers(50, 3000)),
                                         height=int(rng.integers(50, 3000)))
    affine = images.stored_crop_affine(landmarks, size=320).astype(np.float32)
    in_crop = coords.apply_affine(coords.invert_affine(affine), landmarks.astype(np.float64))
    back = coords.apply_affine(affine.astype(np.float64), in_crop.astype(np.float32).astype(np.float64))
    assert np.abs(back - landmarks).max() < 0.01
    # The landmark box fills 1/STORED_CROP_SCALE of the crop, centred.
    side = (in_crop.max(0) - in_crop.min(0)).max()
    np.testing.assert_allclose(side, 320 / images.STORED_CROP_SCALE, rtol=1e-5)
    np.testing.assert_allclose((in_crop.max(0) + in_crop.min(0)) / 2, [159.5, 159.5], atol=1e-3)


def test_crop_rejects_degenerate_boxes_and_bad_images(tmp_path):
  with pytest.raises(ValueError, match="zero-size box"):
    images.stored_crop_affine(np.ones((68, 2)), size=32)
  with pytest.raises(images.ImageReadError, match="uint8"):
    images.as_rgb(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(images.ImageReadError, match=r"\[H, W, 3\]"):
    images.as_rgb(np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(images.ImageReadError, match="not found"):
    images.read_image(tmp_path / "missing.jpg")


def test_read_image_converts_greyscale_to_rgb(tmp_path):
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  Image.fromarray(grey).save(tmp_path / "g.png")
  rgb = images.read_image(pathlib.Path(tmp_path / "g.png"))
  assert rgb.shape == (3, 4, 3)
  np.testing.assert_array_equal(rgb[:, :, 2], grey)


# ------------------------------------------------------------------------------ unusual image modes


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
  # Probe: Image.convert("RGB") clips I;16 at 255, storing an all-white crop.
  values = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
  Image.fromarray(values).save(tmp_path / "deep.png")
  assert Image.open(tmp_path / "deep.png").mode == "I;16"
  rgb = images.read_image(tmp_path / "deep.png")
  expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
  assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
  np.testing.assert_array_equal(rgb[..., 0], expected)
  np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])
  assert rgb.min() == 0 and rgb.max() == 251


def test_unusual_modes_convert_or_are_refused_naming_the_file(tmp_path):
  cmyk = Image.new("CMYK", (4, 3), (0, 255, 255, 0))  # Pure red in CMYK.
  cmyk.save(tmp_path / "cmyk.tif")
  np.testing.assert_array_equal(images.read_image(tmp_path / "cmyk.tif")[0, 0], [255, 0, 0])
  Image.fromarray(np.full((3, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
  with pytest.raises(images.ImageReadError, match=rf"{tmp_path}/float.tif: a floating-point image \(mode F\)"):
    images.read_image(tmp_path / "float.tif")
  Image.fromarray(np.full((3, 4), 70000, np.int32)).save(tmp_path / "wide.tif")
  with pytest.raises(images.ImageReadError, match=rf"{tmp_path}/wide.tif: a 32-bit integer image .*70000"):
    images.read_image(tmp_path / "wide.tif")
  Image.fromarray(np.full((3, 4), 65535, np.int32)).save(tmp_path / "i32.tif")
  np.testing.assert_array_equal(images.read_image(tmp_path / "i32.tif"), np.full((3, 4, 3), 255, np.uint8))


def test_landmark_box_mostly_outside_the_photo_is_refused():
  landmarks = np.array([[10.0, 10.0], [50.0, 50.0]])  # Box centre (30, 30), side 40.
  images.check_box_inside(landmarks, (80, 96, 3), source="x.jpg")  # Inside.
  images.check_box_inside(landmarks + [46, 0], (80, 96, 3), source="x.jpg")  # 95.5 - 56 = 39.5 of 40 inside.
  # Right edge at 95.5: a box from 76 to 116 has 19.5 / 40 = 49% inside.
  with pytest.raises(images.ImageReadError, match=r"x.jpg: the landmark box \(centre 96.0, 30.0, side 40.0 px\) "
                     r"lies mostly outside the 96x80 photo \(49% inside\)"):
    images.check_box_inside(landmarks + [66, 0], (80, 96, 3), source="x.jpg")
  assert images.MIN_BOX_INSIDE == 0.5


def test_a_dangling_pts_link_names_the_file_and_its_target(tmp_path):
  # Probe: a .pts symlink to a missing file gave a FileNotFoundError traceback.
  ff.write_300w(tmp_path, {"afw": 2})
  pts = tmp_path / "afw" / "afw_0001.pts"
  pts.unlink()
  pts.symlink_to(tmp_path / "elsewhere" / "afw_0001.pts")
  with pytest.raises(readers.DatasetFormatError) as raised:
    readers.read_300w(tmp_path, "train", allow_partial=True)
  assert str(raised.value) == (f"{pts}: cannot be read (a symbolic link to {tmp_path}/elsewhere/afw_0001.pts, which "
                               "does not exist); restore it from the official archive")


def test_two_images_for_one_annotation_are_an_error_naming_both(tmp_path):
  # Probe: with e1.jpg and a mirrored e1.png beside one e1.pts, the .png was taken silently.
  ff.write_300w(tmp_path, {"afw": 2})
  jpg = tmp_path / "afw" / "afw_0001.jpg"
  png = tmp_path / "afw" / "afw_0001.png"
  Image.open(jpg).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(png)
  with pytest.raises(readers.DatasetFormatError) as raised:
    readers.read_300w(tmp_path, "train", allow_partial=True)
  assert str(raised.value) == (f"{tmp_path}/afw/afw_0001.pts: 2 images for one annotation: {jpg} and {png}; keep "
                               "the one the points belong to (the official archive's) and move the other out of "
                               "the manual dir")
  png.unlink()
  assert len(readers.read_300w(tmp_path, "train", allow_partial=True)) == 2
