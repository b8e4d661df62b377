"""Reproduce the paper's central comparison at small scale: the dense control against its upcycled MoEs.

``compare`` trains, from one dense model (SmolLM2-135M by default) on the same fixed text, the dense control and
the paper's MoE variants for the same number of training tokens, then reports what the paper's Table 1 reports:
held-out loss and perplexity at equal tokens, relative improvement over the dense control, and throughput; plus
an equal-FLOPs view (each run's held-out loss interpolated at the training FLOPs the dense control spent) and a
plot of held-out loss against tokens and against FLOPs for every run. Every number comes from the runs'
``metrics.jsonl`` (written by ``upcycle train``'s own loop), so ``upcycle plot RUN_DIR...`` redraws any set of
runs, including ones trained by hand.

FLOPs per training token (forward + backward), from the model configuration::

    6 * N_active + 12 * n_layers * (n_heads * head_dim) * seq_len

where N_active counts the weight-matrix parameters a token uses: attention projections, the router, the dense
MLP or only its top-k experts' MLPs (k/E of the expert weights), and the LM head; not the input-embedding
lookup, norms or biases (the PaLM appendix B convention; attention scores and values without causal halving).

A comparison is the sweep of named arms (``upcycle sweep --preset compare``): each arm is a point of
:class:`upcycle.sweep.plan.SweepPlan`, every arm runs at seed 0 and the dense control and the best MoE then run
the other seeds. Each run (its upcycle converted into the verified cache, then trained) runs in its own Python
process by default, so the memory of one model is returned before the next loads; a finished run
(``result.json`` in its folder) is reused when the command is run again with the same settings, and a run killed
midway resumes from its latest checkpoint.

The modules, in the order a comparison uses them: :mod:`~upcycle.compare.sizes` and
:mod:`~upcycle.compare.variants` (what is compared), :mod:`~upcycle.compare.recipes` and
:mod:`~upcycle.compare.plan` (one run, as it crosses processes), :mod:`~upcycle.compare.runner` (executing runs),
:mod:`~upcycle.compare.run_data` and :mod:`~upcycle.compare.analysis` (the numbers),
:mod:`~upcycle.compare.render` (table and plot), :mod:`~upcycle.compare.main` (the commands);
:mod:`~upcycle.compare.flops` counts FLOPs per token and :mod:`~upcycle.compare.output` guards OUT.
"""

from __future__ import annotations

from upcycle.compare.analysis import findings, summarise
from upcycle.compare.flops import FLOPS_FORMULA, ModelCost, model_cost
from upcycle.compare.main import CompareResult, compare_main, plot_main
from upcycle.compare.output import COMPARE_FILES, COMPARE_FOLDERS, check_compare_out
from upcycle.compare.plan import RunSpec
from upcycle.compare.recipes import measurement_run, paper_recipe, sized
from upcycle.compare.render import markdown_table, plot_runs
from upcycle.compare.run_data import RESULT_FILE, RUN_INFO_FILE, RunData, load_run
from upcycle.compare.runner import LineReporter, execute_run
from upcycle.compare.sizes import SIZES, Size
from upcycle.compare.variants import DEFAULT_VARIANTS, VARIANTS, Variant, arm_points, recipe_variant

__all__ = [
    "COMPARE_FILES",
    "COMPARE_FOLDERS",
    "DEFAULT_VARIANTS",
    "FLOPS_FORMULA",
    "RESULT_FILE",
    "RUN_INFO_FILE",
    "SIZES",
    "VARIANTS",
    "CompareResult",
    "LineReporter",
    "ModelCost",
    "RunData",
    "RunSpec",
    "Size",
    "Variant",
    "arm_points",
    "check_compare_out",
    "compare_main",
    "execute_run",
    "findings",
    "load_run",
    "markdown_table",
    "measurement_run",
    "model_cost",
    "paper_recipe",
    "plot_main",
    "plot_runs",
    "recipe_variant",
    "sized",
    "summarise",
]
