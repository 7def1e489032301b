"""COFW: the paper's full setup (Section 4.3): EfficientNet-B3 teachers, MobileNetV2 student, 224 px.

Run: python -m kd_landmarks.main --config configs/cofw.py[:phase=...,platform=gpu] --workdir runs/cofw
(prepare the data first: python -m kd_landmarks.datasets prepare cofw ...).
"""
from kd_landmarks import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.dataset = "cofw"
  return config_lib.apply_arg(config, arg)
