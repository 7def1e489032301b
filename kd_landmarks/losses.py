"""Loss functions of the paper: Loss_main, the assistive loss ALoss, KD-Loss, and the Table 8 baselines.

Every loss works per coordinate on arrays ``[..., K, 2]`` of zero-centred normalised coordinates (each in
[-0.5, 0.5], Section 3.3) and is pure and jittable. ``reduction='none'`` returns the per-coordinate values
(same shape as ``pred``); ``reduction='mean'`` returns their mean over every axis, which is Eq. 11's
``1/(N k) sum`` with each x and y coordinate counted as one term (as the authors' code does with
``tf.reduce_mean``).

``weights`` (optional, ``reduction='mean'`` only): one weight per point, ``[..., K]`` broadcastable to the
batch (e.g. a face's visibility mask: 0 for a point its annotation leaves out). The mean becomes
``sum(w * v) / sum(w)`` over every coordinate (both coordinates of a point share its weight), so a missing
point neither contributes nor dilutes the others; all-ones weights give the plain mean. Every term of KD-Loss
(Loss_main and both ALoss) is reduced with the same weights.

Equations as implemented (``d_Pr = |P_Pr - P_Gt|``, ``d_Te = |P_Te - P_Gt|``, per coordinate):

* Eq. 4  ``P_Te' = P_Gt + sign(P_Pr - P_Gt) d_Te``      (teacher mirrored to the prediction's side)
* Eq. 5  ``beta  = P_Gt + sigma sign(P_Pr - P_Gt) d_Te``  (so ``|beta - P_Gt| = sigma d_Te``)
* Eqs. 7-9 with the half-open intervals of the text:
  ``R_P: d_Pr >= d_Te``;  ``R_N: sigma d_Te <= d_Pr < d_Te``;  ``R_L: d_Pr < sigma d_Te``.
* Eq. 6  ``omega = +1`` in R_P, ``-0.5`` in R_N, and in R_L ``-0.5 d_Pr / (sigma d_Te)``: the linear ramp
  from 0 at P_Gt to -0.5 at beta that the text and Fig. 7 describe. Eq. 6 as printed writes
  ``-0.5 / (beta - P_Gt)`` and omits the factor ``(P_Pr - P_Gt)``; that literal form is neither 0 at
  P_Gt nor continuous at beta, contradicting the text, so we use the ramp.
* Eq. 10 ``ALoss = omega |P_Te' - P_Pr|`` -- linear in R_P and R_N, quadratic in R_L.
* Eqs. 12-13 ``Loss_main = Delta`` if ``Delta <= 0.5`` else ``Delta^2 + C`` with ``C = 0.5 - 0.5^2 = 0.25``.
* Eq. 14 ``KD-Loss = phi Loss_main + ALoss_Tou + ALoss_Tol`` with ``phi = 2``, ``sigma = 0.4``.

**Non-negativity (Section 3.4 claims sigma = 0.4 makes KD-Loss never negative).** It does not hold when
both teachers are away from the ground truth. Near P_Gt both points lie in R_L, where each ALoss has
slope ``-0.5 / sigma = -1.25`` in ``d_Pr``, while ``phi Loss_main`` has slope ``phi = 2``: the sum has
slope ``phi - 1 / sigma = -0.5 < 0``, so P_Gt is a local *maximum* of the per-coordinate KD-Loss. With
teacher distances D_Tou, D_Tol > 0 and ``H = 2 D_Tou D_Tol / (D_Tou + D_Tol)`` (their harmonic mean), the
per-coordinate minimum lies at ``d_Pr = (1 - phi sigma) H / 2 = 0.1 H`` on either side of P_Gt, with value
``-(1 - phi sigma)^2 H / (4 sigma) = -0.025 H`` (e.g. -0.025 for two teachers 1.0 away). It holds with
one teacher (the Table 7 ablations: slope ``2 - 1.25 > 0``, minimum 0 at P_Gt) and for two teachers
whenever ``phi sigma >= 1`` (e.g. sigma = 0.5). We follow the paper's equations regardless; the tests pin
these numbers and ``docs/method.md`` discusses them.

**The authors' public code** (github.com/aliprf/KD-Loss, ``custom_Losses.kd_loss``) differs; it is the
``'author_code'`` entry of :data:`VARIANTS`: weights +1.9/-0.45 (Tough) and +1.8/-0.4 (Tolerant) in R_P/R_N,
``beta`` at 0.15 of the teacher distance, weight 0 in R_L, its own region tests (R_P empty when the
teacher equals the ground truth), and a main loss ``3 Delta`` for ``Delta <= d_Tol`` else
``Delta^2 + 3 d_Tol - d_Tol^2`` (threshold at the Tolerant teacher's distance), with weight 2. Without the
Tolerant teacher (``kd_tough_only``) that threshold is the Tough teacher's distance ``d_Tou``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

REDUCTIONS = ("mean", "none")
LOW_INFLUENCE_MODES = ("ramp", "zero")
REGION_MODES = ("paper", "author_code")
MAIN_LOSS_MODES = ("paper", "author_code")

# Smooth-L1 switches from quadratic to linear at this error (normalised units, 1% of the image side).
# The usual beta = 1 would make smooth-L1 a pure 0.5 * L2 on [-0.5, 0.5] coordinates, contradicting
# Table 8 where smooth-L1 behaves like L1; the paper does not give its value.
SMOOTH_L1_BETA = 0.01


@dataclasses.dataclass(frozen=True)
class KDLossVariant:
  """The constants of KD-Loss; see :data:`VARIANTS`.

  Attributes:
    name: the table key.
    phi: weight of Loss_main in Eq. 14.
    sigma: ``|beta - P_Gt|`` as a fraction of ``|P_Te - P_Gt|`` (Eq. 5).
    tough_weights: (omega in R_P, omega in R_N) for the Tough teacher.
    tolerant_weights: the same for the Tolerant teacher.
    low_influence: omega in R_L: ``'ramp'`` (0 at P_Gt to the R_N weight at beta) or ``'zero'``.
    regions: ``'paper'`` (Eqs. 7-9, text's intervals) or ``'author_code'`` (its sign tests).
    main_loss: ``'paper'`` (Eq. 13, threshold ``main_delta``) or ``'author_code'`` (threshold at the
      Tolerant teacher's distance from P_Gt).
    main_delta: Eq. 13's threshold (paper main loss only).
    main_l1_scale: slope of the linear part of the main loss (1 in the paper, 3 in the code).
  """
  name: str
  phi: float
  sigma: float
  tough_weights: tuple[float, float]
  tolerant_weights: tuple[float, float]
  low_influence: str
  regions: str
  main_loss: str
  main_delta: float = 0.5
  main_l1_scale: float = 1.0


VARIANTS = {
    "paper": KDLossVariant(
        name="paper", phi=2.0, sigma=0.4, tough_weights=(1.0, -0.5), tolerant_weights=(1.0, -0.5),
        low_influence="ramp", regions="paper", main_loss="paper", main_delta=0.5, main_l1_scale=1.0),
    # student_train.py / custom_Losses.py of github.com/aliprf/KD-Loss (alpha_tough=1.9,
    # alpha_mi_tough=-0.45, alpha_tol=1.8, alpha_mi_tol=-0.4, main_loss_weight=2, 0.15 * |T - Gt|).
    "author_code": KDLossVariant(
        name="author_code", phi=2.0, sigma=0.15, tough_weights=(1.9, -0.45), tolerant_weights=(1.8, -0.4),
        low_influence="zero", regions="author_code", main_loss="author_code", main_l1_scale=3.0),
}


def get_variant(variant) -> KDLossVariant:
  """A :class:`KDLossVariant` from its name (or itself), with an error that lists the names."""
  if isinstance(variant, KDLossVariant):
    return variant
  try:
    return VARIANTS[variant]
  except (KeyError, TypeError):
    raise ValueError(f"unknown KD-Loss variant: {variant!r}; choose from {sorted(VARIANTS)}") from None


def _check(name, reduction, *arrays):
  if reduction not in REDUCTIONS:
    raise ValueError(f"{name}: unknown reduction {reduction!r}; choose from {list(REDUCTIONS)}")
  arrays = [jnp.asarray(a) for a in arrays]
  shapes = [a.shape for a in arrays]
  if any(s != shapes[0] for s in shapes):
    raise ValueError(
        f"{name}: pred, gt and teachers must have one shape [..., K, 2], got {shapes}; "
        "convert all of them to the same batch of normalised landmarks.")
  return arrays


def _reduce(values, reduction, weights=None):
  if weights is None:
    return jnp.mean(values) if reduction == "mean" else values
  if reduction != "mean":
    raise ValueError("weights apply to reduction='mean'; with reduction='none' multiply the per-coordinate "
                     "values by the weights yourself")
  return weighted_mean(values, weights)


def point_weights(weights, values_shape):
  """Per-point weights ``[..., K]`` as per-coordinate weights broadcast to ``values_shape`` ``[..., K, 2]``."""
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape[-1:] != tuple(values_shape[-2:-1]):
    raise ValueError(f"weights must be per point [..., K] with K={values_shape[-2]}, got shape {weights.shape}")
  return jnp.broadcast_to(weights[..., None], values_shape)


def weighted_mean(values, weights):
  """``sum(w * v) / sum(w)`` with per-point ``weights`` ``[..., K]`` over per-coordinate ``values`` ``[..., K, 2]``
  (0 when every weight is 0)."""
  coordinate_weights = point_weights(weights, values.shape)
  total = jnp.sum(coordinate_weights)
  return jnp.sum(coordinate_weights * values) / jnp.where(total > 0, total, 1.0)


def l2_loss(pred, gt, *, reduction="mean", weights=None):
  """Squared error per coordinate (Table 8 "L2 Loss"; also how the teachers are trained)."""
  pred, gt = _check("l2_loss", reduction, pred, gt)
  return _reduce(jnp.square(pred - gt), reduction, weights)


def l1_loss(pred, gt, *, reduction="mean", weights=None):
  """Absolute error per coordinate (Table 8 "L1 Loss")."""
  pred, gt = _check("l1_loss", reduction, pred, gt)
  return _reduce(jnp.abs(pred - gt), reduction, weights)


def smooth_l1_loss(pred, gt, *, beta=SMOOTH_L1_BETA, reduction="mean", weights=None):
  """Smooth-L1 (Table 8): ``0.5 x^2 / beta`` for ``|x| < beta``, else ``|x| - 0.5 beta``."""
  pred, gt = _check("smooth_l1_loss", reduction, pred, gt)
  if not beta > 0:
    raise ValueError(f"smooth_l1_loss: beta must be > 0, got {beta}")
  error = jnp.abs(pred - gt)
  values = jnp.where(error < beta, 0.5 * jnp.square(error) / beta, error - 0.5 * beta)
  return _reduce(values, reduction, weights)


def main_loss(pred, gt, *, delta=0.5, l1_scale=1.0, reduction="mean", weights=None):
  """Loss_main (Eqs. 12-13): ``l1_scale * Delta`` for ``Delta <= delta``, else ``Delta^2 + C``.

  ``C = l1_scale * delta - delta^2`` joins the pieces continuously (the paper: ``l1_scale = 1``,
  ``delta = 0.5``, ``C = 0.25``). ``delta`` may be an array broadcastable to ``pred`` -- the authors'
  code uses ``delta = |P_Gt - P_Sm|`` and ``l1_scale = 3``.
  """
  pred, gt = _check("main_loss", reduction, pred, gt)
  error = jnp.abs(pred - gt)  # Eq. 12
  delta = jnp.asarray(delta, dtype=error.dtype)
  offset = l1_scale * delta - jnp.square(delta)
  values = jnp.where(error <= delta, l1_scale * error, jnp.square(error) + offset)
  return _reduce(values, reduction, weights)


def assistive_weight(pred, gt, teacher, *, sigma=0.4, positive_weight=1.0, negative_weight=-0.5,
                     low_influence="ramp", regions="paper"):
  """omega_Te of Eq. 6 per coordinate, and the mirrored teacher P_Te' of Eq. 4.

  Returns ``(omega, mirrored_teacher)``; see the module docstring for the regions and the R_L ramp.
  """
  if low_influence not in LOW_INFLUENCE_MODES:
    raise ValueError(f"unknown low_influence: {low_influence!r}; choose from {list(LOW_INFLUENCE_MODES)}")
  if regions not in REGION_MODES:
    raise ValueError(f"unknown regions: {regions!r}; choose from {list(REGION_MODES)}")
  if not 0.0 <= sigma <= 1.0:
    raise ValueError(f"sigma must be in [0, 1] (beta lies between P_Gt and P_Te), got {sigma}")
  pred, gt, teacher = (jnp.asarray(a) for a in (pred, gt, teacher))
  side = jnp.sign(pred - gt)
  pred_distance = jnp.abs(pred - gt)
  teacher_distance = jnp.abs(teacher - gt)
  beta_distance = sigma * teacher_distance  # Eq. 5: |beta - P_Gt|
  mirrored = gt + side * teacher_distance  # Eq. 4
  if regions == "paper":
    in_positive = pred_distance >= teacher_distance  # Eq. 7
    in_negative = ~in_positive & (pred_distance >= beta_distance)  # Eq. 8, [beta, P_Te)
  else:
    # custom_Losses.kd_loss: R_P iff sign(Pr - T') sign(T' - Gt) > 0 (empty when T = Gt);
    # R_N iff sign(T' - Pr) sign(Pr - beta) >= 0 (closed [beta, T']).
    beta = gt + side * beta_distance
    in_positive = jnp.sign(pred - mirrored) * jnp.sign(mirrored - gt) > 0
    in_negative = ~in_positive & (jnp.sign(mirrored - pred) * jnp.sign(pred - beta) >= 0)
  in_low = ~in_positive & ~in_negative & (pred_distance < beta_distance)  # Eq. 9, [P_Gt, beta)
  if low_influence == "ramp":
    # beta_distance is 0 only when R_L is empty; the safe denominator keeps the unused branch (and
    # its gradient) finite there instead of producing 0/0 = NaN that jnp.where would still backprop.
    safe_beta_distance = jnp.where(beta_distance > 0, beta_distance, 1.0)
    low_weight = negative_weight * pred_distance / safe_beta_distance
  else:
    low_weight = jnp.zeros_like(pred_distance)
  omega = jnp.where(in_positive, positive_weight,
                    jnp.where(in_negative, negative_weight, jnp.where(in_low, low_weight, 0.0)))
  return omega, mirrored


def assistive_loss(pred, gt, teacher, *, sigma=0.4, positive_weight=1.0, negative_weight=-0.5,
                   low_influence="ramp", regions="paper", reduction="mean", weights=None):
  """ALoss_Te (Eqs. 4-10): ``omega_Te |P_Te' - P_Pr|`` per coordinate.

  Defaults are the paper's; the authors' code uses ``sigma=0.15``, weights (1.9, -0.45) or (1.8, -0.4),
  ``low_influence='zero'`` and ``regions='author_code'``.
  """
  pred, gt, teacher = _check("assistive_loss", reduction, pred, gt, teacher)
  omega, mirrored = assistive_weight(
      pred, gt, teacher, sigma=sigma, positive_weight=positive_weight, negative_weight=negative_weight,
      low_influence=low_influence, regions=regions)
  return _reduce(omega * jnp.abs(mirrored - pred), reduction, weights)  # Eq. 10


def kd_loss_terms(pred, gt, tough, tolerant, *, variant="paper", phi=None, sigma=None,
                  use_tough=True, use_tolerant=True, reduction="mean", weights=None):
  """The terms of Eq. 14 as a dict: ``main`` (Loss_main, unweighted), ``tough``, ``tolerant`` (ALoss,
  zero when the teacher is not used) and ``total = phi * main + tough + tolerant``.

  A teacher that is not used (``use_tough=False`` / ``use_tolerant=False``) is never read: the
  ``'author_code'`` main-loss threshold is then the other teacher's distance from P_Gt."""
  pred, gt, tough, tolerant = _check("kd_loss", reduction, pred, gt, tough, tolerant)
  config = get_variant(variant)
  phi = config.phi if phi is None else phi
  sigma = config.sigma if sigma is None else sigma
  if not (use_tough or use_tolerant):
    raise ValueError("kd_loss: use at least one teacher (use_tough or use_tolerant); "
                     "without teachers train with main_loss or l1_loss instead.")
  if config.main_loss == "paper":
    main = main_loss(pred, gt, delta=config.main_delta, l1_scale=config.main_l1_scale, reduction="none")
  else:
    # The authors' code thresholds Loss_main at the Tolerant teacher's distance from P_Gt. Without the
    # Tolerant teacher (kd_tough_only, Table 7) the threshold is the remaining teacher's distance
    # |P_Gt - P_Tou|: the same "switch to L2 beyond the assisting teacher" rule, and a loss that never
    # reads the dropped teacher (docs/method.md, "Ablations with the authors' constants").
    threshold_teacher = tolerant if use_tolerant else tough
    main = main_loss(pred, gt, delta=jnp.abs(gt - threshold_teacher), l1_scale=config.main_l1_scale,
                     reduction="none")

  def aloss(teacher, weights):
    return assistive_loss(pred, gt, teacher, sigma=sigma, positive_weight=weights[0],
                          negative_weight=weights[1], low_influence=config.low_influence,
                          regions=config.regions, reduction="none")

  zero = jnp.zeros_like(main)
  tough_term = aloss(tough, config.tough_weights) if use_tough else zero
  tolerant_term = aloss(tolerant, config.tolerant_weights) if use_tolerant else zero
  total = phi * main + tough_term + tolerant_term  # Eq. 14
  terms = {"main": main, "tough": tough_term, "tolerant": tolerant_term, "total": total}
  return {name: _reduce(value, reduction, weights) for name, value in terms.items()}


def kd_loss(pred, gt, tough, tolerant, *, variant="paper", phi=None, sigma=None, use_tough=True,
            use_tolerant=True, reduction="mean", weights=None):
  """KD-Loss (Eq. 14): ``phi * Loss_main + ALoss_Tou + ALoss_Tol``.

  Args:
    pred, gt, tough, tolerant: ``[..., K, 2]`` normalised coordinates: the student's prediction, the
      ground truth (Hard-landmarks), the Tough teacher's Accurate-landmarks and the Tolerant teacher's
      Smooth-landmarks.
    variant: ``'paper'`` (phi = 2, sigma = 0.4) or ``'author_code'``; see :data:`VARIANTS`.
    phi, sigma: override the variant's values when given.
    use_tough, use_tolerant: the Table 7 ablations drop one ALoss term (phi unchanged).
    reduction: ``'mean'`` or ``'none'`` (per coordinate).
    weights: optional per-point weights ``[..., K]`` (``'mean'`` only; module docstring).

  With the paper's constants the per-coordinate value can be negative near P_Gt when both teachers
  are away from it (minimum ``-0.025 H`` at ``0.1 H`` from P_Gt, H the harmonic mean of the teacher
  distances); see the module docstring.
  """
  return kd_loss_terms(pred, gt, tough, tolerant, variant=variant, phi=phi, sigma=sigma,
                       use_tough=use_tough, use_tolerant=use_tolerant, reduction=reduction, weights=weights)["total"]


# --- The table the training config selects from ------------------------------------------------------


def _student_kd(pred, gt, tough, tolerant, *, variant="paper", reduction="mean", weights=None):
  return kd_loss(pred, gt, tough, tolerant, variant=variant, reduction=reduction, weights=weights)


def _student_kd_tough_only(pred, gt, tough, tolerant, *, variant="paper", reduction="mean", weights=None):
  return kd_loss(pred, gt, tough, tolerant, variant=variant, use_tolerant=False, reduction=reduction,
                 weights=weights)


def _student_kd_tolerant_only(pred, gt, tough, tolerant, *, variant="paper", reduction="mean", weights=None):
  return kd_loss(pred, gt, tough, tolerant, variant=variant, use_tough=False, reduction=reduction,
                 weights=weights)


def _baseline(loss_fn):
  def student_loss(pred, gt, tough=None, tolerant=None, *, variant="paper", reduction="mean", weights=None):
    del tough, tolerant  # Baselines do not use the teachers.
    get_variant(variant)  # Still reject a misspelt variant rather than ignore it silently.
    return loss_fn(pred, gt, reduction=reduction, weights=weights)
  student_loss.__name__ = f"student_{loss_fn.__name__}"
  student_loss.__doc__ = f"{loss_fn.__doc__} (teachers and variant ignored)"
  return student_loss


STUDENT_LOSSES: dict[str, Callable] = {
    "kd": _student_kd,
    "kd_tough_only": _student_kd_tough_only,
    "kd_tolerant_only": _student_kd_tolerant_only,
    "l2": _baseline(l2_loss),
    "l1": _baseline(l1_loss),
    "smooth_l1": _baseline(smooth_l1_loss),
}


def get_student_loss(name: str) -> Callable:
  """``(pred, gt, tough, tolerant, *, variant='paper', reduction='mean', weights=None) -> loss`` for a config
  name."""
  try:
    return STUDENT_LOSSES[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown loss: {name!r}; choose from {sorted(STUDENT_LOSSES)}") from None
