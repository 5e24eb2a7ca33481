"""Offline side of UniMatch: data layer (numpy only), training, evaluation and export (PyTorch).

Importing this package must stay free of torch: the service imports ``model.data`` for the schema.
"""
