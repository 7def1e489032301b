"""Tests for kd_landmarks.training.input_pipeline: epochs, resume, multi-process sharding, teacher join, eval mask."""
import itertools

import numpy as np
import pytest

from kd_landmarks.training import input_pipeline

NUM_LANDMARKS = 5


def _source(num_examples):
  """In-memory examples whose every field encodes the example's position, so batches are checkable."""
  return [{"image": np.full((4, 4, 3), i % 256, np.uint8),
           "landmarks": np.full((NUM_LANDMARKS, 2), i, np.float32),
           "soft_landmarks": np.full((NUM_LANDMARKS, 2), i + 0.5, np.float32),
           "index": np.int64(i), "image_id": f"face_{i:03d}"} for i in range(num_examples)]


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


def test_each_epoch_is_a_permutation_without_the_remainder():
  num_examples, batch = 23, 5  # 4 steps per epoch, 3 examples dropped each epoch
  assert input_pipeline.steps_per_epoch(num_examples, batch) == 4
  batches = _take(input_pipeline.make_train_iterator(_source(num_examples), global_batch_size=batch, seed=3,
                                                     num_threads=0), 12)
  epochs = []
  for epoch in range(3):
    indices = np.concatenate([b["index"] for b in batches[epoch * 4:(epoch + 1) * 4]])
    assert len(set(indices.tolist())) == 20 and indices.min() >= 0 and indices.max() < num_examples
    epochs.append(indices)
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
  for b in batches:
    assert b["image"].dtype == np.uint8 and b["image"].shape == (batch, 4, 4, 3)
    # Fields stay together: every field of a row comes from the same example.
    np.testing.assert_array_equal(b["landmarks"][:, 0, 0], b["index"])
    np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["index"] % 256)
    assert [int(s[5:]) for s in b["image_id"]] == b["index"].tolist()


def test_same_seed_same_batches_other_seed_other_batches():
  def indices(seed):
    iterator = input_pipeline.make_train_iterator(_source(30), global_batch_size=6, seed=seed, num_steps=5)
    return np.stack([b["index"] for b in iterator])
  np.testing.assert_array_equal(indices(1), indices(1))
  assert not np.array_equal(indices(1), indices(2))


def test_resume_at_step_reproduces_the_stream():
  source = _source(17)
  full = _take(input_pipeline.make_train_iterator(source, global_batch_size=4, seed=7), 10)
  resumed = _take(input_pipeline.make_train_iterator(source, global_batch_size=4, seed=7, start_step=6), 4)
  for a, b in zip(full[6:], resumed):
    np.testing.assert_array_equal(a["index"], b["index"])
  for step, batch in enumerate(full):
    np.testing.assert_array_equal(
        input_pipeline.train_batch_indices(step, num_examples=17, global_batch_size=4, seed=7),
        batch["index"])


def test_a_padded_batch_holds_the_unpadded_examples_and_masks_the_rest_on_every_process():
  """5 examples as 8 rows over 2 processes: process 0 reads rows 0-3, process 1 row 4 and 3 padding rows that
  repeat the batch's first example, flagged False; the real rows are exactly the unpadded batch's."""
  source = _source(23)
  plain = _take(input_pipeline.make_train_iterator(source, global_batch_size=5, seed=3, num_steps=4), 4)
  blocks = [_take(input_pipeline.make_train_iterator(source, global_batch_size=5, seed=3, num_steps=4,
                                                     padded_batch_size=8, num_processes=2, process_index=p), 4)
            for p in range(2)]
  for step in range(4):
    rows = {key: np.concatenate([blocks[p][step][key] for p in range(2)]) for key in ("index", "example_mask")}
    np.testing.assert_array_equal(rows["example_mask"], [True] * 5 + [False] * 3)
    np.testing.assert_array_equal(rows["index"][:5], plain[step]["index"])
    np.testing.assert_array_equal(rows["index"][5:], [plain[step]["index"][0]] * 3)
  assert "example_mask" not in plain[0]


def test_processes_split_each_global_batch_into_contiguous_blocks():
  source = _source(40)
  single = _take(input_pipeline.make_train_iterator(source, global_batch_size=12, seed=0), 5)
  per_process = [_take(input_pipeline.make_train_iterator(source, global_batch_size=12, seed=0,
                                                          num_processes=3, process_index=p), 5)
                 for p in range(3)]
  for step in range(5):
    parts = [per_process[p][step]["index"] for p in range(3)]
    assert all(len(part) == 4 for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts), single[step]["index"])


