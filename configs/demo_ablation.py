"""Tables 7-8 on the synthetic faces: all six student losses, three seeds each, from the same two teachers.

  python -m kd_landmarks.main --config configs/demo_ablation.py --workdir runs/demo_ablation

The demo's data, teachers and schedule (configs/demo.py); the students are L2, L1, smooth-L1 (Table 8), KD
with only the Tough or only the Tolerant teacher (Table 7) and KD, each with three seeds that every loss
shares (seed k of each loss starts from the same initialisation and batch order). The report regenerates
Tables 7 and 8 in the paper's layout per seed, the mean ± std over seeds, and for every loss the paired
95% interval of its per-image NME difference against L2 (and KD against each other loss).

The teachers and their cache are the demo's: pointing --workdir at a finished runs/demo reuses them (phase
'all' skips finished phases) and trains only the four extra losses.
"""
import importlib.util
import os

from kd_landmarks import config_lib


def _demo_config(arg):
  # Loaded by path: configs/ is not a package, and the demo's settings (with their measurements) have one home.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
  spec = importlib.util.spec_from_file_location("configs_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  config = _demo_config(None)
  with config.unlocked():
    config.student_loss = "l2,l1,smooth_l1,kd_tough_only,kd_tolerant_only,kd"
    config.student_seeds = 3
  config.unlock()
  return config_lib.apply_arg(config, arg)
