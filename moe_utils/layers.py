"""MoE layers: router + expert bank + dispatch, the presets, and the dense baseline.

Notebook 09 adds ``SharedExpertMoELayer`` (DeepSeekMoE's shared and fine-grained experts,
preset ``deepseek_layer``) and ``upcycled_layer`` (sparse upcycling of a dense FFN). Routers
that route by token id (``HashRouter``) get the ids through ``MoELayer.forward(x, token_ids)``.

``MoELayer`` returns only the FFN part; the Transformer block adds the residual,
so a token whose assignments were all dropped by capacity leaves the block as
``x + 0`` (docs/conventions.md, "Capacity and dropping").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_float_tensor, check_last_dim, check_positive_float, check_positive_int
from .dispatch import BACKENDS, moe_ffn
from .experts import ExpertBank, FeedForward, SwiGLU
from .losses import router_z_loss, switch_load_balancing_loss, topk_load_balancing_loss
from .routers import ExpertChoiceRouter, Routing, SwitchRouter, TopKRouter

__all__ = [
    "MoEOutput",
    "MoELayer",
    "SharedExpertMoELayer",
    "DenseFFN",
    "switch_layer",
    "mixtral_layer",
    "deepseek_layer",
    "upcycled_layer",
    "AUX_LOSSES",
]

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
        if isinstance(router, ExpertChoiceRouter) and aux_loss is not None:
            raise ValueError("expert choice is balanced by construction and gives tokens a varying number of "
                             f"experts: use aux_loss=None, got {aux_loss!r}")
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

    def after_optimizer_step(self) -> None:
        """Called by the training loop after each ``optimizer.step()``: lets a router update
        state that is not learned by gradient (``BiasBalancedRouter``'s bias). No-op otherwise."""
        hook = getattr(self.router, "after_optimizer_step", None)
        if hook is not None:
            hook()

    def route(self, x2: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        """The router's decision for ``x2: [T, d]``; ``token_ids: [T]`` for routers that need them."""
        if getattr(self.router, "needs_token_ids", False):
            if token_ids is None:
                raise ValueError(
                    f"{type(self.router).__name__} routes by token id: call the layer as layer(x, token_ids=ids), "
                    "ids an integer tensor of shape x.shape[:-1] (TinyLM passes its input ids)"
                )
            return self.router(x2, token_ids=token_ids)
        return self.router(x2)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> MoEOutput:
        """``x: [..., d]``; ``token_ids: [...]`` integer ids of the same tokens, used only by
        routers with ``needs_token_ids`` (``HashRouter``) and ignored otherwise."""
        check_float_tensor("x", x)
        if x.dim() < 2:
            raise ValueError(f"x must have shape [..., d_model] with at least 2 dimensions, got {tuple(x.shape)}")
        check_last_dim("x", x, self.d_model)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)  # [T, d]
        if token_ids is not None:
            if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
                raise TypeError("token_ids must be an integer tensor of token ids, shaped like x.shape[:-1]")
            if token_ids.shape != lead:
                raise ValueError(f"token_ids must have shape x.shape[:-1] = {tuple(lead)}, got {tuple(token_ids.shape)}")
            token_ids = token_ids.reshape(-1)
        routing = self.route(x2, token_ids)
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


class SharedExpertMoELayer(MoELayer):
    """Shared plus routed experts (DeepSeekMoE, Dai et al. 2024, section 3):
    ``y = sum_s shared_s(x) + sum_j w[t, j] * routed_{i[t, j]}(x)``.

    shared: an ``ExpertBank`` of ``n_shared`` experts that every token passes through with
            weight 1 (no router, no capacity), or None. The routed part is an ordinary
            ``MoELayer`` (router, experts, losses, backend), so the ``Routing`` record, the
            losses and the monitor see only the routed experts.
    ``deepseek_layer`` builds the fine-grained, equal-compute configuration.
    """

    def __init__(self, router: nn.Module, experts: ExpertBank, shared: ExpertBank | None = None,
                 aux_loss: str | None = "topk", aux_loss_coef: float = 0.02, z_loss_coef: float = 0.0,
                 backend: str = "auto"):
        super().__init__(router, experts, aux_loss, aux_loss_coef, z_loss_coef, backend)
        if shared is not None:
            if not isinstance(shared, ExpertBank):
                raise TypeError(f"shared must be an ExpertBank or None, got {type(shared).__name__}")
            if shared.d_model != experts.d_model:
                raise ValueError(f"shared.d_model={shared.d_model} must equal experts.d_model={experts.d_model}")
        self.shared = shared

    @property
    def n_shared(self) -> int:
        return 0 if self.shared is None else self.shared.num_experts

    def shared_output(self, x2: torch.Tensor) -> torch.Tensor:
        """``sum_s shared_s(x)`` for ``x2: [T, d]`` (zeros without shared experts)."""
        y = torch.zeros_like(x2)
        for s in range(self.n_shared):
            y = y + self.shared.forward_expert(s, x2)
        return y

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> MoEOutput:
        out = super().forward(x, token_ids)
        if self.shared is not None:
            out.output = out.output + self.shared_output(x.reshape(-1, self.d_model)).reshape(x.shape)
        return out


def deepseek_layer(
    d_model: int,
    d_ff: int,
    num_experts: int = 8,
    k: int = 2,
    granularity: int = 2,
    n_shared: int = 1,
    aux_loss_coef: float = 0.02,
    z_loss_coef: float = 0.0,
    backend: str = "auto",
) -> SharedExpertMoELayer:
    """DeepSeekMoE at the compute of a top-``k`` of ``num_experts`` layer with experts of width ``d_ff``.

    Fine-grained segmentation (Dai et al. 2024): each expert is cut into ``m = granularity``
    experts of width ``d_ff / m``, giving ``m * num_experts`` experts with ``m * k`` active.
    Shared-expert isolation: ``n_shared`` of them become always-on shared experts, so the
    router picks ``m * k - n_shared`` of the remaining ``m * num_experts - n_shared``.
    Total and active FFN parameters equal those of the original layer. SwiGLU experts,
    softmax-top-k-renormalise router, top-k balance loss (coefficient ``aux_loss_coef``).
    """
    for name, v in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts), ("k", k),
                    ("granularity", granularity)):
        check_positive_int(name, v)
    check_positive_int("n_shared", n_shared, minimum=0)
    if d_ff % granularity:
        raise ValueError(f"granularity={granularity} must divide the expert width d_ff={d_ff} "
                         f"(fine-grained experts have width d_ff / granularity)")
    if k > num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got k={k}")
    active = granularity * k
    if n_shared >= active:
        raise ValueError(f"n_shared must be in [0, granularity * k - 1 = {active - 1}] so that the router still "
                         f"chooses at least one expert, got n_shared={n_shared}")
    width = d_ff // granularity
    routed = granularity * num_experts - n_shared
    router = TopKRouter(d_model, routed, k=active - n_shared)
    experts = ExpertBank(routed, d_model, width, kind="swiglu")
    shared = ExpertBank(n_shared, d_model, width, kind="swiglu") if n_shared else None
    return SharedExpertMoELayer(router, experts, shared, "topk", aux_loss_coef, z_loss_coef, backend)


