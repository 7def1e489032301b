"""The timing helpers every benchmark uses: median wall time of calls after warm-up."""
import statistics
import time


def median_seconds(fn, *, warmup: int, iterations: int) -> float:
  """Median seconds of ``fn()`` over ``iterations`` calls, after ``warmup`` untimed calls. ``fn`` must block
  until its work is done (e.g. call ``block_until_ready`` on JAX outputs)."""
  return interleaved_median_seconds({"fn": fn}, warmup=warmup, iterations=iterations)["fn"]


def interleaved_median_seconds(fns: dict, *, warmup: int, iterations: int) -> dict:
  """Median seconds of each ``fns[name]()``, the calls taken in turn (a, b, c, a, b, c, ...).

  For ratios between frameworks on a shared machine: a slow spell (another job, frequency scaling)
  then slows every contestant alike instead of whichever block of iterations it fell on.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(iterations):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}
