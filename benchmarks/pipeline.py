"""Rehearsal of the paper's whole pipeline at full scale: every phase, timed, and the full run projected.

Runs the real phases (``kd_landmarks.pipeline.run``: EfficientNet-B3 Tough and Tolerant teachers, the teacher
cache, the L2 and KD MobileNetV2 students, evaluation, report) of a paper config (``configs/<dataset>.py``:
224 px, teachers batch 40, students batch 70) on the synthetic faces, prepared by the same tfds builder into
the same array_record storage, with the split sizes of the real dataset (300W: 3,148 train / 689 test;
COFW 1,345 / 507; WFLW 7,500 / 2,500), read by the same input pipeline, augmented on the device, with the
same checkpoints, validation and teacher cache. Each training run stops after a fixed number of steps
(1 compile step + ``--warmup`` + ``--steps`` timed). Printed per phase:

* compile seconds (the train step's ``lower().compile()``; the persistent compilation cache is on, as in a
  real run, so the second teacher reads the first one's program) and the first step;
* steady-state images/s over the timed steps with the real input pipeline, and the same step run
  ``--steps`` more times on one batch already on the device (no input at all);
* input wait: the fraction of step time the input costs, 1 - (device-only time / pipeline time), and the
  fraction of it the host spent blocked on the next batch;
* the step's memory as XLA plans it (arguments + outputs + temporaries) and the device's peak memory where
  the backend reports it (GPU, TPU);
* validation and evaluation images/s, the teacher-cache seconds, checkpoint saves, the report;
* the projected wall clock of the full paper run: 250 epochs per model, every phase.

The model sees synthetic faces with 68 landmarks whatever ``--dataset`` says (only the split sizes follow
it); speed does not depend on the pixels. Synthetic crops are stored as PNG, real ones as JPEG: ``--decode``
times both decoders and the current input pipeline against the split decoded once into memory
(``--source memory`` runs the whole rehearsal on that).

  python benchmarks/pipeline.py --scale full --dataset 300w            # on a GPU/TPU host: the real sizes
  python benchmarks/pipeline.py --scale full --batch 256               # global batch 256 for every model
  python benchmarks/pipeline.py --scale cpu --decode                   # this CPU: tiny models, 64 px
  python benchmarks/pipeline.py --scale tiny                           # the CI smoke size (seconds)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from kd_landmarks import config_lib  # noqa: E402  (no JAX: flags answer before JAX's import)
from kd_landmarks.training import machine  # noqa: E402  (no JAX either)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_EPOCHS = 250.0
# The real datasets: train size, the evaluation splits' sizes (every split but train). Validation is the
# slice of the train split held out by config.val_holdout (5%: 157 faces of 300W). WFLW subsets: the
# official list files' counts.
DATASETS = {
    "300w": dict(train=3148, test=689,
                 eval={"test_common": 554, "test_challenging": 135, "test_full": 689}),
    "cofw": dict(train=1345, test=507, eval={"test": 507}),
    "wflw": dict(train=7500, test=2500,
                 eval={"test": 2500, "test_pose": 326, "test_expression": 314, "test_illumination": 698,
                       "test_makeup": 206, "test_occlusion": 736, "test_blur": 773}),
}
# full: the paper's networks and sizes. cpu: the same code with tiny variants at 64 px, real split sizes, to
# finish within minutes on 2 cores. tiny: the CI smoke size.
SCALES = {
    "full": dict(teacher_model="efficientnet_b3", student_model="mobilenet_v2", image_size=224,
                 stored_size=360, warmup=5, steps=30, num_train=0, num_test=0, batch=0),
    "cpu": dict(teacher_model="efficientnet_b3_tiny", student_model="mobilenet_v2_tiny", image_size=64,
                stored_size=96, warmup=2, steps=4, num_train=0, num_test=0, batch=0),
    "tiny": dict(teacher_model="efficientnet_b3_tiny", student_model="mobilenet_v2_tiny", image_size=32,
                 stored_size=48, warmup=1, steps=2, num_train=48, num_test=16, batch=8),
}
MODELS = (("teacher_tough", "teacher"), ("teacher_tolerant", "teacher"), ("student_l2", "student"),
          ("student_kd", "student"))


# ------------------------------------------------------------------------------------------ instruments

@dataclasses.dataclass
class TrainRecord:
  """What one ``train.fit`` did, filled in by the wrappers below."""
  compile_s: float = float("nan")
  first_step_s: float = float("nan")
  global_batch: int = 0
  window_s: float = float("nan")          # The timed steps, real input pipeline.
  device_only_s: float = float("nan")     # The same number of steps on one batch already on the device.
  window_steps: int = 0
  next_s: list = dataclasses.field(default_factory=list)   # Host seconds blocked in next(batches), per step.
  window_next_s: float = float("nan")
  step_memory_bytes: int | None = None
  checkpoint_s: list = dataclasses.field(default_factory=list)
  validation: list = dataclasses.field(default_factory=list)  # (seconds, examples)

  def img_s(self):
    return self.window_steps * self.global_batch / self.window_s

  def device_img_s(self):
    return self.window_steps * self.global_batch / self.device_only_s

  def input_wait(self):
    return max(0.0, 1.0 - self.device_only_s / self.window_s)

  def step_s(self):
    return self.window_s / self.window_steps


class _TimedStep:
  """Wraps the compiled train step: times the compile, then ``steps`` steps after ``warmup``, then the same
  number on the last batch with no input pipeline at all."""

  def __init__(self, jitted, record: TrainRecord, warmup: int, steps: int, profile_dir: str | None = None):
    self._jitted, self._record, self._warmup, self._steps = jitted, record, warmup, steps
    self._profile_dir = profile_dir
    self._compiled = None
    self._calls = 0
    self._t0 = None

  def __call__(self, *args):
    import jax  # pylint: disable=g-import-not-at-top  (flags answer before JAX's import, see main)
    record = self._record
    self._calls += 1
    # The window: steps first..last, each with its own next(batches) (fit calls it just before the step).
    first, last = 2 + self._warmup, 1 + self._warmup + self._steps
    if self._compiled is None:
      start = time.perf_counter()
      self._compiled = self._jitted.lower(*args).compile()
      record.compile_s = time.perf_counter() - start
      record.step_memory_bytes = _planned_bytes(self._compiled)
      record.global_batch = int(args[1]["image"].shape[0])
      start = time.perf_counter()
      out = jax.block_until_ready(self._compiled(*args))
      record.first_step_s = time.perf_counter() - start
    else:
      out = self._compiled(*args)
    if self._calls == first - 1:
      # The device idle and the next batch not yet asked for: the window holds `steps` fetches and steps.
      jax.block_until_ready(out)
      if self._profile_dir:
        jax.profiler.start_trace(self._profile_dir)
      self._t0 = time.perf_counter()
    if self._calls == last:
      jax.block_until_ready(out)
      record.window_s = time.perf_counter() - self._t0
      if self._profile_dir:
        jax.profiler.stop_trace()
      record.window_steps = last - first + 1
      record.window_next_s = float(sum(record.next_s[first - 1:last]))
      start = time.perf_counter()
      for _ in range(record.window_steps):  # The same work with the batch already on the device.
        out = self._compiled(out[0], *args[1:])
      jax.block_until_ready(out)
      record.device_only_s = time.perf_counter() - start
    return out


class _TimedIterator:
  def __init__(self, iterator, record: TrainRecord):
    self._iterator, self._record = iterator, record

  def __iter__(self):
    return self

  def __next__(self):
    start = time.perf_counter()
    batch = next(self._iterator)
    self._record.next_s.append(time.perf_counter() - start)
    return batch

  def close(self):
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def _planned_bytes(compiled):
  """Arguments + outputs + temporaries - aliased (donated) bytes of a compiled program, as XLA plans them."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)


