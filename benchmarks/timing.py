"""The one timing helper every benchmark uses: median wall time of a call after warm-up."""
import statistics
import time


def median_seconds(fn, *, warmup: int, iterations: int) -> float:
  """Median seconds of ``fn()`` over ``iterations`` calls, after ``warmup`` untimed calls. ``fn`` must block
  until its work is done (e.g. call ``block_until_ready`` on JAX outputs)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iterations):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
