"""The tfds builder ``kd_landmarks``: one config per dataset (``300w``, ``cofw``, ``wflw``, ``synthetic``).

Each example is a face crop cut from the ground-truth landmark box (paper Section 4.3) with a margin of
:data:`STORED_CROP_SCALE`, its landmarks in crop pixels and in original-image pixels, the affine between the
two (NME is reported in original-image pixels), and the ASM soft landmarks of Section 3.1 (Eqs. 1-3,
``keep=0.9`` of the variance, since version 1.1.0) from a shape model fitted on the train split. The keys
are those of docs/contracts.md.

The shape model is fitted in the *normalised stored-crop frame* (:func:`kd_landmarks.coords.to_normalized`
of the crop-pixel landmarks). Because the crop is the landmark box scaled by a constant, this frame is each
shape's own square-box-normalised frame: translation and scale do not dominate the PCA, as in the authors'
code, which works on normalised face crops.

Written as array_record and read with ``as_data_source()`` (no TensorFlow); images are encoded with PIL
(jpeg for real photos, png for synthetic renders) and decoded by tfds with OpenCV or PIL.

The ``custom`` config is the user's own set (:mod:`kd_landmarks.datasets.custom`): K points of its own scheme,
so its point fields have shape ``[None, 2]`` in the features and K is in the metadata (``custom``: the
resolved description, flip pairs included), which :func:`register_custom` reads to put the scheme in the
dataset table. Its examples add ``visible`` (bool ``[K]``: annotated points) and ``face_box`` (float32 ``[4]``,
x0, y0, x1, y1 in original pixels: the annotated face box, else the visible points' bounding box). Missing
points are filled from the shape model before anything uses the coordinates
(:func:`kd_landmarks.shapes.fit_shape_model_with_missing`), so the crop box and the soft landmarks are those of
a complete face; ``visible`` keeps the filled points out of every loss and metric.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import shutil
from typing import Any, Optional

from array_record.python import array_record_module
from etils import epath
from google.protobuf import json_format
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from kd_landmarks import coords
from kd_landmarks import errors
from kd_landmarks import files
from kd_landmarks import metrics
from kd_landmarks import provenance
from kd_landmarks import shapes
from kd_landmarks.datasets import custom
from kd_landmarks.datasets import flips
from kd_landmarks.datasets import images as images_lib
from kd_landmarks.datasets import info as info_lib
from kd_landmarks.datasets import readers
from kd_landmarks.datasets import synthetic

STORED_CROP_SCALE = images_lib.STORED_CROP_SCALE
STORED_CROP_SIZE = images_lib.STORED_CROP_SIZE
# Section 3.1: Soft-landmarks rebuilt from the components explaining 90% of the shape variance (the authors'
# code, PCA(n_components=0.9); docs/method.md, "Soft-landmarks"), parameters clipped at 3 sqrt(lambda). m~ is
# a preparation option (`prepare --soft_keep/--soft_keep_mode`, config.soft_landmarks), by default the
# dataset's own (DatasetInfo.soft_keep).
NUM_ATTRIBUTES = len(readers.WFLW_ATTRIBUTES)
# Defaults of the procedurally rendered dataset (the demo config's data); all overridable at prepare time.
SYNTHETIC_DEFAULTS = {"num_train": 2000, "num_test": 300, "image_size": 128, "seed": 0}
PREPARE_COMMAND = ("python -m kd_landmarks.datasets prepare --dataset {dataset} --manual_dir M "
                   "--data_dir {data_dir}")
SHAPE_MODEL_FILE = "shape_model.npz"  # in the prepared folder; frame: normalised stored crop
# In the prepared folder: the SHA-256 of every file of the manual dir the build read, by relative path, so that
# `prepare` can name the file that changed since.
MANUAL_FILES_JSON = "manual_dir_files.json"
# The files of a prepared folder that tfds reads to open it; a damaged one is named (tfds' own error names none).
_BUILD_METADATA_FILES = ("dataset_info.json", "features.json", "metadata.json")
_CHUNK = 32  # examples handed to the worker threads at a time (bounds memory while keeping order)


@dataclasses.dataclass(eq=False)
class LandmarksConfig(tfds.core.BuilderConfig):
  """A dataset of :mod:`kd_landmarks.datasets.info` and how its images are stored.

  ``allow_partial`` and the synthetic sizes (0: :data:`SYNTHETIC_DEFAULTS`) are preparation options that
  ``tfds build`` reaches as a JSON config, e.g. ``--config '{"name": "synthetic", "num_train": 64}'``; the
  data lands in the folder of the named config, where ``prepare`` writes it (see ``KdLandmarks.__init__``).
  """
  dataset: str = ""
  image_encoding: str = "jpeg"
  allow_partial: bool = False
  num_train: int = 0
  num_test: int = 0
  image_size: int = 0
  seed: int = 0


class KdLandmarks(tfds.core.GeneratorBasedBuilder):
  """Facial landmark datasets as stored face crops with ground-truth and soft landmarks."""

  name = "kd_landmarks"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Soft landmarks keep the components explaining 90% of the shape variance (keep_mode "
               "'variance', the authors' PCA(n_components=0.9)) instead of 90% of the eigenvectors; on real "
               "68-point shapes they now move by 5.7% inter-ocular NME instead of 0.55%. Re-prepare data of "
               "1.0.0: its Tolerant-teacher targets are almost the ground truth.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = readers.MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      LandmarksConfig(name="300w", dataset="300w", description="300W, 68 points (iBUG), Ren et al. protocol"),
      LandmarksConfig(name="cofw", dataset="cofw", description="COFW colour, 29 points, occlusion flags"),
      LandmarksConfig(name="wflw", dataset="wflw", description="WFLW, 98 points, 6 attribute subsets"),
      LandmarksConfig(name="synthetic", dataset="synthetic", image_encoding="png",
                      description="procedurally rendered 68-point faces (no download needed)"),
      LandmarksConfig(name=info_lib.CUSTOM, dataset=info_lib.CUSTOM,
                      description="your own annotated faces: any K >= 3 points, missing points allowed"),
  ]
  DEFAULT_CONFIG_NAME = "synthetic"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds's default resolves package resources through `importlib_resources`, which is not one of its
    # installed dependencies; this file is the answer it is looking for.
    return epath.Path(__file__)

  def __init__(self, *, allow_partial: bool = False, synthetic_options: Optional[dict] = None,
               soft_landmarks: Optional[dict] = None, num_workers: Optional[int] = None, show_progress: bool = True,
               custom_set: Optional[custom.CustomSet] = None, **kwargs):
    """Extra options (preparation only; reading needs none of them).

    Args:
      allow_partial: accept split sizes other than the official ones (fixtures, deliberate subsets).
      synthetic_options: overrides of :data:`SYNTHETIC_DEFAULTS` for the ``synthetic`` config.
      soft_landmarks: ``keep``, ``keep_mode`` of :func:`kd_landmarks.shapes.soft_landmarks` (None: the
        dataset's ``soft_keep``, in the ``variance`` reading): which Soft-landmarks are stored.
      num_workers: threads decoding and cropping images (PIL releases the GIL); default min(4, cores).
      show_progress: one tqdm bar per split.
      custom_set: the ``custom`` config's faces, already read from the manual dir (``prepare`` reads them
        first to compare options); read in ``_split_generators`` when None (``tfds build``).
      **kwargs: ``data_dir``, ``config``, ``version``, ``file_format`` of tfds (``file_format`` defaults
        to ``array_record``).
    """
    kwargs.setdefault("file_format", "array_record")
    allow_partial, synthetic_options = self._options_of_custom_config(kwargs, allow_partial, synthetic_options)
    self._allow_partial = bool(allow_partial)
    unknown = set(synthetic_options or {}) - set(SYNTHETIC_DEFAULTS)
    if unknown:
      raise errors.ArgumentError(f"unknown synthetic options {sorted(unknown)}; choose from {sorted(SYNTHETIC_DEFAULTS)}")
    self._synthetic_options = {**SYNTHETIC_DEFAULTS, **(synthetic_options or {})}
    shapes.soft_landmark_options(soft_landmarks)  # Checked now; resolved against the dataset when used.
    self._soft_landmarks_given = dict(soft_landmarks or {})
    self._num_workers = num_workers or min(4, os.cpu_count() or 1)
    self._show_progress = show_progress
    self._custom_set = custom_set
    super().__init__(**kwargs)

  @classmethod
  def _options_of_custom_config(cls, kwargs, allow_partial, synthetic_options):
    """Moves the options of a ``LandmarksConfig`` that is not one of ours (``tfds build --config JSON``) into
    the builder's options, and names our config of that name in its place.

    tfds refuses a custom config named like a registered one and would otherwise store it under its own
    name; this way ``tfds build`` and ``prepare`` write the same folder, and the options are recorded in
    its metadata (``preparation_options``), which ``prepare`` compares before reusing a build.
    """
    config = kwargs.get("config")
    if not isinstance(config, LandmarksConfig) or any(config is known for known in cls.BUILDER_CONFIGS):
      return allow_partial, synthetic_options
    names = [known.name for known in cls.BUILDER_CONFIGS]
    if config.name not in names:
      raise errors.ArgumentError(f"kd_landmarks config {config.name!r}: name one of {names} (the options go beside it, "
                       f"e.g. {{\"name\": \"synthetic\", \"num_train\": 64}})")
    if config.dataset not in ("", config.name):
      raise errors.ArgumentError(f"kd_landmarks config {config.name!r}: dataset {config.dataset!r} differs from the name; "
                       "leave `dataset` out")
    sizes = {key: int(getattr(config, key)) for key in SYNTHETIC_DEFAULTS if getattr(config, key)}
    if sizes and config.name != "synthetic":
      raise errors.ArgumentError(f"kd_landmarks config {config.name!r}: {sorted(sizes)} only apply to the synthetic config "
                       f"(the official datasets have fixed splits and stored size {STORED_CROP_SIZE})")
    kwargs["config"] = config.name
    return allow_partial or config.allow_partial, {**sizes, **(synthetic_options or {})} or None

  # ------------------------------------------------------------------------------------------- info

  @property
  def is_custom(self) -> bool:
    return self.builder_config.dataset == info_lib.CUSTOM

  @property
  def dataset_info(self) -> info_lib.DatasetInfo:
    if self.is_custom and self._custom_set is not None:  # Being prepared: its scheme, flip pairs still open.
      return info_lib.custom_info(dict(self._custom_set.description,
                                       flip_pairs=self._custom_set.description["flip_pairs"] or []))
    return info_lib.get_info(self.builder_config.dataset)

  @property
  def soft_landmark_options(self) -> dict[str, Any]:
    """``keep``/``keep_mode`` of the Soft-landmarks this build stores."""
    return shapes.soft_landmark_options(self._soft_landmarks_given, default_keep=self.dataset_info.soft_keep)

  @property
  def stored_size(self) -> int:
    if self.builder_config.dataset == "synthetic":
      return int(self._synthetic_options["image_size"])
    return STORED_CROP_SIZE

  def preparation_options(self) -> dict[str, Any]:
    """What the stored data depends on beyond the code version; kept in the dataset's metadata."""
    options = {"dataset": self.builder_config.dataset, "stored_crop_size": self.stored_size,
               "stored_crop_scale": STORED_CROP_SCALE, "num_landmarks": self.dataset_info.num_landmarks,
               "soft_landmarks": {**self.soft_landmark_options, "clip": 3.0,
                                  "fitted_on": "train", "frame": "normalised stored crop",
                                  "shape_model_file": SHAPE_MODEL_FILE},
               "allow_partial": self._allow_partial}
    if self.builder_config.dataset == "synthetic":
      options["synthetic"] = {k: int(v) for k, v in self._synthetic_options.items()}
    if self.is_custom:
      # As given (flip pairs None: derived at build time, stored in the metadata's `custom`).
      options["custom_given"] = dict(self._custom_set.description)
    return options

  def _info(self) -> tfds.core.DatasetInfo:
    # A custom set's K is known from its files only (`tfds build` names the config before reading them).
    num_landmarks = None if self.is_custom else self.dataset_info.num_landmarks
    points = tfds.features.Tensor(shape=(num_landmarks, 2), dtype=np.float32)
    custom_features = {"visible": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                       "face_box": tfds.features.Tensor(shape=(4,), dtype=np.float32)} if self.is_custom else {}
    features = tfds.features.FeaturesDict({
        **custom_features,
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format=self.builder_config.image_encoding),
        "landmarks": points,
        "soft_landmarks": points,
        "landmarks_original": points,
        "crop_to_original": tfds.features.Tensor(shape=(2, 3), dtype=np.float32),
        "image_id": tfds.features.Text(),
        "attributes": tfds.features.Tensor(shape=(NUM_ATTRIBUTES,), dtype=np.int32),
        "occluded": tfds.features.Tensor(shape=(num_landmarks,), dtype=np.int32),
        "index": tfds.features.Scalar(dtype=np.int64),
    })
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=features, metadata=tfds.core.MetadataDict(),
        # `index` must equal the position in the split (it joins the teacher cache).
        disable_shuffling=True,
        homepage="https://arxiv.org/abs/2111.07047")

  # ------------------------------------------------------------------------------------- generation

  def _read_raw_splits(self, manual_dir) -> dict[str, list[readers.RawExample]]:
    dataset = self.builder_config.dataset
    if self.is_custom:
      if self._custom_set is None:
        self._custom_set = custom.read_custom(manual_dir)
      return self._custom_set.splits
    splits = self.dataset_info.splits
    if dataset == "synthetic":
      return {split: self._read_synthetic(split) for split in splits}
    return {split: readers.read_split(dataset, manual_dir, split, allow_partial=self._allow_partial)
            for split in splits}

  def _read_synthetic(self, split: str) -> list[readers.RawExample]:
    options = self._synthetic_options
    num_examples = int(options[f"num_{split}"])
    if num_examples < 1:
      raise errors.ArgumentError(f"synthetic split {split!r}: num_{split} must be >= 1, got {num_examples}")
    examples = []
    generated = synthetic.generate(split, num_examples=num_examples, image_size=int(options["image_size"]),
                                   seed=int(options["seed"]))
    generated = tqdm.tqdm(generated, total=num_examples, desc=f"render synthetic/{split}", unit="face",
                          disable=not self._show_progress)
    for i, raw in enumerate(generated):
      landmarks = np.asarray(raw["landmarks"], dtype=np.float32)
      if landmarks.shape != (self.dataset_info.num_landmarks, 2):
        raise readers.DatasetFormatError(f"synthetic {split} example {i}: landmarks of shape {landmarks.shape}, "
                                         f"expected ({self.dataset_info.num_landmarks}, 2)")
      examples.append(readers.RawExample(image_id=str(raw["image_id"]), landmarks=landmarks,
                                         image=np.asarray(raw["image"])))
    if len(examples) != num_examples:
      raise readers.DatasetFormatError(f"synthetic.generate({split!r}) yielded {len(examples)} examples, "
                                       f"{num_examples} were asked for")
    return examples

  def _split_generators(self, dl_manager):
    manual_dir = None
    if self.builder_config.dataset != "synthetic":
      try:
        manual_dir = dl_manager.manual_dir
      except AssertionError:  # tfds' bare assertion for a missing or empty manual dir (`tfds build`).
        readers.check_manual_dir(getattr(dl_manager, "_manual_dir", None), self.builder_config.dataset)
        raise  # Not one of those: tfds' own message.
    raw_splits = self._read_raw_splits(manual_dir)
    size = self.stored_size
    if self.is_custom:
      raw_splits = self._fill_missing_points(raw_splits)
    # Fit the shape model on the train split, in the normalised stored-crop frame (see module docstring).
    train_crop_landmarks = np.stack([_crop_landmarks(raw.landmarks, size)
                                     for raw in raw_splits[self.dataset_info.train_split]])
    shape_model = shapes.fit_shape_model(coords.to_normalized(train_crop_landmarks, size))
    # Kept with the data (tfds moves the whole folder into place), so that soft landmarks with another
    # `keep` can be recomputed without the official archives: see `load_shape_model`.
    shapes.save_shape_model(pathlib.Path(self.data_path) / SHAPE_MODEL_FILE, shape_model)
    metadata = self.preparation_options()
    if self.is_custom:
      metadata["custom"] = self._resolve_custom(shape_model, raw_splits)
    metadata["split_sizes"] = {split: len(raw) for split, raw in raw_splits.items()}
    contents = None
    if manual_dir is not None:  # `prepare` compares it with the manual dir of a later call.
      contents = manual_dir_contents(manual_dir, num_workers=self._num_workers)
      metadata["manual_dir"] = manual_dir_fingerprint(manual_dir, contents)
      with open(pathlib.Path(self.data_path) / MANUAL_FILES_JSON, "w") as f:
        json.dump(contents, f, indent=0, sort_keys=True)
    metadata["content_fingerprint"] = _content_fingerprint(self.preparation_options(), contents)
    self.info.metadata.update(metadata)
    return {split: self._generate_examples(raw, shape_model=shape_model, split=split)
            for split, raw in raw_splits.items()}

  def _fill_missing_points(self, raw_splits):
    """The custom set with every missing point filled from the shape model (module docstring of
    kd_landmarks.shapes): fitted with the fills on the train split, then filling the other splits."""
    train = raw_splits[self.dataset_info.train_split]
    never = custom.missing_everywhere(train)
    if never:
      raise errors.DataError(f"{self._custom_set.source}: points {never} are missing in every face of the train "
                             "split; annotate them in some faces, or drop them from the scheme")

    def stack(rows):
      return np.stack([row.landmarks for row in rows]), np.stack([row.visible for row in rows])

    landmarks, visible = stack(train)
    shape_model, filled_train = shapes.fit_shape_model_with_missing(landmarks, visible, **self.soft_landmark_options)
    filled = {}
    for split, rows in raw_splits.items():
      if split == self.dataset_info.train_split:
        points = filled_train
      else:
        points = shapes.reconstruct_missing(*stack(rows), shape_model, **self.soft_landmark_options)
      filled[split] = [dataclasses.replace(row, landmarks=point.astype(np.float32)) for row, point in zip(rows, points)]
    return filled

  def _resolve_custom(self, shape_model, raw_splits) -> dict:
    """The custom description as stored: flip pairs given or derived from the mean shape (printed), the
    counts of missing points; then the scheme is registered in the dataset table."""
    description = dict(self._custom_set.description)
    num_landmarks = description["num_landmarks"]
    description["flip_pairs_derived"] = description["flip_pairs"] is None
    if description["flip_pairs"] is None:
      pairs = flips.derive_flip_pairs(shape_model.mean.reshape(num_landmarks, 2))
      description["flip_pairs"] = [list(pair) for pair in pairs]
      midline = sorted(set(range(num_landmarks)) - {i for pair in pairs for i in pair})
      print(f"custom set {description['name']!r}: flip pairs derived from the mean shape's mirror symmetry: "
            f"{description['flip_pairs']}, on the midline: {midline}. Check them; to change them, write "
            f"\"flip_pairs\" in {custom.DESCRIPTION_FILE} and prepare again with --overwrite.", flush=True)
    description["missing_points"] = {split: int(sum(int((~row.visible).sum()) for row in rows))
                                     for split, rows in raw_splits.items()}
    info_lib.register_custom(info_lib.custom_info(description))
    return description

  def _generate_examples(self, raw_examples, *, shape_model, split):
    size = self.stored_size
    encoding = self.builder_config.image_encoding

    soft_landmarks = self.soft_landmark_options

    def build(position):
      return position, make_example(raw_examples[position], index=position, size=size, encoding=encoding,
                                    shape_model=shape_model, dataset=self.builder_config.dataset,
                                    soft_landmarks=soft_landmarks)

    progress = tqdm.tqdm(total=len(raw_examples), desc=f"{self.builder_config.name}/{split}",
                         unit="face", disable=not self._show_progress)
    with concurrent.futures.ThreadPoolExecutor(self._num_workers) as executor, progress:
      positions = iter(range(len(raw_examples)))
      while chunk := list(itertools.islice(positions, _CHUNK)):
        for position, example in executor.map(build, chunk):
          progress.update(1)
          yield position, example


