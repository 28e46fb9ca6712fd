"""Networks: the recurrent layers (``RNN``, ``LSTM``, ``GRU``), ``Linear``, ``Embedding`` and
``Model``, the losses and the optimisers.

Imports ``gpurnn.engine`` (and nothing above it).
"""
