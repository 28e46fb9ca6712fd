"""Data-parallel training with PyTorch's DistributedDataParallel over gpurnn.torch layers:
2 processes (gloo backend, CPU, localhost) each on half of every batch end with the same
weights as one process on the whole batch (float64)."""
import datetime
import os
import socket
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

STEPS, B, T, I, H = 4, 6, 5, 3, 4
WORLD = 2
TIMEOUT_S = 300  # spawning, importing torch and compiling gpurnn's kernels in each process


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        import gpurnn.torch

        self.lstm = gpurnn.torch.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True,
                                      dtype=torch.float64)
        self.gru = gpurnn.torch.GRU(2 * H, H, batch_first=True, dtype=torch.float64)
        self.head = torch.nn.Linear(H, 1, dtype=torch.float64)

    def forward(self, x):
        out, _ = self.lstm(x)
        out, _ = self.gru(out)
        return self.head(out)


def build():
    torch.manual_seed(0)
    return Model()


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(B, T, I, dtype=torch.float64, generator=gen),
             torch.randn(B, T, 1, dtype=torch.float64, generator=gen)) for _ in range(STEPS)]


def train(model, lo, hi):
    """SGD with momentum on rows lo:hi of every batch; the loss is the mean over those rows, so
    DDP's average over equal halves is the whole batch's mean."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[lo:hi]), y[lo:hi])
        loss.backward()
        opt.step()


def worker(rank, port, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        model = build()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        share = B // WORLD
        train(ddp, rank * share, (rank + 1) * share)
        if rank == 0:
            torch.save(model.state_dict(), out_path)
        # Both ranks leave together: a rank that tore its gloo pairs down while the other still
        # worked once made that one abort ("terminate called without an active exception",
        # SIGABRT) on a loaded CI machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process(tmp_path):
    out_path = tmp_path / "rank0.pt"
    context = mp.spawn(worker, args=(free_port(), str(out_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {WORLD} DDP processes did not finish within {TIMEOUT_S} s")

    reference = build()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    train(reference, 0, B)
    parallel = torch.load(out_path)
    assert set(parallel) == set(initial)
    for name, expected in reference.state_dict().items():
        assert not torch.equal(expected, initial[name]), f"{name} did not train"
        np.testing.assert_allclose(parallel[name].numpy(), expected.numpy(), rtol=1e-10,
                                   atol=1e-12, err_msg=name)