def _crop_landmarks(landmarks_original: np.ndarray, size: int) -> np.ndarray:
  crop_to_original = images_lib.stored_crop_affine(landmarks_original, size=size)
  return coords.apply_affine(coords.invert_affine(crop_to_original), landmarks_original.astype(np.float64))


def make_example(raw: readers.RawExample, *, index: int, size: int, encoding: str, shape_model,
                 dataset: str, soft_landmarks: dict) -> dict[str, Any]:
  """One stored example (keys of docs/contracts.md) from an official-format face; ``soft_landmarks``: the
  ``keep``/``keep_mode`` of its Soft-landmarks (:attr:`KdLandmarks.soft_landmark_options`)."""
  num_landmarks = info_lib.get_info(dataset).num_landmarks
  landmarks_original = np.asarray(raw.landmarks, dtype=np.float64)
  if landmarks_original.shape != (num_landmarks, 2):
    raise readers.DatasetFormatError(f"{raw.image_id}: landmarks of shape {landmarks_original.shape}, "
                                     f"{dataset} needs ({num_landmarks}, 2)")
  image = raw.load_image()
  images_lib.check_box_inside(landmarks_original, image.shape, source=raw.image_path or raw.image_id)
  crop_to_original = images_lib.stored_crop_affine(landmarks_original, size=size)
  crop = images_lib.crop_face(image, crop_to_original, size)
  landmarks = coords.apply_affine(coords.invert_affine(crop_to_original), landmarks_original)
  soft = coords.to_pixels(shapes.soft_landmarks(coords.to_normalized(landmarks, size), shape_model,
                                                **soft_landmarks), size)
  attributes = np.zeros(NUM_ATTRIBUTES, np.int32) if raw.attributes is None else raw.attributes
  occluded = np.zeros(num_landmarks, np.int32) if raw.occluded is None else raw.occluded
  custom_fields = {}
  if dataset == info_lib.CUSTOM:
    visible = np.asarray(raw.visible, dtype=bool)
    face_box = raw.face_box
    if face_box is None:  # The visible points' bounding box (x0, y0, x1, y1).
      face_box = metrics.landmark_box(landmarks_original, visible)
    custom_fields = {"visible": visible, "face_box": np.asarray(face_box, dtype=np.float32)}
  return {
      **custom_fields,
      "image": images_lib.encode_image(crop, encoding),
      "landmarks": landmarks.astype(np.float32),
      "soft_landmarks": np.asarray(soft, dtype=np.float32),
      "landmarks_original": landmarks_original.astype(np.float32),
      "crop_to_original": crop_to_original.astype(np.float32),
      "image_id": raw.image_id,
      "attributes": np.asarray(attributes, dtype=np.int32),
      "occluded": np.asarray(occluded, dtype=np.int32),
      "index": np.int64(index),
  }


