"""A tiny decoder-only Transformer LM whose FFN is dense or MoE (nanoGPT-flat).

Block (pre-norm, as in LLaMA/Mixtral)::

    x = x + Attention(RMSNorm(x))          # causal, F.scaled_dot_product_attention
    x = x + FFN(RMSNorm(x))                # DenseFFN, switch_layer or mixtral_layer

Positions: learned absolute embeddings (the simplest scheme that works at this
size). Input embedding and output head share one matrix (weight tying).

Equal active FFN parameters (the fair comparison of notebook 07). With ``d_ff = f``
and SwiGLU everywhere:

* ``dense``:   one SwiGLU of hidden size ``f``                    -> ``3 d f`` per token
* ``switch``:  E SwiGLU experts of hidden size ``f``, top-1        -> ``3 d f`` (+ router)
* ``mixtral``: E SwiGLU experts of hidden size ``f / 2``, top-2    -> ``3 d f`` (+ router)

Switch holds E times the dense FFN parameters, Mixtral E / 2 times; all three
compute the same number per token. (``switch_layer`` defaults to GELU experts; here it gets SwiGLU so that
only the routing differs between the three models.)

Notebook 09's kinds (``BEYOND_TOPK_KINDS``), at the same active FFN parameters:

* ``random``:        Mixtral-shaped (E experts of ``f / k``), k experts drawn at random
* ``hash``:          Switch-shaped (E experts of ``f``), expert = table[token id]
                     (``hash_table``: ``"random"``, or ``"balanced"`` from the course
                     corpus's training-split byte counts)
* ``expert_choice``: Mixtral-shaped, each expert takes ``C = T * k / E`` tokens of the
                     batch (capacity factor ``c = top_k``: ``k`` experts per token on average)
* ``deepseek``:      the Mixtral layer cut into ``granularity * E`` experts of
                     ``f / (k * granularity)``, ``n_shared`` of them always on
                     (``moe_utils.layers.deepseek_layer``)
* ``bias_balanced``: Mixtral-shaped, ``BiasBalancedRouter`` (no aux loss by default);
                     ``TinyLM.after_optimizer_step`` updates the biases

Token ids reach the FFNs through ``Block.forward(x, idx)``: ``TinyLM`` passes its input ids
to every block, and ``MoELayer`` hands them to routers that need them (``HashRouter``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive_float, check_positive_int
from .dispatch import BACKENDS
from .experts import ExpertBank
from .layers import DenseFFN, MoELayer, deepseek_layer, mixtral_layer, switch_layer
from .routers import SCORE_FUNCS, BiasBalancedRouter, ExpertChoiceRouter, HashRouter, RandomRouter, Routing

__all__ = [
    "FFN_KINDS",
    "BEYOND_TOPK_KINDS",
    "ALL_FFN_KINDS",
    "HASH_TABLES",
    "LMConfig",
    "LMOutput",
    "RMSNorm",
    "CausalSelfAttention",
    "Block",
    "TinyLM",
    "upcycle",
]

FFN_KINDS = ("dense", "switch", "mixtral")  # notebook 07's models
BEYOND_TOPK_KINDS = ("random", "hash", "expert_choice", "deepseek", "bias_balanced")  # notebook 09
ALL_FFN_KINDS = FFN_KINDS + BEYOND_TOPK_KINDS
HASH_TABLES = ("random", "balanced")
_DEFAULT_AUX = {"dense": 0.0, "switch": 1e-2, "mixtral": 2e-2, "random": 0.0, "hash": 0.0, "expert_choice": 0.0,
                "deepseek": 2e-2, "bias_balanced": 0.0}
# kinds whose E experts have width f / top_k and whose router picks top_k of them (on average)
_TOPK_SHAPED = ("mixtral", "random", "expert_choice", "bias_balanced", "deepseek")


@dataclass
class LMConfig:
    """Everything that fixes a model's shape and its routing losses.

    ffn:           ``"dense"``, ``"switch"`` (top-1, capacity) or ``"mixtral"`` (top-2, dropless),
                   or one of notebook 09's ``BEYOND_TOPK_KINDS`` (module docstring)
    d_ff:          the dense hidden size ``f``; experts get ``f`` (switch, hash) or ``f / top_k``
                   (mixtral, random, expert_choice, bias_balanced; deepseek: ``f / top_k / granularity``)
    aux_loss_coef: None picks the default of each design: switch 1e-2 (Switch Transformer paper),
                   mixtral and deepseek 2e-2 (``router_aux_loss_coef`` of the released Hugging Face
                   Mixtral config; the Mixtral paper gives none), the other notebook-09 kinds 0;
                   0 switches it off. Applied per MoE layer and summed over layers (Hugging Face
                   pools all layers into one loss)
    z_loss_coef:   router z-loss coefficient (ST-MoE 1e-3)
    capacity_factor / eval_capacity_factor: Switch only (training / eval mode)
    hash_table:    ``hash`` only: ``"random"`` or ``"balanced"``
    granularity, n_shared: ``deepseek`` only (``m`` and ``K_s`` of Dai et al. 2024)
    bias_update_rate, score_func: ``bias_balanced`` only (``u`` of Wang et al. 2024; softmax or sigmoid)

    The fields after ``backend`` were added for notebook 09; at their defaults they are left
    out of the training cache key, so notebook 07's runs keep their keys.
    """

    ffn: str = "dense"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    d_ff: int = 128
    num_experts: int = 8
    top_k: int = 2
    aux_loss_coef: float | None = None
    z_loss_coef: float = 1e-3
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    jitter_eps: float = 1e-2
    backend: str = "auto"
    hash_table: str = "random"
    granularity: int = 2
    n_shared: int = 1
    bias_update_rate: float = 1e-3
    score_func: str = "softmax"

    def __post_init__(self) -> None:
        if self.ffn not in ALL_FFN_KINDS:
            raise ValueError(f"ffn must be one of {ALL_FFN_KINDS}, got {self.ffn!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "d_ff", "num_experts", "top_k",
                     "granularity"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("n_shared", self.n_shared, minimum=0)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if self.ffn in _TOPK_SHAPED:
            if self.d_ff % self.top_k:
                raise ValueError(f"d_ff={self.d_ff} must be a multiple of top_k={self.top_k} for ffn={self.ffn!r}")
            if self.top_k > self.num_experts:
                raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.ffn == "deepseek":
            if (self.d_ff // self.top_k) % self.granularity:
                raise ValueError(f"granularity={self.granularity} must divide the expert width d_ff / top_k = "
                                 f"{self.d_ff // self.top_k} for ffn='deepseek'")
            if self.n_shared >= self.granularity * self.top_k:
                raise ValueError(f"n_shared must be in [0, granularity * top_k - 1 = "
                                 f"{self.granularity * self.top_k - 1}] for ffn='deepseek', got {self.n_shared}")
        if self.hash_table not in HASH_TABLES:
            raise ValueError(f"hash_table must be one of {HASH_TABLES}, got {self.hash_table!r}")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        self.bias_update_rate = check_positive_float("bias_update_rate", self.bias_update_rate, allow_zero=True)
        if self.aux_loss_coef is None:
            self.aux_loss_coef = _DEFAULT_AUX[self.ffn]
        self.aux_loss_coef = check_positive_float("aux_loss_coef", self.aux_loss_coef, allow_zero=True)
        self.z_loss_coef = check_positive_float("z_loss_coef", self.z_loss_coef, allow_zero=True)
        check_positive_float("capacity_factor", self.capacity_factor)
        check_positive_float("eval_capacity_factor", self.eval_capacity_factor)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def expert_d_ff(self) -> int:
        """Hidden size of one (routed) expert: f (dense, switch, hash), f / top_k (mixtral, random,
        expert_choice, bias_balanced) or f / top_k / granularity (deepseek)."""
        if self.ffn == "deepseek":
            return self.d_ff // self.top_k // self.granularity
        return self.d_ff // self.top_k if self.ffn in _TOPK_SHAPED else self.d_ff

    @property
    def is_moe(self) -> bool:
        return self.ffn != "dense"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LMOutput:
    """logits: [B, S, V]; loss: next-token cross-entropy (None without targets);
    aux_loss, z_loss: summed over MoE layers with coefficients applied (0 for dense);
    routings: one ``Routing`` per layer (None for a dense layer), tokens flattened to [B*S]."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    routings: list[Routing | None]


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * g`` (no mean subtraction, no bias)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. x: [B, S, d] -> [B, S, d]."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        # [B, S, d] -> [B, heads, S, d / heads]
        q, k, v = (t.view(B, S, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, d))


