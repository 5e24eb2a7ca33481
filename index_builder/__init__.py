"""Builds the 4-layer HNSW graph over entity vectors (paper section IV-B) and writes it as mmap-able arrays."""