# ------------------------------------------------------------------------------------------ entry points


def _config_name(dataset: str) -> str:
  if dataset.lower() == info_lib.CUSTOM:
    return info_lib.CUSTOM
  return info_lib.get_info(dataset).name


def _metadata_path(data_dir, config_name: str) -> pathlib.Path:
  """Where tfds keeps a prepared config's metadata (``<data_dir>/kd_landmarks/<config>/<version>``)."""
  return pathlib.Path(data_dir) / KdLandmarks.name / config_name / str(KdLandmarks.VERSION) / "metadata.json"


def register_custom(data_dir) -> info_lib.DatasetInfo:
  """Reads the custom set prepared in ``data_dir`` and puts its scheme in the dataset table (``info.get_info(
  'custom')`` then answers); FileNotFoundError naming the prepare command when none is prepared there."""
  path = _metadata_path(os.path.expanduser(os.fspath(data_dir)), info_lib.CUSTOM)
  if not path.exists():
    raise errors.MissingFileError(
        f"no custom set is prepared in {data_dir} (no {path}); run: " + prepare_command(info_lib.CUSTOM, data_dir))
  description = json.loads(path.read_text()).get(info_lib.CUSTOM)
  if not isinstance(description, dict):
    raise errors.DataError(f"{path}: no '{info_lib.CUSTOM}' description; prepare the set again with --overwrite")
  return info_lib.register_custom(info_lib.custom_info(description, where=str(path)))


