"""``tfds build`` without TensorFlow: tfds's own build command (same flags, same code), minus the CLI's other
commands.

The ``tfds`` executable (tensorflow_datasets 4.9.10) imports all its commands at start-up, and one of them,
``convert_format``, evaluates ``tf.train.Example`` at import time (``convert_format_utils.py``, line 51), so
``tfds build --help`` stops with ``ModuleNotFoundError: No module named 'tensorflow'`` where TensorFlow is
not installed, before reading any flag. Building a dataset needs no TensorFlow (array_record, PIL). This
module parses the arguments with tfds's ``build.Args`` and runs its ``execute``, exactly as ``tfds build``
does after its start-up:

  python -m kd_landmarks.datasets.tfds_build kd_landmarks/300w --imports kd_landmarks.datasets.builder \\
      --manual_dir ~/data/300w --data_dir ~/tfds

With TensorFlow installed, ``tfds build`` itself takes the same arguments. Preparation options go in a JSON
``--config`` (``'{"name": "synthetic", "num_train": 64}'``, ``'{"name": "300w", "allow_partial": true}'``);
``--download_config '{"compute_stats": "skip"}'`` skips tfds's statistics pass (``prepare`` skips it too).
"""
from __future__ import annotations

import sys

from absl import app
from tensorflow_datasets.scripts.cli import build
from tensorflow_datasets.scripts.cli import cli_utils

_parse_flags = cli_utils.make_flags_parser(build.Args, description="tfds build (TensorFlow-free launcher)")


def main(args: build.Args) -> None:
  args.execute()


def run(argv: list[str]) -> None:
  """Runs ``tfds build argv...`` in this process (``argv`` without the program name)."""
  main(_parse_flags(["tfds_build", *argv]))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags, argv=sys.argv)
