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

Unlike tfds's CLI, a misspelt flag, a ``--config`` or ``--download_config`` that is not JSON, an option
``kd_landmarks`` does not have, and every other mistake the user can fix (a manual dir of the wrong layout)
is one ``error:`` line with exit ``errors.EXIT_CODE``, as for ``python -m kd_landmarks.datasets prepare``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys

from absl import app
from tensorflow_datasets.scripts.cli import build
from tensorflow_datasets.scripts.cli import cli_utils

from kd_landmarks import errors
from kd_landmarks.datasets import builder as builder_lib

DESCRIPTION = "tfds build (TensorFlow-free launcher)"
# The --config keys of kd_landmarks that are preparation options (the rest are tfds' own BuilderConfig fields).
CONFIG_OPTIONS = ("name", "allow_partial", "num_train", "num_test", "image_size", "seed")


class _OneLineParser(cli_utils.ArgumentParser):
  """tfds's parser, whose usage errors (argparse prints the 20-line usage, then the error) raise one
  :class:`errors.ArgumentError` instead, with the closest known flag for a misspelt one."""

  def error(self, message):
    known = [option for option in self._option_string_actions if option.startswith("--")]
    guesses = []
    for flag in re.findall(r"(--[\w-]+)", message):
      if flag not in known:
        guesses += difflib.get_close_matches(flag, known, n=1)
    hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
    raise errors.ArgumentError(f"{message}{hint}; see --help")


def parse_args(argv: list[str]) -> build.Args:
  """``tfds build`` arguments (``argv`` without the program name), checked: see :func:`check_json_options`."""
  parser = _OneLineParser(description=DESCRIPTION, allow_abbrev=False)
  parser.add_arguments(build.Args, dest="args")
  args = parser.parse_args(argv).args
  check_json_options(args)
  return args


def check_json_options(args: build.Args) -> None:
  """``--download_config`` and a ``--config`` given as JSON must parse, and a kd_landmarks ``--config`` may
  only name its options: tfds would stop with a JSONDecodeError or a TypeError naming no flag."""
  generation = args.generation
  for flag, text in (("--config", generation.config), ("--download_config", generation.download_config)):
    if not text or (flag == "--config" and not text.lstrip().startswith("{")):
      continue  # A --config that is a plain name is the config's name.
    try:
      value = json.loads(text)
    except ValueError as error:
      raise errors.ArgumentError(f"{flag} {text!r} is not valid JSON ({error}); quote keys and strings with "
                                 "\", e.g. --config '{\"name\": \"synthetic\", \"num_train\": 64}'") from None
    if not isinstance(value, dict):
      raise errors.ArgumentError(f"{flag} {text!r} must be a JSON object, e.g. '{{\"name\": \"synthetic\"}}'")
    names = list(args.positional_datasets) + list(args.datasets)
    if flag == "--config" and names and all(n.split("/")[0] == builder_lib.KdLandmarks.name for n in names):
      fields = {field.name for field in dataclasses.fields(builder_lib.LandmarksConfig)}
      for key in value:
        if key not in fields:
          close = difflib.get_close_matches(key, CONFIG_OPTIONS, n=1)
          hint = f" (did you mean {close[0]!r}?)" if close else ""
          raise errors.ArgumentError(f"--config: kd_landmarks has no option {key!r}{hint}; choose from "
                                     f"{list(CONFIG_OPTIONS)}")


def _parse_flags(argv: list[str]) -> build.Args:
  """absl's ``flags_parser`` (``argv`` with the program name): a usage mistake ends the process in one line."""
  try:
    return parse_args(argv[1:])
  except errors.UserError as error:
    sys.exit(errors.report(error))


def main(args: build.Args) -> None:
  try:
    args.execute()
  except errors.UserError as error:  # The builder's: a manual dir of the wrong layout, an unknown option.
    sys.exit(errors.report(error))


def run(argv: list[str]) -> None:
  """Runs ``tfds build argv...`` in this process (``argv`` without the program name)."""
  main(_parse_flags(["tfds_build", *argv]))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags, argv=sys.argv)
