"""Shared test set-up.

Triton kernels run on CPU tensors through the interpreter, which must be switched
on before any Triton kernel module is imported; ``make unit`` also sets it.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