def _training_token_counts(vocab_size: int) -> torch.Tensor:
    """Occurrences of each token id in the course corpus's training split (for the balanced hash)."""
    from .data import corpus_tokens

    train = corpus_tokens().train
    if int(train.max()) >= vocab_size:
        raise ValueError(f"the course corpus holds token ids up to {int(train.max())}, beyond vocab_size={vocab_size}")
    return torch.bincount(train, minlength=vocab_size)


def _make_ffn(cfg: LMConfig) -> nn.Module:
    if cfg.ffn == "dense":
        return DenseFFN(cfg.d_model, cfg.d_ff, kind="swiglu")
    if cfg.ffn in BEYOND_TOPK_KINDS:
        return _make_beyond_topk_ffn(cfg)
    if cfg.ffn == "switch":
        return switch_layer(
            cfg.d_model,
            cfg.expert_d_ff,
            cfg.num_experts,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.eval_capacity_factor,
            jitter_eps=cfg.jitter_eps,
            aux_loss_coef=cfg.aux_loss_coef,
            z_loss_coef=cfg.z_loss_coef,
            expert_kind="swiglu",
            backend=cfg.backend,
        )
    return mixtral_layer(
        cfg.d_model,
        cfg.expert_d_ff,
        cfg.num_experts,
        k=cfg.top_k,
        aux_loss_coef=cfg.aux_loss_coef,
        z_loss_coef=cfg.z_loss_coef,
        backend=cfg.backend,
    )