@contextlib.contextmanager
def instrumented(records: list, *, warmup: int, steps: int, memory_sources: dict | None,
                 profile_dir: str | None = None):
  """Wraps the train step, the train iterator, checkpoint saves and validation for every ``train.fit``;
  with ``memory_sources`` the phases read splits decoded once into memory (``input_pipeline.InMemorySource``)."""
  from kd_landmarks import pipeline
  from kd_landmarks.training import checkpoint
  from kd_landmarks.evaluation import evaluate
  from kd_landmarks.training import input_pipeline
  from kd_landmarks.training import train  # pylint: disable=g-import-not-at-top
  compile_train_step = train.compile_train_step
  make_train_iterator = input_pipeline.make_train_iterator
  save_state = checkpoint.save_state
  mean_nme = evaluate.mean_nme
  load_split = pipeline.load_split

  def timed_compile(spec, mesh):
    records.append(TrainRecord())
    return _TimedStep(compile_train_step(spec, mesh), records[-1], warmup, steps, profile_dir)

  def timed_iterator(*args, **kwargs):
    return _TimedIterator(make_train_iterator(*args, **kwargs), records[-1])

  def timed_save(*args, **kwargs):
    start = time.perf_counter()
    save_state(*args, **kwargs)
    records[-1].checkpoint_s.append(time.perf_counter() - start)

  def timed_validation(*args, **kwargs):
    start = time.perf_counter()
    value = mean_nme(*args, **kwargs)
    records[-1].validation.append((time.perf_counter() - start, len(kwargs["source"])))
    return value

  def memory_split(config, workdir, split):
    if split not in memory_sources:
      memory_sources[split] = input_pipeline.InMemorySource(load_split(config, workdir, split), None)
    return memory_sources[split]

  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(train, "compile_train_step", timed_compile))
    stack.enter_context(mock.patch.object(input_pipeline, "make_train_iterator", timed_iterator))
    stack.enter_context(mock.patch.object(checkpoint, "save_state", timed_save))
    stack.enter_context(mock.patch.object(evaluate, "mean_nme", timed_validation))
    if memory_sources is not None:
      stack.enter_context(mock.patch.object(pipeline, "load_split", memory_split))
    yield


