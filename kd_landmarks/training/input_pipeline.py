"""Host-side input pipeline: random-access source -> shuffled, sharded numpy batches (grain).

Training (:func:`make_train_iterator`). Every epoch is a fresh permutation of the whole split
(grain's index shuffle seeded by ``seed`` and the epoch), cut into global batches of
``global_batch_size`` with the remainder dropped. Global batch ``s`` is a pure function of
(seed, s), which makes resuming at ``start_step`` exact, and it does not depend on the number of
processes: process ``p`` of ``P`` loads the p-th contiguous block of ``global_batch_size / P`` rows
(the rows ``jax.make_array_from_process_local_data`` expects from it).

Evaluation (:func:`make_eval_iterator`). Every example exactly once, in order; each process reads a
contiguous block, and every process yields the same number of fixed-size batches. Slots past the
end are filled with a copy of a real example (finite values, so no NaN leaks into masked sums) and
flagged ``mask == False``: nothing is dropped and nothing is counted twice.

Batches are dicts of numpy arrays: ``image`` uint8 [B, S, S, 3], the landmark sets in stored-crop
pixels, the other stored fields, plus ``tough``/``tolerant`` joined from the teacher cache by each
example's ``index`` (row i of the cache is the example with ``index == i``; contracts.md).
Augmentation happens later, on the device (:mod:`kd_landmarks.augment`).

One grain element is one whole batch, read with the source's batched ``__getitems__`` (array_record
fetches the records of a batch together) and stacked; ``num_threads`` threads build different
batches at once (record reads and image decoding release the GIL), overlapping with the training
step. Per element instead of per batch, grain's bookkeeping cost more than the reads on small crops
(benchmarks/input_pipeline.py: about 1.5-2x fewer examples/s).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np
from tqdm import tqdm

# Threads building batches: one per core (up to 8). Reads and decoding release the GIL, and even on
# few cores a thread lets the next batch load while the device runs the step.
DEFAULT_NUM_THREADS = min(8, os.cpu_count() or 1)
TEACHER_KEYS = ("tough", "tolerant")
# Training batches padded to a multiple of the device count carry it: False on the padding rows.
EXAMPLE_MASK = "example_mask"


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Training steps in one epoch (the remainder of each epoch is dropped)."""
  return num_examples // global_batch_size


def make_train_iterator(source, *, global_batch_size: int, seed: int, start_step: int = 0,
                        num_processes: int = 1, process_index: int = 0,
                        teacher_cache: Mapping[str, np.ndarray] | None = None,
                        keys: Sequence[str] | None = None, num_steps: int | None = None,
                        num_threads: int = DEFAULT_NUM_THREADS, prefetch_batches: int = 2,
                        padded_batch_size: int | None = None):
  """This process' training batches from ``start_step`` on (endless unless ``num_steps`` is given).

  Args:
    source: random-access examples (``len`` and ``[i]`` -> dict of numpy), e.g.
      ``kd_landmarks.datasets.load_split(...)`` or a list of dicts.
    global_batch_size: examples per step over all processes.
    seed: shuffling seed, 0 <= seed < 2**32.
    start_step: the first global step to yield (resume).
    num_processes, process_index: multi-host sharding (``jax.process_count()``, ``jax.process_index()``).
    teacher_cache: ``teacher_cache.load_teacher_outputs(...).as_cache()``; adds ``tough`` and ``tolerant`` [B, K, 2].
    keys: the example fields to keep (all when None); teacher keys are always added when cached.
    num_steps: stop after this many steps (endless when None).
    num_threads: threads building batches (0: build them in the consuming thread).
    prefetch_batches: how many batches are read ahead (at least num_threads).
    padded_batch_size: rows of the global batch as the devices hold it (``parallel.padded_batch_size``);
      rows ``global_batch_size`` and up repeat the batch's first example, and every batch then carries
      ``example_mask`` (bool, False on those rows). None: no padding, no mask.

  Returns:
    A grain ``DatasetIterator`` (also checkpointable with ``get_state``/``set_state``) of dicts of
    numpy arrays with leading dimension ``padded_batch_size // num_processes``. Which examples a global
    batch holds depends on ``global_batch_size`` and ``seed`` only, never on the padding.
  """
  num_examples = _check_source(source)
  rows = padded_batch_size or global_batch_size
  if rows < global_batch_size:
    raise ValueError(f"padded_batch_size={padded_batch_size} is smaller than global_batch_size={global_batch_size}")
  padded = rows > global_batch_size
  local_batch_size = _local_batch_size(rows, num_processes, process_index)
  epoch_steps = steps_per_epoch(num_examples, global_batch_size)
  if epoch_steps == 0:
    raise ValueError(f"the split has {num_examples} examples, fewer than one global batch of "
                     f"{global_batch_size}; lower the batch size (training: --config.teacher.batch_size / "
                     "--config.student.batch_size)")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  # The cache has a row per example of the whole split (joined on the stored `index`); a subset of the split
  # (the training split without its held-out validation slice, datasets/holdout.py) says how large that is.
  join = _ExampleTransform(keys, teacher_cache, getattr(source, "num_indexed", num_examples))
  order = _epoch_order(num_examples, seed)

  def load_batch(step: int) -> dict:
    batch_start = _batch_start(step, num_examples, global_batch_size)
    rows_here = range(process_index * local_batch_size, (process_index + 1) * local_batch_size)
    # A padding row reads the batch's first example (finite values); the mask keeps it out of everything.
    positions = [order[batch_start + (row if row < global_batch_size else 0)] for row in rows_here]
    if isinstance(source, InMemorySource):  # Decoded already: one gather per field, no per-example work.
      batch = join.batch(source.take(positions))
    else:
      batch = _stack([join(example) for example in _read(source, positions)])
    if padded:
      batch[EXAMPLE_MASK] = np.array([row < global_batch_size for row in rows_here])
    return batch

  stop = start_step + num_steps if num_steps is not None else _ENDLESS
  read_options = _read_options(num_threads, prefetch_batches)
  return iter(grain.MapDataset.range(start_step, stop).map(load_batch).to_iter_dataset(read_options))


