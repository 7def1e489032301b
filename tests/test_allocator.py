"""allocator.retain_freed_memory: freed large blocks are reused without new page faults (glibc only)."""
import os
import platform
import subprocess
import sys

import pytest

# Allocates and touches 200 MB, frees it, then does it again and prints the page faults of the second
# round: glibc's default serves the block with a fresh mmap each time (one fault per 4 KiB page).
# (malloc and memset by hand: NumPy asks for transparent huge pages, which hide the effect.)
_PROBE = """
import ctypes, resource, sys
if sys.argv[1] == "retain":
  from kd_landmarks.cpu import allocator
  print(allocator.retain_freed_memory(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 200_000_000
block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size); ctypes.memset(block, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_round_faults(mode):
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                       env.get("PYTHONPATH", "")])
  result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
  return int(result.stdout.strip()), result.stderr


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_retained_memory_is_reused_without_page_faults():
  default_faults, _ = _second_round_faults("default")
  retained_faults, message = _second_round_faults("retain")
  assert "freed memory retained" in message
  pages = 200e6 / 4096
  if default_faults < 0.5 * pages:  # The premise: glibc maps fresh 4 KiB pages again.
    pytest.skip(f"glibc's default faulted only {default_faults} times for {pages:.0f} pages here "
                "(transparent huge pages set to 'always'?): nothing to compare against")
  assert retained_faults < 0.02 * pages, retained_faults


def test_preloaded_allocator_is_left_alone(monkeypatch):
  from kd_landmarks.cpu import allocator
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
  monkeypatch.setitem(allocator._state, "applied", None)
  assert allocator.retain_freed_memory() == "tcmalloc preloaded: already retains freed memory"
