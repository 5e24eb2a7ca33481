"""Reproduction of the paper's offline experiments (section V-B, V-C, V-D) on public data.

``experiments.config`` declares one table's grid (datasets x methods x seeds, budget, learning-rate
grid), ``experiments.runner`` runs it resumably, one JSON file per (dataset, method, seed), and
``experiments.render`` turns those files into the Table III / IV analogs and the Fig. 4 / 5 plots.
"""
