"""A subprocess for the parallel / multi-host / kill-and-resume tests: runs train.fit on in-memory data.

  python tests/train_worker.py fit OUT.npz MODEL_DIR [MODEL_DIR ...] [--steps N] [--devices D]
      [--process_id I --num_processes P --coordinator HOST:PORT]
  python tests/train_worker.py pmap_vs_shard_map OUT.npz --devices 2
  python tests/train_worker.py device_counts OUT.npz --devices 8 [--model NAME] [--batch B] [--dtype bfloat16]
  python tests/train_worker.py lock OUT.json WORKDIR --process_id I --num_processes P --coordinator HOST:PORT
  python tests/train_worker.py evaluate OUT.npz [--process_id I --num_processes P --coordinator HOST:PORT]

Writes the final params (flattened) of the last MODEL_DIR to OUT.npz. XLA_FLAGS must be set before jax
is imported, hence the subprocess.
"""
import argparse
import os
import sys


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["fit", "pmap_vs_shard_map", "device_counts", "evaluate", "lock"])
  parser.add_argument("out")
  parser.add_argument("model_dirs", nargs="*")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--checkpoint_every", type=int, default=2)
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--model", default="mobilenet_v2_tiny")
  parser.add_argument("--batch", type=int, default=70)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from kd_landmarks.training import parallel
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  import numpy as np
  if args.mode == "lock":
    lock_both_ways(args.out, args.model_dirs[0])
    return
  if args.mode == "fit":
    import train_fixtures as fx
    from kd_landmarks.training import train
    for model_dir in args.model_dirs:
      variables = train.fit(fx.fit_setup(model_dir, num_train_steps=args.steps, batch_size=4,
                                         checkpoint_every=args.checkpoint_every))
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
  elif args.mode == "evaluate":
    flat = evaluate_in_memory()
  elif args.mode == "device_counts":
    flat = step_on_each_device_count(args.model, args.batch, args.dtype)
  else:
    flat = pmap_vs_shard_map()
  np.savez(args.out, **flat)
  print(f"worker {args.process_id}: {jax.process_count()} processes, {jax.device_count()} devices, done")


def lock_both_ways(out, workdir):
  """Every process takes the workdir lock (only process 0 touches the file), then process 0 releases it
  and a foreign run's lock appears: every process must now stop with process 0's message."""
  import json
  import jax
  from kd_landmarks.training import workdir_lock
  index, count = jax.process_index(), jax.process_count()
  result = {}
  lock = workdir_lock.acquire(workdir, process_index=index, process_count=count)
  result["first_holds_file"] = lock.path is not None
  result["file_exists"] = os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  lock.release()
  if index == 0:
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
      json.dump({"pid": 4242, "host": "node-17", "time": 0.0, "argv": ["other"], "token": "t"}, f)
  try:
    workdir_lock.acquire(workdir, process_index=index, process_count=count)
    result["second"] = "acquired"
  except workdir_lock.WorkdirLockedError as error:
    result["second"] = str(error)
  with open(out, "w") as f:
    json.dump(result, f)


