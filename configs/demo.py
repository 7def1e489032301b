"""The demo: the whole pipeline on the procedurally rendered synthetic faces, sized for a 2-core CPU.

  python -m kd_landmarks.main --config configs/demo.py --workdir runs/demo

Renders the synthetic dataset into runs/demo/data on first use (no download), trains the Tough and Tolerant
teachers (tiny EfficientNet-B3), caches their predictions, trains the MobileNetV2 (tiny) student with L2 and
with KD-Loss, evaluates all four and writes runs/demo/report.md. Same code path as the paper configs; only
sizes and step counts are small. Optimiser, decay and augmentation are the paper's.
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
  config.dataset = "synthetic"
  config.synthetic.num_train = 1200
  config.synthetic.num_test = 300
  config.synthetic.image_size = 96
  config.image_size = 64
  config.teacher_model = "efficientnet_b3_tiny"
  config.student_model = "mobilenet_v2_tiny"
  config.student_loss = "l2,kd"
  config.teacher.batch_size = 32
  config.teacher.num_train_steps = 600
  config.student.batch_size = 32
  config.student.num_train_steps = 600
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.eval_every_steps = -1
  config.eval_batch_size = 100
  return default.apply_arg(config, arg)
