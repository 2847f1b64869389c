"""The tiny decoder-only LM: shapes, losses, routing records, equal active parameters, causality."""

from __future__ import annotations

import math

import pytest
import torch

from moe_utils.layers import MoELayer
from moe_utils.model import FFN_KINDS, LMConfig, TinyLM

TINY = dict(d_model=32, n_layers=2, n_heads=4, seq_len=16, d_ff=64, num_experts=4)


@pytest.mark.parametrize("ffn", FFN_KINDS)
def test_forward_returns_logits_losses_and_one_routing_per_layer(ffn):
    model = TinyLM(LMConfig(ffn=ffn, **TINY))
    idx = torch.randint(0, 256, (3, 16))
    out = model(idx, idx)
    assert out.logits.shape == (3, 16, 256)
    assert len(out.routings) == 2
    # an untrained model predicts bytes close to uniformly: loss near ln 256
    assert abs(out.loss.item() - math.log(256)) < 0.5
    if ffn == "dense":
        assert out.routings == [None, None]
        assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0
    else:
        k = 1 if ffn == "switch" else 2
        for r in out.routings:
            assert r.indices.shape == (48, k) and r.probs.shape == (48, 4)
        coef = 1e-2 if ffn == "switch" else 2e-2
        # balance loss summed over 2 layers: near coef * (1 or k) per layer at init
        assert 0.5 * 2 * coef * k < out.aux_loss.item() < 2 * 2 * coef * k
        # z-loss with small logits: near (ln E)^2 * 1e-3 per layer, clearly not 0
        z_uniform = 2 * 1e-3 * math.log(4) ** 2
        assert 0.5 * z_uniform < out.z_loss.item() < 2 * z_uniform
        out.loss.add(out.aux_loss).add(out.z_loss).backward()
        assert all(layer.router.gate.weight.grad is not None for layer in model.moe_layers)


def test_active_ffn_parameters_match_across_models():
    counts = {f: TinyLM(LMConfig(ffn=f, **TINY)).ffn_parameters() for f in FFN_KINDS}
    assert counts["dense"]["active"] == counts["switch"]["active"] == counts["mixtral"]["active"]
    # Switch: E experts of width f; Mixtral: E experts of width f / 2
    assert counts["switch"]["total"] == 4 * counts["dense"]["total"]
    assert counts["mixtral"]["total"] == 2 * counts["dense"]["total"]
    # the formula agrees with the real modules' parameter counts (routers excluded)
    for f in FFN_KINDS:
        model = TinyLM(LMConfig(ffn=f, **TINY))
        real = sum(p.numel() for b in model.blocks for n, p in b.ffn.named_parameters() if not n.startswith("router"))
        assert real == counts[f]["total"], f
    mixtral = TinyLM(LMConfig(ffn="mixtral", **TINY))
    assert all(isinstance(b.ffn, MoELayer) and b.ffn.experts.d_ff == 32 for b in mixtral.blocks)


@pytest.mark.parametrize("ffn", FFN_KINDS)
def test_model_is_causal(ffn):
    model = TinyLM(LMConfig(ffn=ffn, **TINY)).eval()  # eval: no jitter, evaluation capacity
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    # equal up to float rounding: the tokens after position 10 change which rows share an
    # expert's matrix product, and a CPU matmul of fewer than 16 rows rounds differently
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-2


def test_bad_config_gives_clear_errors():
    with pytest.raises(ValueError, match=r"ffn must be one of \('dense', 'switch', 'mixtral', 'random', .*'bias_balanced'\), got"):
        LMConfig(ffn="moe")
    with pytest.raises(ValueError, match="multiple of n_heads"):
        LMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="multiple of top_k"):
        LMConfig(ffn="mixtral", d_ff=63)
    with pytest.raises(ValueError, match="d_model must be an int >= 1"):
        LMConfig(d_model=0)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        LMConfig(ffn="switch", aux_loss_coef=-1.0)
    with pytest.raises(TypeError, match="config must be an LMConfig"):
        TinyLM({"ffn": "dense"})


def test_default_aux_coefficients_follow_the_papers():
    assert LMConfig(ffn="switch").aux_loss_coef == 1e-2
    assert LMConfig(ffn="mixtral").aux_loss_coef == 2e-2
    assert LMConfig(ffn="switch", aux_loss_coef=0.0).aux_loss_coef == 0.0


def test_forward_rejects_bad_input():
    model = TinyLM(LMConfig(**TINY))
    with pytest.raises(ValueError, match="exceeds config.seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("ffn", ["dense", "switch"])
def test_generate_is_greedy_and_restores_training_mode(ffn):
    model = TinyLM(LMConfig(ffn=ffn, **TINY))
    model.train()
    prompt = torch.tensor([[65, 66, 67]])
    a = model.generate(prompt, 20)
    b = model.generate(prompt, 20)
    assert a.shape == (1, 23) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    assert model.training
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = model.generate(prompt, 10, temperature=1.0, generator=g1)
    s2 = model.generate(prompt, 10, temperature=1.0, generator=g2)
    assert torch.equal(s1, s2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, 0)


def test_dense_and_moe_models_from_the_same_seed_share_every_non_ffn_weight():
    # paired initialisation: the dense-vs-MoE comparison differs only in the FFN
    states = {}
    for ffn in ("dense", "switch", "mixtral"):
        torch.manual_seed(3)
        states[ffn] = TinyLM(LMConfig(ffn=ffn, d_model=16, n_layers=2, n_heads=2, seq_len=8, d_ff=32,
                                      num_experts=4)).state_dict()
    shared = [k for k in states["dense"] if ".ffn." not in k]
    assert len(shared) >= 10
    for k in shared:
        assert torch.equal(states["dense"][k], states["switch"][k]) and torch.equal(states["dense"][k],
                                                                                     states["mixtral"][k]), k
