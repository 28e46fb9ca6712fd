"""Training: the training step and loop, truncated BPTT, the non-finite guard, checkpoints,
the embedded tasks and data-parallel training under MPI.

Imports ``gpurnn.nn`` and ``gpurnn.engine`` (and nothing above them).
"""
