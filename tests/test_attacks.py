"""moe_utils.attacks: crafting, the capacity-overflow attack (it changes a victim's output
under capacity and not under dropless routing or isolation), output_change against a
float64 per-position reference, and the toy leak checked against moe_utils.capacity."""

from __future__ import annotations

import math

import pytest
import torch

from moe_utils import attacks as K
from moe_utils.analysis import routing_policy
from moe_utils.capacity import capacity_mask
from moe_utils.model import LMConfig, TinyLM


def _tiny_switch(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LMConfig(ffn="switch", d_model=16, n_layers=2, n_heads=2, seq_len=16, d_ff=16, num_experts=4, **kw)
    return TinyLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_switch()


# ---------------------------------------------------------------- crafting


def test_routed_fraction_counts_first_choices(model):
    seqs = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    with routing_policy(model, drop_tokens=False):
        first = model(seqs).routings[1].indices.view(3, 16)
    for e in range(4):
        want = (first == e).double().mean(1)
        assert torch.allclose(K.routed_fraction(model, seqs, 1, e), want)


def test_repeated_byte_routing_rows_are_shares(model):
    scan = K.repeated_byte_routing(model, 0)
    assert scan.shape == (95, 4)
    assert torch.allclose(scan.sum(1), torch.ones(95, dtype=torch.float64))
    # the row of byte 'a' equals routed_fraction of 'a' x 16
    a = torch.full((16,), ord("a"))
    want = torch.stack([K.routed_fraction(model, a, 0, e)[0] for e in range(4)])
    assert torch.allclose(scan[ord("a") - 32], want)


def test_craft_expert_string_beats_every_repeated_candidate(model):
    scan = K.repeated_byte_routing(model, 0)
    crafted = K.craft_expert_string(model, 0, [0, 1, 2, 3], 16)
    assert crafted.shape == (4, 16) and int(crafted.min()) >= 32 and int(crafted.max()) <= 126
    for e in range(4):
        got = float(K.routed_fraction(model, crafted[e], 0, e)[0])
        top16 = K.PRINTABLE[torch.argsort(-scan[:, e], stable=True)[:16]]
        repeated = K.routed_fraction(model, top16[:, None].expand(-1, 16), 0, e)
        assert got >= float(repeated.max()) - 1e-12  # never worse than any repeated candidate


def test_craft_expert_string_batched_equals_one_at_a_time_and_keeps_prefix(model):
    prefix = torch.tensor(list(b"hello"))
    many = K.craft_expert_string(model, 1, [0, 2], 6, prefix=prefix, num_candidates=4)
    assert many.shape == (2, 6)
    assert torch.equal(many[1], K.craft_expert_string(model, 1, 2, 6, prefix=prefix, num_candidates=4))
    with pytest.raises(ValueError, match="seq_len"):
        K.craft_expert_string(model, 0, 0, 12, prefix=prefix)
    with pytest.raises(ValueError, match="expert"):
        K.craft_expert_string(model, 0, 4, 4)
    with pytest.raises(ValueError, match="layer"):
        K.craft_expert_string(model, 2, 0, 4)


# ---------------------------------------------------------------- overflow


def _overflow_setting(model):
    victim = torch.tensor(list(b"def f(x):\n  return x"))[:16]
    C = 32  # eval CF 2.0 x 64 tokens / 4 experts
    with routing_policy(model, drop_tokens=False):
        first = model(victim[None]).routings[0].indices[:, 0]
    target = int(torch.bincount(first, minlength=4).argmax())
    flood = K.craft_flood(model, [target], 3, 64)
    return victim, flood, target, C


def test_flood_fills_the_target_buffer_and_drops_the_victims_tokens(model):
    victim, flood, target, C = _overflow_setting(model)
    out = K.run_group(model, torch.cat([flood, victim[None]]))
    r = out.routings[0]
    assert r.capacity == C
    assert int(r.kept_per_expert()[target]) == C
    on_target = r.indices.view(4, 16)[3] == target
    assert on_target.any() and not r.kept.view(4, 16)[3][on_target].any()  # all dropped


def test_attack_changes_the_victims_output_under_capacity_only(model):
    victim, flood, _, _ = _overflow_setting(model)
    batch = torch.cat([flood, victim[None]])
    alone = K.run_group(model, victim[None], drop_tokens=False).logits[0]
    attacked = K.run_group(model, batch).logits[3]
    assert (attacked - alone).abs().max() > 1e-3  # the victim's output moved
    dropless = K.run_group(model, batch, drop_tokens=False).logits[3]
    assert torch.allclose(dropless, alone, atol=1e-5)  # ... and not without capacity
    big = K.run_group(model, batch, capacity_factor=4.0).logits[3]  # CF = E: no drop possible
    assert torch.allclose(big, alone, atol=1e-5)
    own = K.run_group(model, victim[None]).logits[0]
    isolated = K.run_group(model, batch, group_size=16).logits[3]
    assert torch.allclose(isolated, own, atol=1e-5)  # isolation: exactly its own group
    first = K.run_group(model, torch.cat([victim[None], flood])).logits[0]
    assert torch.allclose(first, alone, atol=1e-5)  # ahead of the attacker: untouched


def test_craft_flood_refuses_an_impossible_budget(model):
    with pytest.raises(ValueError, match="cannot fill"):
        K.craft_flood(model, [0], 1, 10_000)


def test_run_group_restores_mode(model):
    model.train()
    K.run_group(model, torch.zeros(1, 4, dtype=torch.long))
    assert model.training
    model.eval()
    with pytest.raises(TypeError, match="seqs"):
        K.run_group(model, torch.zeros(4, dtype=torch.long))


def test_output_change_against_a_per_position_float64_reference():
    g = torch.Generator().manual_seed(0)
    ref, new = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    targets = torch.tensor([0, 3, 6, 1, 2])
    kl = loss = loss_ref = 0.0
    changed = 0
    for t in range(5):
        p = [math.exp(v) for v in ref[t].double().tolist()]
        q = [math.exp(v) for v in new[t].double().tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        kl += sum(a * math.log(a / b) for a, b in zip(p, q)) / 5
        loss += -math.log(q[int(targets[t])]) / 5
        loss_ref += -math.log(p[int(targets[t])]) / 5
        changed += max(range(7), key=p.__getitem__) != max(range(7), key=q.__getitem__)
    got = K.output_change(ref, new, targets)
    assert got["kl"] == pytest.approx(kl, abs=1e-12)
    assert got["top1_changed"] == pytest.approx(changed / 5)
    assert got["loss"] == pytest.approx(loss, abs=1e-12)
    assert got["loss_change"] == pytest.approx(loss - loss_ref, abs=1e-12)
    assert K.output_change(ref, ref)["kl"] == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match=r"\[S, V\]"):
        K.output_change(ref, new[:3])


# ---------------------------------------------------------------- toy leak


def test_toy_position_priority_matches_the_course_capacity_rule():
    layer = K.ToyCapacityMoE(vocab=16, num_experts=4, capacity=2, priority="position", seed=3)
    ids = torch.randint(0, 16, (20,), generator=torch.Generator().manual_seed(0))
    y, kept = layer(ids)
    e, _ = layer.route(ids)
    want, _ = capacity_mask(e[:, None], 4, 2)
    assert torch.equal(kept, want[:, 0])
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))  # a dropped token returns zeros
    assert (y[kept].abs().sum(-1) > 0).all()


