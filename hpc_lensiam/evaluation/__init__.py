"""Evaluation without a stage: statistics (bootstrap and seed-aware intervals), the probe core (ridge,
k-NN, split by lens system) and the lens finders' classification metrics. numpy/scipy/sklearn only."""
