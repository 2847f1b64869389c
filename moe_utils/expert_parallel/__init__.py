"""Expert parallelism on ``torch.distributed``: experts spread over ranks, tokens moved by all-to-all.

* ``layer.py``: ``ExpertParallelMoE`` (dropless and GShard-style capacity), ``expert_owner``,
  ``token_rank_matrix``
* ``exchange.py``: the differentiable ``all_to_all`` and the per-step ``exchange_header``
* ``launch.py``: ``launch(fn, world_size, ...)``, a few CPU processes in a gloo group (tests, notebooks)
* ``check.py``: ``Case``, ``run_case`` / ``reference_case``: the layer against the single-process
  ``MoELayer``; ``time_all_to_all``
* ``__main__.py``: ``python -m moe_utils.expert_parallel`` (2 local CPU processes) or, on GPUs,
  ``torchrun --nproc-per-node=8 -m moe_utils.expert_parallel --backend nccl``
"""

from .check import Case, build_case, max_differences, reference_case, run_case, run_cases, time_all_to_all
from .exchange import all_to_all, exchange_header
from .launch import launch
from .layer import ExpertParallelMoE, ExpertParallelOutput, expert_owner, token_rank_matrix

__all__ = [
    "all_to_all",
    "exchange_header",
    "Case",
    "build_case",
    "max_differences",
    "reference_case",
    "run_case",
    "run_cases",
    "time_all_to_all",
    "launch",
    "ExpertParallelMoE",
    "ExpertParallelOutput",
    "expert_owner",
    "token_rank_matrix",
]
