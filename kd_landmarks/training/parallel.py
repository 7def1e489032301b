"""Data parallelism: the device mesh, shard_map-compiled steps, host <-> global arrays, multi-host start.

Every step runs per device under ``jax.shard_map`` over a 1-D mesh axis named ``'data'`` (what ``jax.pmap``
compiles to since JAX 0.8): the batch is split along its first axis (padded to a multiple of the devices,
:func:`padded_batch_size`), the train state is replicated, and the step itself sums the devices' gradients
and BatchNorm statistics with ``lax.psum(..., 'data')`` (kd_landmarks/training/train.py). On several hosts each
process feeds only its contiguous block of the global batch (``input_pipeline.make_train_iterator`` with
the process index) and the same program runs on every process (SPMD).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
# Environment variables that launch/ scripts (or a user) set to start a multi-host run explicitly.
ENV_COORDINATOR = "KD_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "KD_NUM_PROCESSES"
ENV_PROCESS_ID = "KD_PROCESS_ID"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` when this process is one of several; returns whether it did.

  Explicit arguments (or the KD_* environment variables) win; otherwise a SLURM job with several tasks or
  a multi-worker Cloud TPU VM slice is detected and JAX's own cluster detection fills in the details.
  Must run before anything touches a device.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError(
          f"a coordinator address ({coordinator_address}) needs the process count and this process' id: "
          f"set --num_processes/--process_id or {ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}")
    if num_processes > 1:
      jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id)
      return True
    return False
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _is_multiworker_tpu():
    jax.distributed.initialize()  # JAX's cluster detection reads SLURM / TPU metadata.
    return True
  return False


def _is_multiworker_tpu() -> bool:
  hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hostnames.split(",") if h]) > 1


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh ``('data',)`` over all devices of all processes (or the given ones).

  Ordered by (process, device id), so that process p's devices hold the p-th contiguous block of every batch:
  the block the input pipeline gives process p, and the order in which host arrays are gathered.
  """
  devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def compile_step(step_fn: Callable, mesh: jax.sharding.Mesh, *, in_specs, out_specs,
                 donate_argnums: Sequence[int] = ()) -> Callable:
  """``jax.jit(jax.shard_map(step_fn))``: ``step_fn`` sees per-device blocks and may use collectives over ``'data'``."""
  mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  return jax.jit(mapped, donate_argnums=tuple(donate_argnums))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicated_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def padded_batch_size(global_batch_size: int, num_devices: int) -> int:
  """The rows a training batch of ``global_batch_size`` examples occupies on ``num_devices`` devices: the next
  multiple of the device count. The extra rows are padding that the step masks out (loss, gradient and
  BatchNorm statistics), so any batch size trains as that batch on any device count (70, the paper's student
  batch, is 72 rows on 8 devices, 2 of them padding)."""
  if global_batch_size < 1 or num_devices < 1:
    raise ValueError(f"a batch of {global_batch_size} examples on {num_devices} devices")
  return -(-global_batch_size // num_devices) * num_devices


def describe_batch(global_batch_size: int, num_devices: int) -> str:
  """The log line of a training batch's layout over the devices."""
  padded = padded_batch_size(global_batch_size, num_devices)
  text = f"global batch {global_batch_size} over {num_devices} device(s): {padded // num_devices} rows per device"
  if padded > global_batch_size:
    text += f", {padded - global_batch_size} padding row(s) masked out of the loss and BatchNorm"
  return text


def shard_host_batch(local_batch: Any, mesh) -> Any:
  """This process' slice of a batch (numpy pytree) -> global arrays sharded along 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def replicate(tree: Any, mesh) -> Any:
  """A host pytree (identical on every process) -> global arrays replicated on every device."""
  sharding = replicated_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def fetch_replicated(tree: Any) -> Any:
  """Replicated global arrays -> numpy, reading this process' own copy (works on every host)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array)
                      else np.asarray(x), tree)


def fetch_batch(tree: Any) -> Any:
  """Arrays sharded along 'data' -> the whole global batch as numpy on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)
