"""A one-class SVM solved as a differentiable layer, and the OCSVM-guided loss built on it.

Baseline: "OCSVM-guided representation learning" (Pinon and Lartizien, 2025). An autoencoder is trained with
``MSE reconstruction + OCSVMGuidedLoss(z)``: in every batch a nu-one-class SVM is fitted on the latent codes of
one half of the batch and the other half is penalised for falling outside its boundary. The SVM's solution is
differentiated implicitly, so the encoder learns a latent space that a one-class SVM describes well; after
training, anomalies are scored with a plain scikit-learn OCSVM fitted on the training codes.

Scaling convention (used everywhere in this module unless a name says ``sklearn``): Schoelkopf's dual

    minimise 1/2 a^T K a   subject to   0 <= a_i <= C = 1 / (nu * n),   sum_i a_i = 1,

with decision function ``f(x) = sum_i a_i k(x_i, x) - rho``. libsvm (hence scikit-learn) solves the same problem
scaled by ``nu * n``: ``alpha_libsvm = nu * n * a`` (bounds ``[0, 1]``, sum ``nu * n``), ``rho_libsvm = nu * n *
rho``, so ``OneClassSVM.decision_function = nu * n * f``. Both have the same support vectors and the same sign;
:func:`sklearn_decision` returns the scikit-learn numbers.

Everything here is plain torch; the solver works in float64 whatever the input dtype.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn

GammaSpec = float | str

_TAU = 1e-12  # curvature floor of an SMO pair, as libsvm's TAU (guards a positive semi-definite K)
_STAGES = (1e-5, 1e-8, 1e-11)  # SMO tolerances (relative to max diag K) at which an exact polish is tried


# ----------------------------------------------------------------------------------------------- kernels


def rbf_kernel(a: torch.Tensor, b: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """Gaussian kernel ``exp(-gamma * ||a_i - b_j||^2)``, ``(n, d), (m, d) -> (n, m)``.

    Squared distances as ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product, cheap for wide latent codes), clipped at 0
    against round-off; no square root, so gradients stay finite at coincident points. The layer symmetrises K
    itself, so the round-off asymmetry of ``rbf_kernel(x, x)`` does not matter.
    """
    sq_dist = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1) - 2.0 * a @ b.mT
    return torch.exp(-gamma * sq_dist.clamp_min(0.0))


def resolve_gamma(x: torch.Tensor, gamma: GammaSpec) -> float:
    """scikit-learn's ``gamma``: ``'scale'`` is ``1 / (d * Var(x))`` over all entries, ``'auto'`` is ``1 / d``.

    Returned as a float, so it carries no gradient: as in scikit-learn it is a fitted constant. (On standardised
    codes ``Var`` is 1 whatever the codes, so its derivative would be zero anyway.)
    """
    if isinstance(gamma, str):
        d = x.shape[-1]
        if gamma == "auto":
            return 1.0 / d
        if gamma == "scale":
            var = float(x.detach().double().var(unbiased=False))
            return 1.0 / (d * var) if var > 0 else 1.0
        raise ValueError(f"unknown gamma {gamma!r}: use a float, 'scale' or 'auto'")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    return float(gamma)


# ------------------------------------------------------------------------------------ dual: forward solve


def box_bound(n: int, nu: float) -> float:
    """Upper bound ``C = 1 / (nu * n)`` of the dual variables (above 1 it never binds, since they sum to 1)."""
    if not 0.0 < nu <= 1.0:
        raise ValueError(f"nu must be in (0, 1], got {nu}")
    return 1.0 / (nu * n)


def free_mask(alpha: torch.Tensor, upper: float) -> torch.Tensor:
    """Margin support vectors, ``0 < a_i < C`` (up to a relative 1e-12, as the solver sets bounded ones exactly)."""
    slack = 1e-12 * upper
    return (alpha > slack) & (alpha < upper - slack)


def _initial_alpha(K: torch.Tensor, upper: float) -> torch.Tensor:
    """A feasible start: libsvm's (``floor(nu n)`` variables at C, the remainder on one more), placed on the points
    of lowest kernel density ``(K 1)_i``, which are the likeliest support vectors."""
    n = K.shape[0]
    alpha = torch.zeros(n, dtype=K.dtype, device=K.device)
    order = torch.argsort(K.sum(1))
    full = min(int(math.floor(1.0 / upper + 1e-12)), n)
    alpha[order[:full]] = upper
    if full < n:
        alpha[order[full]] = max(1.0 - full * upper, 0.0)
    return alpha


def _kkt_gap(alpha: torch.Tensor, grad: torch.Tensor, upper: float) -> float:
    """libsvm's stopping measure ``max_{a_i > 0} g_i - min_{a_i < C} g_i`` (``g = K a``): it is <= 0 exactly when
    some threshold ``rho`` separates the gradients as the KKT conditions demand."""
    low = grad[alpha > 0]
    up = grad[alpha < upper]
    if low.numel() == 0 or up.numel() == 0:
        return 0.0
    return float(low.max() - up.min())


def _violation(K: torch.Tensor, alpha: torch.Tensor, upper: float) -> float:
    """Largest violation of the optimality conditions: KKT gap (clipped at 0), ``|sum a - 1|`` and the box."""
    box = max(float((-alpha).max()), float((alpha - upper).max()), 0.0)
    return max(_kkt_gap(alpha, K @ alpha, upper), abs(float(alpha.sum()) - 1.0), box)


def _smo(K: torch.Tensor, alpha: torch.Tensor, grad: torch.Tensor, upper: float, tol: float, max_iter: int) -> int:
    """Sequential minimal optimisation with second-order working-set selection (Fan, Chen and Lin, 2005).

    Updates ``alpha`` and ``grad = K alpha`` in place until the KKT gap is below ``tol``; returns the number of
    iterations used. Each step moves mass from a point ``j`` with a too-large gradient to the point ``i`` with
    the smallest gradient among those that can still grow, exactly minimising the objective along that pair.
    """
    diag = torch.diagonal(K)
    inf = torch.tensor(math.inf, dtype=K.dtype, device=K.device)
    for it in range(max_iter):
        up, low = alpha < upper, alpha > 0
        neg_up = torch.where(up, -grad, -inf)
        i = int(torch.argmax(neg_up))
        g_i = float(grad[i])
        if float(torch.where(low, grad, -inf).max()) - g_i < tol:
            return it
        b = grad - g_i
        quad = (diag[i] + diag - 2.0 * K[i]).clamp_min(_TAU)
        j = int(torch.argmin(torch.where(low & (b > 0), -b * b / quad, inf)))
        a_i, a_j = float(alpha[i]), float(alpha[j])
        step = min(float(b[j] / quad[j]), upper - a_i, a_j)
        new_i = upper if step == upper - a_i else a_i + step
        new_j = 0.0 if step == a_j else a_j - step
        alpha[i], alpha[j] = new_i, new_j
        grad += (new_i - a_i) * K[i] + (new_j - a_j) * K[j]
    return max_iter


def _kkt_matrix(K_free: torch.Tensor) -> torch.Tensor:
    """``M = [[K_FF, -1], [1^T, 0]]``, the linear KKT system of the free variables and rho."""
    ones = torch.ones(K_free.shape[0], 1, dtype=K_free.dtype, device=K_free.device)
    return torch.cat([torch.cat([K_free, -ones], 1), torch.cat([ones.mT, ones.new_zeros(1, 1)], 1)])


def _polish(K: torch.Tensor, alpha: torch.Tensor, upper: float) -> torch.Tensor | None:
    """Exact solution for the active set of ``alpha``: bounded variables kept, the free ones from the KKT system

        [K_FF  -1] [a_F]   [-K_FU a_U      ]
        [1^T    0] [rho] = [1 - sum_U a_U ].

    Returns ``None`` when the system is singular or its solution leaves the box (wrong active set).
    """
    free = free_mask(alpha, upper)
    n_free = int(free.sum())
    if n_free == 0:
        return alpha.clone()
    fixed = alpha.masked_fill(free, 0.0)
    rhs = torch.cat([-(K[free] @ fixed), (1.0 - fixed.sum()).reshape(1)])
    sol, info = torch.linalg.solve_ex(_kkt_matrix(K[free][:, free]), rhs)
    a_free = sol[:n_free]
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        return None
    slack = 1e-12 * upper  # only round-off may be clipped, so that the clipping keeps sum a = 1
    if bool((a_free < -slack).any()) or bool((a_free > upper + slack).any()):
        return None
    out = fixed.clone()
    out[free] = a_free.clamp(0.0, upper)
    return out


def _solve_dual_exact(K: torch.Tensor, nu: float, tol: float, max_iter: int) -> torch.Tensor:
    """The dual solution of a symmetric float64 ``K`` (no autograd): staged SMO, each stage followed by an exact
    polish on the active set SMO found, accepted once its KKT gap is below ``tol * max diag K``."""
    n = K.shape[0]
    upper = box_bound(n, nu)
    if n * upper <= 1.0 + 1e-12:  # nu = 1: the box allows a single feasible point
        return torch.full((n,), upper, dtype=K.dtype, device=K.device)
    scale = max(float(torch.diagonal(K).abs().max()), 1e-300)
    alpha = _initial_alpha(K, upper)
    grad = K @ alpha
    used = 0
    for stage_tol in (*_STAGES, tol):
        used += _smo(K, alpha, grad, upper, stage_tol * scale, max_iter - used)
        polished = _polish(K, alpha, upper)
        if polished is not None and _violation(K, polished, upper) <= tol * scale:
            return polished
        grad = K @ alpha  # drop the drift of the incremental updates before the next stage
        if used >= max_iter:
            break
    gap = _kkt_gap(alpha, grad, upper)
    if gap > tol * scale:
        warnings.warn(f"OCSVM dual: {used} SMO iterations left a KKT gap of {gap:.3g}", RuntimeWarning, stacklevel=3)
    return alpha


# ------------------------------------------------------------------------------- dual: implicit gradient


def _symmetric(K: torch.Tensor) -> torch.Tensor:
    """The symmetric part of ``K``: the only part the quadratic objective ``a^T K a`` sees."""
    return 0.5 * (K + K.mT)


def _robust_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """LU solve (deterministic, so backward is reentrant); least squares if ``matrix`` is singular, as when
    duplicate points make ``K_FF`` rank deficient."""
    sol, info = torch.linalg.solve_ex(matrix, rhs)
    if int(info) == 0 and bool(torch.isfinite(sol).all()):
        return sol
    return torch.linalg.lstsq(matrix, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)


class _OCSVMDual(torch.autograd.Function):
    """``alpha(K)`` with the gradient from implicit differentiation of the KKT conditions on the active set.

    With the free set F, the bounded set U (``a = C``, constant) and the rest at 0 (constant), the solution obeys
    ``(K a)_F = rho 1`` and ``1^T a = 1``. Differentiating, ``K_FF da_F - drho 1 = -(dK a)_F`` and ``1^T da_F = 0``;
    so for an upstream gradient ``v`` on ``a``, solving ``M^T [w; s] = [v_F; 0]`` with ``M = [[K_FF, -1], [1^T, 0]]``
    gives ``dL/dK = -w a^T`` (rows F), symmetrised because the forward pass uses the symmetric part of K.
    """

    @staticmethod
    def forward(ctx, K: torch.Tensor, nu: float, tol: float, max_iter: int) -> torch.Tensor:  # noqa: D102
        K64 = _symmetric(K.detach().double())
        alpha = _solve_dual_exact(K64, nu, tol, max_iter)
        ctx.save_for_backward(K64, alpha)
        ctx.upper = box_bound(K.shape[0], nu)
        return alpha.to(K.dtype)

    @staticmethod
    def backward(ctx, grad_alpha: torch.Tensor):  # noqa: D102
        K64, alpha = ctx.saved_tensors
        free = free_mask(alpha, ctx.upper)
        n_free = int(free.sum())
        grad_K = torch.zeros_like(K64)
        if n_free > 0:
            rhs = torch.cat([grad_alpha.double()[free], grad_alpha.new_zeros(1, dtype=K64.dtype)])
            w = _robust_solve(_kkt_matrix(K64[free][:, free]).mT, rhs)[:n_free]
            grad_K[free] = -torch.outer(w, alpha)
        return _symmetric(grad_K).to(grad_alpha.dtype), None, None, None


def solve_ocsvm_dual(K: torch.Tensor, nu: float, tol: float = 1e-12, max_iter: int = 100_000) -> torch.Tensor:
    """Solution ``a`` of the nu-OCSVM dual (module docstring scaling: ``0 <= a <= 1/(nu n)``, ``sum a = 1``).

    ``K`` is an ``(n, n)`` positive semi-definite kernel matrix (its symmetric part is used). The QP is solved in
    float64 by SMO plus an exact active-set polish, to a KKT gap of ``tol * max diag K``; the result is
    differentiable with respect to ``K`` by implicit differentiation (no unrolled iterations). Multiply by
    ``nu * n`` for scikit-learn's ``dual_coef_``.
    """
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square matrix, got shape {tuple(K.shape)}")
    return _OCSVMDual.apply(K, float(nu), float(tol), int(max_iter))


# ----------------------------------------------------------------------------- offset, decisions, checks


def ocsvm_rho(K: torch.Tensor, alpha: torch.Tensor, nu: float) -> torch.Tensor:
    """Offset ``rho`` (module scaling): the mean of ``(K a)_i`` over margin support vectors ``0 < a_i < C``, where
    the KKT conditions make them all equal. With no free variable, libsvm's fallback: the midpoint of the
    interval ``[max_{a=C} (K a)_i, min_{a=0} (K a)_i]`` of valid thresholds. Differentiable through ``K`` and ``a``.
    """
    upper = box_bound(K.shape[0], nu)
    grad = _symmetric(K) @ alpha
    free = free_mask(alpha.detach(), upper)
    if bool(free.any()):
        return grad[free].mean()
    at_upper, at_zero = alpha.detach() >= upper, alpha.detach() <= 0
    ends = [grad[at_upper].max()] if bool(at_upper.any()) else []
    ends += [grad[at_zero].min()] if bool(at_zero.any()) else []
    return torch.stack(ends).mean()


def ocsvm_decision(K_test_train: torch.Tensor, alpha: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """Decision values ``f(x) = sum_i a_i k(x_i, x) - rho`` (module scaling), ``(m, n) -> (m,)``; > 0 inside."""
    return K_test_train @ alpha - rho


def sklearn_decision(K_test_train: torch.Tensor, alpha: torch.Tensor, rho: torch.Tensor, nu: float) -> torch.Tensor:
    """Decision values in scikit-learn's scaling: ``nu * n * f``, equal to ``OneClassSVM.decision_function``."""
    return nu * alpha.shape[0] * ocsvm_decision(K_test_train, alpha, rho)