def _make_beyond_topk_ffn(cfg: LMConfig) -> nn.Module:
    d, E, f = cfg.d_model, cfg.num_experts, cfg.expert_d_ff
    if cfg.ffn == "deepseek":
        return deepseek_layer(d, cfg.d_ff // cfg.top_k, E, k=cfg.top_k, granularity=cfg.granularity,
                              n_shared=cfg.n_shared, aux_loss_coef=cfg.aux_loss_coef, z_loss_coef=cfg.z_loss_coef,
                              backend=cfg.backend)
    aux = None
    if cfg.ffn == "random":
        router = RandomRouter(d, E, k=cfg.top_k)
    elif cfg.ffn == "hash":
        if cfg.hash_table == "balanced":
            router = HashRouter.balanced(d, E, _training_token_counts(cfg.vocab_size))
        else:
            router = HashRouter.random(d, E, cfg.vocab_size)  # global RNG: the FFN's draws
    elif cfg.ffn == "expert_choice":
        router = ExpertChoiceRouter(d, E, capacity_factor=float(cfg.top_k))
    else:  # bias_balanced
        router = BiasBalancedRouter(d, E, k=cfg.top_k, score_func=cfg.score_func, update_rate=cfg.bias_update_rate)
        aux = "topk"  # off at the default coefficient 0
    experts = ExpertBank(E, d, f, kind="swiglu")
    return MoELayer(router, experts, aux, cfg.aux_loss_coef, cfg.z_loss_coef, cfg.backend)


class Block(nn.Module):
    """Pre-norm Transformer block; returns ``(x, moe_output or None)``.

    ``with_ffn=False`` leaves the FFN as a placeholder for ``TinyLM`` to fill in later
    (see ``TinyLM`` on why the FFNs are initialised last)."""

    def __init__(self, cfg: LMConfig, with_ffn: bool = True):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.norm2 = RMSNorm(cfg.d_model)
        self.ffn = _make_ffn(cfg) if with_ffn else nn.Identity()

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None):
        """``x: [B, S, d]``; ``idx: [B, S]`` the input token ids, for routers that route by id."""
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h, token_ids=idx)  # MoEOutput: the FFN part only; the residual is added here
            return x + out.output, out
        return x + self.ffn(h), None


