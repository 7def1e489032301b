"""kd_landmarks: KD-Loss facial landmark detection (Fard & Mahoor, CVIU 2022) in JAX/Flax."""

__version__ = "0.1.0"
