"""gpurnn: recurrent networks (tanh/ReLU RNN, LSTM, GRU) with BPTT, on NVIDIA GPUs through
Numba CUDA kernels and CuPy, and on CPUs through Numba CPU kernels, behind one interface.

    import gpurnn
    m = gpurnn.LSTM(input_size, hidden_size, device="auto")
    out, state = m(x)                 # x [T, B, I]
    dx, dstate = m.backward(dout)     # BPTT; gradients in m.grads
"""
from .engine.backend import cuda_unavailable_reason, get_backend
from .engine.memory import OutOfMemory
from .interop.datafiles import read_data
from .interop.interchange import from_onnx, from_torch
from .nn.inference import is_grad_enabled, no_grad
from .nn.layers import GRU, LSTM, RNN, RNNBase
from .nn.losses import mse, softmax_cross_entropy
from .nn.optim import SGD, Adam, Momentum, clip_grad_norm, clip_grad_value
from .training.model import History, Model, load_model

__version__ = "0.1.0"

__all__ = ["RNN", "LSTM", "GRU", "RNNBase", "no_grad", "is_grad_enabled", "get_backend",
           "cuda_unavailable_reason", "OutOfMemory", "from_torch", "from_onnx", "__version__",
           "Model", "History", "load_model", "read_data", "mse", "softmax_cross_entropy", "SGD", "Momentum",
           "Adam", "clip_grad_norm", "clip_grad_value"]
