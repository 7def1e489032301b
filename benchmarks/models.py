"""Speed of the student (MobileNetV2) and teacher (EfficientNet-B3): JAX against peers, same run.

Measures, at 224 px by default:
  * forward latency at batch 1 (jitted JAX; PyTorch eager, channels-last; ONNX Runtime on the
    PyTorch model exported with torch.onnx and on ours exported by ``kd_landmarks.deploy.export``), median
    milliseconds;
  * train-step throughput (forward + backward + Adam, MSE on the coordinates, BatchNorm in training
    mode), batch 8 on CPU, median images/second;
and prints ratios JAX / peer. The PyTorch models are written here (no torchvision) to match the Flax
ones layer for layer, including the Dense(2K) head; their parameter counts are printed as a check.

JAX runs with the kernels training takes on this platform (``config.cpu_kernels``: kd_landmarks/cpu on the CPU,
the portable ones elsewhere) and with every combination of ``models.Kernels`` fields that ``--depthwise``,
``--norm`` and ``--pointwise`` name (depthwise: lax, xla, native; BatchNorm: flax, xla, native; 1x1: conv,
dot), and prints the training kernels' train throughput against the fastest other combination timed.

CPU (pin the cores so every framework gets the same ones; the figures are medians):
  taskset -c 0,1 python benchmarks/models.py                # full run
  python benchmarks/models.py --quick                       # a few iterations at 64 px: checks it runs
  python benchmarks/models.py --models student --peers torch --depthwise all --norm all --pointwise all
GPU (JAX only; peers need a CUDA PyTorch, use --peers torch to try):
  python benchmarks/models.py --platform gpu --dtype bfloat16 --batch 256 --models student
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks import timing  # noqa: E402

MODEL_NAMES = {"student": "mobilenet_v2", "teacher": "efficientnet_b3"}


def model_name(role):
  """The kd_landmarks model of a role ('student', 'teacher'), or ``role`` itself (any models.MODEL_NAMES entry,
  JAX only: the PyTorch peers exist for the two roles)."""
  return MODEL_NAMES.get(role, role)
NUM_LANDMARKS = 68


# ----------------------------------------------------------------------------------------------- JAX

def jax_callables(role, args, kernels):
  """(forward at batch 1, train step at args.batch, compile seconds): compiled and run once.

  ``kernels`` (a ``models.Kernels``) computes both: the forward pass and the train step.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from kd_landmarks import models

  device = jax.devices(args.platform)[0]
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  model = models.create_model(model_name(role), num_landmarks=NUM_LANDMARKS, dtype=dtype, kernels=kernels)
  size = args.image_size
  with jax.default_device(device):
    rng = jax.random.key(0)
    images = jax.random.uniform(rng, (args.batch, size, size, 3), jnp.float32)
    targets = jax.random.uniform(rng, (args.batch, NUM_LANDMARKS, 2), jnp.float32) - 0.5
    variables = jax.jit(lambda x: model.init(rng, x, train=False))(images[:1])
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(variables["params"])
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def adam_step(params, batch_stats, opt_state, images, targets, key):
      def loss_fn(params):
        pred, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"], rngs={"dropout": key})
        return jnp.mean((pred - targets) ** 2), updates["batch_stats"]
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    step = jax.jit(adam_step, donate_argnums=(0, 1, 2))
    one = images[:1]
    start = time.perf_counter()
    forward(variables, one).block_until_ready()
    # The train step donates the state it is given: it trains a copy, so the forward keeps its variables.
    state = jax.tree_util.tree_map(jnp.copy, [variables["params"], variables["batch_stats"], opt_state])
    key = jax.random.key(1)
    state[:] = step(*state, images, targets, key)[:3]
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start

  def run_forward():
    forward(variables, one).block_until_ready()

  def run_step():
    outputs = step(state[0], state[1], state[2], images, targets, key)
    state[:] = outputs[:3]
    jax.block_until_ready(outputs[3])

  return run_forward, run_step, compile_s


# The kernels that exist for each field of ``models.Kernels``, by name (kd_landmarks/models/layers.py: the
# portable ones; kd_landmarks/cpu/kernels.py: the CPU training ones). 'native' needs the native CPU kernels
# (kd_landmarks/cpu/native), so it runs on the CPU only.
DEPTHWISE = ("lax", "xla", "native")   # grouped lax.conv; shifted slices, weight gradient in XLA / native.
NORM = ("flax", "xla", "native")       # flax.linen.BatchNorm; closed-form backward, reductions in XLA / native.
POINTWISE = ("conv", "dot")            # 1x1 lax.conv; a 2-D matrix product.


