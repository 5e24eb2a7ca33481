"""Making datasets in the unified entity space (paper section IV-A, UMES): importers, the synthetic
generator, splits and filters, ``unimatch data describe``.

They write the dataset format of ``contracts.dataset`` (schema in ``contracts.schema``); numpy and
pydantic only.
"""
