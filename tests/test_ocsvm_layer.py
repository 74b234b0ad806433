"""The differentiable OCSVM layer: agreement with scikit-learn, implicit gradients, KKT accuracy, the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.svm import OneClassSVM

from scripts.baselines.ocsvm_layer import (
    OCSVMGuidedLoss,
    box_bound,
    fit_latent_ocsvm,
    free_mask,
    kkt_residual,
    ocsvm_decision,
    ocsvm_rho,
    rbf_kernel,
    resolve_gamma,
    sklearn_decision,
    solve_ocsvm_dual,
)

# (seed, n, d, nu): nu * n never an integer, so no support vector is pinned exactly at a bound by the sum
SKLEARN_CASES = [
    (0, 20, 2, 0.13),
    (1, 20, 3, 0.3),
    (2, 35, 2, 0.07),
    (3, 40, 4, 0.25),
    (4, 50, 5, 0.05),
    (5, 60, 3, 0.45),
    (6, 60, 5, 0.03),
    (8, 30, 2, 0.55),
    (9, 45, 4, 0.41),
    (10, 25, 3, 0.7),
]
# cases whose solution has alphas at the upper bound C (outliers of the fitted boundary) as well as free ones
BOUNDED_CASES = {(5, 60, 3, 0.45), (8, 30, 2, 0.55), (9, 45, 4, 0.41), (10, 25, 3, 0.7)}


def _points(seed: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training points with a few outliers (so some alphas sit at the upper bound) and held-out points."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[: max(1, n // 10)] *= 3.0
    return torch.tensor(x), torch.tensor(rng.normal(scale=1.5, size=(25, d)))


def _active_set_margin(K: torch.Tensor, alpha: torch.Tensor, nu: float) -> float:
    """How far the solution is from an active-set change: free alphas from the bounds, and the bounded ones'
    gradients from rho (their KKT multipliers)."""
    upper = box_bound(K.shape[0], nu)
    free = free_mask(alpha, upper)
    grad = K @ alpha
    rho = ocsvm_rho(K, alpha, nu)
    from_bounds = torch.minimum(alpha[free], upper - alpha[free]).min() / upper
    multipliers = (grad[~free] - rho).abs().min()
    return float(torch.minimum(from_bounds, multipliers))


@pytest.mark.parametrize(("seed", "n", "d", "nu"), SKLEARN_CASES)
def test_dual_matches_sklearn_precomputed(seed: int, n: int, d: int, nu: float) -> None:
    x, x_test = _points(seed, n, d)
    gamma = 1.0 / d
    K, K_test = rbf_kernel(x, x, gamma), rbf_kernel(x_test, x, gamma)
    alpha = solve_ocsvm_dual(K, nu)
    rho = ocsvm_rho(K, alpha, nu)
    ref = OneClassSVM(kernel="precomputed", nu=nu, tol=1e-10).fit(K.numpy())

    assert set(np.flatnonzero(alpha.numpy() > 0)) == set(ref.support_)
    ref_alpha = np.zeros(n)
    ref_alpha[ref.support_] = ref.dual_coef_[0]
    np.testing.assert_allclose(nu * n * alpha.numpy(), ref_alpha, atol=1e-4)
    assert nu * n * float(rho) == pytest.approx(ref.offset_[0], abs=1e-4)
    ours = sklearn_decision(K_test, alpha, rho, nu).numpy()
    theirs = ref.decision_function(K_test.numpy())
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    if (seed, n, d, nu) in BOUNDED_CASES:  # the upper bound is exercised, in both solutions
        assert bool((alpha >= box_bound(n, nu)).any()) and bool((ref.dual_coef_ >= 1.0 - 1e-9).any())


def test_dual_matches_sklearn_rbf_and_scaling() -> None:
    x, x_test = _points(7, 45, 3)
    nu = 0.2
    ref = OneClassSVM(kernel="rbf", nu=nu, gamma="scale", tol=1e-10).fit(x.numpy())
    gamma = resolve_gamma(x, "scale")
    assert gamma == pytest.approx(ref._gamma)
    K = rbf_kernel(x, x, gamma)
    alpha = solve_ocsvm_dual(K, nu)
    rho = ocsvm_rho(K, alpha, nu)
    np.testing.assert_allclose(nu * 45 * alpha.numpy()[ref.support_], ref.dual_coef_[0], atol=1e-4)
    plain = ocsvm_decision(rbf_kernel(x_test, x, gamma), alpha, rho).numpy()
    np.testing.assert_allclose(nu * 45 * plain, ref.decision_function(x_test.numpy()), atol=1e-4)
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(alpha.max()) <= box_bound(45, nu)


KKT_CASES = [(0, 8, 2, 0.2), (1, 64, 8, 0.03), (2, 128, 16, 0.03), (3, 128, 4, 0.5)]


@pytest.mark.parametrize(("seed", "n", "d", "nu"), KKT_CASES)
def test_kkt_residual_is_tiny(seed: int, n: int, d: int, nu: float) -> None:
    x, _ = _points(seed, n, d)
    K = rbf_kernel(x, x, 1.0 / d)
    alpha = solve_ocsvm_dual(K, nu)
    assert kkt_residual(K, alpha, nu) < 1e-9


def test_duplicate_points_and_float32() -> None:
    """A rank-deficient K (duplicated codes, as in a collapsing latent space) is still solved, also in float32."""
    x, _ = _points(8, 12, 2)
    x = torch.cat([x, x[:4]])
    K = rbf_kernel(x, x, 0.5)
    alpha = solve_ocsvm_dual(K, 0.3)
    assert kkt_residual(K, alpha, 0.3) < 1e-9
    alpha32 = solve_ocsvm_dual(K.float(), 0.3)
    assert alpha32.dtype == torch.float32
    assert kkt_residual(K, alpha32, 0.3) < 1e-6


@pytest.mark.parametrize(("seed", "nu"), [(0, 0.3), (3, 0.3), (11, 0.25)])
def test_gradcheck_dual_wrt_points(seed: int, nu: float) -> None:
    torch.manual_seed(seed)
    x = torch.randn(10, 2, dtype=torch.float64)
    x[0] *= 3.0
    K = rbf_kernel(x, x, 0.5)
    alpha = solve_ocsvm_dual(K, nu)
    assert _active_set_margin(K, alpha, nu) > 1e-3  # the active set cannot change under gradcheck's 1e-6 steps

    def alpha_and_rho(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = rbf_kernel(points, points, 0.5)
        a = solve_ocsvm_dual(kernel, nu)
        return a, ocsvm_rho(kernel, a, nu)

    assert torch.autograd.gradcheck(alpha_and_rho, (x.requires_grad_(),))


def test_gradcheck_uses_upper_bound_case() -> None:
    """An active set with alphas at C (outliers) as well as free ones: the bounded ones carry no gradient."""
    torch.manual_seed(0)
    x = torch.randn(12, 2, dtype=torch.float64)
    x[:2] += 4.0
    nu, gamma = 0.45, 0.2
    K = rbf_kernel(x, x, gamma)
    alpha = solve_ocsvm_dual(K, nu)
    assert bool((alpha >= box_bound(12, nu)).any()) and bool(free_mask(alpha, box_bound(12, nu)).any())
    assert _active_set_margin(K, alpha, nu) > 1e-3
    assert torch.autograd.gradcheck(lambda p: solve_ocsvm_dual(rbf_kernel(p, p, gamma), nu), (x.requires_grad_(),))


def _latent_batch(seed: int, outliers: bool) -> torch.Tensor:
    torch.manual_seed(seed)
    z = torch.randn(16, 3, dtype=torch.float64)
    if outliers:
        z[8:11] += torch.tensor([3.0, -2.5, 2.0], dtype=torch.float64)
    return z


def test_gradcheck_loss_wrt_codes() -> None:
    loss = OCSVMGuidedLoss(nu=0.3, weight=0.1)
    z = _latent_batch(0, outliers=True)
    f = loss.decision_values(z)
    assert bool((f < 0).any()) and float(f.abs().min()) > 1e-3  # penalty active, away from the relu kink
    half = rbf_kernel(*(2 * [(z[:8] - z[:8].mean(0)) / z[:8].std(0, unbiased=False)]), 1 / 3)
    assert _active_set_margin(half, solve_ocsvm_dual(half, 0.3), 0.3) > 1e-3
    assert torch.autograd.gradcheck(loss, (z.requires_grad_(),))


def test_loss_gradient_finite_and_nonzero_with_outliers() -> None:
    loss = OCSVMGuidedLoss()  # defaults: nu=0.03, weight=0.1, gamma='scale'
    z = _latent_batch(1, outliers=True).float().requires_grad_()
    value = loss(z)
    assert value.dtype == torch.float32 and value.ndim == 0 and float(value.detach()) > 0
    value.backward()
    assert bool(torch.isfinite(z.grad).all())
    assert float(z.grad[8:].abs().sum()) > 0 and float(z.grad[:8].abs().sum()) > 0


def test_loss_value_and_affine_invariance() -> None:
    """The loss is 0.1 / nu * sum relu(-f), and invariant to a per-feature affine map of the codes."""
    loss = OCSVMGuidedLoss(nu=0.3, weight=0.1)
    z = _latent_batch(2, outliers=True)
    f = loss.decision_values(z)
    assert float(loss(z)) == pytest.approx(0.1 / 0.3 * float(torch.relu(-f).sum()), rel=1e-12)
    scaled = z * torch.tensor([2.0, 0.5, 7.0], dtype=torch.float64) + 3.0
    assert float(loss(scaled)) == pytest.approx(float(loss(z)), rel=1e-9)


def test_loss_is_zero_when_second_half_inside() -> None:
    z = _latent_batch(3, outliers=False)
    z[8:] = 0.1 * z[8:] + z[:8].mean(0)  # a tight cluster at the first half's centre
    z.requires_grad_()
    value = OCSVMGuidedLoss(nu=0.3)(z)
    assert float(value.detach()) == 0.0
    value.backward()
    assert float(z.grad.abs().max()) == 0.0


def test_loss_decisions_match_fitted_pipeline() -> None:
    """The batch OCSVM of the loss is the scoring pipeline fitted on the first half (up to the nu * n scaling)."""
    nu = 0.2
    z = _latent_batch(4, outliers=True)
    f = OCSVMGuidedLoss(nu=nu).decision_values(z).detach().numpy()
    pipeline = fit_latent_ocsvm(z[:8].numpy(), nu=nu)
    pipeline.named_steps["ocsvm"].set_params(tol=1e-10)
    pipeline.fit(z[:8].numpy())
    np.testing.assert_allclose(nu * 8 * f, pipeline.decision_function(z[8:].numpy()), atol=1e-6)
    scores = -pipeline.decision_function(z[8:].numpy())
    assert np.argmax(scores) in (0, 1, 2)  # the shifted codes are the most anomalous