def kernel_functions():
  """{field: {name: function}} for the names above."""
  from kd_landmarks.cpu import kernels
  from kd_landmarks.models import depthwise
  from kd_landmarks.models import layers
  return {
      "depthwise_conv": {"lax": depthwise.depthwise_conv, "xla": kernels.depthwise_conv_xla,
                         "native": kernels.depthwise_conv_native},
      "batch_norm_train": {"flax": None, "xla": kernels.batch_norm_train_xla,
                           "native": kernels.batch_norm_train_native},
      "pointwise_conv": {"conv": layers.pointwise_conv, "dot": kernels.pointwise_conv_dot},
  }


def build_kernels(depthwise_name, norm_name, pointwise_name):
  """The ``models.Kernels`` of these names."""
  from kd_landmarks import models
  functions = kernel_functions()
  return models.Kernels(depthwise_conv=functions["depthwise_conv"][depthwise_name],
                        batch_norm_train=functions["batch_norm_train"][norm_name],
                        pointwise_conv=functions["pointwise_conv"][pointwise_name])


def kernel_names(kernels):
  """(depthwise, norm, pointwise) names of a ``models.Kernels`` built from the functions above."""
  functions = kernel_functions()
  return tuple(next(name for name, fn in functions[field].items() if fn is getattr(kernels, field))
               for field in ("depthwise_conv", "batch_norm_train", "pointwise_conv"))


def jax_name(depthwise_name, norm_name, pointwise_name):
  return f"JAX[depthwise {depthwise_name}, norm {norm_name}, 1x1 {pointwise_name}]"


def training_kernels():
  """The ``cpu.TrainingKernels`` a training run on this platform takes with the default config
  (``config.cpu_kernels``: the CPU kernels on the CPU, the portable ones elsewhere)."""
  from kd_landmarks import config_lib
  from kd_landmarks.training import train
  return train.training_kernels(config_lib.base_config())


# ------------------------------------------------------------------------------------------- PyTorch

def torch_models():
  """PyTorch MobileNetV2 and EfficientNet with the same layers and head as kd_landmarks.models."""
  import math
  import torch
  from torch import nn

  from kd_landmarks.models.efficientnet import BASE_STAGES, VARIANTS, round_filters, round_repeats
  from kd_landmarks.models.layers import IMAGENET_MEAN, IMAGENET_STD, make_divisible
  from kd_landmarks.models.mobilenet_v2 import INVERTED_RESIDUAL_SETTINGS

  def conv_bn(cin, cout, k, stride, groups, act):
    # TF SAME padding for stride 2 on even inputs pads (0, 1); symmetric k//2 has the same cost.
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]
    if act is not None:
      layers.append(act())
    return nn.Sequential(*layers)

  class Head(nn.Module):
    def __init__(self, channels, dropout):
      super().__init__()
      self.dropout = nn.Dropout(dropout)
      self.fc = nn.Linear(channels, 2 * NUM_LANDMARKS)

    def forward(self, x):
      return self.fc(self.dropout(x.mean((2, 3)))).view(x.shape[0], NUM_LANDMARKS, 2)

  class Normalize(nn.Module):
    def __init__(self):
      super().__init__()
      self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
      self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
      return (x - self.mean) / self.std

  class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, t, stride):
      super().__init__()
      hidden = cin * t
      layers = [conv_bn(cin, hidden, 1, 1, 1, nn.ReLU6)] if t != 1 else []
      layers += [conv_bn(hidden, hidden, 3, stride, hidden, nn.ReLU6), conv_bn(hidden, cout, 1, 1, 1, None)]
      self.body = nn.Sequential(*layers)
      self.residual = stride == 1 and cin == cout

    def forward(self, x):
      return x + self.body(x) if self.residual else self.body(x)

  class TorchMobileNetV2(nn.Module):
    def __init__(self):
      super().__init__()
      layers = [Normalize(), conv_bn(3, 32, 3, 2, 1, nn.ReLU6)]
      cin = 32
      for t, c, n, s in INVERTED_RESIDUAL_SETTINGS:
        for i in range(n):
          layers.append(InvertedResidual(cin, make_divisible(c), t, s if i == 0 else 1))
          cin = make_divisible(c)
      layers.append(conv_bn(cin, 1280, 1, 1, 1, nn.ReLU6))
      self.features = nn.Sequential(*layers)
      self.head = Head(1280, 0.0)

    def forward(self, x):
      return self.head(self.features(x))

  class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, t, drop):
      super().__init__()
      hidden = cin * t
      self.expand = conv_bn(cin, hidden, 1, 1, 1, nn.SiLU) if t != 1 else nn.Identity()
      self.depthwise = conv_bn(hidden, hidden, k, stride, hidden, nn.SiLU)
      squeezed = max(1, int(cin * 0.25))
      self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, squeezed, 1), nn.SiLU(),
                              nn.Conv2d(squeezed, hidden, 1), nn.Sigmoid())
      self.project = conv_bn(hidden, cout, 1, 1, 1, None)
      self.residual = stride == 1 and cin == cout
      self.drop = drop

    def forward(self, x):
      y = self.depthwise(self.expand(x))
      y = self.project(y * self.se(y))
      if not self.residual:
        return y
      if self.training and self.drop > 0:
        keep = torch.rand(y.shape[0], 1, 1, 1) < 1 - self.drop
        y = y * keep / (1 - self.drop)
      return x + y

  class TorchEfficientNet(nn.Module):
    def __init__(self, variant="b3"):
      super().__init__()
      width, depth, _, dropout = VARIANTS[variant]
      stem = round_filters(32, width)
      layers = [Normalize(), conv_bn(3, stem, 3, 2, 1, nn.SiLU)]
      cin = stem
      total = sum(round_repeats(s.repeats, depth) for s in BASE_STAGES)
      block = 0
      for s in BASE_STAGES:
        cout = round_filters(s.out_channels, width)
        for i in range(round_repeats(s.repeats, depth)):
          layers.append(MBConv(cin, cout, s.kernel_size, s.strides if i == 0 else 1, s.expansion,
                               0.2 * block / total))
          cin = cout
          block += 1
      top = round_filters(1280, width)
      layers.append(conv_bn(cin, top, 1, 1, 1, nn.SiLU))
      self.features = nn.Sequential(*layers)
      self.head = Head(top, dropout)

    def forward(self, x):
      return self.head(self.features(x))

  del math
  return {"student": TorchMobileNetV2, "teacher": TorchEfficientNet}


