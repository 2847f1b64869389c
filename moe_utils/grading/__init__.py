"""The exercise autograder and the notebooks' self-checks.

* ``python -m moe_utils.grading build``: student notebooks from the masters
* ``python -m moe_utils.grading grade NOTEBOOK [--json F] [--junit F]``: points per question
* ``python -m moe_utils.grading grade FOLDER --csv grades.csv``: every submission in a folder
* in a notebook: ``from moe_utils.grading import check_router_probs``

Importing this package imports every module the grader runs, so nothing is loaded
from disk after a submission has run. See ``exercises/README.md`` for the
lecturer's guide and the trust boundary.
"""

from . import build, extract, pool, runner, spec, worker  # noqa: F401  (all loaded before any submission runs)
from .checks import *  # noqa: F403  (check_<question> for every question)
from .checks import __all__ as _check_names
from .grader import NotebookReport, QuestionResult, WorkerPool, grade_folder, grade_notebook
from .questions import EXERCISES, QUESTIONS, questions_for

__all__ = [
    *_check_names,
    "EXERCISES",
    "QUESTIONS",
    "questions_for",
    "grade_notebook",
    "grade_folder",
    "WorkerPool",
    "NotebookReport",
    "QuestionResult",
]
