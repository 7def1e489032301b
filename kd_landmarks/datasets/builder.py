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
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
from typing import Any, Optional

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from kd_landmarks import coords
from kd_landmarks import provenance
from kd_landmarks import shapes
from kd_landmarks.datasets import images as images_lib
from kd_landmarks.datasets import info as info_lib
from kd_landmarks.datasets import readers
from kd_landmarks.datasets import synthetic

STORED_CROP_SCALE = images_lib.STORED_CROP_SCALE
STORED_CROP_SIZE = images_lib.STORED_CROP_SIZE
# Section 3.1: Soft-landmarks rebuilt from the components explaining 90% of the shape variance (the authors'
# code, PCA(n_components=0.9); docs/method.md, "Soft-landmarks"), parameters clipped at 3 sqrt(lambda).
SOFT_LANDMARKS_KEEP = 0.9
SOFT_LANDMARKS_KEEP_MODE = shapes.DEFAULT_KEEP_MODE
NUM_ATTRIBUTES = len(readers.WFLW_ATTRIBUTES)
# Defaults of the procedurally rendered dataset (the demo config's data); all overridable at prepare time.
SYNTHETIC_DEFAULTS = {"num_train": 2000, "num_test": 300, "image_size": 128, "seed": 0}
PREPARE_COMMAND = ("python -m kd_landmarks.datasets prepare --dataset {dataset} --manual_dir M "
                   "--data_dir {data_dir}")
