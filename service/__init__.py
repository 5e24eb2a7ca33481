"""The online matching service (paper section IV-C): FastAPI, Redis features, NANN beam search over ONNX.

Nothing under this package may import torch.
"""
