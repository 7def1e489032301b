"""The teachers' prediction cache: rows joined to examples by ``index``, validated on write and read."""
import numpy as np
import pytest

from kd_landmarks.datasets import teacher_cache as tc


def _predictions(num_examples=5, num_landmarks=4, seed=0):
  rng = np.random.default_rng(seed)
  tough = rng.uniform(0, 320, size=(num_examples, num_landmarks, 2)).astype(np.float32)
  tolerant = rng.uniform(0, 320, size=(num_examples, num_landmarks, 2)).astype(np.float32)
  return tough, tolerant


def test_rows_come_back_in_index_order(tmp_path):
  tough, tolerant = _predictions()
  order = np.array([3, 0, 4, 1, 2])  # e.g. the order a shuffled pipeline produced them in
  path = tc.write_teacher_cache(tmp_path / "cache" / "train.npz", index=order, tough=tough, tolerant=tolerant)
  loaded = tc.load_teacher_cache(path, num_examples=5, num_landmarks=4)
  assert set(loaded) == {"tough", "tolerant"}
  for position, example_index in enumerate(order):
    np.testing.assert_array_equal(loaded["tough"][example_index], tough[position])
    np.testing.assert_array_equal(loaded["tolerant"][example_index], tolerant[position])
  assert loaded["tough"].dtype == np.float32
  assert not list(tmp_path.glob("cache/*.tmp*"))


@pytest.mark.parametrize("index, fragment", [
    (np.array([0, 1, 1, 3, 4]), "duplicates [1]"),
    (np.array([1, 2, 3, 4, 5]), "exactly once"),
    (np.array([0, 1, 2, 3]), "must have shape (5,)"),
    (np.array([0.0, 1, 2, 3, 4]), "must be integers"),
])
def test_bad_index_is_refused(tmp_path, index, fragment):
  tough, tolerant = _predictions()
  with pytest.raises(tc.TeacherCacheError) as error:
    tc.write_teacher_cache(tmp_path / "c.npz", index=index, tough=tough, tolerant=tolerant)
  assert fragment in str(error.value) and "c.npz" in str(error.value)
  assert not (tmp_path / "c.npz").exists()


def test_bad_predictions_are_refused(tmp_path):
  tough, tolerant = _predictions()
  index = np.arange(5)
  with pytest.raises(tc.TeacherCacheError, match=r"tough must be \[N, K, 2\]"):
    tc.write_teacher_cache(tmp_path / "c.npz", index=index, tough=tough[..., :1], tolerant=tolerant)
  with pytest.raises(tc.TeacherCacheError, match="shapes differ"):
    tc.write_teacher_cache(tmp_path / "c.npz", index=index, tough=tough, tolerant=tolerant[:, :3])
  bad = tolerant.copy()
  bad[2, 1, 0] = np.nan
  with pytest.raises(tc.TeacherCacheError, match="tolerant contains NaN"):
    tc.write_teacher_cache(tmp_path / "c.npz", index=index, tough=tough, tolerant=bad)
  with pytest.raises(tc.TeacherCacheError, match="empty"):
    tc.write_teacher_cache(tmp_path / "c.npz", index=np.arange(0), tough=tough[:0], tolerant=tolerant[:0])


def test_load_checks_file_and_split(tmp_path):
  with pytest.raises(tc.TeacherCacheError, match="no teacher cache"):
    tc.load_teacher_cache(tmp_path / "missing.npz")
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(tc.TeacherCacheError, match="not a readable .npz"):
    tc.load_teacher_cache(tmp_path / "junk.npz")
  np.savez(tmp_path / "partial.npz", tough=np.zeros((2, 4, 2), np.float32))
  with pytest.raises(tc.TeacherCacheError, match=r"missing arrays \['tolerant', 'index'\]"):
    tc.load_teacher_cache(tmp_path / "partial.npz")
  tough, tolerant = _predictions()
  path = tc.write_teacher_cache(tmp_path / "c.npz", index=np.arange(5), tough=tough, tolerant=tolerant)
  with pytest.raises(tc.TeacherCacheError, match="5 rows but the split has 6 examples"):
    tc.load_teacher_cache(path, num_examples=6)
  with pytest.raises(tc.TeacherCacheError, match="4 landmarks, expected 68"):
    tc.load_teacher_cache(path, num_landmarks=68)
