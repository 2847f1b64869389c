"""Notebook 09's FFN kinds inside TinyLM and the training loop: shapes, equal active
parameters, token ids reaching the hash router, causality (and expert choice's lack of it),
the bias update after each optimizer step, upcycling a whole model, continued training, and
the training cache keeping notebook 07's keys."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict

import pytest
import torch

from moe_utils import train as T
from moe_utils.layers import MoELayer, SharedExpertMoELayer
from moe_utils.model import BEYOND_TOPK_KINDS, LMConfig, TinyLM, upcycle
from moe_utils.routers import BiasBalancedRouter, ExpertChoiceRouter, HashRouter, RandomRouter

TINY = dict(d_model=32, n_layers=2, n_heads=4, seq_len=16, d_ff=64, num_experts=4)


def _model(ffn, **kw):
    torch.manual_seed(0)
    return TinyLM(LMConfig(ffn=ffn, **{**TINY, **kw}))


ROUTERS = {"random": RandomRouter, "hash": HashRouter, "expert_choice": ExpertChoiceRouter,
           "deepseek": type(None), "bias_balanced": BiasBalancedRouter}


@pytest.mark.parametrize("ffn", BEYOND_TOPK_KINDS)
def test_new_kinds_build_run_and_spend_the_dense_active_parameters(ffn):
    model = _model(ffn)
    dense = _model("dense")
    p, pd = model.ffn_parameters(), dense.ffn_parameters()
    assert p["active"] == pd["active"]  # expert choice: on average (top_k experts per token)
    # the formula agrees with the real modules (routers excluded)
    real = sum(q.numel() for b in model.blocks for n, q in b.ffn.named_parameters() if not n.startswith("router"))
    assert real == p["total"]
    idx = torch.randint(0, 256, (3, 16))
    out = model(idx, idx)
    assert abs(out.loss.item() - math.log(256)) < 0.5 and len(out.routings) == 2
    layer = model.blocks[0].ffn
    assert isinstance(layer, MoELayer)
    if ffn == "deepseek":
        assert isinstance(layer, SharedExpertMoELayer) and layer.n_shared == 1
        assert layer.experts.num_experts == 2 * 4 - 1 and layer.router.k == 2 * 2 - 1 and layer.experts.d_ff == 16
    else:
        assert isinstance(layer.router, ROUTERS[ffn])
    (out.loss + out.aux_loss + out.z_loss).backward()


def test_hash_model_routes_every_layer_by_the_input_token_ids():
    model = _model("hash").eval()
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx)
    for block, r in zip(model.blocks, out.routings):
        assert r.indices.squeeze(1).tolist() == block.ffn.router.table[idx.reshape(-1)].tolist()


def test_balanced_hash_model_uses_the_training_split_byte_counts():
    from moe_utils.data import corpus_tokens

    model = _model("hash", hash_table="balanced", num_experts=8)
    table = model.blocks[0].ffn.router.table
    counts = torch.bincount(corpus_tokens().train, minlength=256)
    load = torch.zeros(8, dtype=torch.long).index_add_(0, table, counts)
    # the greedy bound, and far better than a random table's typical spread
    assert int(load.max()) <= counts.sum() / 8 + int(counts.max())
    assert torch.equal(model.blocks[1].ffn.router.table, table)


@pytest.mark.parametrize("ffn", ["random", "hash", "deepseek", "bias_balanced"])
def test_token_choice_kinds_are_causal(ffn):
    model = _model(ffn).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    with torch.no_grad():
        torch.manual_seed(5)  # the random router draws per position: same draws for both calls
        a = model(idx).logits
        torch.manual_seed(5)
        b = model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=0)


def test_expert_choice_model_is_not_causal():
    # the documented limitation: later tokens change which experts earlier tokens get
    model = _model("expert_choice").eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (4, 16))
    changed = idx.clone()
    changed[:, 8:] = torch.randint(0, 256, (4, 8))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    # the first 8 positions of every window are identical in both batches, yet their outputs differ
    assert (a.logits[:, :8] - b.logits[:, :8]).abs().max() > 1e-3
    ea = a.routings[0].indices.view(4, 16, -1)[:, :8] * a.routings[0].valid.view(4, 16, -1)[:, :8]
    eb = b.routings[0].indices.view(4, 16, -1)[:, :8] * b.routings[0].valid.view(4, 16, -1)[:, :8]
    assert ea.shape != eb.shape or not torch.equal(ea, eb)  # because their experts changed


def test_new_kind_config_errors_are_clear():
    with pytest.raises(ValueError, match="ffn must be one of"):
        LMConfig(ffn="expert-choice")
    with pytest.raises(ValueError, match="hash_table must be one of"):
        LMConfig(ffn="hash", hash_table="sorted")
    with pytest.raises(ValueError, match="granularity=3 must divide the expert width d_ff / top_k = 64"):
        LMConfig(ffn="deepseek", granularity=3)
    with pytest.raises(ValueError, match="n_shared must be an int >= 0"):
        LMConfig(ffn="deepseek", n_shared=-1)
    with pytest.raises(ValueError, match=r"n_shared must be in \[0, granularity \* top_k - 1 = 3\]"):
        LMConfig(ffn="deepseek", n_shared=4)
    with pytest.raises(ValueError, match="score_func"):
        LMConfig(ffn="bias_balanced", score_func="tanh")
    with pytest.raises(ValueError, match="multiple of top_k=3"):
        LMConfig(ffn="expert_choice", top_k=3)
    assert LMConfig(ffn="deepseek").aux_loss_coef == 2e-2 and LMConfig(ffn="bias_balanced").aux_loss_coef == 0.0


# ---------------------------------------------------------------- upcycling a whole model


def test_upcycled_model_computes_the_dense_model_at_step_0():
    torch.manual_seed(0)
    dense = TinyLM(LMConfig(ffn="dense", **TINY)).double().eval()
    moe = upcycle(dense, num_experts=4, top_k=2)
    assert moe.config.ffn == "mixtral" and moe.config.d_ff == 2 * 64 and moe.config.expert_d_ff == 64
    assert moe.ffn_parameters()["active"] == 2 * dense.ffn_parameters()["active"]
    assert not moe.training
    idx = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        a, b = dense(idx).logits, moe(idx).logits
    assert (a - b).abs().max() < 1e-12
    # the routers are new, not derived from the dense weights: they differ between seeds
    torch.manual_seed(1)
    other = upcycle(dense)
    assert not torch.equal(other.blocks[0].ffn.router.gate.weight, moe.blocks[0].ffn.router.gate.weight)
    with pytest.raises(TypeError, match="config.ffn == 'dense'"):
        upcycle(moe)


# ---------------------------------------------------------------- the training loop


def tc(**kw):
    base = dict(steps=6, seed=0, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=1)
    base.update(kw)
    return T.TrainConfig(**base)


def test_train_updates_the_bias_once_per_step_from_that_steps_load(data):
    cfg = LMConfig(ffn="bias_balanced", **{**TINY, "n_layers": 1})
    one = T.train(cfg, tc(steps=1), data, progress=False)
    load = torch.tensor(one.history["routing"][0][0]["tokens_per_expert"], dtype=torch.float64)
    want = [1e-3 * (1 if load.mean() > x else -1 if load.mean() < x else 0) for x in load.tolist()]
    bias = one.model.blocks[0].ffn.router.bias
    assert bias.tolist() == pytest.approx(want, rel=1e-6)  # b += u sign(mean - load), after the step
    six = T.train(cfg, tc(steps=6), data, progress=False)
    b6 = six.model.blocks[0].ffn.router.bias.double()
    assert float(b6.abs().max()) <= 6e-3 + 1e-9 and float(b6.abs().max()) > 0
    # every entry is a whole number of steps of size u
    assert torch.allclose(b6 / 1e-3, (b6 / 1e-3).round(), atol=1e-4)


def test_continued_training_starts_from_the_given_weights(data):
    cfg = LMConfig(ffn="dense", **{**TINY, "n_layers": 1})
    base = T.train(cfg, tc(steps=4), data, progress=False)
    state = base.model.state_dict()
    job = T.continue_training(cfg, state, steps=3, seed=5, batch_size=4, warmup_steps=1, eval_every=3,
                              eval_batches=1)
    assert job[1].init_from == T.state_digest(state) and job[2] is state
    more = T.train(job[0], job[1], data, progress=False, init_state=state)
    # the step-0 validation loss is the parent's final one: same weights, same windows
    assert more.history["val_loss"][0] == pytest.approx(base.history["val_loss"][-1], abs=1e-6)
    with pytest.raises(ValueError, match="init_from is set"):
        T.train(job[0], job[1], data, progress=False)
    with pytest.raises(ValueError, match="has digest"):
        T.train(job[0], job[1], data, progress=False, init_state=more.model.state_dict())
    with pytest.raises(ValueError, match="init_from must be None or a state_digest"):
        T.TrainConfig(steps=1, init_from="abc")
    with pytest.raises(RuntimeError):
        T.continue_training(LMConfig(ffn="switch", **{**TINY, "n_layers": 1}), state, steps=1)


def test_train_many_runs_continuation_jobs_like_train(data, tmp_path):
    cfg = LMConfig(ffn="dense", **{**TINY, "n_layers": 1})
    state = T.train(cfg, tc(steps=2), data, progress=False).model.state_dict()
    job = T.continue_training(cfg, state, steps=2, seed=1, batch_size=4, warmup_steps=1, eval_every=2,
                              eval_batches=1)
    here = T.train(job[0], job[1], data, progress=False, init_state=state)
    runs = T.train_many({"a": job, "b": job}, data, workers=2, report=None)
    assert runs["a"].history["loss"] == here.history["loss"] == runs["b"].history["loss"]
    with pytest.raises(TypeError, match=r"\(LMConfig, TrainConfig, init_state\)"):
        T.train_many({"a": (cfg, job[1], "state")}, data, report=None)


def _key_of_notebook_07(config: LMConfig, tc_: T.TrainConfig) -> str:
    """The cache key as the code of TRAINING_CODE_VERSION 3 computed it, before notebook 09's
    fields existed: the LMConfig and TrainConfig fields of that version only."""
    model_fields = ["ffn", "vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "d_ff", "num_experts", "top_k",
                    "aux_loss_coef", "z_loss_coef", "capacity_factor", "eval_capacity_factor", "jitter_eps", "backend"]
    train_fields = ["steps", "seed", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip",
                    "eval_every", "eval_batches", "eval_seed"]
    blob = json.dumps(
        {"model": {f: getattr(config, f) for f in model_fields}, "train": {f: getattr(tc_, f) for f in train_fields},
         "corpus": T.CORPUS_VERSION, "py": sys.version_info[:2], "code": 3},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_notebook_07_runs_keep_their_cache_keys():
    assert T.TRAINING_CODE_VERSION == 3
    for ffn in ("dense", "switch", "mixtral"):
        for seed in (0, 1):
            job = T.course_run(ffn, seed)
            assert T._cache_key(*job) == _key_of_notebook_07(*job), (ffn, seed)
    job = T.course_run("switch", 0, aux_loss_coef=0.0)
    assert T._cache_key(*job) == _key_of_notebook_07(*job)
    # a new field away from its default does change the key
    assert T._cache_key(*T.course_run("deepseek", 0)) != T._cache_key(*T.course_run("deepseek", 0, n_shared=2))
    cfg, tc0 = T.course_run("dense", 0)
    assert T._cache_key(cfg, tc0) != T._cache_key(cfg, T.TrainConfig(**{**asdict(tc0), "init_from": "0" * 16}))


@pytest.mark.parametrize("ffn", ["bias_balanced", "random"])
def test_resume_restores_the_bias_and_the_random_draws(ffn, data, tmp_path):
    # the bias is a buffer saved with the model; the random router draws from the RNG the
    # checkpoint stores: an interrupted run resumes to exactly the uninterrupted one
    cfg = LMConfig(ffn=ffn, **{**TINY, "n_layers": 1})
    config = tc(steps=8, eval_every=4)
    full = T.train(cfg, config, data, progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_5(step, record):
        if step == 5:
            raise Interrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        T.train(cfg, config, data, checkpoint=ckpt, checkpoint_every=4, progress=False, callback=stop_at_5)
    resumed = T.train(cfg, config, data, checkpoint=ckpt, checkpoint_every=4, resume=True, progress=False)
    assert resumed.history["loss"] == full.history["loss"]
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    if ffn == "bias_balanced":
        assert full.model.blocks[0].ffn.router.bias.abs().sum() > 0
