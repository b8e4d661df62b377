"""Experiments made of training runs: `upcycle compare` (the paper's dense control against its upcycles) and
`upcycle sweep` (any recipe key over a grid). A comparison is the sweep of named arms, so both share one runner,
one analysis of `metrics.jsonl`, one table and plot.

The modules, in the order a sweep or comparison uses them:

- what is run: `grid` (the `--grid` axes), `points` (each point a validated recipe), `control` (the dense control),
  `naming` (run folders), `presets` (named sweeps, `compare` among them), `sizes`, `variants` (compare's arms)
  and `paper_recipe` (the paper's settings at each size);
- how it runs: `sweep_plan` (the runs, with seeds for all or for the best), `run_spec` (one run, as it crosses
  processes), `runner` (each run in a process of its own; `python -m upcycle.experiments --worker SPEC.json`),
  `execute`;
- what it says: `run_data` (a run's records), `flops` (training FLOPs per token), `compare_analysis` and
  `sweep_analysis` (the numbers), `compare_render` and `sweep_render` (table and plots), `report`, `output`
  (what OUT may hold);
- the commands: `compare` (`compare_main`, `plot_main`) and `sweep` (`sweep_main`).
"""
