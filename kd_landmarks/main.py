"""Entry point: ``python -m kd_landmarks.main --config configs/demo.py[:phase=...,platform=...] --workdir DIR``.

Flags only; the work is ``pipeline.run(config, workdir)``. Overrides: ``--config.student_loss=kd_tough_only``.
Configs are locked, so a misspelt key stops at once. Multi-host: pass --coordinator_address/--num_processes/
--process_id (or the KD_* variables, or run under SLURM / on a TPU VM slice, which JAX detects).
"""
from __future__ import annotations

import logging

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config (configs/*.py[:phase=...,platform=...]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, teacher cache, evaluation and report.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-host run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process' id in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax logs every checkpoint step at INFO through absl's logger, and JAX its backend probing, burying our
  # progress bars and metrics; keep their warnings and errors, and our own INFO lines (root logger).
  for noisy in ("absl", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from kd_landmarks import config_lib
  if config_lib.runs_on_cpu_before_start(FLAGS.config.platform) and FLAGS.config.retain_freed_memory:
    # Before JAX allocates anything: only memory allocated afterwards is retained (so decided before any
    # backend starts: with platform 'auto', from JAX_PLATFORMS and the installed plugins).
    from kd_landmarks import allocator
    logging.info("%s", allocator.retain_freed_memory())
  from kd_landmarks import parallel
  # Before anything touches a device: joins the other hosts when there are any.
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax
  from kd_landmarks import backend
  from kd_landmarks import pipeline
  # The platform JAX has ('auto') or the one asked for, which must exist ("install .[gpu]" otherwise);
  # dtype and prefetch follow it whether it came from ':platform=' or '--config.platform='.
  config = backend.resolve(FLAGS.config)
  logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
  backend.log_resolved(config)
  pipeline.run(config, FLAGS.workdir)


def entry_point():
  app.run(main)


if __name__ == "__main__":
  entry_point()
