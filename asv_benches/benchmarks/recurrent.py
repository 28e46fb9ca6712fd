"""gpurnn and PyTorch recurrent layers: inference time, training-step time, peak memory.

Every class takes the same parameters, so each gpurnn figure has a PyTorch figure from the same
run on the same machine.  Layers and inputs are built in ``setup`` (outside the timed body);
a GPU timing ends with a synchronise.  ``device="cuda"`` is skipped where there is no GPU
(gpurnn needs CuPy and a GPU; torch needs a CUDA build), torch where it is not installed, and
``gru_seed`` for torch, which has only the reset-after GRU (compare both gpurnn GRUs with
torch's ``gru``).

* training step: forward in training mode, then the backward of ``sum(out * dout)`` down to the
  weights and the input (torch: ``x.requires_grad_()``, since gpurnn always returns ``dx``);
* inference: ``eval()`` forward (torch: also under ``torch.inference_mode()``).
"""
import numpy as np

#: (T steps, B batch, I input, H hidden), written T x B x I x H.
SHAPES = ["100x32x256x256", "100x64x512x512", "1000x1x128x128", "50x256x128x128"]
CELLS = ["rnn", "lstm", "gru", "gru_seed"]
DEVICES = ["cpu", "cuda"]
DTYPES = ["float32", "float64"]

#: cell -> (gpurnn class, options); torch's class is the same name without options.
GPURNN_CELLS = {"rnn": ("RNN", {}), "lstm": ("LSTM", {}), "gru": ("GRU", {"reset_after": True}),
                "gru_seed": ("GRU", {"reset_after": False})}


def parse_shape(shape):
    return tuple(int(v) for v in shape.split("x"))


class _Bench:
    params = [CELLS, SHAPES, DEVICES, DTYPES]
    param_names = ["cell", "shape", "device", "dtype"]
    timeout = 600
    # A training step at the largest shape takes a good fraction of a second on 2 cores.
    min_run_count = 5
    warmup_time = 0.5


class _Inference:
    training = False

    def time_forward(self, *params):
        self.run()
        self.sync()

    def peakmem_forward(self, *params):
        self.run()


class _Training:
    training = True

    def time_step(self, *params):
        self.run()
        self.sync()

    def peakmem_step(self, *params):
        self.run()


class _Gpurnn(_Bench):
    def setup(self, cell, shape, device, dtype):
        import gpurnn

        if device == "cuda" and gpurnn.cuda_unavailable_reason() is not None:
            raise NotImplementedError(f"no GPU: {gpurnn.cuda_unavailable_reason()}")
        T, B, I, H = parse_shape(shape)
        cls, opts = GPURNN_CELLS[cell]
        self.layer = getattr(gpurnn, cls)(I, H, device=device, dtype=dtype, seed=0, **opts)
        self.layer.train(self.training)
        be = self.layer.backend
        rng = np.random.default_rng(0)
        self.x = be.asarray(rng.standard_normal((T, B, I)).astype(dtype))  # [T, B, I]
        self.dout = be.asarray(rng.standard_normal((T, B, H)).astype(dtype))  # [T, B, H]
        self.sync = be.synchronize
        self.run()  # compiles (or loads from Numba's cache) and sizes the workspaces
        self.sync()


class GpurnnInference(_Inference, _Gpurnn):
    def run(self):
        self.layer(self.x)


class GpurnnTraining(_Training, _Gpurnn):
    def run(self):
        self.layer(self.x)
        self.layer.backward(self.dout)


class _Torch(_Bench):
    def setup(self, cell, shape, device, dtype):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("torch is not installed")
        if cell == "gru_seed":
            raise NotImplementedError("torch has only the reset-after GRU (see 'gru')")
        if device == "cuda" and not torch.cuda.is_available():
            raise NotImplementedError("torch sees no GPU")
        self.torch = torch
        T, B, I, H = parse_shape(shape)
        torch.manual_seed(0)
        tdtype = getattr(torch, dtype)
        cls = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}[cell]
        self.layer = getattr(torch.nn, cls)(I, H).to(device=device, dtype=tdtype)
        self.layer.train(self.training)
        self.x = torch.randn(T, B, I, dtype=tdtype, device=device,
                             requires_grad=self.training)  # [T, B, I]
        self.dout = torch.randn(T, B, H, dtype=tdtype, device=device)  # [T, B, H]
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.run()
        self.sync()


class TorchInference(_Inference, _Torch):
    def run(self):
        with self.torch.inference_mode():
            self.layer(self.x)


class TorchTraining(_Training, _Torch):
    def run(self):
        self.layer.zero_grad(set_to_none=True)
        self.x.grad = None
        out, _ = self.layer(self.x)
        out.backward(self.dout)