def train_batch_indices(step: int, *, num_examples: int, global_batch_size: int, seed: int,
                        num_processes: int = 1, process_index: int = 0) -> np.ndarray:
  """Source positions of this process' rows of global batch ``step`` (what the iterator reads).

  Cheap (no reads): for logging, tests and exact-resume checks.
  """
  local_batch_size = _local_batch_size(global_batch_size, num_processes, process_index)
  order = _epoch_order(num_examples, seed)
  start = _batch_start(step, num_examples, global_batch_size) + process_index * local_batch_size
  return np.array([order[position] for position in range(start, start + local_batch_size)])


def _batch_start(step: int, num_examples: int, global_batch_size: int) -> int:
  """Where global batch ``step`` starts in the concatenated epoch orders (each epoch's remainder dropped)."""
  epoch, batch_in_epoch = divmod(step, steps_per_epoch(num_examples, global_batch_size))
  return epoch * num_examples + batch_in_epoch * global_batch_size


class EvalIterator:
  """Fixed-size evaluation batches with a boolean ``mask`` (False on padding). ``len`` = batches."""

  def __init__(self, batches: Iterable, num_batches: int):
    self._iterator = iter(batches)
    self._num_batches = num_batches

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)


def make_eval_iterator(source, *, batch_size: int, num_processes: int = 1, process_index: int = 0,
                       keys: Sequence[str] | None = None, num_threads: int = DEFAULT_NUM_THREADS,
                       prefetch_batches: int = 2) -> EvalIterator:
  """Every example of ``source`` once, in order, in batches of ``batch_size`` with a ``mask``.

  Process ``p`` reads the p-th contiguous block of ceil(N / P) examples; all processes yield the same
  number of batches (collectives in the eval step need that), the last ones padded.
  """
  num_examples = _check_source(source)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  _local_batch_size(num_processes, num_processes, process_index)  # validates the process arguments
  per_process = math.ceil(num_examples / num_processes)
  num_batches = math.ceil(per_process / batch_size)
  begin = process_index * per_process
  end = min(begin + per_process, num_examples)
  join = _ExampleTransform(keys, None, num_examples)
  # A real example (finite values) stands in for padding; the mask says it is not one.
  padding_position = begin if begin < end else 0

  def load_batch(batch_index: int) -> dict:
    first = begin + batch_index * batch_size
    positions = list(range(first, first + batch_size))
    valid = [position < end for position in positions]
    examples = _read(source, [position if ok else padding_position
                              for position, ok in zip(positions, valid)])
    batch = _stack([join(example) for example in examples])
    batch["mask"] = np.asarray(valid, dtype=bool)
    return batch

  read_options = _read_options(num_threads, prefetch_batches)
  batches = grain.MapDataset.range(num_batches).map(load_batch).to_iter_dataset(read_options)
  return EvalIterator(batches, num_batches)


