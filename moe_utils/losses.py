"""Auxiliary losses for MoE routers.

Conventions (docs/conventions.md, "Load-balancing losses"):

* ``switch_load_balancing_loss``: ``alpha * E * sum_i f_i * P_i`` (Switch
  Transformer eq. 4), the course default, alpha = 1e-2. ``f_i`` counts top-1
  choices *before* capacity dropping; ``P_i`` is the mean router probability.
  Equals alpha at uniform routing and alpha * E at total collapse.
* ``topk_load_balancing_loss``: the Hugging Face Mixtral variant, ``f`` is a
  ``[k, E]`` table and the value at perfect balance is ``k``, not 1.
* ``router_z_loss``: ``mean_t (logsumexp_e h)^2`` (ST-MoE), ``(ln E)^2`` at zero logits.
* ``cv_squared``: squared coefficient of variation (Shazeer et al. 2017), population variance.

Only ``P`` carries gradient in the balance losses: ``f`` comes from an argmax. The
product ``f * P`` is what hands the router a differentiable signal; a loss built
only from counts (``sum_i (f_i - 1/E)^2``) gives the router no gradient at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    check_finite,
    check_float_tensor,
    check_index_tensor,
    check_positive_float,
    check_positive_int,
    check_probabilities,
)
from ._ops import logsumexp_lastdim

__all__ = ["switch_load_balancing_loss", "topk_load_balancing_loss", "router_z_loss", "cv_squared"]


def _check_probs_and_indices(router_probs, expert_indices, ndim_idx):
    check_float_tensor("router_probs", router_probs, ndim=2)
    check_finite("router_probs", router_probs)
    check_probabilities("router_probs", router_probs)
    E = router_probs.shape[1]
    check_index_tensor("expert_indices", expert_indices, ndim=ndim_idx, upper=E)
    if expert_indices.shape[0] != router_probs.shape[0]:
        raise ValueError(
            f"expert_indices must have T={router_probs.shape[0]} rows like router_probs, "
            f"got shape {tuple(expert_indices.shape)}"
        )
    return E


def switch_load_balancing_loss(
    router_probs: torch.Tensor, expert_indices: torch.Tensor, alpha: float = 1e-2, group_size: int | None = None
) -> torch.Tensor:
    """Switch Transformer auxiliary loss ``alpha * E * sum_i f_i * P_i``, per routing group.

    router_probs:   [T, E] softmax probabilities
    expert_indices: [T] top-1 expert ids, or [T, k] (only the first column, the
                    top-1 choice, is counted), taken *before* capacity dropping
    alpha:          coefficient (1e-2 in the paper); pass 1.0 for the raw value
    group_size:     tokens per routing group (T must be a multiple of it); None: the
                    T tokens are one group. ``f`` and ``P`` are taken inside each group
                    and the per-group losses are averaged, as in the Hugging Face
                    Switch Transformers code (one group per sequence there).

    Returns a scalar. Uniform routing gives ``alpha``; all tokens on one expert with
    probability 1 gives ``alpha * E``. An empty batch (T = 0) gives 0.
    """
    alpha = check_positive_float("alpha", alpha, allow_zero=True)
    E = _check_probs_and_indices(router_probs, expert_indices, (1, 2))
    T = router_probs.shape[0]
    if T == 0:
        return router_probs.sum() * 0.0
    G = T if group_size is None else check_positive_int("group_size", group_size)
    if T % G:
        raise ValueError(f"the number of tokens T={T} must be a multiple of group_size={G}")
    top1 = expert_indices if expert_indices.dim() == 1 else expert_indices[:, 0]
    f = F.one_hot(top1, E).to(router_probs.dtype).view(T // G, G, E).mean(dim=1)  # [groups, E], no gradient
    P = router_probs.view(T // G, G, E).mean(dim=1)  # [groups, E], differentiable
    return alpha * E * torch.sum(f * P, dim=-1).mean()


def topk_load_balancing_loss(router_probs: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
    """Top-k load-balancing loss as in the Hugging Face Mixtral code (no coefficient).

    router_probs:   [T, E] softmax probabilities
    expert_indices: [T, k] the k chosen experts per token

    ``f[j, e]`` is the fraction of tokens whose j-th choice is e (a ``[k, E]``
    table), ``P[e]`` the mean probability, and the loss is
    ``E * sum_{j,e} f[j, e] * P[e]``. Its value at perfect balance is ``k``, not 1;
    multiply by the model's coefficient yourself (the released Hugging Face Mixtral config
    uses 0.02). Empty batch: 0.
    """
    E = _check_probs_and_indices(router_probs, expert_indices, 2)
    if router_probs.shape[0] == 0:
        return router_probs.sum() * 0.0
    f = F.one_hot(expert_indices, E).to(router_probs.dtype).mean(dim=0)  # [k, E]
    P = router_probs.mean(dim=0)  # [E]
    return E * torch.sum(f * P.unsqueeze(0))


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_e h[t, e])^2`` (no coefficient).

    router_logits: [T, E]. Penalises large logits, which keeps the float32 softmax
    well conditioned. At zero logits it is ``(ln E)^2``, not 0. The usual
    coefficient is 1e-3. Empty batch: 0.
    """
    check_float_tensor("router_logits", router_logits, ndim=2)
    check_finite("router_logits", router_logits)
    if router_logits.shape[0] == 0:
        return router_logits.sum() * 0.0
    return logsumexp_lastdim(router_logits).pow(2).mean()  # = torch.logsumexp(router_logits, -1) ...


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var(v) / (mean(v)^2 + 1e-10)``.

    Population variance (divide by n), as in Shazeer et al. 2017's importance and
    load losses. Fewer than two values give 0.
    """
    check_float_tensor("v", v, ndim=1)
    check_finite("v", v)
    if v.numel() < 2:
        return v.sum() * 0.0
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)
