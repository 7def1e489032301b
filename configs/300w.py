"""300W: the paper's full setup (Section 4.3): EfficientNet-B3 teachers, MobileNetV2 student, 224 px.

Run: python -m kd_landmarks.main --config configs/300w.py[:phase=...,platform=gpu] --workdir runs/300w
(prepare the data first: python -m kd_landmarks.datasets prepare 300w ...).
"""
from kd_landmarks import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.dataset = "300w"
  return config_lib.apply_arg(config, arg)