def prepare_command(dataset: str, data_dir, *, overwrite: bool = False) -> str:
  """The ``prepare`` command line for ``dataset`` (no --manual_dir for synthetic, which needs none)."""
  command = PREPARE_COMMAND.format(dataset=dataset, data_dir=data_dir)
  if dataset == "synthetic":
    command = command.replace(" --manual_dir M", "")
  return command + (" --overwrite" if overwrite else "")


def _stored_metadata(builder: KdLandmarks) -> Optional[dict]:
  path = pathlib.Path(builder.data_path) / "metadata.json"
  return json.loads(path.read_text()) if path.exists() else None


def _stored_options(builder: KdLandmarks) -> Optional[dict]:
  stored = _stored_metadata(builder)
  return None if stored is None else {key: stored.get(key) for key in builder.preparation_options()}


def _file_sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def manual_dir_contents(manual_dir, *, num_workers: Optional[int] = None) -> dict[str, str]:
  """The SHA-256 of every file under ``manual_dir`` (annotations, images, .mat files), by relative path.

  Contents, not names and sizes: an annotation edited in place keeps its size (a coordinate 357.4 -> 457.4).
  SHA-256 runs at 1.1 GB/s per core (measured: a 300 MB file in 0.27 s from the page cache, one core of a
  2-core Xeon), so a manual dir of a few GB costs seconds, against minutes to build from it. Symbolic links
  are followed; a link to nothing is no file here (its reader names it)."""
  root = pathlib.Path(manual_dir).resolve()
  paths = sorted(path for path in root.rglob("*") if path.is_file())
  with concurrent.futures.ThreadPoolExecutor(num_workers or min(4, os.cpu_count() or 1)) as executor:
    digests = list(executor.map(_file_sha256, paths))  # hashlib releases the GIL while it hashes.
  return {path.relative_to(root).as_posix(): digest for path, digest in zip(paths, digests)}


