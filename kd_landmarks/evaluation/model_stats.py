"""Model size and cost, in the style of the paper's Table 5 (params, FLOPs) and Table 6 (size in MB).

    python -m kd_landmarks.evaluation.model_stats [--num_landmarks 68] [--image_size 224] [--models mobilenet_v2,...]

Conventions (stated because frameworks differ):
  * Params are the trainable parameters (the ``params`` collection): convolution kernels, biases and
    BatchNorm scale/bias. BatchNorm moving mean/variance (``batch_stats``) are not counted, which is
    what Keras reports as "trainable params" and what the paper's 2.4 M (mnv2) means. They are listed
    separately.
  * FLOPs come from XLA's cost analysis of the lowered inference forward at batch 1, with the
    ``lax`` depthwise convolution (the shifted-slices CPU path is the same arithmetic in another form).
    XLA counts a multiply-add as 2 FLOPs; MACs = FLOPs / 2. The paper's "FLOPs" for mnv2 (0.6 G) are
    XLA FLOPs; its EfficientNet-B3 figure (1.8 B) is the published multiply-adds at 300 px.
  * Size is params + BatchNorm statistics stored at 4 (float32) or 2 (float16) bytes each, in
    MB = 10^6 bytes: what a weights file without compression holds.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from kd_landmarks import models


def count_parameters(tree) -> int:
  """Number of scalars in a pytree of arrays or ``ShapeDtypeStruct``s."""
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(tree)))


def abstract_variables(model, image_size: int):
  """The model's variables as shapes only (``jax.eval_shape``: no compile, no memory)."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))


def forward_flops(model, variables, image_size: int) -> float:
  """XLA's FLOP count for one image (inference; lowered only, no compile)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX returned one dict per device.
    analysis = analysis[0]
  return float(analysis["flops"])


def model_stats(name: str, *, num_landmarks: int = 68, image_size: int = 224) -> dict:
  """Params (total, backbone, head), BatchNorm statistics, GFLOPs, GMACs, MB at float32/float16."""
  model = models.create_model(name, num_landmarks=num_landmarks)
  variables = abstract_variables(model, image_size)
  params = count_parameters(variables["params"])
  head = count_parameters(variables["params"]["head"])
  batch_stats = count_parameters(variables.get("batch_stats", {}))
  flops = forward_flops(model, variables, image_size)
  stored = params + batch_stats
  return dict(model=name, num_landmarks=num_landmarks, image_size=image_size, params=params,
              backbone_params=params - head, head_params=head, batch_stats=batch_stats,
              gflops=flops / 1e9, gmacs=flops / 2e9, mb_float32=stored * 4 / 1e6,
              mb_float16=stored * 2 / 1e6)


def format_table(rows) -> str:
  header = ("| model | params (M) | backbone (M) | BN stats | GFLOPs | GMACs | MB fp32 | MB fp16 |\n"
            "|---|---|---|---|---|---|---|---|")
  lines = [header]
  for r in rows:
    lines.append(f"| {r['model']} | {r['params'] / 1e6:.3f} | {r['backbone_params'] / 1e6:.3f} | "
                 f"{r['batch_stats']:,} | {r['gflops']:.3f} | {r['gmacs']:.3f} | "
                 f"{r['mb_float32']:.1f} | {r['mb_float16']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_landmarks", type=int, default=68)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--models", default="mobilenet_v2,efficientnet_b3",
                      help=f"comma-separated, from {list(models.MODEL_NAMES)}")
  args = parser.parse_args(argv)
  rows = [model_stats(name.strip(), num_landmarks=args.num_landmarks, image_size=args.image_size)
          for name in args.models.split(",") if name.strip()]
  print(f"Table 5/6 style, {args.num_landmarks} landmarks, {args.image_size}x{args.image_size} input "
        "(params exclude BatchNorm moving statistics; GFLOPs from XLA, = 2 x MACs):")
  print(format_table(rows))


if __name__ == "__main__":
  main()
