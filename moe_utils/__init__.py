"""moe_utils: the small shared package of the Mixture-of-Experts course.

One module per idea: ``experts``, ``routers``, ``capacity``, ``losses``,
``dispatch``, ``layers``, ``accounting``. Conventions follow the course's
conventions page, docs/conventions.md; each docstring says which one it implements.
"""

from .accounting import ModelConfig, ParameterCount, count_parameters, flops_per_token
from .capacity import buffer_positions, capacity_mask, expert_capacity
from .dispatch import moe_ffn, moe_ffn_reference
from .experts import ExpertBank, FeedForward, SwiGLU
from .layers import (
    DenseFFN,
    MoELayer,
    MoEOutput,
    SharedExpertMoELayer,
    deepseek_layer,
    mixtral_layer,
    switch_layer,
    upcycled_layer,
)
from .losses import cv_squared, router_z_loss, switch_load_balancing_loss, topk_load_balancing_loss
from .routers import (
    BiasBalancedRouter,
    ExpertChoiceRouter,
    HashRouter,
    NoisyTopKRouter,
    RandomRouter,
    Routing,
    SwitchRouter,
    TopKRouter,
)

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "ParameterCount",
    "count_parameters",
    "flops_per_token",
    "buffer_positions",
    "capacity_mask",
    "expert_capacity",
    "moe_ffn",
    "moe_ffn_reference",
    "ExpertBank",
    "FeedForward",
    "SwiGLU",
    "DenseFFN",
    "MoELayer",
    "MoEOutput",
    "SharedExpertMoELayer",
    "deepseek_layer",
    "mixtral_layer",
    "switch_layer",
    "upcycled_layer",
    "cv_squared",
    "router_z_loss",
    "switch_load_balancing_loss",
    "topk_load_balancing_loss",
    "BiasBalancedRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "NoisyTopKRouter",
    "RandomRouter",
    "Routing",
    "SwitchRouter",
    "TopKRouter",
]
