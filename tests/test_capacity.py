"""Expert capacity and position-order dropping (the Switch convention of docs/conventions.md)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from _moe_vectors import CAPACITY_CF1, KEPT, POSITIONS, TOP1, E, T

from moe_utils import buffer_positions, capacity_mask, expert_capacity


def _positions_by_python_loop(indices: list[list[int]], num_experts: int, group_size: int | None = None):
    """Independent reference: walk the assignments choice-major, count per expert per group."""
    n_tok = len(indices)
    k = len(indices[0]) if n_tok else 0
    G = n_tok if group_size is None else group_size
    pos = [[0] * k for _ in range(n_tok)]
    for start in range(0, n_tok, max(G, 1)):
        counter = [0] * num_experts
        for j in range(k):
            for t in range(start, start + G):
                e = indices[t][j]
                pos[t][j] = counter[e]
                counter[e] += 1
    return pos


def test_test_vector_capacity_at_cf1_is_two():
    assert expert_capacity(T, E, 1.0, min_capacity=0) == CAPACITY_CF1


def test_test_vector_buffer_positions_and_kept_mask():
    idx = torch.tensor(TOP1).unsqueeze(1)
    assert buffer_positions(idx, E).squeeze(1).tolist() == POSITIONS
    kept, pos = capacity_mask(idx, E, CAPACITY_CF1)
    assert kept.squeeze(1).tolist() == KEPT
    assert pos.squeeze(1).tolist() == POSITIONS


@pytest.mark.parametrize(
    "num_tokens,num_experts,cf,k,min_cap",
    [
        (6, 3, 1.0, 1, 0),
        (6, 3, 1.0, 1, 4),
        (1024, 8, 1.25, 1, 4),
        (1024, 8, 2.0, 1, 4),
        (64, 128, 1.25, 1, 4),
        (64, 128, 1.25, 1, 0),
        (100, 1, 0.29, 1, 0),  # 0.29 * 100 is 28.999999999999996 in floating point
        (10, 4, 1.0, 2, 0),  # k > 1 counts assignments
        (512, 16, 1.5, 2, 4),
        (0, 4, 1.25, 1, 0),
    ],
)
def test_expert_capacity_is_floor_of_cf_k_t_over_e_with_minimum(num_tokens, num_experts, cf, k, min_cap):
    expected = max(min_cap, math.floor(Fraction(str(cf)) * k * num_tokens / num_experts))
    assert expert_capacity(num_tokens, num_experts, cf, k=k, min_capacity=min_cap) == expected


def test_expert_capacity_default_minimum_is_four():
    assert expert_capacity(8, 8, 1.0) == 4


def test_exactly_capacity_tokens_kept_per_overloaded_expert_earliest_first():
    g = torch.Generator().manual_seed(1)
    num_experts, n_tok, cap = 4, 40, 5
    # skewed routing so that several experts overflow
    idx = torch.multinomial(torch.tensor([0.5, 0.3, 0.15, 0.05]), n_tok, replacement=True, generator=g)
    kept, _ = capacity_mask(idx.unsqueeze(1), num_experts, cap)
    kept = kept.squeeze(1)
    overloaded = 0
    for e in range(num_experts):
        tokens = [t for t in range(n_tok) if idx[t] == e]
        kept_tokens = [t for t in tokens if kept[t]]
        assert kept_tokens == tokens[:cap], f"expert {e} must keep its first {cap} tokens in position order"
        overloaded += len(tokens) > cap
    assert overloaded >= 2


def test_choice_major_priority_for_top2_matches_python_loop():
    g = torch.Generator().manual_seed(2)
    num_experts, n_tok = 5, 24
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(n_tok)])
    expected = _positions_by_python_loop(idx.tolist(), num_experts)
    assert buffer_positions(idx, num_experts).tolist() == expected


def test_second_choice_loses_to_later_first_choice():
    # token 0 picks expert 1 second; tokens 1 and 2 pick expert 1 first: with C = 2 the
    # first choices of tokens 1 and 2 are served before token 0's second choice
    idx = torch.tensor([[0, 1], [1, 0], [1, 2]])
    kept, pos = capacity_mask(idx, 3, 2)
    assert pos.tolist() == [[0, 2], [0, 1], [1, 0]]
    assert kept.tolist() == [[True, False], [True, True], [True, True]]


def test_group_size_restarts_buffer_positions_in_each_group():
    g = torch.Generator().manual_seed(3)
    num_experts, group, n_groups = 3, 8, 4
    idx = torch.randint(0, num_experts, (group * n_groups, 2), generator=g)
    expected = _positions_by_python_loop(idx.tolist(), num_experts, group_size=group)
    assert buffer_positions(idx, num_experts, group_size=group).tolist() == expected


def test_capacity_zero_drops_everything():
    kept, _ = capacity_mask(torch.tensor([[0], [1], [0]]), 2, 0)
    assert not kept.any()


def test_buffer_positions_of_empty_batch_is_empty():
    pos = buffer_positions(torch.zeros(0, 2, dtype=torch.long), 4)
    assert pos.shape == (0, 2)
