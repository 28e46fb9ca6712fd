"""gpurnn against PyTorch (cuDNN) on the same GPU, in one process: medians and ratios.

For each cell (LSTM, GRU in the reset-after form cuDNN runs, tanh RNN) and shape (T, B, I=H),
fp32 by default:

* training step: forward in training mode, then the backward of ``sum(out * dout)`` down to the
  weights and the input (torch: ``x.requires_grad_()``, since gpurnn always returns ``dx``);
* inference: ``eval()`` forward (torch: under ``torch.inference_mode()``);
* activation memory of training: bytes a training forward keeps for the backward, beside its
  input, output and final state.  gpurnn: the tape (``layer.activation_bytes``) and, measured,
  the growth of CuPy's pool over a first training forward (tape plus workspaces), of which the
  backend's scratch buffers (``drivers.scratch_buffers``: held once for a whole stack and
  reused call after call, where cuDNN's workspace goes back to torch's cache).  torch: the
  growth of ``torch.cuda.memory_allocated`` over a training forward, less the output and final
  state: cuDNN's reserve space (torch does not expose it directly).

Timing: CUDA events around each call on the current stream, ``--warmup`` calls first, then the
median of ``--repeat`` calls; inputs rotate over three random sets (never zeros).  Before timing,
gpurnn's output is checked against torch's with the same weights (relative error column).

Also measured: host-side cost of one step-kernel launch per launch mode (``--launch-cost``),
and the error of a TF32 GEMM against float64 (``--tf32-check``).

Variants of gpurnn (``--variants``, comma-separated, each
``MODE[+persistent[N]][+fused][+graphs][+fp32]`` with MODE in lazy, eager, fast (N: the
persistent kernels on at most N blocks; ``+fused``: the fused step kernels of
``kernels/fused.py`` where the persistent path does not run), or ``default[+fp32]``: what a
user gets with no option set, the launch mode, the persistent kernels and the CUDA graphs
chosen by ``gpurnn/engine/dispatch.py``): each runs the whole table.  Precision, like for
like: float32 GEMMs run TF32 on both sides by default (gpurnn's default and
``torch.backends.cudnn.allow_tf32``'s); ``+fp32`` switches both to strict float32.  Every
row states which (``precision``).  Without a GPU the script prints why and exits with status 2,
measuring nothing.

    python benchmarks/gpu_compare.py                      # the issue's shapes and cells
    python benchmarks/gpu_compare.py --shapes 1000,1,128 --cells lstm --variants fast+persistent
    python benchmarks/gpu_compare.py --shapes 1000,1,128 --variants default,fast+fused+graphs
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

# The benchmark never wants Numba's CUDA simulator, whatever the environment says.
os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

SHAPES = [(100, 64, 512), (100, 256, 1024), (1000, 4, 256), (1000, 1, 128)]
#: name -> (gpurnn class, gpurnn options, torch class, torch options)
CELLS = {
    "lstm": ("LSTM", {}, "LSTM", {}),
    "gru": ("GRU", {"reset_after": True}, "GRU", {}),
    "rnn": ("RNN", {}, "RNN", {"nonlinearity": "tanh"}),
}
N_INPUTS = 3


def no_gpu_reason():
    """None when both gpurnn (CuPy + Numba) and torch can use a GPU here, else why not."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    if not torch.backends.cudnn.is_available():
        return "torch has no cuDNN"
    from gpurnn import cuda_unavailable_reason

    return cuda_unavailable_reason()


def parse_shape(text):
    try:
        T, B, H = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is T,B,H (three ints), got {text!r}")
    if min(T, B, H) < 1:
        raise argparse.ArgumentTypeError(f"T, B and H must be positive, got {text!r}")
    return T, B, H


def parse_variant(text):
    """``{"name", "launch", "persistent", "blocks", "fused", "graphs", "tf32"}``; ``default``
    leaves the launch mode (None), the persistent kernels and the CUDA graphs ("auto") to
    gpurnn's dispatch rules (no fused steps: they are off by default); ``+persistentN`` caps
    the persistent kernels at N blocks (``blocks``; None: gpurnn's choice); ``tf32`` is False
    with ``+fp32`` (both sides strict float32)."""
    parts = text.split("+")
    mode, flags = parts[0], set(parts[1:])
    blocks = None
    for flag in list(flags):
        if flag.startswith("persistent") and flag[len("persistent"):].isdigit():
            blocks = int(flag[len("persistent"):])
            flags = (flags - {flag}) | {"persistent"}
    if mode == "default" and flags <= {"fp32"}:
        return {"name": text, "launch": None, "persistent": "auto", "blocks": None,
                "fused": False, "graphs": "auto", "tf32": "fp32" not in flags}
    if (mode not in ("lazy", "eager", "fast")
            or not flags <= {"persistent", "fused", "graphs", "fp32"} or blocks == 0):
        raise argparse.ArgumentTypeError(
            f"a variant is MODE[+persistent[N]][+fused][+graphs][+fp32] with MODE "
            f"lazy|eager|fast, or default[+fp32], got {text!r}")
    return {"name": text, "launch": mode, "persistent": "persistent" in flags, "blocks": blocks,
            "fused": "fused" in flags, "graphs": "graphs" in flags, "tf32": "fp32" not in flags}


