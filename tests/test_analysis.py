"""moe_utils.analysis: specialisation statistics, ablation and routing policies, each
checked against an independent float64 computation, a hand-worked example or an
invariant (an unused expert changes nothing, isolation equals running alone...)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_utils import analysis as A
from moe_utils.capacity import capacity_mask
from moe_utils.layers import mixtral_layer, switch_layer
from moe_utils.model import LMConfig, TinyLM
from moe_utils.viz import plot_routed_text

# ---------------------------------------------------------------- information


def _mi_reference(x, y):
    """Mutual information (bits) from a dictionary of counts, in plain Python floats."""
    x, y = x.tolist(), y.tolist()
    n = len(x)
    pxy, px, py = {}, {}, {}
    for a, b in zip(x, y):
        pxy[a, b] = pxy.get((a, b), 0) + 1
        px[a] = px.get(a, 0) + 1
        py[b] = py.get(b, 0) + 1
    return sum(c / n * math.log2(c * n / (px[a] * py[b])) for (a, b), c in pxy.items())


def test_mutual_information_hand_worked_table():
    # joint counts [[3, 1], [1, 3]]: I = 1 - H(1/4) bits
    x = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert A.mutual_information(x, y, 2, 2) == pytest.approx(1 - h, abs=1e-12)


def test_mutual_information_extremes():
    x = torch.arange(4).repeat(5)
    assert A.mutual_information(x, x, 4, 4) == pytest.approx(2.0, abs=1e-12)  # Y = X: H(X)
    y = torch.arange(4).repeat_interleave(4)  # every (x, y) pair exactly once
    assert A.mutual_information(torch.arange(4).repeat(4), y, 4, 4) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_matches_a_counting_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (500,), generator=g)
    y = (x + torch.randint(0, 2, (500,), generator=g)) % 5
    assert A.mutual_information(x, y, 3, 5) == pytest.approx(_mi_reference(x, y), abs=1e-10)


def test_conditional_mutual_information_matches_per_stratum_reference():
    g = torch.Generator().manual_seed(1)
    z = torch.randint(0, 4, (800,), generator=g)
    x = (z + torch.randint(0, 2, (800,), generator=g)) % 3
    y = (x * (z % 2) + torch.randint(0, 2, (800,), generator=g)) % 4
    ref = 0.0
    for v in range(4):
        m = z == v
        ref += float(m.double().mean()) * _mi_reference(x[m], y[m])
    assert A.conditional_mutual_information(x, y, z, 3, 4, 4) == pytest.approx(ref, abs=1e-10)


def test_conditional_mutual_information_is_zero_when_z_explains_both():
    z = torch.arange(6).repeat(10)
    x, y = z % 2, z % 3  # dependent on each other, but both functions of z
    assert A.mutual_information(x, y, 2, 3) >= 0.0
    assert A.conditional_mutual_information(x, y, z, 2, 3, 6) == pytest.approx(0.0, abs=1e-12)
    # with a constant z it is the plain mutual information
    zero = torch.zeros_like(z)
    assert A.conditional_mutual_information(x, y, zero, 2, 3, 1) == pytest.approx(
        A.mutual_information(x, y, 2, 3), abs=1e-12)


def test_information_rejects_bad_input():
    with pytest.raises(ValueError, match="y"):
        A.mutual_information(torch.tensor([0, 1]), torch.tensor([0]), 2, 2)
    with pytest.raises(ValueError, match="x"):
        A.mutual_information(torch.tensor([0, 5]), torch.tensor([0, 1]), 2, 2)
    with pytest.raises(ValueError, match="at least one"):
        A.mutual_information(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 2, 2)


# ---------------------------------------------------------------- permutation test


def test_domain_expert_test_detects_dependence_with_smallest_p_value():
    labels = torch.arange(3).repeat(10)  # 30 windows
    experts = labels[:, None].expand(-1, 16) * 2  # domain d -> expert 2d, every token
    t = A.domain_expert_test(labels, experts, 3, 8, permutations=99, seed=0)
    assert t.statistic == pytest.approx(math.log2(3), abs=1e-12)
    assert t.p_value == pytest.approx(1 / 100)
    assert float(t.null.max()) < t.statistic


def test_domain_expert_test_shuffles_windows_not_tokens():
    # each window sends all its tokens to one random expert, independent of its label:
    # a token-level shuffle would call this hugely significant, a window shuffle does not
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(2).repeat(20)
    experts = torch.randint(0, 4, (40,), generator=g)[:, None].expand(-1, 64)
    t = A.domain_expert_test(labels, experts, 2, 4, permutations=199, seed=0)
    assert t.p_value > 0.05
    assert t.statistic == pytest.approx(A.mutual_information(labels.repeat_interleave(64), experts.reshape(-1), 2, 4))
    assert t.null.shape == (199,) and abs(t.excess - (t.statistic - t.null_mean)) < 1e-15


def test_domain_expert_test_uses_the_first_choice_of_top_k():
    labels = torch.tensor([0, 1, 0, 1])
    first = labels[:, None].expand(-1, 5)
    second = torch.zeros(4, 5, dtype=torch.long) + 3
    t = A.domain_expert_test(labels, torch.stack([first, second], -1), 2, 4, permutations=10)
    assert t.statistic == pytest.approx(1.0)


def test_domain_expert_test_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 windows"):
        A.domain_expert_test(torch.tensor([0]), torch.zeros(1, 4, dtype=torch.long), 2, 4)
    with pytest.raises(ValueError, match="one row per window"):
        A.domain_expert_test(torch.tensor([0, 1, 0]), torch.zeros(2, 4, dtype=torch.long), 2, 4)
    with pytest.raises(ValueError, match="permutations"):
        A.domain_expert_test(torch.tensor([0, 1]), torch.zeros(2, 4, dtype=torch.long), 2, 4, permutations=0)


# ---------------------------------------------------------------- shares, repetition, bytes


def test_routing_shares_hand_worked():
    labels = torch.tensor([0, 0, 1, 1, 1])
    experts = torch.tensor([[0, 1], [0, 2], [2, 1], [2, 0], [2, 1]])  # top-2
    shares, counts = A.routing_shares(labels, experts, 3, 3)
    assert counts.tolist() == [2, 3, 0]
    assert torch.allclose(shares[0], torch.tensor([2 / 4, 1 / 4, 1 / 4], dtype=torch.float64))
    assert torch.allclose(shares[1], torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64))
    assert shares[2].tolist() == [0.0, 0.0, 0.0]  # a label without tokens: zeros, count 0


def test_consecutive_repetition_hand_worked():
    top1 = torch.tensor([[0, 0, 1, 1, 1], [2, 3, 2, 3, 3]])  # 8 pairs, 4 repeats
    r = A.consecutive_repetition(top1, 4)
    assert r["first"] == pytest.approx(4 / 8)
    assert r["uniform_first"] == 0.25
    shares = torch.tensor([2, 3, 2, 3]) / 10
    assert r["load_first"] == pytest.approx(float((shares**2).sum()))


def test_consecutive_repetition_top2_overlap_and_random_rate():
    e = torch.tensor([[[0, 1], [1, 2], [3, 4], [4, 0]]])  # pairs: share 1; none; share 4
    r = A.consecutive_repetition(e, 8)
    assert r["first"] == 0.0 and r["any"] == pytest.approx(2 / 3)
    assert r["uniform_any"] == pytest.approx(1 - 15 / 28)  # Mixtral paper: about 46%
    # a long uniformly random router comes close to both random rates
    g = torch.Generator().manual_seed(0)
    rand = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(20000)]).view(100, 200, 2)
    rr = A.consecutive_repetition(rand, 8)
    assert abs(rr["first"] - 1 / 8) < 0.01 and abs(rr["any"] - rr["uniform_any"]) < 0.015


def test_byte_classes_pinned_string():
    text = b"def f(x):\n    return x+1  # ok\n\tz"
    got = A.byte_classes(torch.tensor(list(text))[None])[0].tolist()
    L, D, I, S, N, O, P = (A.BYTE_CLASSES.index(c) for c in
                           ("letter", "digit", "indent", "space", "newline", "operator", "punctuation"))
    want = [L, L, L, S, L, P, L, P, P, N, I, I, I, I, L, L, L, L, L, L, S, L, O, D, S, S, P, S, L, L, N, I, L]
    assert got == want


def test_byte_classes_non_ascii_and_first_line_spaces():
    ids = torch.tensor([list(" a é".encode())])  # a leading space with no newline before it
    got = A.byte_classes(ids)[0].tolist()
    assert got[0] == A.BYTE_CLASSES.index("space")
    assert got[-2:] == [A.BYTE_CLASSES.index("other")] * 2
    with pytest.raises(ValueError, match="byte ids"):
        A.byte_classes(torch.tensor([[300]]))


def test_top_choices_matches_sorting():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 6, generator=g)
    assert torch.equal(A.top_choices(h, 2), torch.argsort(h, dim=-1, descending=True)[:, :2])
    with pytest.raises(ValueError, match="k must be"):
        A.top_choices(h, 7)


def test_domain_windows_are_aligned_and_spread():
    stream = torch.arange(1000)
    w = A.domain_windows({"a": stream}, 10, 5)["a"]
    assert w.shape == (5, 11)
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(5, 10, dtype=torch.long))
    assert w[0, 0] == 0 and w[-1, -1] == 999
    with pytest.raises(ValueError, match="fewer than seq_len"):
        A.domain_windows({"a": torch.arange(5)}, 10, 2)


# ---------------------------------------------------------------- ablation


def _float64(layer):
    return layer.double().eval()


def _sub_layer(layer, keep, make):
    """A layer holding only the experts in ``keep`` (same weights): the reference for
    'this expert does not exist'."""
    sub = make(len(keep))
    with torch.no_grad():
        sub.router.gate.weight.copy_(layer.router.gate.weight[keep])
        for name in ("w1", "w2", "w3"):
            if getattr(layer.experts, name, None) is not None:
                getattr(sub.experts, name).copy_(getattr(layer.experts, name)[keep])
    return _float64(sub)


def test_reroute_ablation_of_topk_equals_a_layer_without_that_expert():
    torch.manual_seed(0)
    layer = _float64(mixtral_layer(8, 6, num_experts=5, k=2))
    x = torch.randn(40, 8, dtype=torch.float64)
    for e in range(5):
        keep = [i for i in range(5) if i != e]
        ref = _sub_layer(layer, keep, lambda n: mixtral_layer(8, 6, num_experts=n, k=2))(x).output
        with A.expert_ablation(layer, e):
            got = layer(x)
        assert torch.allclose(got.output, ref, atol=1e-12), e
        assert not (got.routing.indices == e).any()


def test_reroute_ablation_of_switch_equals_a_layer_without_that_expert():
    torch.manual_seed(1)
    make = lambda n: switch_layer(8, 6, n, expert_kind="swiglu")  # noqa: E731
    layer = _float64(make(4))
    layer.router.drop_tokens = False
    x = torch.randn(30, 8, dtype=torch.float64)
    sub = _sub_layer(layer, [0, 1, 3], make)
    sub.router.drop_tokens = False
    with A.expert_ablation(layer, 2):
        got = layer(x).output
    # without expert 2 the remaining softmax is renormalised, exactly as in a 3-expert layer
    assert torch.allclose(got, sub(x).output, atol=1e-12)


def test_reroute_ablation_keeps_capacity():
    torch.manual_seed(2)
    layer = _float64(switch_layer(8, 6, 4, eval_capacity_factor=1.0, min_capacity=0, expert_kind="swiglu"))
    x = torch.randn(32, 8, dtype=torch.float64)
    with A.expert_ablation(layer, 0):
        r = layer(x).routing
    assert r.capacity == 8
    kept, _ = capacity_mask(r.indices, 4, 8)
    assert torch.equal(r.kept, kept)


def test_drop_ablation_removes_exactly_that_experts_contribution():
    torch.manual_seed(3)
    layer = _float64(mixtral_layer(8, 6, num_experts=4, k=2))
    x = torch.randn(25, 8, dtype=torch.float64)
    full = layer(x)
    r = full.routing
    contrib = torch.zeros_like(x)
    for t in range(25):  # per-token loop: what expert 1 added to token t
        for j in range(2):
            if int(r.indices[t, j]) == 1:
                contrib[t] = r.weights[t, j] * layer.experts.forward_expert(1, x[t : t + 1])[0]
    with A.expert_ablation(layer, 1, mode="drop"):
        dropped = layer(x).output
    assert torch.allclose(dropped, full.output - contrib, atol=1e-12)


def test_ablation_restores_the_router_even_after_an_error():
    layer = mixtral_layer(8, 6, num_experts=4, k=2)
    router = layer.router
    with pytest.raises(RuntimeError, match="boom"):
        with A.expert_ablation(layer, 0):
            raise RuntimeError("boom")
    assert layer.router is router


def test_ablation_rejects_bad_arguments():
    layer = mixtral_layer(8, 6, num_experts=4, k=2)
    with pytest.raises(ValueError, match="expert"):
        with A.expert_ablation(layer, 4):
            pass
    with pytest.raises(ValueError, match="mode"):
        with A.expert_ablation(layer, 0, mode="zero"):
            pass
    with pytest.raises(TypeError, match="MoELayer"):
        with A.expert_ablation(torch.nn.Linear(2, 2), 0):
            pass
    full = mixtral_layer(8, 6, num_experts=2, k=2)
    with pytest.raises(ValueError, match="k < num_experts"):
        with A.expert_ablation(full, 0):
            pass


def _tiny_lm(ffn="switch", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LMConfig(ffn=ffn, d_model=16, n_layers=2, n_heads=2, seq_len=16, d_ff=16, num_experts=4, **kw)
    return TinyLM(cfg).eval()


def test_ablation_losses_zero_for_an_expert_that_adds_nothing():
    model = _tiny_lm("mixtral")
    with torch.no_grad():  # expert 3 of layer 0 outputs exactly 0: dropping it changes nothing
        model.moe_layers[0].experts.w2[3].zero_()
    g = torch.Generator().manual_seed(0)
    windows = {d: torch.randint(0, 256, (4, 17), generator=g) for d in ("a", "b")}
    used = A.top_choices(A.router_logits_of(model, windows["a"][:, :-1])[0], 2)
    assert (used == 3).any()  # it is used, so the zero change is not for lack of tokens
    ab = A.ablation_losses(model, windows, mode="drop")
    assert ab.shape == (2, 4, 2)
    assert torch.equal(ab[0, 3], torch.zeros(2, dtype=torch.float64))
    assert ab.abs().max() > 1e-4  # the other experts do change the loss
    rerouted = A.ablation_losses(model, windows)  # rerouting its tokens does change it
    assert rerouted[0, 3].abs().max() > 1e-4


# ---------------------------------------------------------------- routing policy


def test_routing_policy_isolation_equals_running_each_sequence_alone():
    model = _tiny_lm("switch", eval_capacity_factor=0.5)  # tight capacity: drops happen
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (5, 16), generator=g)
    shared = model(batch)
    assert any((~r.kept).any() for r in shared.routings)
    with A.routing_policy(model, group_size=16):
        iso = model(batch).logits
    for i in range(5):
        alone = model(batch[i : i + 1]).logits[0]
        assert torch.allclose(iso[i], alone, atol=1e-5)


def test_routing_policy_dropless_keeps_everything_and_restores():
    model = _tiny_lm("switch", eval_capacity_factor=0.5)
    router = model.moe_layers[0].router
    before = (router.drop_tokens, router.capacity_factor, router.eval_capacity_factor, router.group_size)
    batch = torch.randint(0, 256, (4, 16))
    with A.routing_policy(model, drop_tokens=False):
        assert all(bool(r.kept.all()) for r in model(batch).routings)
    with pytest.raises(RuntimeError):
        with A.routing_policy(model, capacity_factor=9.0, group_size=16, priority="random"):
            assert model.moe_layers[0].router.inner.eval_capacity_factor == 9.0
            raise RuntimeError
    assert model.moe_layers[0].router is router
    assert (router.drop_tokens, router.capacity_factor, router.eval_capacity_factor, router.group_size) == before


def test_random_priority_keeps_exactly_capacity_but_not_the_earliest():
    model = _tiny_lm("switch", eval_capacity_factor=0.5)
    batch = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    pos = model(batch).routings[0]
    with A.routing_policy(model, priority="random", generator=torch.Generator().manual_seed(0)):
        rnd = model(batch).routings[0]
    assert torch.equal(rnd.indices, pos.indices)
    load = rnd.tokens_per_expert()
    assert torch.equal(rnd.kept_per_expert(), torch.clamp(load, max=rnd.capacity))
    assert not torch.equal(rnd.kept, pos.kept)  # a different subset survives
    # the kept positions are a permutation of 0..kept-1 per expert
    for e in range(4):
        p = rnd.positions[(rnd.indices == e) & rnd.kept]
        assert sorted(p.tolist()) == list(range(p.numel()))


def test_routing_policy_rejects_bad_values():
    model = _tiny_lm()
    with pytest.raises(ValueError, match="priority"):
        with A.routing_policy(model, priority="first"):
            pass
    with pytest.raises(ValueError, match="capacity_factor"):
        with A.routing_policy(model, capacity_factor=0):
            pass
    with pytest.raises(ValueError, match="group_size"):
        with A.routing_policy(model, group_size=0):
            pass


def test_router_logits_of_is_window_major_and_dropless():
    model = _tiny_lm("switch", eval_capacity_factor=0.5)
    w = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))
    logits = A.router_logits_of(model, w, batch_size=4)
    assert [tuple(t.shape) for t in logits] == [(96, 4), (96, 4)]
    one = A.router_logits_of(model, w[4:5])
    for layer in range(2):
        assert torch.allclose(logits[layer][64:80], one[layer], atol=1e-5)
    with pytest.raises(ValueError, match="no MoE layer"):
        A.router_logits_of(_tiny_lm("dense"), w)


# ---------------------------------------------------------------- Hugging Face layout


class _FakeHFOutput:
    def __init__(self, router_logits):
        self.router_logits = router_logits


class _FakeHFMoE:
    """Stands in for a transformers MoE model: returns per-layer [batch*seq, E] logits."""

    def __init__(self, layers=3, E=5):
        self.w = [torch.randn(7, E, generator=torch.Generator().manual_seed(i)) for i in range(layers)]

    def __call__(self, input_ids, attention_mask=None, output_router_logits=False):
        assert output_router_logits
        return _FakeHFOutput(tuple(w[input_ids.reshape(-1) % 7].to(torch.bfloat16) for w in self.w))


def test_hf_router_logits_layout_and_padding():
    model = _FakeHFMoE()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logits = A.hf_router_logits(model, ids, mask)
    assert len(logits) == 3 and all(t.shape == (5, 5) and t.dtype == torch.float32 for t in logits)
    full = A.hf_router_logits(model, ids)
    assert torch.equal(full[0][:5], logits[0])
    with pytest.raises(TypeError, match="input_ids"):
        A.hf_router_logits(model, ids.float())


def test_analysis_runs_on_plain_hf_style_logits():
    # [layers][tokens, E], as Hugging Face returns them: 2 layers, 3 windows of 6 tokens
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(18, 8, generator=g) for _ in range(2)]
    ch = [A.top_choices(h, 2) for h in logits]
    rep = A.consecutive_repetition(ch[1].view(3, 6, 2), 8)
    assert 0 <= rep["first"] <= 1
    shares, counts = A.routing_shares(torch.tensor([0, 1, 2]).repeat_interleave(6), ch[0], 3, 8)
    assert torch.allclose(shares.sum(1), torch.ones(3, dtype=torch.float64))


def test_tiny_transformers_mixtral_if_installed():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (3, 8))
    logits = A.hf_router_logits(model, ids)
    assert len(logits) == 2 and logits[0].shape == (24, 4)
    rep = A.consecutive_repetition(A.top_choices(logits[1], 2).view(3, 8, 2), 4)
    assert 0 <= rep["any"] <= 1


# ---------------------------------------------------------------- plot


def test_plot_routed_text_draws_and_checks_lengths():
    import matplotlib

    matplotlib.use("Agg")
    ax = plot_routed_text(torch.tensor(list(b"def f():\n  x")), torch.arange(12) % 4, 4, width=6)
    assert len(ax.texts) == 12 and ax.texts[8].get_text() == "↵"
    with pytest.raises(ValueError, match="same length"):
        plot_routed_text(torch.tensor([1, 2]), torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="expert ids"):
        plot_routed_text(torch.tensor([65]), torch.tensor([4]), 4)


def test_load_local_hf_moe_reads_a_saved_folder_if_installed(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    cfg = transformers.OlmoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, num_experts=4,
                                   num_experts_per_tok=2, max_position_embeddings=32, eos_token_id=0,
                                   pad_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    transformers.OlmoeForCausalLM(cfg).save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(32)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path)
    model, tokenizer = A.load_local_hf_moe(str(tmp_path), dtype=torch.float32)
    ids = tokenizer("w1 w2 w3 w4", return_tensors="pt").input_ids
    logits = A.hf_router_logits(model, ids)
    assert len(logits) == 2 and logits[0].shape == (4, 4)
