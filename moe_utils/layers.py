"""MoE layers: router + expert bank + dispatch, the presets, and the dense baseline.

``MoELayer`` returns only the FFN part; the Transformer block adds the residual,
so a token whose assignments were all dropped by capacity leaves the block as
``x + 0`` (docs/conventions.md, "Capacity and dropping").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_float_tensor, check_last_dim, check_positive_float
from .dispatch import BACKENDS, moe_ffn
from .experts import ExpertBank, FeedForward, SwiGLU
from .losses import router_z_loss, switch_load_balancing_loss, topk_load_balancing_loss
from .routers import Routing, SwitchRouter, TopKRouter

__all__ = ["MoEOutput", "MoELayer", "DenseFFN", "switch_layer", "mixtral_layer", "AUX_LOSSES"]

AUX_LOSSES = ("switch", "topk", None)


@dataclass
class MoEOutput:
    """output: [..., d] (no residual); routing for the flattened [T, d] tokens;
    aux_loss and z_loss: scalars with their coefficients already applied."""

    output: torch.Tensor
    routing: Routing
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


class MoELayer(nn.Module):
    """A sparse FFN: ``y = sum_j w[t, j] * expert_{i[t, j]}(x_t)``.

    router:        any router returning a ``Routing`` (``TopKRouter``, ``SwitchRouter``...)
    experts:       an ``ExpertBank``
    aux_loss:      ``"switch"`` (alpha E sum f P, the course default; with a grouped router
                   it is computed per routing group and averaged), ``"topk"``
                   (Hugging Face Mixtral variant, k at balance) or None
    aux_loss_coef: coefficient of the balance loss (Switch paper 1e-2; the released Hugging Face
                   Mixtral config 0.02)
    z_loss_coef:   coefficient of the router z-loss (ST-MoE 1e-3; 0 disables it)
    backend:       dispatch backend, see ``moe_utils.dispatch.moe_ffn``
    """

    def __init__(
        self,
        router: nn.Module,
        experts: ExpertBank,
        aux_loss: str | None = "switch",
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(experts, ExpertBank):
            raise TypeError(f"experts must be an ExpertBank, got {type(experts).__name__}")
        if getattr(router, "d_model", experts.d_model) != experts.d_model:
            raise ValueError(f"router.d_model={router.d_model} must equal experts.d_model={experts.d_model}")
        if getattr(router, "num_experts", experts.num_experts) != experts.num_experts:
            raise ValueError(
                f"router.num_experts={router.num_experts} must equal experts.num_experts={experts.num_experts}"
            )
        if aux_loss not in AUX_LOSSES:
            raise ValueError(f"aux_loss must be one of {AUX_LOSSES}, got {aux_loss!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.router = router
        self.experts = experts
        self.aux_loss = aux_loss
        self.aux_loss_coef = check_positive_float("aux_loss_coef", aux_loss_coef, allow_zero=True)
        self.z_loss_coef = check_positive_float("z_loss_coef", z_loss_coef, allow_zero=True)
        self.backend = backend

    @property
    def d_model(self) -> int:
        return self.experts.d_model

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: torch.Tensor) -> MoEOutput:
        check_float_tensor("x", x)
        if x.dim() < 2:
            raise ValueError(f"x must have shape [..., d_model] with at least 2 dimensions, got {tuple(x.shape)}")
        check_last_dim("x", x, self.d_model)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)  # [T, d]
        routing = self.router(x2)
        y = moe_ffn(x2, routing, self.experts, backend=self.backend)
        zero = x2.new_zeros((), dtype=torch.float32)
        aux = zero
        if self.aux_loss == "switch" and routing.probs is not None:
            # per routing group, averaged over groups (the router's group_size; None: one group)
            aux = switch_load_balancing_loss(
                routing.probs, routing.indices, alpha=self.aux_loss_coef, group_size=getattr(self.router, "group_size", None)
            )
        elif self.aux_loss == "topk" and routing.probs is not None:
            aux = self.aux_loss_coef * topk_load_balancing_loss(routing.probs, routing.indices)
        z = self.z_loss_coef * router_z_loss(routing.logits) if routing.logits is not None else zero
        return MoEOutput(y.reshape(*lead, self.d_model), routing, aux, z)


class DenseFFN(nn.Module):
    """The dense baseline: one ``SwiGLU`` (``kind="swiglu"``) or GELU ``FeedForward``."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "swiglu"):
        super().__init__()
        if kind == "swiglu":
            self.ffn = SwiGLU(d_model, d_ff)
        elif kind == "gelu":
            self.ffn = FeedForward(d_model, d_ff, bias=False)
        else:
            raise ValueError(f"kind must be 'swiglu' or 'gelu', got {kind!r}")
        self.kind = kind
        self.d_model, self.d_ff = d_model, d_ff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


def switch_layer(
    d_model: int,
    d_ff: int,
    num_experts: int,
    capacity_factor: float = 1.25,
    eval_capacity_factor: float = 2.0,
    min_capacity: int = 4,
    jitter_eps: float = 1e-2,
    group_size: int | None = None,
    aux_loss_coef: float = 1e-2,
    z_loss_coef: float = 0.0,
    expert_kind: str = "gelu",
    backend: str = "auto",
) -> MoELayer:
    """Switch Transformer layer: top-1, un-renormalised gate, capacity, Switch aux loss."""
    router = SwitchRouter(
        d_model,
        num_experts,
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
        min_capacity=min_capacity,
        jitter_eps=jitter_eps,
        group_size=group_size,
    )
    experts = ExpertBank(num_experts, d_model, d_ff, kind=expert_kind)
    return MoELayer(router, experts, "switch", aux_loss_coef, z_loss_coef, backend)


def mixtral_layer(
    d_model: int,
    d_ff: int,
    num_experts: int = 8,
    k: int = 2,
    aux_loss_coef: float = 0.02,
    z_loss_coef: float = 0.0,
    backend: str = "auto",
) -> MoELayer:
    """Mixtral sparse block: SwiGLU experts, softmax-top-k-renormalise, dropless,
    top-k (Hugging Face) balance loss with the coefficient 0.02 of the released Hugging Face
    Mixtral config (the Mixtral paper gives none)."""
    router = TopKRouter(d_model, num_experts, k=k)
    experts = ExpertBank(num_experts, d_model, d_ff, kind="swiglu")
    return MoELayer(router, experts, "topk", aux_loss_coef, z_loss_coef, backend)
