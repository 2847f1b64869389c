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


@pytest.fixture(scope="session")
def data():
    """A small corpus split (about 12,000 characters per domain) for training tests."""
    from moe_utils.data import ByteTokenizer, CorpusTokens, corpus_records

    recs = corpus_records(chars_per_domain=12_000)
    tok = ByteTokenizer()
    val = [r for i, r in enumerate(recs) if i % 10 == 0]
    train = [r for i, r in enumerate(recs) if i % 10 != 0]
    by_domain = {d: tok.encode("\n\n".join(r["text"] for r in val if r["domain"] == d)) for d in ("code", "math")}
    return CorpusTokens(
        train=tok.encode("\n\n".join(r["text"] for r in train)),
        validation=tok.encode("\n\n".join(r["text"] for r in val)),
        validation_by_domain=by_domain,
    )
