"""Offline side of UniMatch: data import and synthesis, training, evaluation and export (PyTorch).

The formats these steps write (schema, dataset, bundle) live in the torch-free ``contracts`` package,
which the service reads; the service imports nothing from here.
"""