def test_toy_score_priority_keeps_the_highest_gates_ties_to_the_earlier():
    layer = K.ToyCapacityMoE(vocab=16, num_experts=4, capacity=2, priority="score", seed=4)
    ids = torch.tensor([5, 5, 5, 1, 2, 3, 9, 9, 12, 0, 7, 5])
    _, kept = layer(ids)
    e, gate = layer.route(ids)
    for ex in range(4):
        members = [t for t in range(len(ids)) if int(e[t]) == ex]
        ranked = sorted(members, key=lambda t: (-float(gate[t]), t))
        assert sorted(t for t in members if kept[t]) == sorted(ranked[:2])


def test_toy_isolation_and_dropless():
    ids = torch.tensor([3, 3, 3, 3, 3, 3])
    owners = torch.tensor([0, 0, 1, 1, 1, 1])
    iso = K.ToyCapacityMoE(capacity=2, per_user=True, seed=0)
    _, kept = iso(ids, owners)
    assert kept.tolist() == [True, True, True, True, False, False]  # 2 slots per user
    assert bool(K.ToyCapacityMoE(capacity=None, seed=0)(ids)[1].all())
    with pytest.raises(ValueError, match="ids"):
        iso(torch.tensor([16]))
    with pytest.raises(ValueError, match="priority"):
        K.ToyCapacityMoE(priority="random")


@pytest.mark.parametrize("seed", range(6))
def test_steal_secret_score_priority_recovers_every_secret_quickly(seed):
    layer = K.ToyCapacityMoE(vocab=16, num_experts=4, capacity=4, priority="score", seed=seed)
    bound = 4 + math.ceil(math.log2(16))
    for secret in range(16):
        r = K.steal_secret(layer, secret)
        assert r.correct and r.guess == secret, (seed, secret)
        assert r.queries <= bound


def test_steal_secret_position_priority_reveals_the_expert():
    layer = K.ToyCapacityMoE(vocab=16, num_experts=4, capacity=4, priority="position", seed=0)
    e, _ = layer.route(torch.arange(16))
    for secret in range(16):
        r = K.steal_secret(layer, secret)
        assert r.guess is not None and int(e[r.guess]) == int(e[secret])


def test_steal_secret_learns_nothing_under_isolation_or_dropless():
    for layer in (K.ToyCapacityMoE(per_user=True, seed=1), K.ToyCapacityMoE(capacity=None, seed=1)):
        for secret in range(16):
            r = K.steal_secret(layer, secret)
            assert r.guess is None and not r.correct


def test_steal_secret_repeats_beat_random_priority():
    hits = {1: 0, 4: 0}
    for seed in range(5):
        for rep in hits:
            layer = K.ToyCapacityMoE(priority="score", randomize=True, seed=seed)
            hits[rep] += sum(K.steal_secret(layer, s, repeats=rep).correct for s in range(16))
    assert hits[4] > hits[1] and hits[4] >= 0.95 * 80
    with pytest.raises(ValueError, match="victim"):
        K.steal_secret(K.ToyCapacityMoE(), 99)
