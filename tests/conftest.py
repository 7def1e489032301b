"""Shared test setup: quiet, deterministic, single-process JAX on the CPU."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