class InMemorySource:
  """The fields ``keys`` of every example of ``source``, decoded once and held as stacked numpy arrays.

  Training reads each example once per epoch, and decoding it (tfds' image feature: PNG/JPEG through
  PIL) is the input pipeline's main cost: 14.6 ms of CPU per batch of 32 demo faces (96 px, measured with
  ``num_threads=0``), taken from the two cores the train step runs on. Held decoded, a batch is one
  gather per field. ``len``, ``[i]`` and ``__getitems__`` behave as the source's (restricted to ``keys``);
  ``metadata`` and ``num_indexed`` are the source's, so the teacher-cache join is unchanged.
  """

  def __init__(self, source, keys: Sequence[str] | None, *, chunk: int = 256, progress: bool = False):
    num_examples = _check_source(source)
    self.name = f"{getattr(source, 'name', type(source).__name__)} (in memory)"
    self.metadata = getattr(source, "metadata", {})
    self.num_indexed = getattr(source, "num_indexed", num_examples)
    self.arrays: dict[str, np.ndarray] = {}
    join = _ExampleTransform(keys, None, num_examples)  # keys None: every field.
    bar = _progress(num_examples, f"decode {self.name}") if progress else None
    for begin in range(0, num_examples, chunk):
      rows = list(range(begin, min(begin + chunk, num_examples)))
      for row, example in zip(rows, _read(source, rows)):
        for key, value in join(example).items():
          value = np.asarray(value)
          if value.dtype.kind in "USO":  # Strings (image_id) of any length: one Python object per example.
            value = np.asarray(value.item(), dtype=object) if value.shape == () else value.astype(object)
          if key not in self.arrays:
            self.arrays[key] = np.empty((num_examples,) + value.shape, value.dtype)
          if self.arrays[key].shape[1:] != value.shape:
            raise ValueError(f"{self.name}: field {key!r} has shape {value.shape} at row {row} and "
                             f"{self.arrays[key].shape[1:]} before; the examples of a split must share shapes")
          self.arrays[key][row] = value
      if bar is not None:
        bar.update(len(rows))
    if bar is not None:
      bar.close()

  @property
  def nbytes(self) -> int:
    """Bytes of the numeric fields (the images are nearly all of it; string fields are not counted)."""
    return sum(array.nbytes for array in self.arrays.values() if array.dtype != object)

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def take(self, positions) -> dict:
    """The examples at ``positions`` stacked (the batch the iterator builds)."""
    positions = np.asarray(positions, dtype=np.int64)
    return {key: array[positions] for key, array in self.arrays.items()}

  def __getitem__(self, position):
    return {key: array[position] for key, array in self.arrays.items()}

  def __getitems__(self, positions):
    return [self[int(position)] for position in positions]

  def __repr__(self) -> str:
    return f"InMemorySource({self.name}, {len(self)} examples, {self.nbytes / 2**20:.0f} MiB)"


def cache_in_memory(source, keys: Sequence[str], budget_bytes: int, *, progress: bool = True):
  """``source`` as an :class:`InMemorySource` of ``keys`` when its decoded size fits ``budget_bytes``;
  otherwise ``source`` itself (logged, with the budget that would hold it). ``budget_bytes <= 0``: never."""
  num_examples = _check_source(source)
  if budget_bytes <= 0 or isinstance(source, InMemorySource):
    return source
  first = _ExampleTransform(keys, None, num_examples)(_read(source, [0])[0])
  estimate = num_examples * sum(np.asarray(value).nbytes for value in first.values())
  if estimate > budget_bytes:
    logging.info("input: %s stays on disk (decoded it needs %.0f MiB, over the %.0f MiB budget; raise "
                 "--config.input_cache_mb to hold it)", getattr(source, "name", source), estimate / 2**20,
                 budget_bytes / 2**20)
    return source
  cached = InMemorySource(source, keys, progress=progress)
  logging.info("input: %r", cached)
  return cached


