"""The ``gpurnn`` command (``gpurnn.cli:main``): its commands, plots and pre-flight checks.

The top layer: imports ``gpurnn.training``, ``gpurnn.nn`` and ``gpurnn.engine``.
"""
from .app import main

__all__ = ["main"]
