"""The graded questions of every exercise notebook, by exercise and by name.

Each question is one function name with a fixed signature, an independent reference
(used only in the grading process and in the student's own self-check) and seeded
cases; see ``spec.py`` for the types and ``bank/`` for the exercises.
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from fractions import Fraction

import torch
import torch.nn.functional as F

from .bank import ALL
from .spec import Case, Exercise, Question, Rand, WrongAnswer

__all__ = [
    "Case",
    "Question",
    "WrongAnswer",
    "Exercise",
    "Rand",
    "EXERCISES",
    "EXERCISE_INFO",
    "QUESTIONS",
    "questions_for",
    "find_question",
    "dependency_source",
    "REFERENCE_GLOBALS",
]

EXERCISE_INFO: dict[str, Exercise] = {e.name: e for e in ALL}
EXERCISES: dict[str, list[Question]] = {e.name: e.questions for e in ALL}
QUESTIONS: list[Question] = [q for e in ALL for q in e.questions]


def questions_for(exercise: str) -> list[Question]:
    if exercise not in EXERCISES:
        raise ValueError(f"exercise must be one of {sorted(EXERCISES)}, got {exercise!r}")
    return EXERCISES[exercise]


def find_question(name: str) -> Question:
    """Look a question up by function name (``router_probs``) or id (``ex01_router_topk.router_probs``)."""
    for q in QUESTIONS:
        if name in (q.name, q.qid):
            return q
    raise ValueError(f"no question named {name!r}; known: {[q.name for q in QUESTIONS]}")


# -- the references a question builds on, as source for the student's process ----------

# what a reference may use besides other references (the namespace they run in there)
REFERENCE_GLOBALS = {"torch": torch, "F": F, "math": math, "Fraction": Fraction}


def _functions_used(fn) -> list:
    names: set[str] = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
    out = []
    for name in sorted(names):
        obj = fn.__globals__.get(name)
        if inspect.isfunction(obj) and obj.__module__.startswith(__package__ + ".bank"):
            out.append(obj)
        elif name in fn.__globals__ and name not in REFERENCE_GLOBALS and not inspect.ismodule(obj) and name != fn.__name__:
            if not callable(obj):
                raise ValueError(f"{fn.__name__} uses the global {name!r}: references may use only other references "
                                 f"and {sorted(REFERENCE_GLOBALS)}")
    return out


def dependency_source(q: Question) -> tuple[str, dict[str, str]]:
    """Source code defining the references of ``q.builds_on`` (and what they call),
    and the binding {student function name: reference function name}.

    The student's process runs it in a namespace of its own, so it holds those
    references and nothing else; ``q``'s own reference is never among them.
    """
    by_name = {o.name: o for o in EXERCISES[q.exercise]}
    roots = [by_name[n].reference for n in q.builds_on]
    seen: dict[str, object] = {}
    todo = list(roots)
    while todo:
        fn = todo.pop()
        if fn.__name__ in seen:
            continue
        seen[fn.__name__] = fn
        todo.extend(_functions_used(fn))
    if q.reference.__name__ in seen:
        raise ValueError(f"{q.name} builds on functions that call its own reference {q.reference.__name__}")
    src = "\n\n".join(textwrap.dedent(inspect.getsource(fn)) for _, fn in sorted(seen.items()))
    return src, {n: by_name[n].reference.__name__ for n in q.builds_on}