def evaluate_in_memory():
  """evaluate.predict_source and split_metrics of a fixed tiny model on 11 in-memory examples (an odd
  count: the last batch is padded and masked, and the processes' blocks differ in size)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import train_fixtures as fx
  from kd_landmarks import metrics as metrics_lib
  from kd_landmarks.evaluation import evaluate
  model = fx.TinyModel()
  variables = model.init(jax.random.PRNGKey(4), jnp.zeros((1, fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3)))
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda x: x + 0.3, variables["batch_stats"])}
  result = evaluate.predict_source(model, variables, fx.InMemorySource(11, seed=2), image_size=fx.IMAGE_SIZE,
                                   batch_size=4)
  metrics = metrics_lib.split_metrics(result["pred"], result["gt"], dataset="synthetic")
  out = {key: np.asarray(result[key]) for key in ("pred", "pred_crop", "gt", "index")}
  out["image_id"] = np.asarray(result["image_id"]).astype(str)
  out.update({f"metric_{key}": np.asarray(value) for key, value in metrics.items()})
  return out


def pmap_vs_shard_map():
  """The same train step under jax.pmap and under jit(shard_map) on all local devices."""
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  import train_fixtures as fx
  from kd_landmarks.training import parallel
  from kd_landmarks.training import train
  devices = jax.device_count()
  source = fx.InMemorySource(16)
  spec = fx.make_spec()
  batch = train.step_batch(spec, fx.make_batch(source, range(2 * devices)))  # As fit gives it to the step.
  state = train.create_train_state(jax.random.PRNGKey(0), fx.TinyModel(), fx.IMAGE_SIZE, fx.make_tx())
  rng = jax.random.PRNGKey(3)

  pmapped = jax.pmap(functools.partial(train.regression_step, spec=spec), axis_name=parallel.AXIS,
                     in_axes=(0, 0, None))
  replicated = jax.tree.map(lambda x: jnp.stack([x] * devices), state)
  per_device = jax.tree.map(lambda x: x.reshape((devices, -1) + x.shape[1:]), batch)
  pmap_state = replicated
  for step in range(2):
    pmap_state, pmap_metrics = pmapped(pmap_state, per_device, jax.random.fold_in(rng, step))

  mesh = parallel.make_mesh()
  compiled = train.compile_train_step(spec, mesh)
  shard_state = jax.tree.map(jnp.copy, state)
  sharded_batch = parallel.shard_host_batch(batch, mesh)
  for step in range(2):
    shard_state, shard_metrics = compiled(shard_state, sharded_batch, jax.random.fold_in(rng, step))
  out = {}
  for name, tree in (("pmap", jax.tree.map(lambda x: x[0], pmap_state.params)),
                     ("pmap_device1", jax.tree.map(lambda x: x[devices - 1], pmap_state.params)),
                     ("shard_map", shard_state.params),
                     ("single", _single_device_reference(spec, state, batch, rng))):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      out[f"{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  out["pmap_loss"] = np.asarray(pmap_metrics["loss"][0])
  out["shard_map_loss"] = np.asarray(shard_metrics["loss"])
  return out


def step_on_each_device_count(model_name, batch_size, dtype):
  """One train step (SGD, so the update is the gradient) of the same ``batch_size`` examples on meshes of 1,
  2, 4 and 8 devices: the loss, the updated params (``-lr * grad``) and the batch statistics of each."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import train_fixtures as fx
  from kd_landmarks import models
  from kd_landmarks.training import input_pipeline
  from kd_landmarks.training import parallel
  from kd_landmarks.training import train
  import dataclasses
  source = fx.InMemorySource(batch_size + 5)
  # 32 px: the tiny networks keep a 2x2 map to their last stage (at 8 px BatchNorm sees 1x1 maps, and
  # float32 rounding alone moves the early layers' gradients by up to 1%).
  spec = dataclasses.replace(fx.make_spec(), image_size=32)
  if model_name == "fixture":
    model = fx.TinyModel()
  else:
    model = models.create_model(model_name, num_landmarks=fx.NUM_LANDMARKS, dtype=jnp.dtype(dtype))
  tx = optax.sgd(1.0)
  state0 = train.create_train_state(jax.random.PRNGKey(0), model, spec.image_size, tx)
  rng = jax.random.PRNGKey(3)
  out = {}
  for devices in (1, 2, 4, 8):
    if devices > jax.device_count():
      continue
    mesh = parallel.make_mesh(jax.devices()[:devices])
    rows = parallel.padded_batch_size(batch_size, devices)
    batches = input_pipeline.make_train_iterator(
        source, global_batch_size=batch_size, seed=0, num_steps=1, num_threads=0, keys=("image", "landmarks"),
        padded_batch_size=rows if rows > batch_size else None)
    batch = train.step_batch(spec, next(batches))
    out[f"rows_{devices}"] = np.asarray(rows)
    step = train.compile_train_step(spec, mesh)
    state, metrics = step(jax.tree.map(jnp.copy, state0), parallel.shard_host_batch(batch, mesh), rng)
    out[f"loss_{devices}"] = np.asarray(metrics["loss"])
    for name, tree in (("params", state.params), ("stats", state.batch_stats)):
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[f"{name}_{devices}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state0.params):
      out[f"params_init{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  return out


def _single_device_reference(spec, state, batch, rng):
  """Not the same computation (one device draws one augmentation for the whole batch): returned so the
  test can check the two-device runs really differ from it, i.e. that the device axis was used."""
  import jax
  import jax.numpy as jnp
  from kd_landmarks.training import parallel
  from kd_landmarks.training import train
  mesh = parallel.make_mesh(jax.devices()[:1])
  compiled = train.compile_train_step(spec, mesh)
  single = jax.tree.map(jnp.copy, state)
  for step in range(2):
    single, _ = compiled(single, parallel.shard_host_batch(batch, mesh), jax.random.fold_in(rng, step))
  return single.params


if __name__ == "__main__":
  main()