def manual_dir_fingerprint(manual_dir, contents: Optional[dict[str, str]] = None) -> dict:
  """What a build was made from: the manual dir's path, file count, total size and one SHA-256 over every
  (relative path, content SHA-256) pair (:func:`manual_dir_contents`, computed unless given)."""
  root = pathlib.Path(manual_dir).resolve()
  contents = manual_dir_contents(root) if contents is None else contents
  total = sum((root / name).stat().st_size for name in contents)
  digest = hashlib.sha256("\n".join(f"{name}\t{sha}" for name, sha in sorted(contents.items())).encode())
  return {"path": str(root), "files": len(contents), "bytes": int(total), "content_sha256": digest.hexdigest()}


def _content_fingerprint(options: dict, contents: Optional[dict[str, str]]) -> str:
  """One SHA-256 naming the prepared data: builder version, preparation options and the manual dir's file
  contents (not its path, so that a moved copy of the same files has the same fingerprint). The build is
  deterministic, so equal fingerprints mean equal stored examples."""
  record = {"builder": KdLandmarks.name, "version": str(KdLandmarks.VERSION), "options": options,
            "manual_dir_files": contents or {}}
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def content_fingerprint(dataset: str, data_dir) -> str:
  """The content fingerprint of ``dataset`` prepared in ``data_dir`` (``metadata.json``'s
  ``content_fingerprint``, also ``load_split(...).metadata['content_fingerprint']``): changes whenever the
  stored examples would (another manual-dir file content, option or builder version). Raises
  :class:`kd_landmarks.errors.DataError` for a build prepared before fingerprints were recorded."""
  builder = _prepared_builder(dataset, data_dir)
  fingerprint = (builder.info.metadata or {}).get("content_fingerprint")
  if not fingerprint:
    raise errors.DataError(
        f"{builder.data_path} was prepared without a content fingerprint: prepare it again: "
        + prepare_command(builder.builder_config.name, data_dir, overwrite=True))
  return fingerprint


