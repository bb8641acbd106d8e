"""Accuracy-budget search: choose a compression per layer group that minimises size (or latency)
while a quality gate holds. ``space`` (the recipe's ``search:`` block), ``sensitivity`` (cheap proxy
scores per group and choice), ``allocate`` (the frontier of configurations), ``run`` (the loop of
full evaluations, journal and resume)."""
