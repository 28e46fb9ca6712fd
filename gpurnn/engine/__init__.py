"""The engine: backends (arrays, GEMMs, step kernels of ``gpurnn.kernels``), the time-loop
drivers of one direction of one layer, memory checks and array helpers.

Imports ``gpurnn.kernels`` only; ``gpurnn.nn`` and everything above build on it.
"""
