"""Robust representation learning (paper III-D): training-only auxiliary losses, never exported."""
