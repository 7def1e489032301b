"""Entry point: ``python -m kd_landmarks.main --config configs/demo.py[:phase=...,platform=...] --workdir DIR``.

Flags only; the work is ``pipeline.run(config, workdir)``. Overrides: ``--config.student_loss=kd_tough_only``.
Configs are locked, so a misspelt key stops at once. Multi-host: pass --coordinator_address/--num_processes/
--process_id (or the KD_* variables, or run under SLURM / on a TPU VM slice, which JAX detects).
"""
from __future__ import annotations

import ast
import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from kd_landmarks import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config (configs/*.py[:phase=...,platform=...]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, teacher cache, evaluation and report.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-host run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process' id in a multi-host run.")
flags.DEFINE_bool("break_lock", False, "Take over the workdir's lock left by a run that is gone "
                  "(kd_landmarks/training/workdir_lock.py); never while that run is alive.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax logs every checkpoint step at INFO through absl's logger, and JAX its backend probing, burying our
  # progress bars and metrics; keep their warnings and errors, and our own INFO lines (root logger).
  for noisy in ("absl", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # The package is imported here, not at the top: flag parsing (a config typo, --help) answers before the
  # ~2 s import of jax, flax, orbax and grain (measured: `import kd_landmarks.pipeline`, 1.9 s on this
  # 2-core Xeon).
  from kd_landmarks.training import parallel
  # Before anything touches a device: joins the other hosts when there are any.
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax
  from kd_landmarks.training import backend
  from kd_landmarks import pipeline
  try:
    # The platform JAX has ('auto') or the one asked for, which must exist ("install .[gpu]" otherwise);
    # dtype and prefetch follow it whether it came from ':platform=' or '--config.platform='.
    config = backend.resolve(FLAGS.config)
    logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
    backend.log_resolved(config)
    pipeline.run(config, FLAGS.workdir, break_lock=FLAGS.break_lock)
  except errors.UserError as error:
    # A mistake the user can fix (a config value, a missing or corrupt file, a locked workdir, a diverged
    # run): its message names the field or file and the fix, so one line and no traceback.
    sys.exit(errors.report(error))


def parse_flags(argv):
  """absl's flag parsing, with ml_collections' error for a misspelt config key as one line.

  ml_collections raises a bare AttributeError whose text is the repr of "'key'\nDid you mean ...", which
  absl does not catch (57 lines of chained traceback). Other flag errors keep absl's handling.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except AttributeError as error:
    text = str(error.args[0]) if error.args else str(error)
    try:
      text = ast.literal_eval(text) if text[:1] in "'\"" else text
    except (ValueError, SyntaxError):
      pass
    sys.exit("FATAL Flags parsing error: no such config key " + " ".join(str(text).split()))


def entry_point():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry_point()
