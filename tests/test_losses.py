"""Tests of Loss_main, ALoss, KD-Loss and the baselines (paper Eqs. 4-14, Table 8)."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from kd_landmarks import losses

# Fig. 7: P_Gt = 0, P_Te = 0.4, sigma = 0.4 -> beta = 0.16.
FIG7_PRED = [0.0, 0.08, 0.16, 0.2, 0.3, 0.4, 0.5]
# omega by hand: R_L ramp -0.5 * x / 0.16, R_N -0.5, R_P +1.
FIG7_OMEGA = [0.0, -0.25, -0.5, -0.5, -0.5, 1.0, 1.0]
# ALoss = omega * |0.4 - x|.
FIG7_ALOSS = [0.0, -0.08, -0.12, -0.10, -0.05, 0.0, 0.10]


def _aloss(pred, gt, teacher, **kwargs):
  return np.asarray(losses.assistive_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(gt, jnp.float32),
                                          jnp.asarray(teacher, jnp.float32), reduction="none", **kwargs))


def test_fig7_values_by_hand():
  pred = np.array(FIG7_PRED)
  omega, mirrored = losses.assistive_weight(pred, np.zeros_like(pred), np.full_like(pred, 0.4))
  np.testing.assert_allclose(omega, FIG7_OMEGA, atol=1e-6)
  np.testing.assert_allclose(_aloss(pred, 0 * pred, 0 * pred + 0.4), FIG7_ALOSS, atol=1e-6)
  # The same curve on the other side of P_Gt: the teacher is mirrored by Eq. 4.
  np.testing.assert_allclose(mirrored[1:], 0.4)
  np.testing.assert_allclose(_aloss(-pred, 0 * pred, 0 * pred + 0.4), FIG7_ALOSS, atol=1e-6)


def test_fig7_minimum_is_at_beta():
  # Section 3.4: "the minimum value for ALoss will be at its corresponding beta", -0.5 (1 - sigma) d_Te.
  pred = np.linspace(-0.5, 0.5, 20001)
  values = _aloss(pred, 0 * pred, 0 * pred + 0.4)
  assert abs(abs(pred[np.argmin(values)]) - 0.16) < 1e-4
  np.testing.assert_allclose(values.min(), -0.5 * 0.6 * 0.4, atol=1e-6)


@pytest.mark.parametrize("gt,teacher", [(0.0, 0.4), (0.1, -0.3), (-0.2, 0.25)])
def test_both_sides_of_each_region_boundary(gt, teacher):
  eps = 1e-4
  d_te = abs(teacher - gt)
  side = np.sign(teacher - gt)
  beta = gt + 0.4 * side * d_te
  below_beta, at_beta, above_beta = beta - side * eps, beta, beta + side * eps
  below_te, at_te, above_te = teacher - side * eps, teacher, teacher + side * eps
  pred = np.array([below_beta, at_beta, above_beta, below_te, at_te, above_te])
  omega, _ = losses.assistive_weight(pred, np.full_like(pred, gt), np.full_like(pred, teacher))
  ramp_below = -0.5 * (0.4 * d_te - eps) / (0.4 * d_te)
  np.testing.assert_allclose(omega, [ramp_below, -0.5, -0.5, -0.5, 1.0, 1.0], atol=1e-4)
  values = _aloss(pred, np.full_like(pred, gt), np.full_like(pred, teacher))
  by_hand = [ramp_below * (0.6 * d_te + eps), -0.5 * 0.6 * d_te, -0.5 * (0.6 * d_te - eps),
             -0.5 * eps, 0.0, eps]
  np.testing.assert_allclose(values, by_hand, atol=1e-5)
  # Continuity across both boundaries (the ramp reading of Eq. 6 makes ALoss continuous at beta).
  assert abs(values[0] - values[2]) < 1e-3 and abs(values[3] - values[5]) < 1e-3


def test_eq6_literal_reading_would_be_discontinuous():
  # The printed Eq. 6 (-0.5 / (beta - P_Gt) in R_L) gives -0.5/0.16 * 0.32 = -1.0 at 0.08 and is
  # nonzero at P_Gt; our ramp gives Fig. 7's -0.08 and 0. This pins which reading we implement.
  assert abs(_aloss([0.08], [0.0], [0.4])[0] - (-0.08)) < 1e-6
  assert abs(_aloss([0.08], [0.0], [0.4])[0] - (-0.5 / 0.16 * 0.32)) > 0.5


def test_main_loss_eq13_by_hand():
  error = jnp.array([0.0, 0.3, 0.5, 0.6, -0.6, 1.0])
  values = losses.main_loss(error, jnp.zeros_like(error), reduction="none")
  np.testing.assert_allclose(values, [0.0, 0.3, 0.5, 0.36 + 0.25, 0.36 + 0.25, 1.25], atol=1e-6)
  # Continuous at Delta = 0.5 (C = 0.25).
  near = losses.main_loss(jnp.array([0.5 - 1e-4, 0.5 + 1e-4]), jnp.zeros(2), reduction="none")
  assert abs(float(near[1] - near[0])) < 1e-3
  # Mean reduction: Eq. 13's 1/(Nk) sum.
  np.testing.assert_allclose(losses.main_loss(error, 0 * error), np.mean(values), rtol=1e-6)


def test_kd_loss_by_hand():
  # P_Gt = 0, P_Pr = 0.3; Tough at 0.2 -> R_P, ALoss = +0.1; Tolerant at -0.5 -> mirrored to 0.5,
  # beta = 0.2, R_N, ALoss = -0.5 * 0.2 = -0.1; KD = 2 * 0.3 + 0.1 - 0.1 = 0.6.
  args = [jnp.array([x]) for x in (0.3, 0.0, 0.2, -0.5)]
  terms = losses.kd_loss_terms(*args, reduction="none")
  np.testing.assert_allclose([terms[k][0] for k in ("main", "tough", "tolerant", "total")],
                             [0.3, 0.1, -0.1, 0.6], atol=1e-6)
  assert abs(float(losses.kd_loss(*args)) - 0.6) < 1e-6
  assert abs(float(losses.kd_loss(*args, use_tolerant=False)) - 0.7) < 1e-6
  assert abs(float(losses.kd_loss(*args, use_tough=False)) - 0.5) < 1e-6
  assert abs(float(losses.kd_loss(*args, phi=1.0)) - 0.3) < 1e-6
  # sigma override: sigma = 0.8 puts beta at 0.4 > 0.3, so the Tolerant term is in R_L:
  # -0.5 * 0.3 / 0.4 * 0.2 = -0.075; KD = 0.6 + 0.1 - 0.075.
  assert abs(float(losses.kd_loss(*args, sigma=0.8)) - 0.625) < 1e-6


def test_kd_reduction_mean_is_mean_of_none_and_shape():
  rng = np.random.default_rng(1)
  arrays = [jnp.asarray(rng.uniform(-0.5, 0.5, size=(3, 7, 2)), jnp.float32) for _ in range(4)]
  per_coordinate = losses.kd_loss(*arrays, reduction="none")
  assert per_coordinate.shape == (3, 7, 2)
  np.testing.assert_allclose(losses.kd_loss(*arrays), per_coordinate.mean(), rtol=1e-5)


# --- Section 3.4's non-negativity claim -------------------------------------------------------------


def _kd_on_grid(d_tough, d_tolerant, **kwargs):
  pred = np.linspace(-0.5, 0.5, 40001).astype(np.float32)
  zero = np.zeros_like(pred)
  # Teachers on opposite sides of P_Gt: Eq. 4 makes the side irrelevant.
  values = np.asarray(losses.kd_loss(pred, zero, zero + d_tough, zero - d_tolerant, reduction="none", **kwargs))
  return pred, values


@pytest.mark.parametrize("d_tough,d_tolerant", [(1.0, 1.0), (0.4, 0.4), (0.2, 0.6), (0.05, 0.9)])
def test_kd_loss_is_negative_near_gt_with_two_teachers(d_tough, d_tolerant):
  # Worked out in the losses module docstring: minimum -(1 - phi sigma)^2 H / (4 sigma) = -0.025 H at
  # |P_Pr - P_Gt| = (1 - phi sigma) H / 2 = 0.1 H, with H the harmonic mean of the teacher distances.
  harmonic = 2 * d_tough * d_tolerant / (d_tough + d_tolerant)
  pred, values = _kd_on_grid(d_tough, d_tolerant)
  assert values.min() < 0
  np.testing.assert_allclose(values.min(), -0.025 * harmonic, rtol=1e-3)
  np.testing.assert_allclose(abs(pred[np.argmin(values)]), 0.1 * harmonic, atol=1e-4)
  # The per-coordinate minimum is not at the ground truth: P_Gt is a local maximum.
  assert values[len(pred) // 2] == 0.0
  # An independent closed form in R_L of both teachers: 2x - x(D1 - x)/(2 sigma D1) - x(D2 - x)/(2 sigma D2).
  x = 0.1 * harmonic
  closed = 2 * x - x * (d_tough - x) / (0.8 * d_tough) - x * (d_tolerant - x) / (0.8 * d_tolerant)
  got = float(losses.kd_loss(jnp.array([x]), jnp.zeros(1), jnp.array([d_tough]), jnp.array([d_tolerant])))
  np.testing.assert_allclose(got, closed, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(closed, -0.025 * harmonic, rtol=1e-6)


@pytest.mark.parametrize("d_tough,d_tolerant", [(1.0, 1.0), (0.2, 0.6), (0.05, 0.9), (0.0, 0.7)])
def test_kd_loss_non_negative_with_one_teacher_or_phi_sigma_at_least_one(d_tough, d_tolerant):
  for kwargs in ({"use_tough": False}, {"use_tolerant": False}, {"sigma": 0.5}):
    _, values = _kd_on_grid(d_tough, d_tolerant, **kwargs)
    assert values.min() >= -1e-6, kwargs


def test_author_code_variant_can_be_negative_too():
  # Tough teacher 1.0 away, Tolerant teacher on P_Gt, P_Pr at the Tough beta = 0.15. The code's main loss
  # switches at d_Tol = 0, so it is Delta^2 = 0.0225 (weight 2); Tough in R_N: -0.45 * 0.85; Tolerant: 0.
  got = losses.kd_loss(jnp.array([0.15]), jnp.zeros(1), jnp.array([1.0]), jnp.zeros(1), variant="author_code")
  np.testing.assert_allclose(got, 2 * 0.0225 - 0.45 * 0.85, rtol=1e-5)


# --- The authors' public code as an independent oracle ---------------------------------------------


def _author_code_numpy(x_pr, x_gt, x_tough, x_tol):
  """custom_Losses.kd_loss of github.com/aliprf/KD-Loss restated in numpy, per coordinate, with the
  weights of its student_train.py (main 2, assistive 1 each). Its reduce_means are means of these."""
  sign = np.sign(x_pr - x_gt)
  tough = x_gt + sign * np.abs(x_tough - x_gt)
  b_tough = x_gt + sign * np.abs(tough - x_gt) * 0.15
  tol = x_gt + sign * np.abs(x_tol - x_gt)
  b_tol = x_gt + sign * np.abs(tol - x_gt) * 0.15
  tough_map = (np.where(np.sign(x_pr - tough) * np.sign(tough - x_gt) > 0, 1.9, 0.0)
               + np.where(np.sign(tough - x_pr) * np.sign(x_pr - b_tough) >= 0, -0.45, 0.0))
  tol_map = (np.where(np.sign(x_pr - tol) * np.sign(tol - x_gt) > 0, 1.8, 0.0)
             + np.where(np.sign(tol - x_pr) * np.sign(x_pr - b_tol) >= 0, -0.4, 0.0))
  d_tol = np.abs(x_gt - x_tol)
  error = np.abs(x_gt - x_pr)
  main = np.where(error <= d_tol, 3 * error, np.square(error) + 3 * d_tol - np.square(d_tol))
  return 2.0 * main + tough_map * np.abs(tough - x_pr) + tol_map * np.abs(tol - x_pr)


def test_author_code_variant_matches_public_code():
  rng = np.random.default_rng(0)
  gt = rng.uniform(-0.4, 0.4, size=(64, 5, 2))
  tough = gt + rng.normal(scale=0.05, size=gt.shape)
  tol = gt + rng.normal(scale=0.08, size=gt.shape)
  pred = gt + rng.normal(scale=0.1, size=gt.shape)
  # Ties the code treats specially: teacher on P_Gt, prediction on P_Gt, on the teacher, exactly on
  # beta (P_Gt = 0 there so that both computations of beta round identically).
  tough[0, 0, 0] = gt[0, 0, 0]
  tol[0, 1, 0] = gt[0, 1, 0]
  pred[0, 2, 0] = gt[0, 2, 0]
  pred[0, 3, 0] = tough[0, 3, 0]
  gt[0, 4, 0], tough[0, 4, 0], tol[0, 4, 0] = 0.0, 0.3, 0.2
  pred[0, 4, 0] = 0.15 * 0.3  # on the Tough teacher's beta
  expected = _author_code_numpy(pred, gt, tough, tol)
  with jax.enable_x64(True):  # exact ties need the same float64 arithmetic as the numpy oracle
    got = np.asarray(losses.kd_loss(pred, gt, tough, tol, variant="author_code", reduction="none"))
    paper = float(losses.kd_loss(pred, gt, tough, tol))
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
  # By hand: main 2 * 3 * 0.045; Tough on its beta (R_N): -0.45 * 0.255; Tolerant (beta 0.03) in R_N:
  # -0.4 * 0.155. With R_N open at beta (or the paper's ramp) the Tough term would be 0.
  np.testing.assert_allclose(got[0, 4, 0], 0.27 - 0.11475 - 0.062, rtol=1e-12)
  # The paper variant is a different function on the same inputs.
  assert abs(paper - expected.mean()) > 1e-3


def test_teacher_on_gt_differs_between_readings():
  # Paper (Eq. 7: 0 - 0 >= 0): R_P with omega = 1, an L1 pull to P_Gt. Authors' code: weight 0.
  assert abs(_aloss([0.2], [0.0], [0.0])[0] - 0.2) < 1e-7
  assert _aloss([0.2], [0.0], [0.0], regions="author_code", low_influence="zero")[0] == 0.0


# --- Gradients ---------------------------------------------------------------------------------------


def _away_from_boundaries(seed, count=24, margin=0.03):
  """Coordinates whose prediction is at least `margin` from every kink of both variants."""
  rng = np.random.default_rng(seed)
  rows = []
  while len(rows) < count:
    gt, d_tough, d_tol, d_pr = rng.uniform(-0.3, 0.3), *rng.uniform(0.05, 0.45, size=3)
    kinks = [0.0, 0.5, d_tough, d_tol, 0.4 * d_tough, 0.4 * d_tol, 0.15 * d_tough, 0.15 * d_tol]
    if min(abs(d_pr - k) for k in kinks) < margin:
      continue
    signs = rng.choice([-1.0, 1.0], size=3)
    rows.append((gt + signs[0] * d_pr, gt, gt + signs[1] * d_tough, gt + signs[2] * d_tol))
  return [jnp.asarray(np.array(column).reshape(-1, 2), jnp.float32) for column in zip(*rows)]


@pytest.mark.parametrize("variant", ["paper", "author_code"])
def test_check_grads_away_from_boundaries(variant):
  pred, gt, tough, tol = _away_from_boundaries(seed=3)
  check_grads(jax.jit(lambda p: losses.kd_loss(p, gt, tough, tol, variant=variant)), (pred,), order=1,
              modes=("rev",), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_check_grads_main_and_assistive():
  pred, gt, tough, _ = _away_from_boundaries(seed=4)
  check_grads(jax.jit(lambda p: losses.main_loss(p, gt)), (pred,), order=1, modes=("rev",), eps=1e-3, atol=2e-3)
  check_grads(jax.jit(lambda p: losses.assistive_loss(p, gt, tough)), (pred,), order=2, modes=("rev",), eps=1e-3,
              atol=2e-3)


def test_gradient_of_kd_by_hand():
  # In R_L of both teachers (D = 1 each): each ALoss is -0.5 (x / 0.4)(1 - x) = -1.25 x (1 - x), so
  # d/dx [2x - 2.5 x (1 - x)] = 2 - 2.5 (1 - 2x) = -0.25 at x = 0.05.
  grad = jax.grad(lambda p: losses.kd_loss(p, jnp.zeros(1), jnp.ones(1), -jnp.ones(1)))(jnp.array([0.05]))
  np.testing.assert_allclose(grad, [2 - 2.5 * 0.9], rtol=1e-5)
  # In R_P of both: 2 (main) + 1 + 1.
  grad = jax.grad(lambda p: losses.kd_loss(p, jnp.zeros(1), 0.1 * jnp.ones(1), 0.2 * jnp.ones(1)))(
      jnp.array([0.3]))
  np.testing.assert_allclose(grad, [4.0], rtol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "author_code"])
def test_gradients_finite_at_degenerate_points(variant):
  # Each column one degenerate case: pred == gt, teacher == gt (both), pred == teacher, pred on beta,
  # pred on the mirrored teacher, everything equal, Loss_main's kink (Delta = 0.5), teacher on beta's side.
  sigma = losses.VARIANTS[variant].sigma
  gt = jnp.array([0.1, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0, -0.1])
  tough = jnp.array([0.3, 0.0, 0.2, 0.2, 0.2, 0.2, 0.1, 0.3])
  tol = jnp.array([-0.2, 0.0, 0.2, 0.3, 0.3, 0.2, 0.3, 0.3])
  pred = jnp.array([0.1, 0.2, 0.2, sigma * 0.2, -0.2, 0.2, 0.5, -0.1 + sigma * 0.4])
  # Gradients with respect to every input (the prediction, and also the teachers and the ground truth).
  value_and_grads = jax.jit(jax.value_and_grad(
      lambda *a: losses.kd_loss(*a, variant=variant, reduction="none").sum(), argnums=(0, 1, 2, 3)))
  value, grads = value_and_grads(pred, gt, tough, tol)
  assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
  # Teacher == gt == pred everywhere: value 0 and finite gradients.
  zero = jnp.zeros(8)
  value, grads = value_and_grads(zero, zero, zero, zero)
  assert float(value) == 0.0 and all(np.all(np.isfinite(g)) for g in grads)


def test_jit_compiles():
  pred, gt, tough, tol = _away_from_boundaries(seed=5)
  jitted = jax.jit(lambda *a: losses.kd_loss(*a))
  np.testing.assert_allclose(jitted(pred, gt, tough, tol), losses.kd_loss(pred, gt, tough, tol), rtol=1e-6)


# --- Properties --------------------------------------------------------------------------------------

coordinate = st.floats(-0.5, 0.5, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(pred=coordinate, gt=coordinate, tough=coordinate, tol=coordinate, shift=st.floats(-0.2, 0.2))
def test_kd_symmetric_about_gt_and_translation_invariant(pred, gt, tough, tol, shift):
  def kd(*a):
    return float(losses.kd_loss(*[jnp.array([x], jnp.float32) for x in a]))
  base = kd(pred, gt, tough, tol)
  # Reflecting everything about P_Gt (Eq. 4 makes ALoss symmetric) leaves KD-Loss unchanged, and so does
  # moving the teachers to the other side of P_Gt.
  assert abs(kd(2 * gt - pred, gt, 2 * gt - tough, 2 * gt - tol) - base) < 1e-5
  assert abs(kd(pred, gt, 2 * gt - tough, tol) - base) < 1e-5
  assert abs(kd(pred + shift, gt + shift, tough + shift, tol + shift) - base) < 1e-4


@settings(max_examples=60, deadline=None)
@given(pred=coordinate, gt=coordinate, teacher=coordinate)
def test_single_teacher_kd_is_non_negative_and_zero_at_gt(pred, gt, teacher):
  args = [jnp.array([x], jnp.float32) for x in (pred, gt, teacher, teacher)]
  assert float(losses.kd_loss(*args, use_tolerant=False)) >= -1e-6
  at_gt = [args[1], args[1], args[2], args[3]]
  assert float(losses.kd_loss(*at_gt, use_tolerant=False)) == 0.0


# --- Baselines, table and errors ---------------------------------------------------------------------


def test_baselines_by_hand():
  pred = jnp.array([[0.1, -0.2], [0.005, 0.0]])
  gt = jnp.zeros((2, 2))
  np.testing.assert_allclose(losses.l2_loss(pred, gt, reduction="none"), [[0.01, 0.04], [0.000025, 0]], atol=1e-8)
  np.testing.assert_allclose(losses.l1_loss(pred, gt), (0.1 + 0.2 + 0.005) / 4, rtol=1e-6)
  np.testing.assert_allclose(losses.smooth_l1_loss(pred, gt, reduction="none"),
                             [[0.1 - 0.005, 0.2 - 0.005], [0.5 * 0.005 ** 2 / 0.01, 0.0]], atol=1e-8)


def test_student_loss_table():
  assert set(losses.STUDENT_LOSSES) == {"kd", "l2", "l1", "smooth_l1", "kd_tough_only", "kd_tolerant_only"}
  pred, gt, tough, tol = _away_from_boundaries(seed=6)
  for name, fn in losses.STUDENT_LOSSES.items():
    params = inspect.signature(fn).parameters
    assert list(params)[:4] == ["pred", "gt", "tough", "tolerant"], name
    assert params["variant"].kind == inspect.Parameter.KEYWORD_ONLY and params["variant"].default == "paper"
    assert params["reduction"].default == "mean"
    assert losses.get_student_loss(name)(pred, gt, tough, tol, reduction="none").shape == pred.shape
  np.testing.assert_allclose(losses.get_student_loss("l1")(pred, gt, tough, tol), losses.l1_loss(pred, gt))
  np.testing.assert_allclose(losses.get_student_loss("kd_tough_only")(pred, gt, tough, tol),
                             losses.kd_loss(pred, gt, tough, tol, use_tolerant=False))
  np.testing.assert_allclose(losses.get_student_loss("kd")(pred, gt, tough, tol, variant="author_code"),
                             losses.kd_loss(pred, gt, tough, tol, variant="author_code"))


def test_errors_are_clear():
  x = jnp.zeros((2, 2))
  with pytest.raises(ValueError, match=r"unknown loss: 'wing'; choose from \['kd', "):
    losses.get_student_loss("wing")
  with pytest.raises(ValueError, match="unknown KD-Loss variant"):
    losses.kd_loss(x, x, x, x, variant="tf")
  with pytest.raises(ValueError, match="unknown KD-Loss variant"):
    losses.get_student_loss("l2")(x, x, x, x, variant="tf")
  with pytest.raises(ValueError, match="unknown reduction"):
    losses.l2_loss(x, x, reduction="sum")
  with pytest.raises(ValueError, match="one shape"):
    losses.kd_loss(x, x, jnp.zeros((3, 2)), x)
  with pytest.raises(ValueError, match="sigma"):
    losses.assistive_loss(x, x, x, sigma=1.5)
  with pytest.raises(ValueError, match="at least one teacher"):
    losses.kd_loss(x, x, x, x, use_tough=False, use_tolerant=False)


@pytest.mark.parametrize("variant", ["paper", "author_code"])
def test_tough_only_never_reads_the_tolerant_teacher(variant):
  """Table 7's mnv2_Tou: with use_tolerant=False, any Tolerant prediction gives the same loss, per coordinate
  and in the mean (author_code once thresholded Loss_main at |gt - tolerant|)."""
  pred, gt, tough, tol = _away_from_boundaries(seed=11)
  rng = np.random.default_rng(3)
  base = losses.kd_loss(pred, gt, tough, tol, variant=variant, use_tolerant=False, reduction="none")
  for other in (jnp.zeros_like(tol), gt, tol + 0.3, jnp.asarray(rng.uniform(-0.5, 0.5, tol.shape), tol.dtype)):
    np.testing.assert_array_equal(
        losses.kd_loss(pred, gt, tough, other, variant=variant, use_tolerant=False, reduction="none"), base)
    np.testing.assert_array_equal(losses.get_student_loss("kd_tough_only")(pred, gt, tough, other, variant=variant),
                                  jnp.mean(base))


def test_author_code_tough_only_threshold_is_the_tough_distance_by_hand():
  """author_code Loss_main with only the Tough teacher: 3 Delta up to d_Tou, Delta^2 + 3 d_Tou - d_Tou^2 past it.
  gt 0, tough 0.2 (d_Tou = 0.2): pred 0.1 -> 0.3; pred 0.4 -> 0.16 + 0.6 - 0.04 = 0.72."""
  gt = jnp.zeros((2,))
  tough = jnp.full((2,), 0.2)
  pred = jnp.array([0.1, 0.4])
  terms = losses.kd_loss_terms(pred[None, :, None].repeat(2, -1), gt[None, :, None].repeat(2, -1),
                               tough[None, :, None].repeat(2, -1), jnp.full((1, 2, 2), 0.45),
                               variant="author_code", use_tolerant=False, reduction="none")
  np.testing.assert_allclose(terms["main"][0, :, 0], [0.3, 0.72], rtol=1e-6)
  np.testing.assert_array_equal(terms["tolerant"], 0.0)
