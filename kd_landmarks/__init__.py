"""kd_landmarks: KD-Loss facial landmark detection (Fard & Mahoor, CVIU 2022) in JAX/Flax.

``from kd_landmarks import Predictor`` is the Python API for a trained student (:class:`kd_landmarks.deploy.predict.Predictor`).
"""

# The one version source: setup.py reads it from this line.
__version__ = "0.1.0"

__all__ = ["Predictor", "__version__"]


def __getattr__(name):
  # Lazy (PEP 562): every module of the package imports this __init__, and training must not load the
  # predict layer (detectors, runtimes) it sits below.
  if name == "Predictor":
    from kd_landmarks.deploy.predict import Predictor
    return Predictor
  raise AttributeError(f"module 'kd_landmarks' has no attribute {name!r}")
