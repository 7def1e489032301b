"""In-memory data and a trivial model for the training tests (no dataset, no real network needed)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from kd_landmarks import augment
from kd_landmarks import losses
from kd_landmarks.training import train
from kd_landmarks.datasets import flips
from kd_landmarks.models import layers

NUM_LANDMARKS = 68  # The synthetic (iBUG) layout, so that NME's eye corners exist.
STORED_SIZE = 16
IMAGE_SIZE = 8


class TinyModel(nn.Module):
  """Conv + BatchNorm + Dense: has params and batch statistics, like the real models."""
  num_landmarks: int = NUM_LANDMARKS

  @nn.compact
  def __call__(self, images, train=False, batch_mask=None, sync_axis=None):
    # No conv bias: BatchNorm cancels it, leaving a zero gradient whose Adam sign is pure rounding noise.
    x = nn.Conv(4, (3, 3), strides=(2, 2), use_bias=False)(images)
    # The models' BatchNorm (synchronised over devices and masked on padding rows in training).
    norm = layers.batch_norm(train=train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                             param_dtype=jnp.float32, batch_mask=batch_mask, axis_name=sync_axis)
    x = norm(activation="relu6", name="BatchNorm_0")(x).mean(axis=(1, 2))
    return nn.Dense(self.num_landmarks * 2)(x).reshape(images.shape[0], self.num_landmarks, 2) * 0.1


class InMemorySource:
  """A random-access source shaped like datasets.load_split's (keys of docs/contracts.md)."""

  def __init__(self, num_examples, seed=0):
    rng = np.random.default_rng(seed)
    centre = STORED_SIZE / 2 - 0.5
    self.landmarks = (centre + rng.uniform(-4, 4, (num_examples, NUM_LANDMARKS, 2))).astype(np.float32)
    self.images = rng.integers(0, 256, (num_examples, STORED_SIZE, STORED_SIZE, 3), dtype=np.uint8)
    self.soft = (self.landmarks + rng.normal(0, 0.3, self.landmarks.shape)).astype(np.float32)
    # crop -> original: scale 2, offset (10, 20).
    self.crop_to_original = np.array([[2, 0, 10], [0, 2, 20]], np.float32)
    self.metadata = {"stored_crop_size": STORED_SIZE}  # As a prepared split's (the teacher cache records it).

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "landmarks": self.landmarks[i], "soft_landmarks": self.soft[i],
            "landmarks_original": self.landmarks[i] * 2 + np.array([10, 20], np.float32),
            "crop_to_original": self.crop_to_original, "image_id": f"img{i}",
            "attributes": np.zeros(6, np.int32), "occluded": np.zeros(NUM_LANDMARKS, np.int32),
            "index": np.int64(i)}


def make_spec(target="landmarks", loss="l2", *, learning_rate=1e-2, decay=1e-6, teacher_modules=None):
  learning_rate_fn = lambda step: learning_rate / (1.0 + decay * jnp.asarray(step, jnp.float32))
  config = augment.AugmentConfig(rotation=True, max_rotation_degrees=10.0)
  return train.StepSpec(target=target, loss_fn=losses.get_student_loss(loss), loss_variant="paper",
                        image_size=IMAGE_SIZE, flip_permutation=flips.flip_permutation(NUM_LANDMARKS),
                        augment_config=config, learning_rate_fn=learning_rate_fn,
                        distill=target == "student" and loss.startswith("kd"), teacher_modules=teacher_modules)


def make_tx(learning_rate=1e-2):
  import optax
  return optax.adam(lambda step: learning_rate / (1.0 + 1e-6 * step))


def make_batch(source, indices, keys=("image", "landmarks", "index")):
  examples = [source[i] for i in indices]
  return {k: np.stack([e[k] for e in examples]) for k in keys}


def fit_setup(model_dir, *, num_train_steps=6, num_examples=16, batch_size=4, checkpoint_every=2,
              stop_after_steps=None, validate=False, mesh=None, input_cache_bytes=0):
  from kd_landmarks.evaluation import evaluate
  source = InMemorySource(num_examples)
  model = TinyModel()
  meta = dict(model="tiny", num_landmarks=NUM_LANDMARKS, image_size=IMAGE_SIZE, dataset="synthetic",
              overrides={}, dtype="float32", phase="teacher_tough", loss="l2")
  validate_fn = None
  if validate:
    validate_fn = functools.partial(evaluate.mean_nme, model, source=InMemorySource(6, seed=1),
                                    dataset="synthetic", image_size=IMAGE_SIZE, batch_size=4, mesh=mesh)
  return train.FitSetup(
      model_dir=model_dir, model=model, spec=make_spec(), train_source=source, global_batch_size=batch_size,
      num_train_steps=num_train_steps, seed=0, tx=make_tx(), meta=meta, log_every_steps=2,
      checkpoint_every_steps=checkpoint_every, prefetch=1, mesh=mesh, stop_after_steps=stop_after_steps,
      validate_fn=validate_fn, input_cache_bytes=input_cache_bytes)
