"""Landmark datasets: official-format readers, the tfds builder ``kd_landmarks`` and dataset facts.

Prepare a dataset once (``python -m kd_landmarks.datasets prepare --dataset ...``), then read it with
:func:`load_split`. Importing this package stays light: tfds is imported only when a split is loaded.
The teachers' outputs are the tfds dataset ``kd_landmarks_teachers`` (:mod:`kd_landmarks.datasets.teacher_cache`).
"""
from __future__ import annotations

from kd_landmarks.datasets.images import STORED_CROP_SCALE
from kd_landmarks.datasets.images import STORED_CROP_SIZE
from kd_landmarks.datasets.info import get_info


def load_split(dataset: str, split: str, data_dir):
  """The prepared ``split`` of ``dataset`` (``300w``, ``cofw``, ``wflw``, ``synthetic``, ``custom``) in ``data_dir``.

  Returns a random-access source (``len`` and ``[i]`` -> dict of numpy arrays with the keys of
  docs/contracts.md); raises ``FileNotFoundError`` naming the prepare command when it is not prepared.
  """
  from kd_landmarks.datasets import builder  # pylint: disable=g-import-not-at-top (tfds is heavy: 0.44 s measured)
  return builder.load_split(dataset, split, data_dir)


def register_custom(data_dir):
  """Puts the scheme of the custom set prepared in ``data_dir`` in the dataset table (``get_info('custom')``,
  the metrics and the flips then know it); returns its ``DatasetInfo``. ``load_split`` does this itself."""
  from kd_landmarks.datasets import builder  # pylint: disable=g-import-not-at-top (tfds, as above)
  return builder.register_custom(data_dir)


def load_shape_model(dataset: str, data_dir):
  """The ASM shape model (Section 3.1) the prepared ``dataset``'s soft landmarks were built with."""
  from kd_landmarks.datasets import builder  # pylint: disable=g-import-not-at-top (tfds, as above)
  return builder.load_shape_model(dataset, data_dir)


__all__ = ["STORED_CROP_SCALE", "STORED_CROP_SIZE", "get_info", "load_shape_model", "load_split",
           "register_custom"]
