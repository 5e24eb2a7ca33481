"""Offline benchmarks of the retrieval engine (`unimatch bench ...`); never imported by the service."""