def default_cache_budget_bytes() -> int:
  """A quarter of the machine's physical memory: 300W's training crops (1.2 GiB at 360 px) and WFLW's
  (2.9 GiB) fit on a 24 GiB machine, leaving the rest to XLA and the other processes."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
  except (ValueError, OSError, AttributeError):
    return 0


def _progress(total: int, desc: str):
  return tqdm(total=total, desc=desc, unit="face", dynamic_ncols=True, leave=False)


# --------------------------------------------------------------------------------------------------

_ENDLESS = 2**62  # grain ranges need an end; no run reaches this many steps.


class _ExampleTransform:
  """Keeps the requested fields and joins the teacher cache by ``index`` (picklable for workers)."""

  def __init__(self, keys, teacher_cache, num_examples):
    self._keys = None if keys is None else tuple(keys)
    self._teacher = None
    if teacher_cache is not None:
      missing = [key for key in TEACHER_KEYS if key not in teacher_cache]
      if missing:
        raise ValueError(f"teacher_cache lacks {missing} (has {sorted(teacher_cache)}); load it with "
                         "kd_landmarks.datasets.teacher_cache.load_teacher_outputs(...).as_cache()")
      self._teacher = {key: np.asarray(teacher_cache[key], np.float32) for key in TEACHER_KEYS}
      rows = {key: value.shape[0] for key, value in self._teacher.items()}
      if any(count != num_examples for count in rows.values()):
        raise ValueError(f"teacher cache rows {rows} do not match the {num_examples} examples of the "
                         "split; it was written for another split; write it again")

  def __call__(self, example: Mapping[str, Any]) -> dict:
    return self.batch(example)  # A 0-d 'index' selects one row of the cache, as a batch of them selects many.

  def batch(self, stacked: Mapping[str, np.ndarray]) -> dict:
    """The kept fields plus the teacher rows of ``stacked['index']``: one example (0-d index) or examples
    stacked along a leading axis (what ``_stack`` of the examples one by one gives)."""
    if self._keys is None:
      result = dict(stacked)
    else:
      missing = [key for key in self._keys if key not in stacked]
      if missing:
        raise KeyError(f"example lacks fields {missing}; it has {sorted(stacked)}")
      result = {key: stacked[key] for key in self._keys}
    if self._teacher is not None:
      if "index" not in stacked:
        raise KeyError(f"joining the teacher cache needs each example's 'index'; it has {sorted(stacked)}")
      rows = np.asarray(stacked["index"], dtype=np.int64)
      bad = rows[(rows < 0) | (rows >= len(self._teacher["tough"]))]
      if bad.size:
        raise IndexError(f"example index {int(bad[0])} is outside the teacher cache's "
                         f"{len(self._teacher['tough'])} rows; the cache belongs to another split")
      for key, table in self._teacher.items():
        result[key] = table[rows]
    return result


def _epoch_order(num_examples: int, seed: int):
  """``order[j]`` = the source position read j-th: element j % N of epoch j // N's permutation.

  grain's index shuffle is O(1) memory and reseeds epoch e with (seed + e); hashing the user's seed
  first keeps runs with seeds s and s + 1 from sharing all but one epoch order.
  """
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  return grain.MapDataset.range(num_examples).shuffle(seed=shuffle_seed)


def _read_options(num_threads: int, prefetch_batches: int) -> grain.ReadOptions:
  # grain keeps at most prefetch_buffer_size elements (batches) in flight: at least one per thread.
  return grain.ReadOptions(num_threads=num_threads,
                           prefetch_buffer_size=max(1, prefetch_batches, num_threads))


def _read(source, positions: list[int]) -> list:
  """Examples at ``positions``; one batched call where the source has one (array_record reads the
  records of a batch together)."""
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(positions))
  return [source[position] for position in positions]


def _stack(examples: list[dict]) -> dict:
  return {key: np.stack([np.asarray(example[key]) for example in examples]) for key in examples[0]}


def _check_source(source) -> int:
  try:
    num_examples = len(source)
  except TypeError:
    raise TypeError(f"the input pipeline needs a random-access source (len and [i]), got "
                    f"{type(source).__name__}") from None
  if num_examples == 0:
    raise ValueError(f"the data source {source!r:.80} is empty; prepare the split first "
                     "(python -m kd_landmarks.datasets prepare ...)")
  return num_examples


def _local_batch_size(global_batch_size: int, num_processes: int, process_index: int) -> int:
  if num_processes <= 0 or not 0 <= process_index < num_processes:
    raise ValueError(f"process_index={process_index} must be in [0, num_processes={num_processes})")
  if global_batch_size <= 0 or global_batch_size % num_processes:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"num_processes={num_processes}")
  return global_batch_size // num_processes
