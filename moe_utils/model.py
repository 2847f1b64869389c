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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive_float, check_positive_int
from .dispatch import BACKENDS
from .layers import DenseFFN, MoELayer, mixtral_layer, switch_layer
from .routers import Routing

__all__ = ["FFN_KINDS", "LMConfig", "LMOutput", "RMSNorm", "CausalSelfAttention", "Block", "TinyLM"]

FFN_KINDS = ("dense", "switch", "mixtral")
_DEFAULT_AUX = {"dense": 0.0, "switch": 1e-2, "mixtral": 2e-2}


@dataclass
class LMConfig:
    """Everything that fixes a model's shape and its routing losses.

    ffn:           ``"dense"``, ``"switch"`` (top-1, capacity) or ``"mixtral"`` (top-2, dropless)
    d_ff:          the dense hidden size ``f``; experts get ``f`` (switch) or ``f / 2`` (mixtral)
    aux_loss_coef: None picks the default of each design: switch 1e-2 (Switch Transformer paper),
                   mixtral 2e-2 (``router_aux_loss_coef`` of the released Hugging Face Mixtral
                   config; the Mixtral paper gives none); 0 switches it off. Applied per MoE
                   layer and summed over layers (Hugging Face pools all layers into one loss)
    z_loss_coef:   router z-loss coefficient (ST-MoE 1e-3)
    capacity_factor / eval_capacity_factor: Switch only (training / eval mode)
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

    def __post_init__(self) -> None:
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "d_ff", "num_experts", "top_k"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if self.ffn == "mixtral":
            if self.d_ff % self.top_k:
                raise ValueError(f"d_ff={self.d_ff} must be a multiple of top_k={self.top_k} for ffn='mixtral'")
            if self.top_k > self.num_experts:
                raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
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
        """Hidden size of one expert: f (dense, switch) or f / top_k (mixtral)."""
        return self.d_ff // self.top_k if self.ffn == "mixtral" else self.d_ff

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


def _make_ffn(cfg: LMConfig) -> nn.Module:
    if cfg.ffn == "dense":
        return DenseFFN(cfg.d_model, cfg.d_ff, kind="swiglu")
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

    def forward(self, x: torch.Tensor):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h)  # MoEOutput: the FFN part only; the residual is added here
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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def ffn_parameters(self) -> dict[str, int]:
        """FFN parameters per model: ``total`` (all experts) and ``active`` (per token), routers excluded."""
        c = self.config
        per_expert = 3 * c.d_model * c.expert_d_ff
        if c.ffn == "dense":
            total = active = per_expert
        else:
            total = c.num_experts * per_expert
            active = (c.top_k if c.ffn == "mixtral" else 1) * per_expert
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
            x, moe = block(x)
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
