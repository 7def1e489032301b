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


# Re-executes itself with a fast allocator preloaded, then prints what the new process has mapped.
_REEXEC_PROBE = """
import os, sys
from kd_landmarks.cpu import allocator
print("said:", allocator.preload_fast_allocator(), file=sys.stderr)
maps = open("/proc/self/maps").read()
print(os.getpid(), sys.argv[1:], os.environ.get(allocator.REEXEC_MARK, ""),
      any(name in maps for name in ("tcmalloc", "jemalloc")))
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="LD_PRELOAD: Linux only")
def test_the_process_reexecutes_itself_once_with_the_fast_allocator_mapped(tmp_path):
  from kd_landmarks.cpu import allocator
  path = allocator.find_fast_allocator()
  if path is None:
    pytest.skip("no tcmalloc/jemalloc installed here (apt install libtcmalloc-minimal4)")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.REEXEC_MARK)}
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  process = subprocess.Popen([sys.executable, "-c", _REEXEC_PROBE, "--flag", "x y"], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err
  pid = out.split(" ", 1)[0]
  mark, mapped = out.strip().rsplit(" ", 2)[1:]
  # The same process (execve keeps the pid), the same arguments, the allocator mapped, and no second exec.
  assert int(pid) == process.pid and "['--flag', 'x y']" in out
  assert mark == os.path.basename(path) and mapped == "True"
  assert err.count("said:") == 1 and "re-executed with LD_PRELOAD" in err


def test_without_a_fast_allocator_nothing_is_reexecuted(monkeypatch):
  from kd_landmarks.cpu import allocator
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.delenv(allocator.REEXEC_MARK, raising=False)
  monkeypatch.setattr(allocator, "find_fast_allocator", lambda: None)
  monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("must not re-execute"))
  assert "apt install libtcmalloc-minimal4" in allocator.preload_fast_allocator()
  monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libjemalloc.so.2")
  assert allocator.preload_fast_allocator() == "jemalloc already preloaded"
  # Imported and called from another program (here pytest), it never replaces that process.
  monkeypatch.setattr(allocator, "find_fast_allocator", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
  monkeypatch.delenv("LD_PRELOAD")
  assert allocator.preload_fast_allocator(program="kd_landmarks.main").startswith("not re-executed")
