"""COFW: the paper's full setup (Section 4.4): EfficientNet-B3 teachers, MobileNetV2 student, 224 px.

Run: python -m kd_landmarks.main --config configs/cofw.py[:phase=...,platform=gpu] --workdir runs/cofw
(prepare the data first: python -m kd_landmarks.datasets prepare cofw ...).
"""
import importlib.util
import os


def _default():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
  spec = importlib.util.spec_from_file_location("kd_landmarks_configs_default", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  default = _default()
  config = default.base_config()
  config.dataset = "cofw"
  return default.apply_arg(config, arg)
