"""Tests of kd_landmarks.training.workdir_lock: one run per workdir."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from kd_landmarks import pipeline
from kd_landmarks.training import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  holder = {"pid": 1, "host": socket.gethostname(), "time": 0.0, "argv": ["other", "run"], "token": "x",
            **holder}
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump(holder, f)


def _dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_second_run_stops_naming_pid_host_and_start_time(tmp_path):
  first = workdir_lock.acquire(str(tmp_path))
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match=rf"{tmp_path} is in use by pid {os.getpid()} on {socket.gethostname()} since "
                     r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC.*pass --break_lock or delete .*\.kd_landmarks\.lock"):
    workdir_lock.acquire(str(tmp_path))
  first.release()
  assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)
  workdir_lock.acquire(str(tmp_path)).release()  # Free again.


def test_pipeline_run_refuses_a_workdir_held_by_a_live_process(tmp_path):
  # Probe: two runs on one workdir at once (no lock, both exit 0, checkpoints of one, NME of the other).
  from test_main import _config
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_lock(str(tmp_path), pid=sleeper.pid, time=time.time())
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"in use by pid {sleeper.pid}"):
      pipeline.run(_config(phase="eval"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_FILE]  # Nothing ran.
  finally:
    sleeper.kill()
    sleeper.wait()


def test_stale_lock_of_this_host_is_taken_over(tmp_path):
  _write_lock(str(tmp_path), pid=_dead_pid())
  lock = workdir_lock.acquire(str(tmp_path))
  assert json.load(open(tmp_path / workdir_lock.LOCK_FILE))["pid"] == os.getpid()
  lock.release()


def test_lock_of_another_host_needs_break_lock(tmp_path):
  _write_lock(str(tmp_path), host="node-17", pid=4242)
  with pytest.raises(workdir_lock.WorkdirLockedError, match=r"pid 4242 on node-17 since 1970-01-01 00:00:00"):
    workdir_lock.acquire(str(tmp_path))
  lock = workdir_lock.acquire(str(tmp_path), break_lock=True)
  assert json.load(open(tmp_path / workdir_lock.LOCK_FILE))["host"] == socket.gethostname()
  lock.release()


def test_release_never_removes_another_runs_lock(tmp_path):
  lock = workdir_lock.acquire(str(tmp_path))
  _write_lock(str(tmp_path), host="node-17")  # Taken over meanwhile with --break_lock elsewhere.
  lock.release()
  assert json.load(open(tmp_path / workdir_lock.LOCK_FILE))["host"] == "node-17"


def test_multi_host_processes_share_process_zeros_lock(tmp_path):
  sent = []

  def broadcast_from_zero(payload):
    sent.append(workdir_lock._decode(payload))  # pylint: disable=protected-access
    return payload

  chief = workdir_lock.acquire(str(tmp_path), process_index=0, process_count=2, broadcast=broadcast_from_zero)
  assert sent == [""] and chief.path is not None  # Success travels as an empty message.
  # Process 1 never touches the file (it exists, held by process 0) and proceeds on process 0's word.
  other = workdir_lock.acquire(str(tmp_path), process_index=1, process_count=2,
                               broadcast=lambda payload: workdir_lock._encode(""))  # pylint: disable=protected-access
  assert other.path is None
  other.release()
  assert os.path.exists(tmp_path / workdir_lock.LOCK_FILE)  # Only process 0 releases it.
  # Process 0 could not take it: it raises, and sends its message, which process 1 raises as its own.
  with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"pid {os.getpid()}") as chief_error:
    workdir_lock.acquire(str(tmp_path), process_index=0, process_count=2, broadcast=broadcast_from_zero)
  assert sent[-1] == str(chief_error.value)
  with pytest.raises(workdir_lock.WorkdirLockedError) as other_error:
    workdir_lock.acquire(str(tmp_path), process_index=1, process_count=2,
                         broadcast=lambda payload: workdir_lock._encode(sent[-1]))  # pylint: disable=protected-access
  assert str(other_error.value) == str(chief_error.value)
  chief.release()


def test_main_prints_one_line_and_exits_non_zero_on_a_held_workdir(tmp_path):
  _write_lock(str(tmp_path), host="node-17", pid=4242)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "kd_landmarks.main", "--config", "configs/demo.py:phase=eval",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
  assert result.returncode == 2  # errors.EXIT_CODE
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {tmp_path} is in use by pid 4242 on node-17") and "--break_lock" in last
  assert "Traceback" not in result.stderr