def _describe_changes(builder: KdLandmarks, current: dict[str, str]) -> str:
  """What differs between the manual dir the build read (``MANUAL_FILES_JSON``) and ``current``."""
  path = pathlib.Path(builder.data_path) / MANUAL_FILES_JSON
  if not path.exists():
    return "the build records no per-file contents to compare"
  built = json.loads(path.read_text())
  changed = sorted(name for name in set(built) & set(current) if built[name] != current[name])
  added = sorted(set(current) - set(built))
  removed = sorted(set(built) - set(current))
  parts = [f"{len(names)} {what} (e.g. {names[0]})" if len(names) > 1 else f"{names[0]} {what}"
           for names, what in ((changed, "changed"), (added, "added"), (removed, "removed")) if names]
  return ", ".join(parts) or "the same files"


class PreparedDataMismatchError(errors.UserError, FileExistsError):
  """``data_dir`` holds a build of other options or of another manual-dir content than asked for."""


def is_prepared(builder: KdLandmarks) -> bool:
  return (pathlib.Path(builder.data_path) / "dataset_info.json").exists()


def _open_builder(data_dir, name: str, *, discard_damaged: bool = False, **options) -> KdLandmarks:
  """``KdLandmarks`` over ``data_dir``. tfds reads a prepared folder's JSON files when it opens one; a damaged
  file (a protobuf ParseError or JSONDecodeError naming no file) is a :class:`errors.DataError` naming it, or,
  with ``discard_damaged`` (``prepare --overwrite``), the damaged folder is removed so that it is rebuilt."""
  folder = pathlib.Path(data_dir) / KdLandmarks.name / name / str(KdLandmarks.VERSION)
  try:
    return KdLandmarks(config=name, data_dir=os.fspath(data_dir), **options)
  except errors.UserError:
    raise
  except (json_format.ParseError, ValueError) as error:
    damaged = _first_unreadable(folder)
    if damaged is None:
      raise
    if discard_damaged:
      shutil.rmtree(folder)
      return KdLandmarks(config=name, data_dir=os.fspath(data_dir), **options)
    raise errors.DataError(
        f"{damaged} cannot be read ({errors.one_line(error)}): the prepared {name} in {data_dir} is damaged; "
        f"prepare it again: {prepare_command(name, data_dir, overwrite=True)}") from None


