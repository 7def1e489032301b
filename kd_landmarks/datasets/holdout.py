"""The validation slice held out of the training split (checkpoint selection off the test splits).

The paper names no validation split, and the authors' code holds out a batch of training images. Choosing
the best checkpoint on a test split and then reporting that checkpoint on the same split is test-set model
selection, so by default a fixed, seeded slice of the *training* split is held out: no teacher and no
student ever trains on it, and it alone scores checkpoints (``config.val_holdout``, ``val_holdout_seed``).

The slice depends only on (number of training examples, size, seed), never on ``config.seed``: every
teacher and every student seed of a run is selected on the same faces, and none of them trains on them.
"""
from __future__ import annotations

import numpy as np

# The held-out part of a split is named like this in model.json, metrics.json and the report.
HOLDOUT_NAME = "train_holdout"


def check_holdout(holdout) -> float:
  """``holdout`` as a float, if it is 0, a fraction in (0, 1) or a whole count >= 1; else ValueError."""
  holdout = float(holdout)
  if not np.isfinite(holdout) or holdout < 0 or (holdout >= 1 and holdout != int(holdout)):
    raise ValueError(f"config.val_holdout must be 0, a fraction in (0, 1) or a whole count >= 1, got {holdout}")
  return holdout


def holdout_size(num_examples: int, holdout) -> int:
  """Number of examples held out: ``holdout`` in (0, 1) is a fraction (rounded, at least 1), >= 1 a count.

  The result leaves at least one training example; 0 holds nothing out.
  """
  holdout = check_holdout(holdout)
  if holdout == 0:
    return 0
  size = int(round(holdout * num_examples)) if holdout < 1 else int(holdout)
  size = max(1, size)
  if size >= num_examples:
    raise ValueError(
        f"config.val_holdout={holdout} holds out {size} of the {num_examples} training examples, leaving none "
        "to train on; lower it (e.g. 0.05)")
  return size


def holdout_positions(num_examples: int, holdout, seed: int) -> np.ndarray:
  """Sorted positions (rows of the training split) of the held-out slice: a seeded random subset."""
  size = holdout_size(num_examples, holdout)
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
  return np.sort(rng.choice(num_examples, size=size, replace=False)).astype(np.int64)


class SubsetSource:
  """Random access to some rows of a source: ``len``, ``[i]`` and ``__getitems__`` like the source.

  Examples keep their stored ``index`` field (their row in the full split), which is what the teacher cache
  is joined on, so a cache written for the whole split serves the subset unchanged.
  """

  def __init__(self, source, positions, name: str):
    self._source = source
    self.positions = np.asarray(positions, dtype=np.int64)
    self.name = name
    self.metadata = getattr(source, "metadata", {})
    # Rows of the whole split: the range of the stored `index` (what a teacher cache must cover).
    self.num_indexed = getattr(source, "num_indexed", len(source))

  def __len__(self) -> int:
    return int(self.positions.size)

  def __getitem__(self, position):
    return self._source[int(self.positions[position])]

  def __getitems__(self, positions):
    rows = [int(self.positions[p]) for p in positions]
    if hasattr(self._source, "__getitems__"):
      return list(self._source.__getitems__(rows))
    return [self._source[row] for row in rows]

  def __repr__(self) -> str:
    return f"SubsetSource({self.name}, {len(self)} examples)"


def split_train_holdout(source, holdout, seed: int, *, name: str = "train"):
  """``(train_source, holdout_source)``: the rows of ``source`` outside / inside the held-out slice.

  With ``holdout == 0`` the training source is ``source`` itself and the held-out source is None.
  """
  num_examples = len(source)
  held = holdout_positions(num_examples, holdout, seed)
  if held.size == 0:
    return source, None
  kept = np.setdiff1d(np.arange(num_examples, dtype=np.int64), held)
  return (SubsetSource(source, kept, f"{name} minus {HOLDOUT_NAME}"),
          SubsetSource(source, held, f"{name}:{HOLDOUT_NAME}"))