def _device_peak_bytes():
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def _host_peak_bytes():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------- the synthetic set

def _render(job):
  from kd_landmarks.datasets import synthetic  # pylint: disable=g-import-not-at-top
  split, index, image_size, seed = job
  return synthetic.render_example(split, index, image_size=image_size, seed=seed)


def _parallel_generate(split, *, num_examples, image_size=128, seed=0, start=0, config=None):
  """``synthetic.generate`` on every core: the same examples (each is a pure function of split, index and
  seed), rendered in a process pool instead of one after another (3,837 faces at 360 px: ~100 s serially)."""
  if config is not None:
    raise ValueError("the parallel renderer uses the default RenderConfig")
  jobs = [(split, index, image_size, seed) for index in range(start, start + num_examples)]
  with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
    yield from pool.imap(_render, jobs, chunksize=16)


def prepare_data(config, data_dir: str) -> float:
  """Renders and stores the synthetic split (the builder of every dataset); returns seconds."""
  from kd_landmarks.datasets import builder, synthetic  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  options = {k: int(v) for k, v in config.synthetic.to_dict().items() if v}
  with mock.patch.object(synthetic, "generate", _parallel_generate):
    builder.prepare("synthetic", data_dir=data_dir, synthetic_options=options, num_workers=os.cpu_count(),
                    show_progress=False)
  return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ config

