"""Shared by test_predict.py and test_export.py: a tiny freshly initialised student saved as a model dir."""
import pathlib

import jax
import numpy as np
import jax.numpy as jnp

from kd_landmarks.training import checkpoint
from kd_landmarks.deploy import export
from kd_landmarks import models

TAKEO_DIR = pathlib.Path(export.FIXTURE_DIR)  # shipped in the package
TINY_MODEL = "mobilenet_v2_tiny"
TINY_IMAGE_SIZE = 64


def tiny_student(num_landmarks: int = 68, image_size: int = TINY_IMAGE_SIZE, seed: int = 0):
  """(module, variables, meta) of an untrained tiny MobileNetV2, as load_inference_variables returns."""
  module = models.create_model(TINY_MODEL, num_landmarks=num_landmarks)
  shapes = jax.eval_shape(
      lambda rng: module.init(rng, jnp.zeros((1, image_size, image_size, 3)), train=False),
      jax.random.PRNGKey(0))
  variables = random_variables(shapes, seed)
  meta = {"model": TINY_MODEL, "num_landmarks": num_landmarks, "image_size": image_size,
          "dataset": "300w", "overrides": {}, "dtype": "float32"}
  return module, variables, meta


def write_model_dir(model_dir, *, config: dict | None = None, **kwargs) -> str:
  """Saves a tiny student the way training does (model.json + best/ checkpoint); ``config``: the
  training config model.json records (what the model card reads)."""
  module, variables, meta = tiny_student(**kwargs)
  if config is not None:
    meta = dict(meta, config=config, phase="student", loss="kd")
  model_dir = str(model_dir)
  checkpoint.write_model_json(model_dir, meta)
  checkpoint.save_best(checkpoint.best_manager(model_dir), 1, variables, 0.1)
  return model_dir


def random_variables(shapes, seed: int):
  """Random variables of the given structure, without compiling ``module.init`` (a minute on 2 busy cores).

  He-normal kernels, and non-trivial batch statistics (mean != 0, var != 1) so that exporters that fold
  batch norm into convolutions are really exercised.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    shape = leaf.shape
    if "kernel" in name:
      fan_in = int(np.prod(shape[:-1])) or 1
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif "scale" in name:
      value = rng.uniform(0.5, 1.5, shape)
    elif "var" in name:
      value = rng.uniform(0.5, 2.0, shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, shape)
    return jnp.asarray(value, dtype=leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
