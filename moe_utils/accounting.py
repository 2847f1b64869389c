"""Parameter and FLOP accounting from a model config.

Counts the weight matrices of a Transformer whose FFN may be a mixture of
experts: embeddings, attention (with grouped-query attention), FFN experts,
routers and norm gains. "Active" parameters are those one token touches: all
non-expert weights plus ``top_k`` experts in each MoE layer (both embedding
matrices are counted, as Mistral AI's 12.9B figure does).

Presets (architecture numbers from the released config or the paper):

* ``MIXTRAL_8X7B``: Mixtral 8x7B ``config.json`` -> 46,702,792,704 total and
  12,879,925,248 active (docs/conventions.md).
* ``SWITCH_BASE_128``: Switch-Base with 128 experts (Fedus et al. 2022, Table 9: T5-Base
  encoder-decoder, 12 + 12 layers, d 768, gated-GELU experts with d_ff 2048, MoE in every
  other FFN, tied embeddings). Table 9 rounds it to "7B"; Tables 7 and 8 give 7.4B
  (7410M). The Hugging Face release uses ReLU experts with d_ff 3072 instead, which has
  the same parameter count (3 * 768 * 2048 = 2 * 768 * 3072).
* ``SWITCH_C``: Switch-C (Fedus et al. 2022, Table 9: d 2080, d_ff 6144, 32 heads of 64,
  15 + 15 layers, 2048 experts in *every* FFN, plain two-matrix experts since Table 9
  marks no GEGLU for it); reported 1571B parameters ("1.6 trillion"). The paper gives no
  active count; an encoder token and a decoder token together touch about 1.7B (0.11%).
* ``GLAM_64B_64E``: GLaM 64B/64E (Du et al. 2022, Table 4: 64 layers, d 8192,
  FFN 32768, 128 heads of 128, 64 experts top-2 in every other layer, gated-GELU
  dense FFNs); the paper reports 1.2T total and 96.6B activated.

Small terms left out on purpose, with their order of magnitude: relative
position biases (T5/GLaM: a few thousand numbers per layer) and biases (none of
these models has any).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._checks import check_k, check_positive_int

__all__ = [
    "ModelConfig",
    "ParameterCount",
    "count_parameters",
    "flops_per_token",
    "MIXTRAL_8X7B",
    "SWITCH_BASE_128",
    "SWITCH_C",
    "GLAM_64B_64E",
    "PRESETS",
]

_FFN_MATRICES = {"swiglu": 3, "geglu": 3, "gelu": 2, "relu": 2}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture numbers needed to count parameters.

    n_layers counts decoder layers; ``n_encoder_layers > 0`` makes it an
    encoder-decoder (decoder layers then carry cross-attention). Every
    ``moe_every``-th FFN (layers ``moe_every-1, 2*moe_every-1, ...`` of each stack)
    is a mixture of ``num_experts`` experts with ``top_k`` active; the others are dense.
    """

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    num_experts: int = 1
    top_k: int = 1
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_kind: str = "swiglu"
    dense_ffn_kind: str | None = None
    dense_d_ff: int | None = None
    moe_every: int = 1
    tied_embeddings: bool = False
    n_encoder_layers: int = 0
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "num_experts", "moe_every"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("n_encoder_layers", self.n_encoder_layers, minimum=0)
        for name in ("n_kv_heads", "head_dim", "dense_d_ff"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_k(self.top_k, self.num_experts)
        for name in ("ffn_kind", "dense_ffn_kind"):
            v = getattr(self, name)
            if v is not None and v not in _FFN_MATRICES:
                raise ValueError(f"{name} must be one of {sorted(_FFN_MATRICES)}, got {v!r}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads must divide n_heads={self.n_heads}, got {self.n_kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def is_moe(self, layer: int) -> bool:
        """Whether FFN ``layer`` (0-based, within its stack) is a mixture of experts."""
        return self.num_experts > 1 and layer % self.moe_every == self.moe_every - 1


@dataclass(frozen=True)
class ParameterCount:
    """Parameter totals, broken down by where they live."""

    total: int
    active: int
    embeddings: int
    attention: int
    experts: int
    dense_ffn: int
    routers: int
    norms: int

    @property
    def non_expert(self) -> int:
        return self.total - self.experts


def _attention_params(cfg: ModelConfig) -> int:
    q_and_o = 2 * cfg.d_model * cfg.n_heads * cfg.dim_head
    k_and_v = 2 * cfg.d_model * cfg.kv_heads * cfg.dim_head
    return q_and_o + k_and_v


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Total and per-token active parameters of ``cfg`` (exact integer arithmetic)."""
    d = cfg.d_model
    expert_size = _FFN_MATRICES[cfg.ffn_kind] * d * cfg.d_ff
    dense_size = _FFN_MATRICES[cfg.dense_ffn_kind or cfg.ffn_kind] * d * (cfg.dense_d_ff or cfg.d_ff)
    attn_one = _attention_params(cfg)
    embeddings = cfg.vocab_size * d * (1 if cfg.tied_embeddings else 2)
    attention = experts = active_experts = dense = routers = norms = 0
    stacks = [(cfg.n_encoder_layers, False), (cfg.n_layers, cfg.n_encoder_layers > 0)]
    for n_layers, cross in stacks:
        if n_layers == 0:
            continue
        norms += d  # final norm of the stack
        for layer in range(n_layers):
            attention += attn_one * (2 if cross else 1)
            norms += d * (3 if cross else 2)
            if cfg.is_moe(layer):
                experts += cfg.num_experts * expert_size
                active_experts += cfg.top_k * expert_size
                routers += d * cfg.num_experts
            else:
                dense += dense_size
    total = embeddings + attention + experts + dense + routers + norms
    active = total - experts + active_experts
    return ParameterCount(total, active, embeddings, attention, experts, dense, routers, norms)


def flops_per_token(cfg: ModelConfig, seq_len: int = 0) -> int:
    """Forward FLOPs per token: ``2 * (active matmul parameters)`` plus attention scores.

    The input embedding is a lookup (no FLOPs); the output head is a matmul. With
    ``seq_len > 0`` the ``QK^T`` and ``AV`` products add ``4 * seq_len * n_heads *
    head_dim`` per layer (full, non-causal length; halve for an average causal token).
    """
    check_positive_int("seq_len", seq_len, minimum=0)
    p = count_parameters(cfg)
    lookup = cfg.vocab_size * cfg.d_model if not cfg.tied_embeddings else 0
    matmul_params = p.active - p.norms - lookup
    layers = cfg.n_layers + cfg.n_encoder_layers
    attn_scores = 4 * seq_len * cfg.n_heads * cfg.dim_head * layers
    return 2 * matmul_params + attn_scores


MIXTRAL_8X7B = ModelConfig(
    name="Mixtral 8x7B",
    vocab_size=32000,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    d_ff=14336,
    num_experts=8,
    top_k=2,
    ffn_kind="swiglu",
    tied_embeddings=False,
    source="Mixtral-8x7B-v0.1 config.json (Jiang et al. 2024)",
)

SWITCH_BASE_128 = ModelConfig(
    name="Switch-Base-128",
    vocab_size=32128,
    d_model=768,
    n_layers=12,
    n_encoder_layers=12,
    n_heads=12,
    head_dim=64,
    d_ff=2048,
    num_experts=128,
    top_k=1,
    ffn_kind="geglu",
    moe_every=2,
    tied_embeddings=True,
    source="Fedus et al. 2022, Switch Transformers, Table 9 (architecture, '7B'); Tables 7-8 report 7.4B",
)

SWITCH_C = ModelConfig(
    name="Switch-C",
    vocab_size=32128,
    d_model=2080,
    n_layers=15,
    n_encoder_layers=15,
    n_heads=32,
    head_dim=64,
    d_ff=6144,
    num_experts=2048,
    top_k=1,
    ffn_kind="relu",
    moe_every=1,
    tied_embeddings=True,
    source="Fedus et al. 2022, Switch Transformers, Table 9; reported 1571B parameters, 2048 experts",
)

GLAM_64B_64E = ModelConfig(
    name="GLaM 64B/64E",
    vocab_size=256000,
    d_model=8192,
    n_layers=64,
    n_heads=128,
    head_dim=128,
    d_ff=32768,
    num_experts=64,
    top_k=2,
    ffn_kind="gelu",
    dense_ffn_kind="geglu",
    moe_every=2,
    tied_embeddings=True,
    source="Du et al. 2022, GLaM, Table 4; reported 1.2T total, 96.6B activated",
)

PRESETS = {c.name: c for c in (MIXTRAL_8X7B, SWITCH_BASE_128, SWITCH_C, GLAM_64B_64E)}
