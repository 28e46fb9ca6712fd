"""A whole training step of a task's model, gpurnn against the same model in torch.nn: the
same device, weights, batches, loss and Adam; sequences per second.

The model is the task's (``gpurnn.training.tasks.model_for_task``: an embedding for token
tasks, the recurrent layers, a linear head); torch's copy is ``torch.nn.Embedding``, ``LSTM``/
``GRU``/``RNN`` and ``Linear`` holding gpurnn's initial weights.  Each timed step is a forward,
the task's loss (mean), the backward and an Adam update, with the device synchronised after it;
the two libraries alternate step by step (so both see the same load) over the same batches.
Reported: the median sequences/s of each, the speed-up (gpurnn's sequences/s over torch's:
above 1, gpurnn trains faster), and the first step's losses, which
agree when the two models are the same (checked: the script fails otherwise).

The GPU-sized example of the README (a character-level language model, 2-layer LSTM, H=1024,
batch 256)::

    python benchmarks/train_compare.py --device cuda --task charlm --layers 2 --hidden 1024 \\
        --batch 256 --json out.json

On the CPU, ``--threads 1`` runs both sides on one thread.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

CELLS = {"lstm": "LSTM", "gru-reset-after": "GRU", "rnn": "RNN"}


def torch_copy(model, cell):
    """torch.nn modules holding ``model``'s weights: (embedding or None, rnn, head)."""
    import torch

    sd = {k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}
    rnn = model.rnn
    options = {"nonlinearity": rnn.nonlinearity} if cell == "rnn" else {}
    recurrent = getattr(torch.nn, CELLS[cell])(rnn.input_size, rnn.hidden_size,
                                               num_layers=rnn.num_layers, **options)
    recurrent.load_state_dict({k[len("rnn."):]: v for k, v in sd.items() if k.startswith("rnn.")})
    head = torch.nn.Linear(rnn.hidden_size, sd["head.weight"].shape[0])
    head.load_state_dict({"weight": sd["head.weight"], "bias": sd["head.bias"]})
    embedding = None
    if "embedding.weight" in sd:
        embedding = torch.nn.Embedding.from_pretrained(sd["embedding.weight"], freeze=False)
    return embedding, recurrent, head


def torch_step(parts, optimizer, batch, task, device):
    """One training step of the torch copy on ``batch``; the loss as a float."""
    import torch

    embedding, recurrent, head = parts
    x = torch.as_tensor(batch.x, device=device)
    target = torch.as_tensor(batch.target, device=device)
    optimizer.zero_grad(set_to_none=True)
    inp = embedding(x) if embedding is not None else x.float()
    out, _ = recurrent(inp)  # [T, B, H]
    if task.head == "last":
        out = out[-1]
    y = head(out)
    if task.loss == "cross_entropy":
        loss = torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), target.reshape(-1))
    else:  # gpurnn's "mse" (the seed's): 1/2 ||y - target||^2 per position, mean over them
        diff = y - target.float().reshape(y.shape)
        loss = 0.5 * diff.square().sum() / (y.numel() // y.shape[-1])
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--task", default="charlm")
    parser.add_argument("--cell", choices=list(CELLS), default="lstm")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per library")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS/OpenMP threads of both (CPU); default: as they come")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    if args.device == "cuda":
        from gpu_compare import no_gpu_reason  # this folder is on sys.path

        reason = no_gpu_reason()
        if reason is not None:
            print(f"train_compare: no GPU, nothing measured: {reason}", file=sys.stderr)
            return 2
    else:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
    import torch

    from gpurnn.nn.optim import Adam
    from gpurnn.training.step import train_step
    from gpurnn.training.tasks import make_task, model_for_task

    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    task = make_task(args.task, args.seq_len)
    cell = "gru" if args.cell == "gru-reset-after" else args.cell
    options = {"reset_after": True} if args.cell == "gru-reset-after" else {}
    model = model_for_task(task, cell, hidden_size=args.hidden, num_layers=args.layers,
                           device=args.device, seed=0, **options)
    optimizer = Adam(model.params, model.grads, lr=args.lr)
    parts = [p.to(args.device) if p is not None else None
             for p in torch_copy(model, args.cell)]
    torch_optimizer = torch.optim.Adam([q for p in parts if p is not None
                                        for q in p.parameters()], lr=args.lr)

    def ours(batch):
        loss, _ = train_step(model, task, optimizer, batch)
        model.backend.synchronize()
        return float(loss)

    def theirs(batch):
        loss = torch_step(parts, torch_optimizer, batch, task, args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return loss

    rng = np.random.default_rng(0)
    batches = [task.batch(rng, args.batch) for _ in range(args.warmup + args.steps)]
    times = {"gpurnn": [], "torch": []}
    first = {}
    for i, batch in enumerate(batches):
        for name, step in (("gpurnn", ours), ("torch", theirs)):
            start = time.perf_counter()
            loss = step(batch)
            elapsed = time.perf_counter() - start
            first.setdefault(name, loss)
            if i >= args.warmup:
                times[name].append(elapsed)
    seq_s = {name: args.batch / statistics.median(t) for name, t in times.items()}
    report = {"device": args.device, "task": args.task, "cell": args.cell,
              "seq_len": task.seq_len, "hidden": args.hidden, "layers": args.layers,
              "batch": args.batch, "steps": args.steps, "threads": args.threads,
              "torch": torch.__version__, "load": os.getloadavg(),
              "first_loss": first, "seq_per_s": seq_s,
              "speedup": seq_s["gpurnn"] / seq_s["torch"]}
    print(f"{args.task} {args.cell} T={task.seq_len} H={args.hidden} layers={args.layers} "
          f"B={args.batch} on {args.device}: gpurnn {seq_s['gpurnn']:.1f} seq/s, torch.nn "
          f"{seq_s['torch']:.1f} seq/s, speed-up {report['speedup']:.2f} (first losses "
          f"{first['gpurnn']:.6f} and {first['torch']:.6f}; load {report['load'][0]:.2f})")
    if args.json:
        from gpurnn.engine.files import write_atomically

        write_atomically(args.json, lambda f: f.write(json.dumps(report, indent=1).encode()))
    # the same model, the same first batch: the same loss, up to float32 summation order
    if not abs(first["gpurnn"] - first["torch"]) <= 1e-4 * max(1.0, abs(first["torch"])):
        print("train_compare: the first losses differ: the two models are not the same",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
