"""Unified entity-space data layer (paper section IV-A, UMES): schema, on-disk format, loaders.

numpy + pydantic only, so the serving side can read schemas and datasets without torch.
"""