SHAPE_MODEL_FILE = "shape_model.npz"  # in the prepared folder; frame: normalised stored crop
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
  ]
  DEFAULT_CONFIG_NAME = "synthetic"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds's default resolves package resources through `importlib_resources`, which is not one of its
    # installed dependencies; this file is the answer it is looking for.
    return epath.Path(__file__)

  def __init__(self, *, allow_partial: bool = False, synthetic_options: Optional[dict] = None,
               num_workers: Optional[int] = None, show_progress: bool = True, **kwargs):
    """Extra options (preparation only; reading needs none of them).

    Args:
      allow_partial: accept split sizes other than the official ones (fixtures, deliberate subsets).
      synthetic_options: overrides of :data:`SYNTHETIC_DEFAULTS` for the ``synthetic`` config.
      num_workers: threads decoding and cropping images (PIL releases the GIL); default min(4, cores).
      show_progress: one tqdm bar per split.
      **kwargs: ``data_dir``, ``config``, ``version``, ``file_format`` of tfds (``file_format`` defaults
        to ``array_record``).
    """
    kwargs.setdefault("file_format", "array_record")
    allow_partial, synthetic_options = self._options_of_custom_config(kwargs, allow_partial, synthetic_options)
    self._allow_partial = bool(allow_partial)
    unknown = set(synthetic_options or {}) - set(SYNTHETIC_DEFAULTS)
    if unknown:
      raise ValueError(f"unknown synthetic options {sorted(unknown)}; choose from {sorted(SYNTHETIC_DEFAULTS)}")
    self._synthetic_options = {**SYNTHETIC_DEFAULTS, **(synthetic_options or {})}
    self._num_workers = num_workers or min(4, os.cpu_count() or 1)
    self._show_progress = show_progress
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
      raise ValueError(f"kd_landmarks config {config.name!r}: name one of {names} (the options go beside it, "
                       f"e.g. {{\"name\": \"synthetic\", \"num_train\": 64}})")
    if config.dataset not in ("", config.name):
      raise ValueError(f"kd_landmarks config {config.name!r}: dataset {config.dataset!r} differs from the name; "
                       "leave `dataset` out")
    sizes = {key: int(getattr(config, key)) for key in SYNTHETIC_DEFAULTS if getattr(config, key)}
    if sizes and config.name != "synthetic":
      raise ValueError(f"kd_landmarks config {config.name!r}: {sorted(sizes)} only apply to the synthetic config "
                       f"(the official datasets have fixed splits and stored size {STORED_CROP_SIZE})")
    kwargs["config"] = config.name
    return allow_partial or config.allow_partial, {**sizes, **(synthetic_options or {})} or None

  # ------------------------------------------------------------------------------------------- info

  @property
  def dataset_info(self) -> info_lib.DatasetInfo:
    return info_lib.get_info(self.builder_config.dataset)

  @property
  def stored_size(self) -> int:
    if self.builder_config.dataset == "synthetic":
      return int(self._synthetic_options["image_size"])
    return STORED_CROP_SIZE

  def preparation_options(self) -> dict[str, Any]:
    """What the stored data depends on beyond the code version; kept in the dataset's metadata."""
    options = {"dataset": self.builder_config.dataset, "stored_crop_size": self.stored_size,
               "stored_crop_scale": STORED_CROP_SCALE, "num_landmarks": self.dataset_info.num_landmarks,
               "soft_landmarks": {"keep": SOFT_LANDMARKS_KEEP, "keep_mode": SOFT_LANDMARKS_KEEP_MODE, "clip": 3.0,
                                  "fitted_on": "train", "frame": "normalised stored crop",
                                  "shape_model_file": SHAPE_MODEL_FILE},
               "allow_partial": self._allow_partial}
    if self.builder_config.dataset == "synthetic":
      options["synthetic"] = {k: int(v) for k, v in self._synthetic_options.items()}
    return options

  def _info(self) -> tfds.core.DatasetInfo:
    num_landmarks = self.dataset_info.num_landmarks
    points = tfds.features.Tensor(shape=(num_landmarks, 2), dtype=np.float32)
    features = tfds.features.FeaturesDict({
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
    splits = self.dataset_info.splits
    if dataset == "synthetic":
      return {split: self._read_synthetic(split) for split in splits}
    return {split: readers.read_split(dataset, manual_dir, split, allow_partial=self._allow_partial)
            for split in splits}

  def _read_synthetic(self, split: str) -> list[readers.RawExample]:
    options = self._synthetic_options
    num_examples = int(options[f"num_{split}"])
    if num_examples < 1:
      raise ValueError(f"synthetic split {split!r}: num_{split} must be >= 1, got {num_examples}")
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
    manual_dir = None if self.builder_config.dataset == "synthetic" else dl_manager.manual_dir
    raw_splits = self._read_raw_splits(manual_dir)
    size = self.stored_size
    # Fit the shape model on the train split, in the normalised stored-crop frame (see module docstring).
    train_crop_landmarks = np.stack([_crop_landmarks(raw.landmarks, size)
                                     for raw in raw_splits[self.dataset_info.train_split]])
    shape_model = shapes.fit_shape_model(coords.to_normalized(train_crop_landmarks, size))
    # Kept with the data (tfds moves the whole folder into place), so that soft landmarks with another
    # `keep` can be recomputed without the official archives: see `load_shape_model`.
    shapes.save_shape_model(pathlib.Path(self.data_path) / SHAPE_MODEL_FILE, shape_model)
    metadata = self.preparation_options()
    metadata["split_sizes"] = {split: len(raw) for split, raw in raw_splits.items()}
    if manual_dir is not None:  # `prepare` compares it with the manual dir of a later call.
      metadata["manual_dir"] = manual_dir_fingerprint(manual_dir)
    self.info.metadata.update(metadata)
    return {split: self._generate_examples(raw, shape_model=shape_model, split=split)
            for split, raw in raw_splits.items()}

  def _generate_examples(self, raw_examples, *, shape_model, split):
    size = self.stored_size
    encoding = self.builder_config.image_encoding

    def build(position):
      return position, make_example(raw_examples[position], index=position, size=size, encoding=encoding,
                                    shape_model=shape_model, dataset=self.builder_config.dataset)

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
                 dataset: str) -> dict[str, Any]:
  """One stored example (keys of docs/contracts.md) from an official-format face."""
  info = info_lib.get_info(dataset)
  num_landmarks = info.num_landmarks
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
                                                keep=SOFT_LANDMARKS_KEEP, keep_mode=SOFT_LANDMARKS_KEEP_MODE),
                            size)
  attributes = np.zeros(NUM_ATTRIBUTES, np.int32) if raw.attributes is None else raw.attributes
  occluded = np.zeros(num_landmarks, np.int32) if raw.occluded is None else raw.occluded
  return {
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
  return info_lib.get_info(dataset).name


def _stored_options(builder: KdLandmarks) -> Optional[dict]:
  path = pathlib.Path(builder.data_path) / "metadata.json"
  if not path.exists():
    return None
  stored = json.loads(path.read_text())
  return {key: stored.get(key) for key in builder.preparation_options()}


def manual_dir_fingerprint(manual_dir) -> dict:
  """What a build was made from: the manual dir's path, file count, total size and a hash of every
  (relative path, size) pair. Sizes, not contents: hashing gigabytes of photos would dwarf the build."""
  root = pathlib.Path(manual_dir).resolve()
  entries = sorted((str(path.relative_to(root)), path.stat().st_size)
                   for path in root.rglob("*") if path.is_file())
  digest = hashlib.sha256("\n".join(f"{name}\t{size}" for name, size in entries).encode()).hexdigest()
  return {"path": str(root), "files": len(entries), "bytes": int(sum(size for _, size in entries)),
          "sha256": digest[:16]}


def _stored_fingerprint(builder: KdLandmarks) -> Optional[dict]:
  path = pathlib.Path(builder.data_path) / "metadata.json"
  return json.loads(path.read_text()).get("manual_dir") if path.exists() else None


def is_prepared(builder: KdLandmarks) -> bool:
  return (pathlib.Path(builder.data_path) / "dataset_info.json").exists()


def prepare(dataset: str, *, data_dir, manual_dir=None, allow_partial: bool = False, overwrite: bool = False,
            synthetic_options: Optional[dict] = None, num_workers: Optional[int] = None,
            show_progress: bool = True) -> KdLandmarks:
  """Builds one config into ``data_dir`` (what ``python -m kd_landmarks.datasets prepare`` runs).

  An existing build prepared with other options (sizes, ``allow_partial``) is an error unless
  ``overwrite``; one with the same options is reused.
  """
  name = _config_name(dataset)
  if name != "synthetic":
    readers.check_manual_dir(manual_dir, name)
  builder = KdLandmarks(config=name, data_dir=os.fspath(data_dir), allow_partial=allow_partial,
                        synthetic_options=synthetic_options, num_workers=num_workers, show_progress=show_progress)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if is_prepared(builder):
    stored = _stored_options(builder)
    wanted = builder.preparation_options()
    if overwrite:
      mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    elif stored != wanted:
      raise FileExistsError(
          f"{builder.data_path} was prepared with {stored}, not the requested {wanted}; pass --overwrite "
          "(overwrite=True) to rebuild it, or choose another --data_dir")
    elif manual_dir is not None and (built_from := _stored_fingerprint(builder)) is not None:
      current = manual_dir_fingerprint(manual_dir)
      if {k: built_from.get(k) for k in current} != current:
        raise FileExistsError(
            f"{builder.data_path} was built from {built_from['path']} ({built_from['files']} files, "
            f"{built_from['bytes']} bytes), but {current['path']} now holds {current['files']} files, "
            f"{current['bytes']} bytes (another file list or sizes); pass --overwrite (overwrite=True) to "
            "rebuild it from this manual dir, or choose another --data_dir")
  tfds.disable_progress_bar()  # ours (one bar per split, with a total) replaces tfds's counters
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else os.fspath(manual_dir), download_mode=mode,
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


class LandmarkSource:
  """Random access to one prepared split: ``len(source)``, ``source[i]`` -> dict of numpy arrays.

  Wraps tfds's array_record data source, turning ``image_id`` into ``str``. ``metadata`` holds the
  preparation options (``stored_crop_size``, ...); ``files`` the split's record shards, whose bytes are its
  content fingerprint (:meth:`content_fingerprint`). Picklable, so grain workers can hold it.
  """

  def __init__(self, source, metadata: dict, name: str, files=()):
    self._source = source
    self.metadata = metadata
    self.name = name
    self.files = tuple(os.fspath(path) for path in files)

  def content_fingerprint(self) -> str:
    """SHA-256 of the split's record shards: a re-prepared split with one point edited has another (the
    models trained on it record it; ``kd_landmarks.provenance``). Reads every byte, once per process:
    SHA-256 ran at 1.2 GB/s on the 2-core Xeon (files in the page cache); a 300-face synthetic split at
    96 px (4.7 MB) took 3 ms, so a split of 1 GB takes about a second."""
    return provenance.files_fingerprint(self.files)

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
  info = info_lib.get_info(dataset)
  builder = KdLandmarks(config=info.name, data_dir=os.fspath(data_dir), show_progress=False)
  if not is_prepared(builder):
    stale = _stale_versions(builder)
    if stale:
      # Data of another builder version holds other soft landmarks (RELEASE_NOTES); never read it silently.
      raise FileNotFoundError(
          f"{info.name} in {data_dir} was prepared by kd_landmarks builder version {', '.join(stale)}, not "
          f"{builder.version} ({KdLandmarks.RELEASE_NOTES.get(str(builder.version), '')}) Prepare it again: "
          + PREPARE_COMMAND.format(dataset=info.name, data_dir=data_dir)
          + (" (no --manual_dir needed)" if info.name == "synthetic" else "")
          + f"; the old data in {pathlib.Path(builder.data_path).parent} may then be deleted.")
    raise FileNotFoundError(
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
  info = info_lib.get_info(dataset)
  if split not in info.splits:
    raise ValueError(f"unknown split {split!r} of {info.name}; choose from {list(info.splits)}")
  builder = _prepared_builder(info.name, data_dir)
  source = builder.as_data_source(split=split)
  metadata = dict(builder.info.metadata or {})
  return LandmarkSource(source, metadata, f"{info.name}/{split}", files=builder.info.splits[split].filepaths)
