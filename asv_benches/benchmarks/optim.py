"""One optimiser step over the parameters of a two-layer LSTM: gpurnn's (one pass a parameter,
``kernels/updates.py``) and torch.optim's (its default, the multi-tensor "foreach" update where
torch has it), on the same sizes, devices and dtypes.  The gradients are set once in ``setup``;
a GPU timing ends with a synchronise.  ``device="cuda"`` is skipped where there is no GPU,
torch where it is not installed.
"""
import numpy as np

OPTIMIZERS = ["sgd", "momentum", "adam"]
#: the hidden size of the LSTM(H, H) x 2 layers whose parameters are stepped
SIZES = [256, 1024]
DEVICES = ["cpu", "cuda"]
DTYPES = ["float32"]
LAYERS = 2


class _Bench:
    params = [OPTIMIZERS, SIZES, DEVICES, DTYPES]
    param_names = ["optimizer", "hidden", "device", "dtype"]
    timeout = 300
    min_run_count = 5
    warmup_time = 0.2


class GpurnnStep(_Bench):
    def setup(self, optimizer, hidden, device, dtype):
        import gpurnn
        from gpurnn.nn.optim import OPTIMIZERS as CLASSES

        if device == "cuda" and gpurnn.cuda_unavailable_reason() is not None:
            raise NotImplementedError(f"no GPU: {gpurnn.cuda_unavailable_reason()}")
        layer = gpurnn.LSTM(hidden, hidden, num_layers=LAYERS, device=device, dtype=dtype, seed=0)
        rng = np.random.default_rng(0)
        be = layer.backend
        grads = {k: be.asarray(rng.standard_normal(p.shape).astype(p.dtype))
                 for k, p in layer.params.items()}
        self.opt = CLASSES[optimizer](layer.params, grads, lr=1e-3)
        self.sync = be.synchronize
        self.opt.step()  # compiles (or loads from Numba's cache)
        self.sync()

    def time_step(self, *params):
        self.opt.step()
        self.sync()


class TorchStep(_Bench):
    def setup(self, optimizer, hidden, device, dtype):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("torch is not installed")
        if device == "cuda" and not torch.cuda.is_available():
            raise NotImplementedError("torch sees no GPU")
        torch.manual_seed(0)
        layer = torch.nn.LSTM(hidden, hidden, num_layers=LAYERS).to(device=device,
                                                                      dtype=getattr(torch, dtype))
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3),
                "momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
                "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3)}[optimizer]
        self.opt = make(layer.parameters())
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.opt.step()
        self.sync()

    def time_step(self, *params):
        self.opt.step()
        self.sync()
