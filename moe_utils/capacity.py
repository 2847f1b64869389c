"""Expert capacity and position-order token dropping (the Switch convention).

One convention, used everywhere in the course (docs/conventions.md, "Capacity and
dropping"):

* ``C = max(min_capacity, floor(capacity_factor * k * T / E))``. With ``k = 1`` this
  is the Switch Transformer formula. For ``k > 1`` this course counts *assignments*
  (hence the factor ``k``); Google's Switch/GShard code does not multiply by ``k``.
* Priority is position order inside the routing group: the first ``C`` assignments
  that chose an expert are kept, exactly ``C`` of them, earliest first. With ``k > 1``
  all first choices come before all second choices (choice-major order, as in
  GShard's top-2), and inside one choice rank earlier tokens win.
* A dropped assignment contributes 0 to the MoE output; the surrounding block
  adds the residual, so a token dropped by every choice passes through unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_index_tensor, check_positive_float, check_positive_int

__all__ = ["expert_capacity", "buffer_positions", "capacity_mask"]


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    k: int = 1,
    min_capacity: int = 4,
) -> int:
    """Tokens (assignments) one expert may take from a group of ``num_tokens``.

    ``C = max(min_capacity, floor(capacity_factor * k * num_tokens / num_experts))``.
    Switch Transformer uses CF 1.25 in training and 2.0 at evaluation, min 4.
    """
    check_positive_int("num_tokens", num_tokens, minimum=0)
    check_positive_int("num_experts", num_experts)
    check_positive_int("k", k)
    check_positive_int("min_capacity", min_capacity, minimum=0)
    cf = check_positive_float("capacity_factor", capacity_factor)
    slots = cf * k * num_tokens / num_experts
    if not math.isfinite(slots):
        raise ValueError(
            f"capacity_factor={capacity_factor} is too large: capacity_factor * k * num_tokens / num_experts "
            "overflows; any capacity_factor >= num_experts / k already keeps every token"
        )
    # a tiny epsilon keeps e.g. 1.25 * 8 / 2 = 5.000000001 from flooring to 4
    return max(min_capacity, int(math.floor(slots + 1e-9)))


def buffer_positions(indices: torch.Tensor, num_experts: int, group_size: int | None = None) -> torch.Tensor:
    """Position of each assignment in its expert's buffer, in priority order.

    indices: [T, k] expert ids -> positions: [T, k] int64, where position 0 is the
    first assignment the expert received inside its routing group. Order:
    choice-major (every token's first choice, in token order, then every second
    choice, ...). ``group_size=None`` treats all T tokens as one group; otherwise
    T must be a multiple of ``group_size`` and each contiguous group of tokens
    fills its own buffers.
    """
    check_positive_int("num_experts", num_experts)
    check_index_tensor("indices", indices, ndim=2, upper=num_experts)
    T, k = indices.shape
    G = T if group_size is None else check_positive_int("group_size", group_size)
    if T == 0:
        return torch.zeros_like(indices)
    if T % G:
        raise ValueError(f"the number of tokens T={T} must be a multiple of group_size={G}")
    n = T // G
    # [n, k*G] expert ids per group in priority order: choice rank first, then position
    order = indices.reshape(n, G, k).transpose(1, 2).reshape(n, k * G)
    one_hot = F.one_hot(order, num_experts)  # [n, k*G, E]
    pos = ((torch.cumsum(one_hot, dim=1) - 1) * one_hot).sum(dim=-1)  # [n, k*G]
    return pos.reshape(n, k, G).transpose(1, 2).reshape(T, k).contiguous()


def capacity_mask(
    indices: torch.Tensor, num_experts: int, capacity: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first ``capacity`` assignments of every expert in every group.

    Returns ``(kept [T, k] bool, positions [T, k] int64)``.
    """
    check_positive_int("capacity", capacity, minimum=0)
    pos = buffer_positions(indices, num_experts, group_size)
    return pos < capacity, pos
