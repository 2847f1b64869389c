"""Parameter and FLOP accounting, re-derived in the test from the published config numbers."""

from __future__ import annotations

import pytest

from moe_utils import ModelConfig, count_parameters, flops_per_token
from moe_utils.accounting import GLAM_64B_64E, MIXTRAL_8X7B, PRESETS, SWITCH_BASE_128

# Mixtral-8x7B-v0.1 config.json
HIDDEN, INTER, LAYERS, EXPERTS, TOPK = 4096, 14336, 32, 8, 2
HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 8, 128, 32000


def _mixtral_by_hand():
    embed = 2 * VOCAB * HIDDEN  # input embedding + untied LM head
    q = o = HIDDEN * HEADS * HEAD_DIM
    k = v = HIDDEN * KV_HEADS * HEAD_DIM
    attention = LAYERS * (q + k + v + o)
    one_expert = 3 * HIDDEN * INTER  # gate, up and down projections
    experts = LAYERS * EXPERTS * one_expert
    router = LAYERS * HIDDEN * EXPERTS
    norms = LAYERS * 2 * HIDDEN + HIDDEN  # two RMSNorms per layer + the final one
    total = embed + attention + experts + router + norms
    active = total - LAYERS * (EXPERTS - TOPK) * one_expert
    return total, active, experts


def test_mixtral_hand_derivation_reproduces_published_numbers():
    # guards the test's own arithmetic: docs/conventions.md states both figures
    total, active, _ = _mixtral_by_hand()
    assert total == 46_702_792_704
    assert active == 12_879_925_248


def test_mixtral_preset_total_and_active_are_exact():
    p = count_parameters(MIXTRAL_8X7B)
    total, active, experts = _mixtral_by_hand()
    assert p.total == total == 46_702_792_704
    assert p.active == active == 12_879_925_248
    assert p.experts == experts


def test_mixtral_experts_hold_45_10b_and_the_rest_1_61b():
    p = count_parameters(MIXTRAL_8X7B)
    assert round(p.experts / 1e9, 2) == 45.10
    assert round(p.non_expert / 1e9, 2) == 1.61
    assert p.non_expert == p.total - p.experts


def test_mixtral_is_not_8_times_7b():
    p = count_parameters(MIXTRAL_8X7B)
    assert p.total < 0.85 * 56e9
    assert p.active < 14e9


def test_mixtral_preset_matches_the_config_numbers():
    c = MIXTRAL_8X7B
    assert (c.d_model, c.d_ff, c.n_layers, c.num_experts, c.top_k) == (HIDDEN, INTER, LAYERS, EXPERTS, TOPK)
    assert (c.n_heads, c.kv_heads, c.dim_head, c.vocab_size, c.tied_embeddings) == (
        HEADS,
        KV_HEADS,
        HEAD_DIM,
        VOCAB,
        False,
    )


def test_switch_base_128_within_2_percent_of_reported_7_4b():
    assert count_parameters(SWITCH_BASE_128).total == pytest.approx(7.4e9, rel=0.02)


def test_glam_64b_64e_activated_within_1_percent_and_total_within_5_percent():
    p = count_parameters(GLAM_64B_64E)
    assert p.active == pytest.approx(96.6e9, rel=0.01)
    assert p.total == pytest.approx(1.2e12, rel=0.05)  # the paper's 1.2T is a rounded figure


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_flops_per_token_is_about_twice_active_parameters(name):
    cfg = PRESETS[name]
    ratio = flops_per_token(cfg) / count_parameters(cfg).active
    assert 1.95 <= ratio <= 2.0


def test_flops_attention_scores_add_four_seq_heads_headdim_per_layer():
    seq = 1024
    extra = flops_per_token(MIXTRAL_8X7B, seq_len=seq) - flops_per_token(MIXTRAL_8X7B)
    assert extra == 4 * seq * HEADS * HEAD_DIM * LAYERS


def test_dense_model_has_active_equal_total_and_no_experts():
    # a small dense decoder with GELU FFN, tied embeddings, counted by hand
    d, f, L, V, H = 64, 256, 2, 100, 4
    cfg = ModelConfig(
        name="tiny", vocab_size=V, d_model=d, n_layers=L, n_heads=H, d_ff=f, ffn_kind="gelu", tied_embeddings=True
    )
    p = count_parameters(cfg)
    expected = V * d + L * (4 * d * d + 2 * d * f + 2 * d) + d
    assert p.total == p.active == expected
    assert p.experts == 0 and p.routers == 0


def test_moe_every_other_layer_counts_half_the_layers_as_moe():
    d, f, L, V, H, num_e = 32, 64, 4, 50, 4, 4
    cfg = ModelConfig(
        name="alt",
        vocab_size=V,
        d_model=d,
        n_layers=L,
        n_heads=H,
        d_ff=f,
        num_experts=num_e,
        top_k=1,
        ffn_kind="relu",
        moe_every=2,
    )
    p = count_parameters(cfg)
    assert p.experts == 2 * num_e * 2 * d * f
    assert p.dense_ffn == 2 * 2 * d * f
    assert p.routers == 2 * d * num_e
    assert p.total - p.active == 2 * (num_e - 1) * 2 * d * f


def test_config_rejects_top_k_above_num_experts():
    with pytest.raises(ValueError, match="k"):
        ModelConfig(name="bad", vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=16, num_experts=2, top_k=3)


def test_switch_c_matches_table_9_and_activates_about_a_thousandth_of_its_weights():
    from moe_utils.accounting import SWITCH_C

    # independent count from Fedus et al. 2022, Table 9: d 2080, d_ff 6144, 32 heads of 64,
    # 15 encoder + 15 decoder layers, 2048 two-matrix experts in every FFN, tied vocab 32128
    d, f, E, attn = 2080, 6144, 2048, 4 * 2080 * 32 * 64
    expert, router = 2 * d * f, d * E
    enc = 15 * (attn + E * expert + router + 2 * d)
    dec = 15 * (2 * attn + E * expert + router + 3 * d)
    total = 32128 * d + enc + dec + 2 * d  # embedding, both stacks, two final norms
    p = count_parameters(SWITCH_C)
    assert p.total == total
    assert abs(total - 1571e9) < 0.5e9  # "1571B" in Table 9
    assert p.active == total - 30 * E * expert + 30 * expert  # one expert per MoE layer
    assert p.active / p.total < 0.0012