def torch_callables(role, args):
  """(params, forward at batch 1 in eval mode, train step at args.batch in train mode, model, one)."""
  import torch
  torch.set_num_threads(args.threads)
  model = torch_models()[role]().to(memory_format=torch.channels_last)
  params = sum(p.numel() for p in model.parameters())
  size = args.image_size
  one = torch.rand(1, 3, size, size).contiguous(memory_format=torch.channels_last)
  images = torch.rand(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
  targets = torch.rand(args.batch, NUM_LANDMARKS, 2) - 0.5
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

  def run_forward():
    model.eval()
    with torch.inference_mode():
      model(one)

  def run_step():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.mean((model(images) - targets) ** 2)
    loss.backward()
    optimizer.step()

  return params, run_forward, run_step, model, one


def onnxruntime_callable(model, one, args, tmp):
  """Forward at batch 1 in ONNX Runtime of the PyTorch model exported with torch.onnx (file in ``tmp``)."""
  import onnxruntime as ort
  import torch
  model.eval()
  path = os.path.join(tmp, "torch_model.onnx")
  try:
    torch.onnx.export(model, (one.contiguous(),), path, input_names=["images"], output_names=["landmarks"],
                      opset_version=17, dynamo=False)
  except TypeError:  # Older torch without the dynamo flag.
    torch.onnx.export(model, (one.contiguous(),), path, input_names=["images"], output_names=["landmarks"],
                      opset_version=17)
  options = ort.SessionOptions()
  options.intra_op_num_threads = args.threads
  options.inter_op_num_threads = 1
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  feed = {"images": one.contiguous().numpy()}
  return lambda: session.run(None, feed)


def our_onnx_callable(role, args, tmp):
  """Forward at batch 1 in ONNX Runtime of the same architecture exported by ``kd_landmarks.deploy.export``
  (uint8 NHWC in; file in ``tmp``)."""
  import jax
  import jax.numpy as jnp
  from kd_landmarks.deploy import export
  from kd_landmarks import models

  model = models.create_model(model_name(role), num_landmarks=NUM_LANDMARKS)  # The portable kernels.
  size = args.image_size
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
      jnp.zeros((1, size, size, 3), jnp.float32))
  image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.uint8)
  path = os.path.join(tmp, "our_model.onnx")
  with open(path, "wb") as f:
    f.write(export.to_onnx_model(model, variables, size).SerializeToString())
  session = export.ort_session(path, threads=args.threads)
  return lambda: export.run_onnx(session, image)


