"""The contracts every step of UniMatch shares, in one torch-free, hnswlib-free place.

The data flow is data -> model (train, export) -> index_builder (graph) -> service (serve); each step
reads what the one before it wrote. What they agree on lives here, and only here:

- ``schema``: the UMES feature schema (paper section IV-A, one schema for every entity type);
- ``dataset``: the on-disk dataset format and its reader/writer;
- ``io``: atomic writes and the one sha256 helper every writer uses;
- ``manifest``, ``bundle``, ``graph``, ``checks``, ``calibration``: the serving bundle
  (docs/bundle-format.md): its manifest, the loaded bundle, the per-layer CSR graph, the containment
  and checksum checks, and the search calibration the bundle carries;
- ``features``: the user-features value type the feature store hands to the engine.

numpy, pydantic and the standard library only: the serving image copies ``contracts/`` and ``service/``,
and importing either loads no module of ``model/`` or ``index_builder/``.
"""