def test_teacher_cache_is_joined_by_index_and_keys_are_selected():
  num_examples = 12
  rng = np.random.default_rng(0)
  cache = {"tough": rng.normal(size=(num_examples, NUM_LANDMARKS, 2)).astype(np.float32),
           "tolerant": rng.normal(size=(num_examples, NUM_LANDMARKS, 2)).astype(np.float32)}
  # Store the examples out of index order: the join must use the `index` field, not the position.
  source = _source(num_examples)[::-1]
  iterator = input_pipeline.make_train_iterator(source, global_batch_size=4, seed=1, teacher_cache=cache,
                                                keys=("image", "landmarks", "index"), num_steps=3)
  for batch in iterator:
    assert set(batch) == {"image", "landmarks", "index", "tough", "tolerant"}
    np.testing.assert_array_equal(batch["tough"], cache["tough"][batch["index"]])
    np.testing.assert_array_equal(batch["tolerant"], cache["tolerant"][batch["index"]])
    assert batch["tough"].dtype == np.float32 and batch["tough"].shape == (4, NUM_LANDMARKS, 2)


def test_teacher_cache_of_another_split_is_rejected():
  cache = {"tough": np.zeros((5, NUM_LANDMARKS, 2), np.float32),
           "tolerant": np.zeros((5, NUM_LANDMARKS, 2), np.float32)}
  with pytest.raises(ValueError, match="do not match the 12 examples"):
    input_pipeline.make_train_iterator(_source(12), global_batch_size=4, seed=0, teacher_cache=cache)
  with pytest.raises(ValueError, match=r"lacks \['tolerant'\]"):
    input_pipeline.make_train_iterator(_source(12), global_batch_size=4, seed=0, teacher_cache={"tough": 0})


@pytest.mark.parametrize("num_examples, batch_size, num_processes", [(10, 4, 1), (10, 4, 3), (9, 3, 3),
                                                                     (2, 4, 3)])
def test_eval_sees_every_example_once_with_a_mask(num_examples, batch_size, num_processes):
  source = _source(num_examples)
  seen, lengths = [], []
  for process in range(num_processes):
    iterator = input_pipeline.make_eval_iterator(source, batch_size=batch_size, num_processes=num_processes,
                                                 process_index=process, num_threads=2)
    batches = list(iterator)
    assert len(batches) == len(iterator)
    lengths.append(len(batches))
    for batch in batches:
      assert batch["mask"].dtype == np.bool_ and batch["image"].shape[0] == batch_size
      assert np.isfinite(batch["landmarks"]).all()  # padding is a real example, not garbage
      seen.extend(batch["index"][batch["mask"]].tolist())
  assert len(set(lengths)) == 1  # every process runs the same number of eval steps
  assert seen == list(range(num_examples))  # in order, none dropped, none twice


def test_bad_arguments_fail_clearly():
  with pytest.raises(ValueError, match="is empty"):
    input_pipeline.make_train_iterator([], global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="is empty"):
    input_pipeline.make_eval_iterator([], batch_size=4)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    input_pipeline.make_train_iterator(_source(3), global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="multiple of num_processes=3"):
    input_pipeline.make_train_iterator(_source(30), global_batch_size=8, seed=0, num_processes=3)
  with pytest.raises(ValueError, match="process_index=2"):
    input_pipeline.make_eval_iterator(_source(30), batch_size=8, num_processes=2, process_index=2)
  with pytest.raises(TypeError, match="random-access source"):
    input_pipeline.make_train_iterator(iter(_source(8)), global_batch_size=4, seed=0)
  iterator = input_pipeline.make_train_iterator(_source(8), global_batch_size=4, seed=0, keys=("nope",))
  with pytest.raises(KeyError, match="lacks fields"):
    next(iterator)


