"""UniMatch: unified multi-domain, multi-entity top-k matching service (command-line entry)."""

__version__ = "0.1.0"