def precision(dtype, tf32):
    """What a row's GEMMs run in, on both sides."""
    return ("tf32" if tf32 else "fp32") if dtype == "float32" else dtype


def event_median(fn, warmup, repeat, events):
    """Median milliseconds of ``fn(i)`` between two CUDA events, after ``warmup`` calls."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeat):
        start, end = events()
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) if hasattr(start, "elapsed_time")
                     else _cupy_elapsed(start, end))
    return statistics.median(times)


def _cupy_elapsed(start, end):
    import cupy

    return cupy.cuda.get_elapsed_time(start, end)


def cupy_events():
    import cupy

    return cupy.cuda.Event(), cupy.cuda.Event()


def torch_events():
    import torch

    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def build_pair(cell, T, B, H, dtype, seed):
    """A gpurnn layer and a torch layer with the same weights, and the shared inputs."""
    import cupy
    import numpy as np
    import torch

    import gpurnn

    g_cls, g_opts, t_cls, t_opts = CELLS[cell]
    ours = getattr(gpurnn, g_cls)(H, H, device="cuda", dtype=dtype, seed=seed, **g_opts)
    theirs = getattr(torch.nn, t_cls)(H, H, **t_opts).to(device="cuda",
                                                          dtype=getattr(torch, dtype))
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    rng = np.random.default_rng(seed)
    # drawn in float32 (float64 for float64) and rounded to ``dtype`` on each side: both round
    # to nearest even, so the two libraries see the same 16-bit values
    draw = "float64" if dtype == "float64" else "float32"
    host = [rng.standard_normal((T, B, H)).astype(draw) for _ in range(N_INPUTS)]
    dout = rng.standard_normal((T, B, H)).astype(draw)
    gxs = [cupy.asarray(x).astype(ours.dtype) for x in host]  # each [T, B, H]
    txs = [torch.from_numpy(x).cuda().to(getattr(torch, dtype)) for x in host]
    return (ours, theirs, gxs, txs, cupy.asarray(dout).astype(ours.dtype),
            torch.from_numpy(dout).cuda().to(getattr(torch, dtype)))


def agreement(ours, theirs, gx, tx):
    """Relative error (Frobenius) of gpurnn's inference output against torch's."""
    import cupy
    import numpy as np
    import torch

    import gpurnn

    ours.eval()
    with gpurnn.no_grad():
        a = cupy.asnumpy(ours(gx)[0]).astype("float64")
    with torch.inference_mode():
        b = theirs.eval()(tx)[0].double().cpu().numpy()
    ours.train()
    theirs.train()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _parts(state):
    return state if isinstance(state, tuple) else (state,)


def measure_cell(cell, T, B, H, dtype, warmup, repeat):
    """Times (ms) and memory (bytes) of one cell and shape, for both libraries."""
    import cupy
    import numpy as np
    import torch

    import gpurnn
    from gpurnn.engine import drivers

    ours, theirs, gxs, txs, gdout, tdout = build_pair(cell, T, B, H, dtype, seed=T + B + H)
    row = {"rel_err": agreement(ours, theirs, gxs[0], txs[0])}

    # Activation memory: gpurnn's first training forward on a fresh layer (tape + workspaces).
    fresh = build_pair(cell, T, B, H, dtype, seed=1)[0]
    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    before = pool.used_bytes()
    out, state = fresh(gxs[0])
    cupy.cuda.Device().synchronize()
    states = sum(int(s.nbytes) for s in _parts(state))
    row["ours_kept_bytes"] = pool.used_bytes() - before - int(out.nbytes) - states
    row["ours_tape_bytes"] = fresh.activation_bytes(T, B)
    row["ours_scratch_bytes"] = sum(
        math.prod(shape) * np.dtype(kind).itemsize for shape, kind in drivers.scratch_buffers(
            fresh.cell, T, B, H, fresh.dtype, True).values())
    del fresh, out, state

    def ours_train(i):
        out, _ = ours(gxs[i % N_INPUTS])
        ours.backward(gdout)

    def ours_infer(i):
        with gpurnn.no_grad():
            ours(gxs[i % N_INPUTS])

    def theirs_train(i):
        x = txs[i % N_INPUTS].requires_grad_()
        theirs.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = theirs(x)
        out.backward(tdout)

    def theirs_infer(i):
        with torch.inference_mode():
            theirs(txs[i % N_INPUTS])

    row["ours_train_ms"] = event_median(ours_train, warmup, repeat, cupy_events)
    ours.eval()
    row["ours_infer_ms"] = event_median(ours_infer, warmup, repeat, cupy_events)
    row["torch_train_ms"] = event_median(theirs_train, warmup, repeat, torch_events)
    theirs.eval()
    row["torch_infer_ms"] = event_median(theirs_infer, warmup, repeat, torch_events)
    theirs.train()

    # cuDNN's reserve space: what a training forward keeps beyond its output and final state.
    x = txs[0].detach().requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out, state = theirs(x)
    torch.cuda.synchronize()
    states = sum(s.numel() * s.element_size() for s in _parts(state))
    row["torch_kept_bytes"] = (torch.cuda.memory_allocated() - base
                               - out.numel() * out.element_size() - states)
    del out, state, x
    return row


def launch_cost(n=2000):
    """Host microseconds per step-kernel launch (rnn_forward_step, B=1, H=128), per mode."""
    import cupy
    import numpy as np

    import gpurnn
    from gpurnn.kernels.cuda import fast_launch_unavailable

    backend = gpurnn.get_backend("cuda")
    saved = backend.launch
    B, H = 1, 128
    rng = np.random.default_rng(0)
    arrays = [cupy.asarray(rng.standard_normal((B, H)).astype("float32")) for _ in range(5)]
    y, h_new, xg, hg, h_prev = arrays
    b_ih, b_hh = (cupy.asarray(rng.standard_normal(H).astype("float32")) for _ in range(2))
    w_hh = cupy.asarray(rng.standard_normal((H, H)).astype("float32"))
    lengths = cupy.full(B, 1, dtype=cupy.int32)
    out = {}
    try:
        for mode in ("lazy", "eager", "fast"):
            if mode == "fast" and fast_launch_unavailable():
                continue
            backend.launch = mode
            step = backend.kernels("float32")["rnn_forward_step"]
            for _ in range(50):
                step(B, H, y, h_new, xg, hg, b_ih, b_hh, h_prev, lengths, 0, 0)
            cupy.cuda.Device().synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                step(B, H, y, h_new, xg, hg, b_ih, b_hh, h_prev, lengths, 0, 0)
            host = time.perf_counter() - t0
            cupy.cuda.Device().synchronize()
            out[mode] = host / n * 1e6
        # one recurrent product [B, H] x [H, H]: gpurnn's cuBLAS call, then CuPy's matmul
        for name, product in (("gemm", backend.matmul),
                              ("cupy_matmul", lambda a, b, out: cupy.matmul(a, b, out=out))):
            for _ in range(50):
                product(h_prev, w_hh.T, out=y)
            cupy.cuda.Device().synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                product(h_prev, w_hh.T, out=y)
            out[name] = (time.perf_counter() - t0) / n * 1e6
            cupy.cuda.Device().synchronize()
    finally:
        backend.launch = saved
    return out


def tf32_check(n=1024):
    """Relative error (Frobenius) of an [n, n] float32 GEMM against float64, TF32 off and on."""
    import cupy
    import numpy as np

    import gpurnn

    backend = gpurnn.get_backend("cuda")
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((n, n)).astype("float32") for _ in range(2))
    ref = a.astype("float64") @ b.astype("float64")
    saved = backend.tf32
    out = {}
    try:
        for flag in (False, True):
            backend.tf32 = flag
            c = cupy.empty((n, n), dtype="float32")
            backend.matmul(cupy.asarray(a), cupy.asarray(b), out=c)
            err = np.linalg.norm(cupy.asnumpy(c).astype("float64") - ref) / np.linalg.norm(ref)
            out["tf32" if flag else "fp32"] = float(err)
    finally:
        backend.tf32 = saved
    return out


def watch_own_loops(backend):
    """A set that gets "fwd" / "bwd" each time ``backend`` runs a forward / backward its own
    way (one persistent kernel, or the fused step kernels), so the table says whether a
    ``+persistent`` or ``+fused`` variant really took that path (the persistent one falls back
    to the per-step loop where the plan does not fit)."""
    seen = set()

    def watched(run, tag):
        def hook(*args):
            ran = run(*args)
            if ran:
                seen.add(tag)
            return ran

        return hook

    backend.forward_sequence = watched(backend.forward_sequence, "fwd")
    backend.backward_sequence = watched(backend.backward_sequence, "bwd")
    return seen


def fmt_table(results):
    head = (f"{'variant':<18} {'prec':<8} {'cell':<5} {'T,B,H':<13} {'train ours':>10} "
            f"{'cuDNN':>8} "
            f"{'ratio':>6} {'infer ours':>10} {'cuDNN':>8} {'ratio':>6} {'tape MB':>8} "
            f"{'kept MB':>8} {'scratch':>8} {'cuDNN MB':>8} {'rel err':>8} {'own loop':>10} "
            f"{'graphs':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        mb = 1 / 2**20
        lines.append(
            f"{r['variant']:<18} {r['precision']:<8} {r['cell']:<5} "
            f"{','.join(map(str, r['shape'])):<13} "
            f"{r['ours_train_ms']:>10.3f} {r['torch_train_ms']:>8.3f} "
            f"{r['ours_train_ms'] / r['torch_train_ms']:>6.2f} "
            f"{r['ours_infer_ms']:>10.3f} {r['torch_infer_ms']:>8.3f} "
            f"{r['ours_infer_ms'] / r['torch_infer_ms']:>6.2f} "
            f"{r['ours_tape_bytes'] * mb:>8.2f} {r['ours_kept_bytes'] * mb:>8.2f} "
            f"{r.get('ours_scratch_bytes', 0) * mb:>8.2f} {r['torch_kept_bytes'] * mb:>8.2f} "
            f"{r['rel_err']:>8.1e} "
            f"{r['own_loop_ran']:>10} {r.get('graphs', 0):>6}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=SHAPES, metavar="T,B,H")
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"],
                        default="float32")
    parser.add_argument("--variants", type=lambda s: [parse_variant(v) for v in s.split(",")],
                        default=[parse_variant(v) for v in ("default", "default+fp32")])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--no-launch-cost", dest="launch_cost", action="store_false")
    parser.add_argument("--no-tf32-check", dest="tf32_check", action="store_false")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)

    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu_compare: no GPU, nothing measured: {reason}", file=sys.stderr)
        return 2

    import cupy
    import numba_cuda
    import torch

    import gpurnn

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    info = {
        "gpu": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
        "cupy": cupy.__version__, "numba_cuda": numba_cuda.__version__,
        "dtype": args.dtype, "warmup": args.warmup, "repeat": args.repeat,
    }
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    report = {"info": info, "results": []}
    if args.launch_cost:
        report["launch_us"] = launch_cost()
        print("host us per launch: " + ", ".join(
            f"{k} {v:.1f}" for k, v in report["launch_us"].items()), flush=True)
    if args.tf32_check:
        report["tf32_rel_err"] = tf32_check()
        print("GEMM rel. error vs float64: " + ", ".join(
            f"{k} {v:.1e}" for k, v in report["tf32_rel_err"].items()), flush=True)

    from gpurnn.engine.dispatch import default_launch
    from gpurnn.kernels.cuda import fast_launch_unavailable

    backend = gpurnn.get_backend("cuda")
    ran_own_loop = watch_own_loops(backend)
    for variant in args.variants:
        if variant["launch"] == "fast" and fast_launch_unavailable():
            print(f"skipping {variant['name']}: {fast_launch_unavailable()}", flush=True)
            continue
        backend.launch, backend.persistent, backend.graphs, backend.tf32 = (
            variant["launch"] or default_launch(simulator=False), variant["persistent"],
            variant["graphs"], variant["tf32"])
        backend.persistent_blocks = variant["blocks"]
        backend.fused = variant["fused"]
        torch.backends.cudnn.allow_tf32 = variant["tf32"]  # like for like
        for cell in args.cells:
            for T, B, H in args.shapes:
                ran_own_loop.clear()
                backend.clear_graphs()
                row = measure_cell(cell, T, B, H, args.dtype, args.warmup, args.repeat)
                row.update(variant=variant["name"], cell=cell, shape=[T, B, H],
                           graphs=backend.graph_count(),
                           precision=precision(args.dtype, variant["tf32"]),
                           own_loop_ran="+".join(sorted(ran_own_loop, reverse=True)) or "-")
                report["results"].append(row)
                print(fmt_table([row]).splitlines()[-1], flush=True)
    print()
    print(fmt_table(report["results"]))
    if args.json:
        from gpurnn.engine.files import write_atomically

        write_atomically(args.json, lambda f: f.write(json.dumps(report, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