class TinyLM(nn.Module):
    """Decoder-only byte-level LM. ``forward(idx [B, S], targets [B, S] | None) -> LMOutput``.

    Paired initialisation: the embeddings, attention and norms are drawn from the random
    generator first and the FFNs last, so a dense and an MoE model built after the same
    ``torch.manual_seed`` start with *identical* weights everywhere except the FFNs. With
    the same batches (same seed in ``train``), the only difference between two runs is
    the FFN, which makes the dense-vs-MoE comparison of notebook 07 a paired one.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config, with_ffn=False) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        for block in self.blocks:  # last: only these draws differ between dense and MoE models
            block.ffn = _make_ffn(config)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def after_optimizer_step(self) -> None:
        """What ``moe_utils.train.train`` calls after every ``optimizer.step()``: each MoE layer
        updates its non-gradient state (``BiasBalancedRouter``'s bias); a no-op for the others."""
        for layer in self.moe_layers:
            layer.after_optimizer_step()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def ffn_parameters(self) -> dict[str, int]:
        """FFN parameters per model: ``total`` (all experts) and ``active`` (per token), routers excluded."""
        c = self.config
        per_expert = 3 * c.d_model * c.expert_d_ff
        if c.ffn == "dense":
            total = active = per_expert
        elif c.ffn == "deepseek":  # shared + routed: granularity * E experts, granularity * k active
            total = c.granularity * c.num_experts * per_expert
            active = c.granularity * c.top_k * per_expert
        else:  # expert_choice: on average, top_k experts per token
            total = c.num_experts * per_expert
            active = (c.top_k if c.ffn in _TOPK_SHAPED else 1) * per_expert
        return {"total": c.n_layers * total, "active": c.n_layers * active}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError("idx must be a [batch, seq] integer tensor of token ids")
        B, S = idx.shape
        if S > self.config.seq_len:
            raise ValueError(f"sequence length {S} exceeds config.seq_len={self.config.seq_len}")
        if B == 0 or S == 0:
            raise ValueError(f"idx must hold at least one token: got shape {tuple(idx.shape)} (batch, seq)")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"idx must hold token ids in [0, vocab_size - 1 = {self.config.vocab_size - 1}], got values in [{lo}, {hi}]"
            )
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(S, device=idx.device))
        aux = x.new_zeros((), dtype=torch.float32)
        z = x.new_zeros((), dtype=torch.float32)
        routings: list[Routing | None] = []
        for block in self.blocks:
            x, moe = block(x, idx)
            if moe is not None:
                aux = aux + moe.aux_loss
                z = z + moe.z_loss
            routings.append(None if moe is None else moe.routing)
        logits = F.linear(self.norm(x), self.tok_emb.weight)  # tied head: [B, S, V]
        loss = None
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
                raise TypeError("targets must be a [batch, seq] integer tensor of token ids")
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
            t_lo, t_hi = int(targets.min()), int(targets.max())
            if t_lo < 0 or t_hi >= self.config.vocab_size:
                raise ValueError(
                    f"targets must hold token ids in [0, {self.config.vocab_size - 1}], got values in [{t_lo}, {t_hi}]"
                )
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return LMOutput(logits, loss, aux, z, routings)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx: [B, S]`` by ``max_new_tokens``; ``temperature=0`` is greedy.

        Runs in eval mode (Switch: evaluation capacity, no jitter) and restores the mode.
        """
        check_positive_int("max_new_tokens", max_new_tokens)
        check_positive_float("temperature", temperature, allow_zero=True)
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self(idx[:, -self.config.seq_len :]).logits[:, -1, :]
                if temperature == 0.0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    probs = torch.softmax(logits.float() / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                idx = torch.cat([idx, nxt], dim=1)
        finally:
            self.train(was_training)
        return idx


@torch.no_grad()
def upcycle(dense: TinyLM, num_experts: int | None = None, top_k: int = 2) -> TinyLM:
    """Sparse upcycling of a whole model (Komatsuzaki et al. 2022): a Mixtral-style ``TinyLM``
    whose every expert is a copy of the dense model's FFN in that block, with new routers.

    The embeddings, attention and norms are copied; each block's FFN becomes
    ``num_experts`` (default: the dense config's) copies of the dense SwiGLU of width ``f``,
    chosen ``top_k`` at a time with renormalised weights. The routers keep the random
    initialisation ``TinyLM`` gave them (seed torch before calling for a reproducible router).
    The result is an ``ffn="mixtral"`` model with ``d_ff = top_k * f``: each token runs
    ``top_k`` experts of width ``f``, so its *active* FFN parameters are ``top_k`` times the
    dense model's. At step 0 it computes the dense model's function (up to float rounding).
    """
    if not isinstance(dense, TinyLM) or dense.config.ffn != "dense":
        raise TypeError("dense must be a TinyLM with config.ffn == 'dense'")
    E = dense.config.num_experts if num_experts is None else check_positive_int("num_experts", num_experts)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, num_experts={E}], got {top_k!r}")
    from dataclasses import replace

    cfg = replace(dense.config, ffn="mixtral", d_ff=top_k * dense.config.d_ff, num_experts=E, top_k=top_k,
                  aux_loss_coef=None)
    ref = next(dense.parameters())
    moe = TinyLM(cfg).to(device=ref.device, dtype=ref.dtype)
    own = moe.state_dict()
    for name, t in dense.state_dict().items():
        if ".ffn." not in name:
            own[name].copy_(t)
    for block_moe, block_dense in zip(moe.blocks, dense.blocks):
        for e in range(E):
            block_moe.ffn.experts.load_expert(e, block_dense.ffn.ffn)
    moe.train(dense.training)
    return moe