def _first_unreadable(folder: pathlib.Path) -> Optional[pathlib.Path]:
  for name in _BUILD_METADATA_FILES:
    path = folder / name
    if path.exists():
      try:
        json.loads(path.read_text())
      except ValueError:
        return path
  return None


def prepare(dataset: str, *, data_dir, manual_dir=None, allow_partial: bool = False, overwrite: bool = False,
            synthetic_options: Optional[dict] = None, soft_landmarks: Optional[dict] = None,
            num_workers: Optional[int] = None, show_progress: bool = True) -> KdLandmarks:
  """Builds one config into ``data_dir`` (what ``python -m kd_landmarks.datasets prepare`` runs).

  An existing build is reused only when it was prepared with the same options (sizes, ``allow_partial``,
  the Soft-landmarks' ``keep``/``keep_mode``)
  from the same manual-dir contents (every file's SHA-256, :func:`manual_dir_contents`). Otherwise it is a
  :class:`PreparedDataMismatchError` naming what differs, unless ``overwrite``: models trained on the old
  build would no longer match their data, so it is never replaced silently. ``overwrite`` also replaces a
  damaged build. Two images for one annotation, a dangling link and any other unreadable file stop the
  build naming the file.
  """
  name = _config_name(dataset)
  if name != "synthetic":
    readers.check_manual_dir(manual_dir, name)
  # A custom set is read first: its options (the description as given) decide whether a build is reused.
  custom_set = custom.read_custom(manual_dir) if name == info_lib.CUSTOM else None
  builder = _open_builder(data_dir, name, discard_damaged=overwrite, allow_partial=allow_partial,
                          synthetic_options=synthetic_options, soft_landmarks=soft_landmarks,
                          num_workers=num_workers, show_progress=show_progress, custom_set=custom_set)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if is_prepared(builder):
    stored = _stored_options(builder)
    wanted = builder.preparation_options()
    if overwrite:
      mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    elif stored != wanted:
      raise PreparedDataMismatchError(
          f"{builder.data_path} was prepared with {stored}, not the requested {wanted}; pass --overwrite "
          "(overwrite=True) to rebuild it, or choose another --data_dir")
    elif manual_dir is not None:
      built_from = _stored_metadata(builder).get("manual_dir") or {}
      contents = manual_dir_contents(manual_dir, num_workers=num_workers)
      current = manual_dir_fingerprint(manual_dir, contents)
      if built_from.get("content_sha256") != current["content_sha256"] or built_from.get("path") != current["path"]:
        raise PreparedDataMismatchError(
            f"{builder.data_path} was built from {built_from.get('path')} ({built_from.get('files')} files, "
            f"{built_from.get('bytes')} bytes), but {current['path']} now holds {current['files']} files, "
            f"{current['bytes']} bytes ({_describe_changes(builder, contents)}); pass --overwrite "
            "(overwrite=True) to rebuild it from this manual dir (models trained on the old build then no "
            "longer match it), or choose another --data_dir")
  tfds.disable_progress_bar()  # ours (one bar per split, with a total) replaces tfds's counters
  with files.writing(data_dir):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir), download_mode=mode,
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  if name == info_lib.CUSTOM:  # A reused build registers the scheme it was built with.
    register_custom(data_dir)
  return builder


class LandmarkSource:
  """Random access to one prepared split: ``len(source)``, ``source[i]`` -> dict of numpy arrays.

  Wraps tfds's array_record data source, turning ``image_id`` into ``str``. ``metadata`` holds the
  preparation options (``stored_crop_size``, ...); ``files`` the split's record shards, whose examples are its
  content fingerprint (:meth:`content_fingerprint`). Picklable, so grain workers can hold it.
  """

  def __init__(self, source, metadata: dict, name: str, files=()):
    self._source = source
    self.metadata = metadata
    self.name = name
    self.files = tuple(os.fspath(path) for path in files)

  def content_fingerprint(self) -> str:
    """SHA-256 of the split's examples (:func:`kd_landmarks.provenance.records_fingerprint`): a re-prepared
    split with one point edited has another, the same faces prepared again the same one (the models trained
    on it record it). Reads every record once per process: 0.04-0.06 s for the demo's 1,200-face training
    shard (18 MB) on the 2-core Xeon, files in the page cache, so about 3 s per GB."""
    return provenance.records_fingerprint(self.files)

  def __len__(self) -> int:
    return len(self._source)

  def _convert(self, example: dict) -> dict:
    example = dict(example)
    if isinstance(example["image_id"], bytes):
      example["image_id"] = example["image_id"].decode("utf-8")
    example["index"] = np.int64(example["index"])
    return example

  def __getitem__(self, position):
    return self._convert(self._source[position])

  def __getitems__(self, positions):
    return [self._convert(example) for example in self._source.__getitems__(positions)]

  def __repr__(self) -> str:
    return f"LandmarkSource({self.name}, {len(self)} examples)"


