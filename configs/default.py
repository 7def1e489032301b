"""Shared defaults: the paper's training hyper-parameters (Section 4.3) and the pipeline switches.

The defaults themselves live in ``kd_landmarks/config_lib.py`` (:func:`base_config`) so that every config file
imports them the same way; this file is a runnable config of its own (dataset 300w).

  python -m kd_landmarks.main --config configs/default.py:phase=...,platform=... --workdir DIR
"""
from kd_landmarks import config_lib


def get_config(arg=None):
  return config_lib.apply_arg(config_lib.base_config(), arg)
