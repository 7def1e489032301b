"""Models: exact sizes of the published architectures, shapes, dtypes, modes and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_landmarks.evaluation import model_stats
from kd_landmarks import cpu
from kd_landmarks.cpu import kernels as cpu_kernels
from kd_landmarks.cpu import native
from kd_landmarks.models import MODEL_NAMES, PORTABLE, Kernels, create_model


def _cpu_training_kernels():
  """The CPU training kernels in their XLA form, and native where they build (kd_landmarks/cpu)."""
  sets = [cpu.training_kernels(use_native=False).model]
  return sets + ([cpu.training_kernels(use_native=True).model] if native.available() else [])


def _init(model, images):
  # Jitted: un-jitted Flax init/apply dispatches op by op, which is slow on CPU.
  return jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(0), images)


def _apply_fn(model, *, train=False, **kwargs):
  """A jitted ``(variables, images, seed) -> apply(...)``; reuse it to compile once."""
  fn = jax.jit(lambda v, x, key: model.apply(v, x, train=train, rngs={"dropout": key}, **kwargs))
  return lambda variables, images, seed=0: fn(variables, images, jax.random.key(seed))


def _variables(model, size):
  return model_stats.abstract_variables(model, size)


def _counts(name, num_landmarks=68, size=224, **overrides):
  variables = _variables(create_model(name, num_landmarks=num_landmarks, **overrides), size)
  params = model_stats.count_parameters(variables["params"])
  head = model_stats.count_parameters(variables["params"]["head"])
  return params, params - head, model_stats.count_parameters(variables["batch_stats"])


# Keras' "trainable params" of tf.keras.applications.*(include_top=False): BatchNorm moving statistics
# are excluded (they are our batch_stats). Head: Dense(1280 -> 2K) = 1280 * 136 + 136 for K = 68.
@pytest.mark.parametrize("name,backbone,with_head", [
    ("mobilenet_v2", 2_223_872, 2_223_872 + 1280 * 136 + 136),   # = 2,398,088
    ("efficientnet_b3", 10_696_232, 10_696_232 + 1536 * 136 + 136),  # = 10,905,264
    ("efficientnet_b0", 4_007_548, 4_007_548 + 1280 * 136 + 136),
])
def test_parameter_counts_match_keras(name, backbone, with_head):
  params, backbone_params, _ = _counts(name)
  assert backbone_params == backbone
  assert params == with_head


def test_pinned_totals_from_the_issue():
  assert _counts("mobilenet_v2")[0] == 2_398_088
  assert _counts("efficientnet_b3")[0] == 10_905_264


@pytest.mark.parametrize("alpha,keras_total_with_imagenet_top,last_channels", [
    (0.5, 1_987_224, 1280), (1.4, 6_156_712, 1792)])
def test_width_multiplier_matches_keras_totals(alpha, keras_total_with_imagenet_top, last_channels):
  # Keras' totals include BatchNorm statistics and a 1000-class top: subtract that top.
  params, backbone, batch_stats = _counts("mobilenet_v2", width_multiplier=alpha)
  assert backbone + batch_stats == keras_total_with_imagenet_top - (last_channels * 1000 + 1000)
  assert params - backbone == last_channels * 136 + 136


def test_named_width_variant_is_keras_alpha():
  # mobilenet_v2_050 is Keras' MobileNetV2(alpha=0.5): 1,987,224 params with the ImageNet top.
  params, backbone, batch_stats = _counts("mobilenet_v2_050")
  assert backbone + batch_stats == 1_987_224 - (1280 * 1000 + 1000)


def test_batch_stats_are_two_per_batchnorm_channel():
  variables = _variables(create_model("mobilenet_v2", num_landmarks=68), 224)
  scales = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
               if path[-1].key == "scale")
  assert model_stats.count_parameters(variables["batch_stats"]) == 2 * scales


def test_mobilenet_v2_macs_near_published():
  stats = model_stats.model_stats("mobilenet_v2", num_landmarks=68, image_size=224)
  # Sandler et al. (2018), Table 4: 300 M multiply-adds at 224 px.
  assert abs(stats["gmacs"] - 0.300) / 0.300 < 0.10
  assert stats["gflops"] == pytest.approx(2 * stats["gmacs"])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_output_shape(name):
  model = create_model(name, num_landmarks=5)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = _variables(model, 64)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert out.shape == (2, 5, 2) and out.dtype == jnp.float32
  assert set(variables) == {"params", "batch_stats"}


def test_tiny_train_and_eval_modes():
  model = create_model("mobilenet_v2_tiny", num_landmarks=3)
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  variables = _init(model, images)
  out, updates = _apply_fn(model, train=True, mutable=["batch_stats"])(variables, images)
  assert out.shape == (2, 3, 2) and np.all(np.isfinite(out))
  # Training moves the running statistics; evaluation is deterministic and uses them.
  before = jax.tree_util.tree_leaves(variables["batch_stats"])
  after = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  evaluate = _apply_fn(model)
  np.testing.assert_array_equal(evaluate(variables, images, 1), evaluate(variables, images, 2))


@pytest.mark.slow  # Four compiles of a train step (about 35 s of CPU on a quiet machine).
def test_cpu_training_kernels_agree_with_the_portable_ones_inside_the_model():
  images = jax.random.uniform(jax.random.key(1), (2, 33, 33, 3))
  base = create_model("mobilenet_v2_tiny", num_landmarks=4)
  variables = _init(base, images)

  def loss(model):
    def fn(params):
      out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                           train=True, mutable=["batch_stats"])
      return jnp.sum(out ** 2), out
    return fn

  (want_loss, want_out), want_grads = jax.jit(jax.value_and_grad(loss(base), has_aux=True))(
      variables["params"])
  # Each kernel is checked alone in test_depthwise.py and below; here their custom VJPs are exercised
  # together through BatchNorm, residuals and stride-2 blocks.
  for kernels in _cpu_training_kernels():
    model = create_model("mobilenet_v2_tiny", num_landmarks=4, kernels=kernels)
    (got_loss, got_out), got_grads = jax.jit(jax.value_and_grad(loss(model), has_aux=True))(
        variables["params"])
    np.testing.assert_allclose(got_out, want_out, rtol=1e-4, atol=1e-5)
    # Train-mode BatchNorm magnifies float32 summation-order differences, and some gradients are zero
    # up to rounding (biases before BatchNorm): compare against the scale of all gradients.
    got_flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(got_grads)])
    want_flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(want_grads)])
    np.testing.assert_allclose(got_flat, want_flat, rtol=1e-3, atol=1e-3 * np.max(np.abs(want_flat)))


@pytest.mark.parametrize("name,overrides", [
    ("mobilenet_v2_tiny", {}),
    # No dropout or stochastic depth: their random masks differ between float32 and float64 runs.
    ("efficientnet_b0_tiny", dict(dropout_rate=0.0, stochastic_depth_rate=0.0))])
def test_native_norm_inside_the_model_matches_float64(name, overrides):
  # A whole train-mode forward and gradient with the native BatchNorm reductions against the same model
  # run in float64 (XLA's reductions, which the kernels do not take): relu6, identity (MobileNetV2) and
  # swish (EfficientNet) through both kernels.
  # Train-mode BatchNorm over few values per channel amplifies rounding: here XLA's float32
  # reductions are 2.5 (1% of the largest gradient) away from float64, the kernels' float64 totals 0.003.
  if not native.available():
    pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
  images = jax.random.uniform(jax.random.key(3), (4, 64, 64, 3))

  def run(model, variables, images):
    def fn(params):
      out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                 train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(3.0 * out)), (out, updates["batch_stats"])
    (_, (out, stats)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(variables["params"])
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree_util.tree_leaves(tree)])
    return flat(out), flat(stats), flat(grads)

  model = create_model(name, num_landmarks=3, kernels=Kernels(batch_norm_train=cpu_kernels.batch_norm_train_native),
                       **overrides)
  variables = _init(model, images)
  got = run(model, variables, images)
  with jax.enable_x64(True):
    model64 = create_model(name, num_landmarks=3, kernels=Kernels(batch_norm_train=cpu_kernels.batch_norm_train_xla),
                           dtype=jnp.float64, param_dtype=jnp.float64, **overrides)
    want = run(model64, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables),
               images.astype(jnp.float64))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-4 * np.max(np.abs(w)))


@pytest.mark.parametrize("name", ["mobilenet_v2_tiny", "efficientnet_b0_tiny"])
def test_pointwise_kernels_agree(name):
  # The dot (CPU training) and the 1x1 conv (portable: accelerators and exporters) must be the same
  # function of the same parameters, with and without bias (EfficientNet's squeeze-excite).
  images = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
  conv = create_model(name, num_landmarks=3)
  dot = create_model(name, num_landmarks=3, kernels=Kernels(pointwise_conv=cpu_kernels.pointwise_conv_dot))
  variables = _init(conv, images)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(_init(dot, images))

  def loss(model):
    return lambda params: jnp.sum(model.apply({**variables, "params": params}, images) ** 2)

  want, want_grads = jax.value_and_grad(loss(conv))(variables["params"])
  got, got_grads = jax.value_and_grad(loss(dot))(variables["params"])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.max(np.abs(w)) + 1e-7)


def test_bfloat16_compute_keeps_float32_params_and_output():
  model = create_model("mobilenet_v2_tiny", num_landmarks=3, dtype=jnp.bfloat16)
  images = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
  variables = _init(model, images)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  out = _apply_fn(model)(variables, images)
  assert out.dtype == jnp.float32
  ref = _apply_fn(create_model("mobilenet_v2_tiny", num_landmarks=3))(variables, images)
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.max(jnp.abs(ref))) + 1e-3)


def test_normalisation_happens_inside_the_model():
  # The stem convolution (no bias) sees (x - ImageNet mean) / std: an image equal to the mean must
  # give an all-zero stem output, and the plain [0, 1] image 0.5 must not.
  model = create_model("mobilenet_v2_tiny", num_landmarks=2)
  mean_image = jnp.broadcast_to(jnp.asarray([0.485, 0.456, 0.406]), (1, 32, 32, 3))
  variables = _init(model, mean_image)
  apply = _apply_fn(model, capture_intermediates=True, mutable=["intermediates"])
  stem_output = lambda x: apply(variables, x)[1]["intermediates"]["stem"]["__call__"][0]
  np.testing.assert_allclose(stem_output(mean_image), 0.0, atol=1e-5)
  assert np.max(np.abs(stem_output(jnp.full_like(mean_image, 0.5)))) > 1e-3


@pytest.mark.slow  # Two compiles of an EfficientNet train step.
def test_stochastic_depth_draws_per_rng_only_when_enabled():
  # Head dropout off, so a difference between rngs can only come from stochastic depth.
  model = create_model("efficientnet_b0_tiny", num_landmarks=2, stochastic_depth_rate=0.5, dropout_rate=0.0)
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  variables = _init(model, images)
  apply = _apply_fn(model, train=True, mutable=["batch_stats"])
  train = lambda seed: apply(variables, images, seed)[0]
  assert not np.allclose(train(1), train(2))
  quiet = create_model("efficientnet_b0_tiny", num_landmarks=2, stochastic_depth_rate=0.0, dropout_rate=0.0)
  quiet_apply = _apply_fn(quiet, train=True, mutable=["batch_stats"])
  quiet_train = lambda seed: quiet_apply(variables, images, seed)[0]
  np.testing.assert_array_equal(quiet_train(1), quiet_train(2))


def test_errors_name_the_choices():
  with pytest.raises(ValueError, match="mobilenet_v2"):
    create_model("resnet50", num_landmarks=68)
  with pytest.raises(ValueError, match="width_multiplier"):
    create_model("mobilenet_v2", num_landmarks=68, widht_multiplier=0.5)
  with pytest.raises(ValueError, match="depthwise_impl"):  # The kernels are no config override.
    create_model("mobilenet_v2", num_landmarks=68, depthwise_impl="lax")
  with pytest.raises(ValueError, match="num_landmarks"):
    create_model("mobilenet_v2", num_landmarks=0)
  model = create_model("mobilenet_v2_tiny", num_landmarks=2)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32)), train=False)


def test_model_stats_prints_table(capsys):
  model_stats.main(["--models", "mobilenet_v2_tiny", "--image_size", "32"])
  printed = capsys.readouterr().out
  assert "| mobilenet_v2_tiny |" in printed and "MB fp32" in printed


def test_pointwise_conv_equals_a_1x1_convolution():
  # Both kernels (the portable conv and the CPU training dot over channels) must equal nn.Conv's 1x1
  # convolution with the same kernel, values and gradients (kernel, bias and input).
  from kd_landmarks.models.layers import PointwiseConv
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 6))
  for kernels in (PORTABLE, Kernels(pointwise_conv=cpu_kernels.pointwise_conv_dot)):
    _check_pointwise(PointwiseConv(4, use_bias=True, kernels=kernels), x)


def _check_pointwise(ours, x):
  import flax.linen as nn
  theirs = nn.Conv(4, (1, 1), use_bias=True)
  variables = ours.init(jax.random.key(1), x)
  variables = {"params": {"kernel": variables["params"]["kernel"],
                          "bias": jax.random.normal(jax.random.key(2), (4,))}}
  assert variables["params"]["kernel"].shape == (1, 1, 6, 4)
  loss = lambda module: lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
  want = jax.grad(loss(theirs), argnums=(0, 1))(variables, x)
  jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)


NORM_FNS = {"xla": cpu_kernels.batch_norm_train_xla, "native": cpu_kernels.batch_norm_train_native}


def _norm_impls():
  return ["xla"] + (["native"] if native.available() else [])


@pytest.mark.parametrize("impl", _norm_impls())
@pytest.mark.parametrize("activation,reference_act", [
    (None, lambda z: z), ("relu6", jax.nn.relu6), ("swish", jax.nn.swish)])
def test_batch_norm_act_equals_flax_batch_norm_then_activation(activation, reference_act, impl):
  # The fused module against flax's BatchNorm + the activation: same variables, same outputs and
  # running-average updates, and the closed-form backward equal to autodiff of flax's forward, for the
  # input and both parameters, with a random cotangent. 12 channels: the native kernels' vector (8)
  # and scalar lanes.
  import flax.linen as nn
  from kd_landmarks.models import layers

  x = 2.0 * jax.random.normal(jax.random.key(0), (3, 5, 4, 12)) + 1.0
  reference = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  fused = layers.BatchNormAct(NORM_FNS[impl], activation=activation, momentum=0.9, epsilon=1e-3)
  variables = reference.init(jax.random.key(1), x)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      fused.init(jax.random.key(1), x))
  # Non-trivial scale, bias and running statistics (init gives ones and zeros).
  keys = iter(jax.random.split(jax.random.key(2), 8))
  variables = jax.tree_util.tree_map(lambda a: a + 0.5 * jax.random.uniform(next(keys), a.shape), variables)
  cotangent = jax.random.normal(jax.random.key(3), x.shape)

  def run_reference(v, x):
    y, updates = reference.apply(v, x, mutable=["batch_stats"])
    return reference_act(y), updates

  def run_fused(v, x):
    return fused.apply(v, x, mutable=["batch_stats"])

  (want, want_stats), (got, got_stats) = run_reference(variables, x), run_fused(variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(jax.tree_util.tree_leaves(got_stats), jax.tree_util.tree_leaves(want_stats)):
    np.testing.assert_allclose(g, w, rtol=1e-6)

  def grads(run):
    return jax.grad(lambda p, x: jnp.sum(run({**variables, "params": p}, x)[0] * cotangent),
                    argnums=(0, 1))(variables["params"], x)

  for g, w in zip(jax.tree_util.tree_leaves(grads(run_fused)), jax.tree_util.tree_leaves(grads(run_reference))):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v2_tiny", "efficientnet_b0_tiny"])
def test_train_and_eval_norms_share_variables(name):
  # CPU training uses BatchNormAct, evaluation flax's BatchNorm: both must create the same variables
  # under the same names, or a checkpoint trained with one would not load into the other.
  trained = create_model(name, num_landmarks=3, kernels=cpu.training_kernels(use_native=False).model)
  evaluated = create_model(name, num_landmarks=3)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  shapes = {train: jax.eval_shape(lambda x, train=train: (trained if train else evaluated).init(
      jax.random.key(0), x, train=train), images) for train in (False, True)}
  assert (jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), shapes[False]) ==
          jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), shapes[True]))


@pytest.mark.parametrize("impl", _norm_impls())
def test_batch_norm_act_gradient_numerically(impl):
  # Finite differences on every output (y, mean, var): the closed form includes the paths through
  # the batch mean and variance, and a cotangent on the returned statistics.
  from jax.test_util import check_grads
  from kd_landmarks.models import layers

  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4), jnp.float32) + 0.5
  scale = jnp.linspace(0.5, 1.5, 4)
  bias = jnp.linspace(-0.2, 0.3, 4)
  for activation in layers.ACTIVATIONS:
    check_grads(lambda x, s, b: NORM_FNS[impl](x, s, b, 1e-3, activation),
                (x, scale, bias), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_batch_norm_act_names_unknown_activation():
  from kd_landmarks.models import layers
  with pytest.raises(ValueError, match="relu6"):
    layers.BatchNormAct(cpu_kernels.batch_norm_train_xla, activation="gelu").init(
        jax.random.key(0), jnp.ones((1, 2, 2, 3)))
  with pytest.raises(ValueError, match="relu6"):
    layers.batch_norm(train=False, momentum=0.9, epsilon=1e-3, dtype=jnp.float32,
                      param_dtype=jnp.float32)(activation="gelu")