def kkt_residual(K: torch.Tensor, alpha: torch.Tensor, nu: float) -> float:
    """Largest violation of the dual's optimality conditions: the KKT gap (see ``_kkt_gap``, clipped at 0), the
    equality ``sum a = 1`` and the box, all in the module's scaling."""
    return _violation(_symmetric(K.detach().double()), alpha.detach().double(), box_bound(K.shape[0], nu))


# ------------------------------------------------------------------------------------------------- loss


def _standardise(z: torch.Tensor, ref: torch.Tensor, detach: bool) -> torch.Tensor:
    """``(z - mean(ref)) / std(ref)`` per feature, population std as StandardScaler, 1 for constant features."""
    mean, std = ref.mean(0), ref.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    if detach:
        mean, std = mean.detach(), std.detach()
    return (z - mean) / std


class OCSVMGuidedLoss(nn.Module):
    """OCSVM-guided latent loss: ``weight * (1/nu) * sum_{x in second half} relu(-f(x))``.

    The batch of latent codes ``z`` ``(B, d)`` is split into a first half (the "training" half, ``B // 2`` codes)
    and a second half. Both are standardised with the first half's per-feature mean and population std (as
    scikit-learn's StandardScaler in :func:`fit_latent_ocsvm`); a nu-OCSVM with an RBF kernel (``gamma='scale'``
    = ``1/(d Var)`` of the standardised first half, a constant) is solved on the first half as a differentiable
    layer; ``f`` is its decision function (module scaling, ``sum a = 1``) at the second half's codes. The penalty
    is summed over the second half, as in the method's description, not averaged: it counts how far the
    outliers of the second half lie outside the boundary, like the slack term of the OCSVM primal.

    Gradient choices: the standardisation statistics keep their gradient by default (``detach_stats=False``),
    which makes the loss exactly invariant to per-feature affine maps of the codes; the encoder then cannot lower
    it by inflating or shrinking the latent space, only by reshaping it. ``gamma`` carries no gradient.
    """

    def __init__(
        self, nu: float = 0.03, weight: float = 0.1, gamma: GammaSpec = "scale", detach_stats: bool = False
    ) -> None:
        super().__init__()
        box_bound(1, nu)  # validates nu
        self.nu, self.weight, self.gamma, self.detach_stats = float(nu), float(weight), gamma, detach_stats

    def decision_values(self, z: torch.Tensor) -> torch.Tensor:
        """``f`` (module scaling) of the second half's codes under the OCSVM fitted on the first half; float64."""
        if z.ndim != 2 or z.shape[0] < 4:
            raise ValueError(f"z must be (B, d) with B >= 4, got shape {tuple(z.shape)}")
        z = z.double()
        half = z.shape[0] // 2
        first = _standardise(z[:half], z[:half], self.detach_stats)
        second = _standardise(z[half:], z[:half], self.detach_stats)
        gamma = resolve_gamma(first, self.gamma)
        K = rbf_kernel(first, first, gamma)
        alpha = solve_ocsvm_dual(K, self.nu)
        rho = ocsvm_rho(K, alpha, self.nu)
        return ocsvm_decision(rbf_kernel(second, first, gamma), alpha, rho)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The scalar loss term, in ``z``'s dtype, to be added to the reconstruction loss."""
        penalty = torch.relu(-self.decision_values(z)).sum()
        return (self.weight / self.nu * penalty).to(z.dtype)


# ------------------------------------------------------------------------------------ scoring after training


def fit_latent_ocsvm(z_train: np.ndarray, nu: float = 0.03):
    """``Pipeline(StandardScaler, OneClassSVM(rbf, nu, gamma='scale'))`` fitted on the training codes ``(N, d)``.

    Anomaly score of new codes: ``-pipeline.decision_function(z)`` (higher is more anomalous). scikit-learn is
    imported here so the training loss does not depend on it.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import OneClassSVM

    pipeline = Pipeline([("scaler", StandardScaler()), ("ocsvm", OneClassSVM(kernel="rbf", nu=nu, gamma="scale"))])
    return pipeline.fit(np.asarray(z_train, dtype=np.float64))