def test_reads_a_prepared_array_record_split(tmp_path):
  """End to end on the tfds array_record source that training really reads (threads included)."""
  from kd_landmarks import datasets  # pylint: disable=g-import-not-at-top  (tfds import is slow)
  from kd_landmarks.datasets import builder  # pylint: disable=g-import-not-at-top
  builder.prepare("synthetic", data_dir=tmp_path, show_progress=False,
                  synthetic_options={"num_train": 20, "num_test": 7, "image_size": 32})
  train = datasets.load_split("synthetic", "train", tmp_path)
  iterator = input_pipeline.make_train_iterator(train, global_batch_size=8, seed=0, num_steps=4,
                                                keys=("image", "landmarks", "soft_landmarks", "index"))
  batches = list(iterator)
  assert len(batches) == 4
  for step, batch in enumerate(batches):
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 32, 32, 3)
    assert batch["landmarks"].dtype == np.float32 and batch["landmarks"].shape == (8, 68, 2)
    np.testing.assert_array_equal(
        batch["index"],
        input_pipeline.train_batch_indices(step, num_examples=20, global_batch_size=8, seed=0))
    # The stored fields of each row belong together: compare with a direct read of that example.
    for row, index in enumerate(batch["index"]):
      np.testing.assert_array_equal(batch["landmarks"][row], train[int(index)]["landmarks"])
  test = datasets.load_split("synthetic", "test", tmp_path)
  eval_batches = list(input_pipeline.make_eval_iterator(test, batch_size=4))
  assert [b["mask"].sum() for b in eval_batches] == [4, 3]
  assert np.concatenate([b["index"][b["mask"]] for b in eval_batches]).tolist() == list(range(7))
  assert eval_batches[1]["image_id"].shape == (4,)


def test_neighbouring_seeds_do_not_share_epochs():
  # grain reseeds epoch e with (seed + e); without hashing, seed 1's epoch 0 would be seed 0's epoch 1.
  epoch_1_of_seed_0 = np.concatenate([input_pipeline.train_batch_indices(
      step, num_examples=20, global_batch_size=5, seed=0) for step in (4, 5, 6, 7)])
  epoch_0_of_seed_1 = np.concatenate([input_pipeline.train_batch_indices(
      step, num_examples=20, global_batch_size=5, seed=1) for step in (0, 1, 2, 3)])
  assert not np.array_equal(epoch_1_of_seed_0, epoch_0_of_seed_1)


def test_a_split_held_in_memory_gives_the_same_batches_teacher_join_included():
  num_examples = 14
  rng = np.random.default_rng(3)
  cache = {"tough": rng.normal(size=(num_examples, NUM_LANDMARKS, 2)).astype(np.float32),
           "tolerant": rng.normal(size=(num_examples, NUM_LANDMARKS, 2)).astype(np.float32)}
  source = _source(num_examples)[::-1]  # Positions differ from the stored index: the join must use index.
  held = input_pipeline.cache_in_memory(source, ("image", "landmarks", "index"), budget_bytes=2**20)
  assert isinstance(held, input_pipeline.InMemorySource) and len(held) == num_examples
  assert held.nbytes == num_examples * (4 * 4 * 3 + NUM_LANDMARKS * 2 * 4 + 8)
  assert set(held.arrays) == {"image", "landmarks", "index"}  # Fields training does not read stay behind.
  kwargs = dict(global_batch_size=4, seed=5, teacher_cache=cache, keys=("image", "landmarks"), num_steps=7)
  for expected, batch in zip(input_pipeline.make_train_iterator(source, **kwargs),
                             input_pipeline.make_train_iterator(held, **kwargs), strict=True):
    assert set(batch) == set(expected) == {"image", "landmarks", "tough", "tolerant"}
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key])
      assert batch[key].dtype == expected[key].dtype


def test_a_split_over_the_memory_budget_stays_on_disk():
  source = _source(10)
  per_example = 4 * 4 * 3 + NUM_LANDMARKS * 2 * 4
  assert input_pipeline.cache_in_memory(source, ("image", "landmarks"), 10 * per_example - 1) is source
  assert input_pipeline.cache_in_memory(source, ("image", "landmarks"), 0) is source
  assert isinstance(input_pipeline.cache_in_memory(source, ("image", "landmarks"), 10 * per_example),
                    input_pipeline.InMemorySource)


def test_examples_of_different_shapes_are_refused_in_memory():
  source = _source(300)
  source[260]["image"] = np.zeros((5, 4, 3), np.uint8)
  with pytest.raises(ValueError, match=r"field 'image' has shape \(5, 4, 3\) at row 260 and \(4, 4, 3\)"):
    input_pipeline.InMemorySource(source, ("image",))


def test_in_memory_strings_keep_their_full_length():
  """image_id of any length survives (a fixed-width string array would cut them to the first one's width)."""
  source = _source(5)
  source[3]["image_id"] = "a_much_longer_image_id_than_the_first"
  held = input_pipeline.InMemorySource(source, None)
  assert held[3]["image_id"] == "a_much_longer_image_id_than_the_first" and held[0]["image_id"] == "face_000"
  assert held.nbytes == 5 * (4 * 4 * 3 + 2 * NUM_LANDMARKS * 2 * 4 + 8)  # image, landmarks, soft, index.
  assert input_pipeline.cache_in_memory(held, ("image",), 2**30) is held
