"""The building blocks of the question bank: ``Case``, ``Question``, ``WrongAnswer``,
``Exercise`` and the seeded random inputs they are made of.

An exercise module in ``moe_utils/grading/bank/`` describes one notebook with these
(``exercises/README.md``, "Adding an exercise", walks through one). Public cases use
fixed seeds, so a notebook's self-check shows the same cases every time. Hidden cases
draw their random inputs from a ``Rand`` that the autograder seeds with a secret, fresh
for every run, in the grading process: nothing on disk or in a student's process
tells what they will be.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Case",
    "Question",
    "WrongAnswer",
    "Exercise",
    "Rand",
    "randn",
    "probs",
    "randint",
    "distinct_choices",
    "new_seed",
    "DEFAULT_HINTS",
    "FAILURE_KINDS",
]


def new_seed() -> int:
    """A secret seed for one grading run's hidden cases."""
    return secrets.randbits(62)


class Rand:
    """Seeded random inputs: ``Rand(seed).randn(8, 4)``. Every draw advances one
    generator, so a list of cases built in one go is a pure function of the seed."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(int(seed))

    def randn(self, *shape: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.g, dtype=torch.float64) * scale).to(dtype)

    def probs(self, T: int, E: int, dtype=torch.float32) -> torch.Tensor:
        """Router probabilities: the softmax of random logits (rows sum to 1)."""
        return torch.softmax(self.randn(T, E, dtype=torch.float64, scale=2.0), dim=-1).to(dtype)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.g, dtype=torch.int64)

    def choices(self, T: int, E: int, k: int) -> torch.Tensor:
        """[T, k] expert ids, distinct inside each row (like a real top-k)."""
        return torch.rand(T, E, generator=self.g).argsort(dim=-1)[:, :k].contiguous()

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.g)

    def integer(self, low: int, high: int) -> int:
        """A Python int in [low, high]."""
        return int(torch.randint(low, high + 1, (1,), generator=self.g))

    def pick(self, options):
        return options[self.integer(0, len(options) - 1)]


# the public cases' inputs: one fixed seed each
def randn(seed: int, *shape: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return Rand(seed).randn(*shape, dtype=dtype, scale=scale)


def probs(seed: int, T: int, E: int, dtype=torch.float32) -> torch.Tensor:
    return Rand(seed).probs(T, E, dtype)


def randint(seed: int, high: int, *shape: int) -> torch.Tensor:
    return Rand(seed).randint(high, *shape)


def distinct_choices(seed: int, T: int, E: int, k: int) -> torch.Tensor:
    return Rand(seed).choices(T, E, k)


@dataclass
class Case:
    """One call of a student's function.

    ``expected`` given: compared as is (published test-vector values); otherwise the
    question's reference computes it. ``grad``: positions of float tensor arguments
    whose gradients (of the summed ``grad_output``-th output) are compared too.
    ``hint``: shown when this case's values are wrong (overrides the question's).
    """

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    public: bool = True
    expected: Any = None
    grad: tuple[int, ...] = ()
    grad_output: int | None = None
    atol: float = 1e-5
    rtol: float = 1e-4
    hint: str | None = None
    id: str = ""  # set by Question.cases: "c0", "c1", ... in list order


@dataclass(frozen=True)
class WrongAnswer:
    """A mistake students make, as code: when a failing output matches what ``fn``
    computes, the feedback names the mistake (``what``) and gives ``hint``."""

    what: str
    fn: Callable
    hint: str


# what can go wrong with an output, in the order the checks find it
FAILURE_KINDS = ("exception", "type", "shape", "dtype", "nan", "values", "grad", "inplace", "memory", "print")

DEFAULT_HINTS = {
    "exception": "the error is in your function (the line is shown); compare the shapes and dtypes your code "
                 "assumes with the docstring, and try your function on the case's inputs",
    "type": "return exactly what the docstring names (a tensor, a tuple of tensors or a Python number); "
            "is a `return` missing?",
    "shape": "compare the shape you return with the docstring: print(result.shape) on small inputs and check "
             "which axis you reduced, kept or added",
    "dtype": "the docstring names the output dtype; cast with .to(dtype) (or .float(), .long()) at the right point",
    "nan": "NaN or inf in the output: look for overflow (exp of a large number) or a division by zero",
    "values": "the shape and dtype are right but the numbers are not: recompute the first failing case by hand",
    "grad": "the gradient must flow back to the inputs: no .detach(), .item(), .tolist(), torch.no_grad() "
            "or new tensors built from Python numbers on the way",
    "inplace": "work on a copy (x = x.clone()) or use out-of-place operations, so the caller's tensors stay as they were",
    "memory": "return tensors with memory of their own: a view (expand, an input returned as it is) shares one "
              "memory, so changing one copy would change the others; use .clone(), torch.stack or .repeat",
    "print": "remove the debugging prints from the graded function",
}


@dataclass
class Question:
    """One graded function.

    ``reference``: an independent implementation, used only in the grading process
    (and the student's own self-check). ``make_cases(h)``: the cases; hidden ones draw
    their inputs from the ``Rand`` ``h``. ``hint``: what to check when the values are
    wrong; ``hints``: per failure kind (``FAILURE_KINDS``), overriding ``DEFAULT_HINTS``.
    ``builds_on``: other questions of the exercise this function may call; while it
    is checked they are the references, so one mistake costs one question.
    ``check``: a comparison of its own (``runner.compare`` signature), e.g. tie-aware.
    ``own_memory``: every output tensor must own its memory (no view of an input, no
    ``expand``): for outputs meant to be changed independently, e.g. upcycled experts.
    """

    exercise: str
    name: str
    points: int
    signature: str
    reference: Callable
    make_cases: Callable[[Rand], list[Case]]
    hint: str
    outputs: tuple[str, ...] = ()  # names of tuple outputs, for messages
    builds_on: tuple[str, ...] = ()
    hints: dict[str, str] = field(default_factory=dict)
    wrong_answers: tuple[WrongAnswer, ...] = ()
    check: Callable | None = None
    own_memory: bool = False

    @property
    def qid(self) -> str:
        return f"{self.exercise}.{self.name}"

    def cases(self, hidden: bool = True, seed: int | None = None) -> list[Case]:
        """The public cases, plus the hidden ones (drawn from ``seed``) if ``hidden``."""
        made = self.make_cases(Rand(new_seed() if seed is None else seed))
        for i, case in enumerate(made):
            case.id = f"c{i}"
        return [c for c in made if hidden or c.public]

    def hint_for(self, kind: str) -> str:
        if kind == "values":
            return self.hints.get("values", self.hint)
        return self.hints.get(kind) or DEFAULT_HINTS.get(kind, self.hint)


@dataclass
class Exercise:
    """One exercise notebook: ``exercises/solutions/<name>.ipynb`` and its questions.

    ``moe_utils_allowed``: modules of the course package a submission may use (module
    names, e.g. ``"moe_utils.experts"``). Empty: none; the self-check imports
    (``from moe_utils.grading import check_...``) are always allowed.
    """

    name: str
    title: str
    lecture: str
    questions: list[Question]
    moe_utils_allowed: tuple[str, ...] = ()

    @property
    def points(self) -> int:
        return sum(q.points for q in self.questions)