def load_config(args):
  """configs/<dataset>.py as the paper has it, then the rehearsal's changes (all existing keys)."""
  spec = importlib.util.spec_from_file_location("rehearsal_config", os.path.join(ROOT, "configs",
                                                                                 f"{args.dataset}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"platform={args.platform}")
  sizes = DATASETS[args.dataset]
  config.dataset = "synthetic"
  config.data_dir = args.data_dir
  config.synthetic.num_train = args.num_train or sizes["train"]
  config.synthetic.num_test = args.num_test or sizes["test"]
  config.synthetic.image_size = args.stored_size
  config.image_size = args.image_size
  config.teacher_model, config.student_model = args.teacher_model, args.student_model
  if args.batch:
    config.teacher.batch_size = config.student.batch_size = args.batch
  steps = 1 + args.warmup + args.steps
  config.teacher.num_train_steps = config.student.num_train_steps = steps
  config.log_every_steps = config.checkpoint_every_steps = steps   # Syncs only at the end of each run.
  config.eval_every_steps = -1       # One validation at the end of each run (the full run: every 5,000).
  config.student_loss = "l2,kd"
  return config


# ----------------------------------------------------------------------------------------------- the run

def rehearse(args) -> dict:
  from kd_landmarks import pipeline
  from kd_landmarks.training import backend  # pylint: disable=g-import-not-at-top
  from kd_landmarks.training import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  config = load_config(args)
  workdir = args.workdir
  shutil.rmtree(workdir, ignore_errors=True)  # A fresh run: nothing to resume, a cold compilation cache.
  os.makedirs(workdir)
  # Before JAX starts its backends: the renderer's process pool forks, and forking a running JAX is unsafe.
  prepare_s = prepare_data(config, pipeline.data_dir_of(config, workdir))
  resolved = backend.resolve(config)
  result = {"platform": backend.describe(), "dtype": resolved.dtype, "jax": jax.__version__,
            "host": f"{machine.cpu_description()['name']}, {os.cpu_count()} cores",
            "args": vars(args), "train_kernels": train.training_kernels(resolved).description, "phases": {}}
  print(f"[rehearsal] {result['platform']}, dtype {resolved.dtype}, jax {jax.__version__}, host "
        f"{result['host']}; training kernels {result['train_kernels']}", flush=True)
  result["prepare_s"] = prepare_s
  print(f"[rehearsal] synthetic set ({config.synthetic.num_train} train / {config.synthetic.num_test} test "
        f"at {args.stored_size} px) prepared in {result['prepare_s']:.1f} s", flush=True)
  memory_sources = {} if args.source == "memory" else None
  records = []
  phases = [("teacher_tough", None), ("teacher_tolerant", None), ("cache_teachers", None),
            ("student", "l2"), ("student", "kd"), ("eval", None), ("report", None)]
  with instrumented(records, warmup=args.warmup, steps=args.steps, memory_sources=memory_sources,
                    profile_dir=args.profile_dir):
    for phase, loss in phases:
      name = f"student_{loss}" if loss else phase
      config.phase = phase
      if loss:
        config.student_loss = loss
      before = len(records)
      start = time.perf_counter()
      pipeline.run(config, workdir)
      entry = {"wall_s": time.perf_counter() - start, "device_peak_bytes": _device_peak_bytes(),
               "host_peak_bytes": _host_peak_bytes()}
      if len(records) > before:
        entry["train"] = dataclasses.asdict(records[-1])
        entry["train"].pop("next_s")
        record = records[-1]
        entry["train"].update(img_s=record.img_s(), device_only_img_s=record.device_img_s(),
                              input_wait=record.input_wait(), host_blocked=record.window_next_s / record.window_s)
      if name == "cache_teachers":  # Both teachers over the train split.
        entry["img_s"] = 2 * config.synthetic.num_train / entry["wall_s"]
      elif name == "eval":  # Every model on the test split, loading and compiling included.
        entry["img_s"] = len(MODELS) * config.synthetic.num_test / entry["wall_s"]
      result["phases"][name] = entry
      print(_phase_line(name, entry), flush=True)
      _write(args.out, result)  # What a run stopped by a time limit had measured so far.
  if memory_sources is not None:
    result["memory_source_bytes"] = {split: s.nbytes for split, s in memory_sources.items()}
  validations = [(seconds, n) for record in records for seconds, n in record.validation]
  result["eval_steady_img_s"] = max(n / seconds for seconds, n in validations)
  result["projection"] = project(result, config, args)
  return result


def _phase_line(name, entry):
  line = f"  {name:<17} {entry['wall_s']:8.1f} s"
  train = entry.get("train")
  if train:
    memory = f", step memory {train['step_memory_bytes'] / 2**20:.0f} MiB" if train["step_memory_bytes"] else ""
    line += (f" | batch {train['global_batch']}: compile {train['compile_s']:.1f} s, first step "
             f"{train['first_step_s']:.2f} s, {train['img_s']:.0f} img/s with input ({train['device_only_img_s']:.0f}"
             f" device only), input wait {100 * train['input_wait']:.1f}% (host blocked "
             f"{100 * train['host_blocked']:.1f}%){memory}")
    if train["validation"]:
      seconds, examples = train["validation"][-1]
      line += f", validation {examples / seconds:.0f} img/s"
  if "img_s" in entry:
    line += f" | {entry['img_s']:.0f} img/s"
  peak = entry["device_peak_bytes"]
  line += f", device peak {peak / 2**30:.2f} GiB" if peak else f", host peak RSS {entry['host_peak_bytes'] / 2**30:.2f} GiB"
  return line


def project(result, config, args) -> dict:
  """The full paper run (250 epochs per model, every phase) from the rehearsal's rates, in seconds.

  Per model, on the real train split less the held-out validation slice (300W: 3,148 - 157): the train
  step's compile, 250 epochs (times config.augment_copies) of steps at the measured steady step time (input
  included), a checkpoint every ``checkpoint_every_steps`` of the paper config (1,000) at the measured save
  time, and a validation on the held-out slice every ``eval_every_steps`` (5,000) and at the end at the
  steady evaluation rate (the fastest measured validation, i.e. one with its program already compiled), plus
  the first validation's compile. The cache and the eval phase: their measured time plus the examples the
  real splits add, at that rate; the report as measured. Batches: the paper's (40 / 70) unless --batch.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from kd_landmarks import pipeline  # pylint: disable=g-import-not-at-top
  from kd_landmarks.datasets import holdout  # pylint: disable=g-import-not-at-top
  sizes = DATASETS[args.dataset]
  if config.val_split:
    raise ValueError("the projection assumes validation on the held-out slice (config.val_split empty)")
  held_out = holdout.holdout_size(sizes["train"], float(config.val_holdout))
  paper = config_lib.base_config()  # The full run's checkpoint and validation intervals.
  full_length = ml_collections.ConfigDict(dict(num_train_steps=-1, num_epochs=PAPER_EPOCHS))
  rate = result["eval_steady_img_s"]
  projection = {"models": {}, "eval_steady_img_s": rate}
  for name, role in MODELS:
    train = result["phases"][name]["train"]
    batch = int(getattr(config, role).batch_size)
    steps = pipeline.num_train_steps(full_length, sizes["train"] - held_out, batch, int(config.augment_copies))
    checkpoints = math.ceil(steps / paper.checkpoint_every_steps)
    validations = math.ceil(steps / paper.eval_every_steps)
    checkpoint_s = float(np.mean(train["checkpoint_s"])) if train["checkpoint_s"] else 0.0
    seconds, examples = train["validation"][0]
    validation_compile_s = max(0.0, seconds - examples / rate)
    step_s = train["window_s"] / train["window_steps"]
    total = (train["compile_s"] + steps * step_s + checkpoints * checkpoint_s + validation_compile_s
             + validations * held_out / rate)
    projection["models"][name] = dict(steps=steps, batch=batch, step_s=step_s, train_s=steps * step_s,
                                      checkpoints=checkpoints, validations=validations, total_s=total)
  projection["held_out"] = held_out
  extra_train = sizes["train"] - config.synthetic.num_train
  extra_eval = sum(sizes["eval"].values()) - config.synthetic.num_test
  projection["cache_s"] = result["phases"]["cache_teachers"]["wall_s"] + 2 * extra_train / rate
  projection["eval_s"] = result["phases"]["eval"]["wall_s"] + len(MODELS) * extra_eval / rate
  projection["report_s"] = result["phases"]["report"]["wall_s"]
  projection["total_s"] = (sum(m["total_s"] for m in projection["models"].values()) + projection["cache_s"]
                           + projection["eval_s"] + projection["report_s"])
  return projection


def print_projection(result, args):
  projection = result["projection"]
  print(f"\n[projection] the full run of {args.dataset} (250 epochs per model, "
        f"{'the paper batches' if not args.batch else f'batch {args.batch}'}) on {result['platform']}:")
  for name, m in projection["models"].items():
    print(f"  {name:<17} {m['steps']:>7} steps x {1e3 * m['step_s']:7.1f} ms (batch {m['batch']}) + "
          f"{m['checkpoints']} checkpoints + {m['validations']} validations = {m['total_s'] / 60:7.1f} min")
  print(f"  {'cache_teachers':<17} {projection['cache_s'] / 60:7.1f} min; eval {projection['eval_s'] / 60:.1f} min "
        f"(eval phase {result['phases']['eval']['img_s']:.0f} img/s incl. loading and compiling, steady "
        f"{projection['eval_steady_img_s']:.0f} img/s); report {projection['report_s']:.0f} s")
  print(f"  total {projection['total_s'] / 60:.1f} min ({projection['total_s'] / 3600:.2f} h)")
  if args.scale != "full":
    print(f"  (scale '{args.scale}': {args.teacher_model} / {args.student_model} at {args.image_size} px, "
          "not the paper's networks: a check of the machinery, not a forecast of the paper's run)")


# ---------------------------------------------------------------------------------------- decode question

def decode_costs(config, workdir, *, batches: int = 20) -> dict:
  """What storing crops as JPEG costs on this host: PIL's decode per stored crop (JPEG q95, as real datasets
  are stored; PNG, as the synthetic set), and host examples/s of the input pipeline over the stored split
  against the split decoded once into memory (no device: the host's side alone)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from kd_landmarks import pipeline
  from kd_landmarks.training import input_pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.load_split(config, workdir, "train")
  crops = [np.asarray(source[i]["image"]) for i in range(min(32, len(source)))]
  result = {"crop_px": int(crops[0].shape[0])}
  for fmt, options in (("JPEG", {"quality": 95}), ("PNG", {})):
    encoded = []
    for crop in crops:
      buffer = io.BytesIO()
      Image.fromarray(crop).save(buffer, format=fmt, **options)
      encoded.append(buffer.getvalue())
    repeats = max(1, 200 // len(encoded))
    start = time.perf_counter()
    for _ in range(repeats):
      for data in encoded:
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    result[f"{fmt.lower()}_decode_ms"] = 1e3 * (time.perf_counter() - start) / (repeats * len(encoded))
  batch = int(config.student.batch_size)
  memory = input_pipeline.InMemorySource(source, None)
  for name, src in (("stored", source), ("memory", memory)):
    iterator = input_pipeline.make_train_iterator(src, global_batch_size=batch, seed=0,
                                                  keys=("image", "landmarks", "index"), num_steps=batches + 1)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    result[f"{name}_examples_s"] = batches * batch / (time.perf_counter() - start)
    iterator.close()
  result["memory_bytes"] = memory.nbytes
  print(f"\n[decode] {result['crop_px']} px crops, one thread: JPEG q95 {result['jpeg_decode_ms']:.2f} ms, PNG "
        f"{result['png_decode_ms']:.2f} ms per crop. Input pipeline ({input_pipeline.DEFAULT_NUM_THREADS} threads, "
        f"batch {batch}, no device): stored split (array_record + PNG decode) {result['stored_examples_s']:.0f} "
        f"examples/s; decoded once into memory ({memory.nbytes / 2**20:.0f} MiB) "
        f"{result['memory_examples_s']:.0f} examples/s", flush=True)
  return result


# ------------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--scale", default="cpu", choices=sorted(SCALES),
                      help="full: the paper's networks at 224 px; cpu: tiny variants at 64 px; tiny: CI smoke")
  parser.add_argument("--dataset", default="300w", choices=sorted(DATASETS), help="whose split sizes to use")
  parser.add_argument("--platform", default="auto", choices=config_lib.PLATFORMS)
  parser.add_argument("--batch", type=int, default=None, help="global batch of every model (default: 40 / 70)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per training run")
  parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the compile step")
  parser.add_argument("--num_train", type=int, default=None, help="default: the dataset's train size")
  parser.add_argument("--num_test", type=int, default=None, help="default: the dataset's test size")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--stored_size", type=int, default=None, help="stored crop px (real datasets: 360)")
  parser.add_argument("--teacher_model", default=None)
  parser.add_argument("--student_model", default=None)
  parser.add_argument("--source", default="stored", choices=["stored", "memory"],
                      help="memory: every phase reads the splits decoded once into host memory")
  parser.add_argument("--decode", action="store_true", help="also time decoding and the in-memory source")
  parser.add_argument("--decode_only", action="store_true",
                      help="prepare the data and time decoding only (no training), e.g. at --stored_size 360")
  parser.add_argument("--workdir", default=None, help="default: a temporary directory (removed at the end)")
  parser.add_argument("--data_dir", default=None, help="default: WORKDIR/data; reused when prepared alike")
  parser.add_argument("--out", default=None, help="write every figure as JSON here")
  parser.add_argument("--profile_dir", default=None,
                      help="jax.profiler trace of each training run's timed steps (slows those steps)")
  args = parser.parse_args(argv)
  for key, value in SCALES[args.scale].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  args.data_dir = args.data_dir or ""
  temporary = args.workdir is None
  if temporary:
    args.workdir = tempfile.mkdtemp(prefix="kd_rehearsal_")
  start = time.perf_counter()
  try:
    if args.decode_only:
      config = load_config(args)
      from kd_landmarks import pipeline  # pylint: disable=g-import-not-at-top
      result = {"host": f"{machine.cpu_description()['name']}, {os.cpu_count()} cores", "args": vars(args),
                "prepare_s": prepare_data(config, pipeline.data_dir_of(config, args.workdir))}
      result["decode"] = decode_costs(config, args.workdir)
    else:
      result = rehearse(args)
      print_projection(result, args)
    if args.decode and not args.decode_only:
      result["decode"] = decode_costs(load_config(args), args.workdir)
  finally:
    if temporary:
      shutil.rmtree(args.workdir, ignore_errors=True)
  result["benchmark_s"] = time.perf_counter() - start
  print(f"[rehearsal] done in {result['benchmark_s']:.0f} s", flush=True)
  _write(args.out, result)
  return result


def _write(path, result):
  if path:
    with open(path, "w") as f:
      json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
  main()
