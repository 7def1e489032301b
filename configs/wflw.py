"""WFLW with the paper's setup. This file sets only ``dataset``; everything else (Section 4.3: EfficientNet-B3
teachers, MobileNetV2 student, 224 px, Adam 1e-3 with time-based decay 1e-6, batches 40 / 70, 250 epochs)
comes from ``kd_landmarks.config_lib.base_config``.

Run: python -m kd_landmarks.main --config configs/wflw.py[:phase=...,platform=gpu] --workdir runs/wflw
(prepare the data first: python -m kd_landmarks.datasets prepare --dataset wflw --manual_dir M --data_dir D,
then add --config.data_dir=D).
"""
from kd_landmarks import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.dataset = "wflw"
  return config_lib.apply_arg(config, arg)
