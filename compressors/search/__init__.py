"""Accuracy-budget search: choose a compression per layer group that minimises size (or latency)
while a quality gate holds. ``space`` (the recipe's ``search:`` block), ``sensitivity`` (cheap proxy
scores per group and choice), ``allocate`` (the frontier of configurations), ``run`` (the loop of
full evaluations), ``journal`` (journal and resume), ``trials`` (one trial, wherever it runs),
``executors`` / ``ray_executor`` (in process, a process pool, Ray tasks), ``plot`` (the Pareto PNG)."""