def _prepared_builder(dataset: str, data_dir) -> KdLandmarks:
  if dataset.lower() == info_lib.CUSTOM:
    register_custom(data_dir)
  info = info_lib.get_info(dataset)
  builder = _open_builder(data_dir, info.name, show_progress=False)
  if not is_prepared(builder):
    stale = _stale_versions(builder)
    if stale:
      # Data of another builder version holds other soft landmarks (RELEASE_NOTES); never read it silently.
      raise errors.MissingFileError(
          f"{info.name} in {data_dir} was prepared by kd_landmarks builder version {', '.join(stale)}, not "
          f"{builder.version} ({KdLandmarks.RELEASE_NOTES.get(str(builder.version), '')}) Prepare it again: "
          + PREPARE_COMMAND.format(dataset=info.name, data_dir=data_dir)
          + (" (no --manual_dir needed)" if info.name == "synthetic" else "")
          + f"; the old data in {pathlib.Path(builder.data_path).parent} may then be deleted.")
    raise errors.MissingFileError(
        f"{info.name} is not prepared in {data_dir} (no {builder.data_path}/dataset_info.json); run: "
        + PREPARE_COMMAND.format(dataset=info.name, data_dir=data_dir)
        + (" (no --manual_dir needed)" if info.name == "synthetic" else ""))
  return builder


def _stale_versions(builder: KdLandmarks) -> list[str]:
  """Other builder versions prepared next to the one this code reads (``<data_dir>/kd_landmarks/<config>/*``)."""
  config_dir = pathlib.Path(builder.data_path).parent
  if not config_dir.is_dir():
    return []
  return sorted(p.name for p in config_dir.iterdir()
                if p.name != str(builder.version) and (p / "dataset_info.json").exists())


def load_shape_model(dataset: str, data_dir) -> shapes.ShapeModel:
  """The shape model the soft landmarks were built with (fitted on the train split, in the normalised
  stored-crop frame: apply it to ``coords.to_normalized(example['landmarks'], stored_crop_size)``)."""
  builder = _prepared_builder(dataset, data_dir)
  return shapes.load_shape_model(pathlib.Path(builder.data_path) / SHAPE_MODEL_FILE)


def load_split(dataset: str, split: str, data_dir) -> LandmarkSource:
  """The prepared ``split`` of ``dataset`` in ``data_dir`` as a random-access source (docs/contracts.md)."""
  if dataset.lower() == info_lib.CUSTOM:
    register_custom(data_dir)
  info = info_lib.get_info(dataset)
  if split not in info.splits:
    raise errors.ArgumentError(f"unknown split {split!r} of {info.name}; choose from {list(info.splits)}")
  builder = _prepared_builder(info.name, data_dir)
  check_records(builder.info.splits[split], pathlib.Path(builder.data_path), split, data_dir=data_dir)
  source = builder.as_data_source(split=split)
  metadata = dict(builder.info.metadata or {})
  return LandmarkSource(source, metadata, f"{info.name}/{split}", files=builder.info.splits[split].filepaths)


def check_records(split_info, folder: pathlib.Path, split: str, *, data_dir=None,
                  builder_name: str = "kd_landmarks", fix: str = "") -> None:
  """Opens each array_record file of ``split`` and compares its record count with the one tfds recorded:
  a truncated or damaged file is a :class:`errors.DataError` naming it now, not a RuntimeError at its first
  read (a minute into training). Opening a file reads its footer only (milliseconds)."""
  for name, expected in zip(split_info.filenames, split_info.shard_lengths):
    path = folder / name
    problem = None
    if not path.is_file():
      problem = "is missing"
    else:
      try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
        count = reader.num_records() if reader.ok() else None
        reader.close()  # Raises the reader's error when it is not ok().
      except (RuntimeError, ValueError) as error:  # What array_record raises for a file it cannot read.
        problem = f"cannot be read ({errors.one_line(error)}; truncated or damaged)"
      else:
        if count != int(expected):
          problem = f"holds {count} records of the {expected} written (truncated or damaged)"
    if problem:
      config = folder.parent.name
      raise errors.DataError(f"{path} {problem}: the {split} split of {builder_name}/{config} cannot be read; "
                             + (fix or f"prepare it again: {prepare_command(config, data_dir, overwrite=True)}"))