def upcycled_layer(
    dense: nn.Module,
    num_experts: int = 8,
    k: int = 2,
    renormalize: bool = True,
    aux_loss: str | None = "topk",
    aux_loss_coef: float = 0.02,
    z_loss_coef: float = 0.0,
    backend: str = "auto",
) -> MoELayer:
    """Sparse upcycling (Komatsuzaki et al. 2022): an MoE layer whose ``num_experts`` experts
    are exact copies of a trained dense FFN (``DenseFFN``, ``SwiGLU`` or bias-free
    ``FeedForward``), with a *new* router (``TopKRouter``, freshly initialised from torch's
    global random generator), dropless.

    At step 0 every expert computes ``dense(x)``, so the output is ``(sum_j w_j) dense(x)``:
    exactly ``dense(x)`` when the k weights are renormalised to sum to 1 (``renormalize=True``),
    but ``p_max * dense(x)`` with the Switch gate (``k=1, renormalize=False``).
    """
    module = dense.ffn if isinstance(dense, DenseFFN) else dense
    experts = ExpertBank.from_dense(module, num_experts)  # same dtype and device as the dense FFN
    router = TopKRouter(module.d_model, num_experts, k=k, renormalize=renormalize)
    router = router.to(device=experts.w1.device, dtype=experts.w1.dtype)
    return MoELayer(router, experts, aux_loss, aux_loss_coef, z_loss_coef, backend)
