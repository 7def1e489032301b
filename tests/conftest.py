"""Shared test setup: quiet, deterministic, single-process JAX on the CPU."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def require_native_kernels():
  """Skips a test that needs the native CPU kernels where they cannot be built here, except in CI
  (``CI=true``, which GitHub Actions and most CI services set): there the build must work, so the test
  fails with the reason instead of being skipped silently."""
  import pytest
  from kd_landmarks.cpu import native
  if native.available():
    return
  reason = f"native kernels unavailable: {native.unavailable_reason()}"
  if os.environ.get("CI", "").lower() in ("true", "1"):
    pytest.fail(f"CI=true: {reason}", pytrace=False)
  pytest.skip(reason)


def require_video():
  """Skips a test that reads or writes video files where PyAV (extra ``video``) is missing, except in CI
  (``CI=true``), where the extra is installed and the test must run."""
  import importlib.util
  import pytest
  if importlib.util.find_spec("av") is not None:
    return
  reason = "PyAV is not installed: pip install -e '.[video]'"
  if os.environ.get("CI", "").lower() in ("true", "1"):
    pytest.fail(f"CI=true: {reason}", pytrace=False)
  pytest.skip(reason)