# ---------------------------------------------------------------------------------------------- main

def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="3 iterations at 64 px: checks that it runs")
  parser.add_argument("--models", default="student,teacher",
                      help="comma-separated: student, teacher, or kd_landmarks model names (e.g. mobilenet_v2_tiny; "
                           "JAX and ONNX Runtime on our export only)")
  parser.add_argument("--platform", default="cpu", help="jax platform: cpu, gpu, tpu")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, default=8, help="train-step batch size")
  parser.add_argument("--image_size", type=int, default=None, help="default 224 (64 with --quick)")
  parser.add_argument("--iterations", type=int, default=None, help="timed forward iterations (default 50)")
  parser.add_argument("--train_iterations", type=int, default=None,
                      help="timed train steps (default: iterations / 5 on CPU, = iterations elsewhere)")
  parser.add_argument("--warmup", type=int, default=None)
  parser.add_argument("--depthwise", default="training",
                      help=f"comma-separated depthwise kernels to time for JAX, among {', '.join(DEPTHWISE)}; "
                           "'training': the one training takes here (config.cpu_kernels); 'all': every one this "
                           "platform runs")
  parser.add_argument("--norm", default="training",
                      help=f"comma-separated training BatchNorm kernels, among {', '.join(NORM)}, or 'training' "
                           "or 'all'; JAX is timed for every combination of --depthwise, --norm and --pointwise")
  parser.add_argument("--pointwise", default="training",
                      help=f"comma-separated 1x1 convolution kernels, among {', '.join(POINTWISE)}, or 'training' "
                           "or 'all'")
  parser.add_argument("--peers", default=None,
                      help="comma-separated: torch, onnxruntime (default both on CPU, none elsewhere)")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="threads for PyTorch / ONNX Runtime (default: the cores this process may use)")
  parser.add_argument("--native_march", default="native",
                      help="-march for the native kernels (e.g. haswell or znver3: another CPU's build, timed "
                           "here; with XLA_FLAGS=--xla_cpu_max_isa=AVX2 ATEN_CPU_CAPABILITY=avx2 "
                           "ONEDNN_MAX_CPU_ISA=AVX2 for an AVX2-only run of every framework)")
  args = parser.parse_args(argv)
  if args.native_march != "native":
    import tempfile
    os.environ["KD_LANDMARKS_NATIVE_MARCH"] = args.native_march
    os.environ["KD_LANDMARKS_NATIVE_CACHE"] = os.path.join(tempfile.gettempdir(),
                                                           f"kd_landmarks-native-{args.native_march}")
  # The same malloc for every framework timed here: glibc's, or the one LD_PRELOAD names (e.g. tcmalloc).
  malloc = f"{os.environ['LD_PRELOAD']} (LD_PRELOAD)" if os.environ.get("LD_PRELOAD") else "glibc default"
  args.image_size = args.image_size or (64 if args.quick else 224)
  args.iterations = args.iterations or (3 if args.quick else 50)
  args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
  if args.train_iterations is None:
    # On CPU a train step costs ~50 forwards: time fewer of them.
    args.train_iterations = args.iterations if args.quick or args.platform != "cpu" else max(
        3, args.iterations // 5)
  if args.peers is None:
    args.peers = "torch,onnxruntime" if args.platform == "cpu" else ""
  peers = {p for p in args.peers.split(",") if p}

  import jax
  if args.platform == "cpu":
    # The training kernels follow jax.default_backend(): on a GPU host they would otherwise be the GPU's
    # (the portable ones) in a CPU benchmark.
    jax.config.update("jax_platforms", "cpu")
  from kd_landmarks.cpu import native
  training = training_kernels()
  training_names = kernel_names(training.model)
  native_ok = args.platform == "cpu" and native.available()

  def chosen(flag, value, names, index):
    if value == "training":
      return [training_names[index]]
    if value == "all":  # Every kernel this platform runs (the native ones are CPU custom calls).
      return [name for name in names if name != "native" or native_ok]
    unknown = sorted(set(value.split(",")) - set(names))
    if unknown:
      parser.error(f"--{flag}: unknown {unknown}; choose from {', '.join(names)}, 'training' or 'all'")
    return value.split(",")

  combinations = [(d, n, p) for d in chosen("depthwise", args.depthwise, DEPTHWISE, 0)
                  for n in chosen("norm", args.norm, NORM, 1)
                  for p in chosen("pointwise", args.pointwise, POINTWISE, 2)]
  if any("native" in combination for combination in combinations) and not native_ok:
    parser.error(f"the native kernels run on the CPU only, where they build: "
                 f"{native.unavailable_reason() if args.platform == 'cpu' else 'platform ' + args.platform}")
  # The training kernels are always timed: the other combinations are measured against them.
  if training_names not in combinations:
    combinations.append(training_names)
  from kd_landmarks.training import machine
  print(f"jax {jax.__version__} on {jax.devices(args.platform)[0].device_kind}; CPU {machine.cpu_description()}; "
        f"cores usable: {len(os.sched_getaffinity(0))}; image {args.image_size}px; train batch {args.batch}; "
        f"dtype {args.dtype}; training kernels: {training.description} = {jax_name(*training_names)}; "
        f"malloc: {malloc}", flush=True)

  import tempfile
  from kd_landmarks import models
  roles = [r.strip() for r in args.models.split(",") if r.strip()]
  unknown = [role for role in roles if model_name(role) not in models.MODEL_NAMES]
  if unknown:
    parser.error(f"--models: unknown {unknown}; choose from student, teacher or {', '.join(models.MODEL_NAMES)}")
  for role in roles:
    print(f"\n== {role} ({model_name(role)}) ==" if role in MODEL_NAMES else f"\n== {role} ==", flush=True)
    forwards, steps = {}, {}
    for combination in combinations:
      name = jax_name(*combination)
      forwards[name], steps[name], compile_s = jax_callables(role, args, build_kernels(*combination))
      print(f"{name}: compiled and ran once in {compile_s:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
      if role in MODEL_NAMES and ("torch" in peers or "onnxruntime" in peers):
        params, forwards["PyTorch"], steps["PyTorch"], torch_model, one = torch_callables(role, args)
        print(f"PyTorch: {params:,} params, channels-last", flush=True)
        if "torch" not in peers:
          del forwards["PyTorch"], steps["PyTorch"]
        if "onnxruntime" in peers:
          forwards["ONNX Runtime (PyTorch export)"] = onnxruntime_callable(torch_model, one, args, tmp)
      if "onnxruntime" in peers:
        forwards["ONNX Runtime (our export)"] = our_onnx_callable(role, args, tmp)
      # Every contestant in turn, so that the ratios are taken under the same conditions.
      forward_s = timing.interleaved_median_seconds(forwards, warmup=args.warmup, iterations=args.iterations)
    step_s = timing.interleaved_median_seconds(steps, warmup=args.warmup, iterations=args.train_iterations)
    for name in forwards:
      line = f"{name:46s} forward b1 {forward_s[name] * 1e3:8.2f} ms"
      if name in step_s:
        line += f"   train b{args.batch} {args.batch / step_s[name]:8.1f} img/s"
      print(line, flush=True)
    for combination in combinations:
      name = jax_name(*combination)
      ratios = []
      if "PyTorch" in forwards:
        ratios += [f"forward time JAX/PyTorch {forward_s[name] / forward_s['PyTorch']:.2f}x",
                   f"train throughput JAX/PyTorch {step_s['PyTorch'] / step_s[name]:.2f}x"]
      if "ONNX Runtime (PyTorch export)" in forwards:
        ratios.append(f"forward time JAX/ONNX Runtime {forward_s[name] / forward_s['ONNX Runtime (PyTorch export)']:.2f}x")
      if ratios:
        print(f"ratios {name}: " + ", ".join(ratios), flush=True)
    if len(combinations) > 1:
      others = [jax_name(*combination) for combination in combinations if combination != training_names]
      fastest = min(others, key=lambda name: step_s[name])
      name = jax_name(*training_names)
      print(f"training kernels {name}: train throughput {step_s[fastest] / step_s[name]:.3f}x the fastest other "
            f"combination timed ({fastest})", flush=True)
    if "ONNX Runtime (our export)" in forwards and "ONNX Runtime (PyTorch export)" in forwards:
      print(f"our ONNX export / PyTorch's ONNX export, forward time: "
            f"{forward_s['ONNX Runtime (our export)'] / forward_s['ONNX Runtime (PyTorch export)']:.2f}x",
            flush=True)


if __name__ == "__main__":
  main()
