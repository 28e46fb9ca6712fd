"""``gpurnn.torch.LSTM``, ``.GRU`` and ``.RNN``: ``torch.nn`` modules that run gpurnn (defined
in ``gpurnn/interop/torch_modules.py``).  Importing this module needs PyTorch."""
from .interop.torch_modules import GRU, LSTM, RNN

__all__ = ["RNN", "LSTM", "GRU"]
