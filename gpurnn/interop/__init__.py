"""Interoperation: weight interchange with PyTorch and ONNX, and ``torch.nn`` modules that
run gpurnn (public as ``gpurnn.torch``).

Imports ``gpurnn.nn`` and ``gpurnn.engine`` only.
"""
