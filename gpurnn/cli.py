"""The ``gpurnn`` command: ``train``, ``gradflow``, ``study``, ``info``.

    gpurnn train                      # an LSTM on the adding problem, about a minute on a CPU
    gpurnn train --task digits --cell gru --steps 2000 --out runs/digits
    gpurnn train --resume runs/digits --steps 4000     # continue exactly where it stopped
    gpurnn gradflow --task adding --seq-len 100        # ||dL/dh_t|| of RNN vs LSTM vs GRU
    gpurnn study adding                                # cells x lengths x seeds (gpurnn/study.py)
    gpurnn info
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

#: per task: defaults of the options not given (seq_len None: the task's own)
TASK_DEFAULTS = {
    "adding": {"seq_len": 30, "hidden": 32, "batch": 32, "steps": 1000, "lr": 1e-2},
    "copy": {"seq_len": 20, "hidden": 64, "batch": 32, "steps": 1500, "lr": 3e-3},
    "digits": {"seq_len": 8, "hidden": 64, "batch": 32, "steps": 1000, "lr": 1e-2},
    "charlm": {"seq_len": 100, "hidden": 128, "batch": 32, "steps": 1000, "lr": 3e-3},
}
#: options that define a run; on --resume they come from the checkpoint
RUN_OPTIONS = ("task", "cell", "seq_len", "hidden", "layers", "batch", "lr", "optimizer", "clip",
               "clip_value", "seed", "dtype", "reduction", "tbptt")
CHECKPOINT = "checkpoint.npz"
#: --cell choices: the model's cell and its options (gru: the seed's form, reset before the
#: recurrent product; gru-reset-after: cuDNN's and PyTorch's)
CELL_CHOICES = {"rnn": ("rnn", {}), "lstm": ("lstm", {}), "gru": ("gru", {}),
                "gru-reset-after": ("gru", {"reset_after": True})}


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _add_model_options(p):
    p.add_argument("--task", choices=["adding", "copy", "digits", "charlm"])
    p.add_argument("--seq-len", type=_positive_int, help="sequence length (task's default)")
    p.add_argument("--hidden", type=_positive_int, help="hidden size")
    p.add_argument("--batch", type=_positive_int, help="sequences per step")
    p.add_argument("--seed", type=int, help="seed of the weights and the data (default 0)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--blas-threads", type=_positive_int, default=1,
                   help="BLAS threads on the CPU (default 1: the per-step products are small, "
                   "and threads spinning on a busy CPU cost up to 6x here; needs threadpoolctl). "
                   "Runs repeat bit for bit at one thread count; another count changes "
                   "results by float32 rounding")


def build_parser():
    parser = argparse.ArgumentParser(prog="gpurnn", description="Recurrent networks (RNN, LSTM, "
                                     "GRU) with BPTT on GPUs and CPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model on an embedded task",
                        description="Train a recurrent model on an embedded task. With no "
                        "options: an LSTM on the adding problem (length 30), about a minute on "
                        "a laptop CPU.")
    _add_model_options(tr)
    tr.add_argument("--cell", choices=list(CELL_CHOICES), help="gru: the seed's form (reset "
                    "before the recurrent product); gru-reset-after: PyTorch's (default lstm)")
    tr.add_argument("--layers", type=_positive_int, help="stacked recurrent layers (default 1)")
    tr.add_argument("--steps", type=_positive_int, help="total training steps (a resumed run "
                    "continues up to this many)")
    tr.add_argument("--lr", type=_positive_float, help="learning rate")
    tr.add_argument("--optimizer", choices=["sgd", "momentum", "adam"])
    tr.add_argument("--clip", type=float, help="clip gradients to this global norm "
                    "(default 1.0; 0 for none)")
    tr.add_argument("--clip-value", type=_positive_float, help="clip each gradient entry to "
                    "[-v, v]")
    tr.add_argument("--tbptt", type=_positive_int, help="truncated BPTT: train in chunks of "
                    "this many steps, the state carried across, an update per chunk")
    tr.add_argument("--on-nonfinite", choices=["stop", "skip", "raise"], default="stop",
                    help="a NaN or Inf in the loss or gradients (never applied to the weights): "
                    "stop at the last good weights and save them, exit 3 (default); skip the "
                    "batch; or raise an error, exit 2")
    tr.add_argument("--reduction", choices=["mean", "sum"], help="loss over positions: mean "
                    "(default) or sum (the seed's sum over time)")
    tr.add_argument("--eval-every", type=_positive_int, help="steps between test evaluations "
                    "(default steps/10)")
    tr.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints "
                    "(default: at evaluations and at the end)")
    tr.add_argument("--out", help="run directory: metrics.jsonl, checkpoint.npz, plots "
                    "(default gpurnn-runs/<task>-<cell>-<time>; on --resume, the checkpoint's)")
    tr.add_argument("--stop-at", type=float, help="stop at the first evaluation whose test "
                    "metric reaches this value (e.g. 0.01 for the adding problem's MSE)")
    tr.add_argument("--resume", help="a checkpoint file or a run directory to continue from")
    tr.add_argument("--gradflow", action="store_true", help="also record ||dL/dh_t|| against t "
                    "before and after training")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    gf = sub.add_parser("gradflow", help="||dL/dh_t|| against t: RNN vs LSTM vs GRU",
                        description="The norm of dL/dh_t against t for the loss on the last step, "
                        "for RNN, LSTM and GRU at initialisation on the same task and data: the "
                        "vanishing gradient made visible.")
    _add_model_options(gf)
    gf.add_argument("--cells", default="rnn,lstm,gru", help="comma-separated cells")
    gf.add_argument("--steps", type=int, default=0, help="train each model this many steps "
                    "first (Adam, --lr, global-norm clip 1, batch 32, the same data); default 0: "
                    "measure at initialisation")
    gf.add_argument("--lr", type=_positive_float, default=1e-2, help="learning rate of --steps")
    gf.add_argument("--out", default=".", help="directory for gradflow.png and gradflow.json")

    sub.add_parser("info", help="version, backends, GPU, and why CUDA is not used")
    from .study import add_parser as add_study_parser  # the study drives cmd_train

    add_study_parser(sub)
    return parser


# ---------------------------------------------------------------------------- train
def _run_config(args, checkpoint):
    """The run's options: from the checkpoint on resume (explicit options must agree), else
    from the arguments and the task's defaults."""
    given = {k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k) is not None}
    if checkpoint is not None:
        config = dict(checkpoint["config"])
        clash = {k: (v, config.get(k)) for k, v in given.items() if config.get(k) != v}
        if clash:
            raise ValueError("options differ from the checkpoint's run: " + ", ".join(
                f"--{k.replace('_', '-')} {v} (checkpoint: {c})" for k, (v, c) in clash.items()))
        return config
    task = given.get("task", "adding")
    config = {"task": task, "cell": "lstm", "layers": 1, "optimizer": "adam", "clip": 1.0,
              "clip_value": None, "seed": 0, "dtype": "float32", "reduction": "mean",
              **{k: v for k, v in TASK_DEFAULTS[task].items() if k != "steps"}}
    config.update(given)
    return config


def _make_run(config, device):
    from .backend import get_backend
    from .model import model_for_task
    from .run_checks import check_run_fits
    from .optim import OPTIMIZERS
    from .tasks import make_task

    task = make_task(config["task"], config["seq_len"])
    cell, options = CELL_CHOICES[config["cell"]]
    check_run_fits({**config, "cell": cell}, task, get_backend(device))
    model = model_for_task(task, cell=cell, hidden_size=config["hidden"],
                           num_layers=config["layers"], device=device, dtype=config["dtype"],
                           seed=config["seed"], **options)
    optimizer = OPTIMIZERS[config["optimizer"]](model.params, model.grads, lr=config["lr"])
    rng = np.random.default_rng([config["seed"], 2])  # the data stream, apart from the weights'
    return task, model, optimizer, rng


def _resolve_resume(path):
    if os.path.isdir(path):
        return os.path.join(path, CHECKPOINT)
    return path


def _write_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _gradflow_record(model, task, batch, label):
    from .model import gradient_flow

    norms = gradient_flow(model, batch, task.loss)
    return {"label": label, "norms": [float(v) for v in norms]}


def cmd_train(args):
    from tqdm import tqdm

    from . import distributed
    from .checkpoint import load_checkpoint, restore, save_checkpoint
    from .model import fit
    from .plots import plot_gradflow, plot_training

    checkpoint = None
    if args.resume is not None:  # an empty path is an error, not "no resume"
        resume_path = _resolve_resume(args.resume)
        checkpoint = load_checkpoint(resume_path)
    config = _run_config(args, checkpoint)
    steps = args.steps or (checkpoint["config"].get("steps") if checkpoint else None) \
        or TASK_DEFAULTS[config["task"]]["steps"]
    config["steps"] = steps
    dp = distributed.data_parallel(config["batch"], args.device)  # None unless under MPI
    root = distributed.world().is_root  # rank 0 alone writes files and shows progress
    out = args.out if args.out is not None else (
        os.path.dirname(os.path.abspath(resume_path)) if checkpoint else
        os.path.join("gpurnn-runs", f"{config['task']}-{config['cell']}-"
                     f"{time.strftime('%Y%m%d-%H%M%S')}"))
    if not checkpoint and any(os.path.exists(os.path.join(out, f))
                              for f in (CHECKPOINT, "metrics.jsonl")):
        raise ValueError(f"{out} already holds a run: continue it with --resume {out}, or give "
                         f"another --out")
    task, model, optimizer, rng = _make_run(config, args.device)
    if root:  # only once the run could be built: a refused run leaves no empty directory
        os.makedirs(out, exist_ok=True)
    start = restore(checkpoint, model, optimizer, rng) if checkpoint else 0
    if dp is not None:
        dp.broadcast_start(model, rng)
    if start >= steps:
        raise ValueError(f"the checkpoint is at step {start}: give --steps above it to continue")
    metrics_path = os.path.join(out, "metrics.jsonl")
    ckpt_path = os.path.join(out, CHECKPOINT)
    eval_every = args.eval_every or max(1, steps // 10)
    ckpt_every = args.checkpoint_every or eval_every
    clip = config["clip"] or None
    if root:
        print(f"gpurnn train: {task.describe()}; {model!r}, {model.num_params()} parameters; "
              f"{config['optimizer']} lr {config['lr']}, batch {config['batch']}, "
              f"steps {start + 1}..{steps}; run directory {out}", file=sys.stderr)
    if not checkpoint and root:
        _write_jsonl(metrics_path, {"config": config, "start": 0})
    gradflow_batch = task.batch(np.random.default_rng([config["seed"], 3]), 16) \
        if args.gradflow else None
    gradflow = []
    if args.gradflow and root:
        gradflow.append(_gradflow_record(model, task, gradflow_batch, f"step {start}"))

    bar = tqdm(total=steps, initial=start, unit="step", disable=args.quiet or not root or None,
               dynamic_ncols=True)
    speed = []

    def on_step(record):
        speed.append(record["seq_per_s"])
        _write_jsonl(metrics_path, record)
        if "test" in record:
            bar.write(f"step {record['step']}: test " + ", ".join(
                f"{k} {v:.4g}" for k, v in record["test"].items()))
        if record["step"] % ckpt_every == 0 or record["step"] == steps or record.get("stopped") \
                or record.get("halted"):
            save_checkpoint(ckpt_path, model, optimizer, record["step"], rng, config)
        bar.set_postfix(loss=f"{record['loss']:.4g}", seq_s=f"{record['seq_per_s']:.0f}",
                        refresh=False)
        bar.update(1)

    t0 = time.perf_counter()
    history = fit(model, task, optimizer, rng, steps, config["batch"], start_step=start,
                  reduction=config["reduction"], clip_norm=clip, clip_value=config["clip_value"],
                  eval_every=eval_every, stop_at=args.stop_at,
                  on_step=on_step if root else None, data_parallel=dp,
                  tbptt=config.get("tbptt"), on_nonfinite=args.on_nonfinite)
    bar.close()
    if not root:
        return 0
    wall = time.perf_counter() - t0
    final = history[-1]["test"]
    last_step = history[-1]["step"]

    records = _read_jsonl(metrics_path)
    metric = task.metric
    title = f"{config['task']} (T={task.seq_len}), {config['cell']} H={config['hidden']}"
    plot_training(records, os.path.join(out, "loss.png"), title, metric,
                  task.baseline.get(metric))
    written = ["metrics.jsonl", CHECKPOINT, "loss.png"]
    if args.gradflow:
        gradflow.append(_gradflow_record(model, task, gradflow_batch, f"step {last_step}"))
        with open(os.path.join(out, "gradflow.json"), "w") as f:
            json.dump(gradflow, f)
        plot_gradflow({g["label"]: g["norms"] for g in gradflow},
                      os.path.join(out, "gradflow.png"), f"||dL/dh_t||, {title}")
        written += ["gradflow.json", "gradflow.png"]
    stopped = bool(history[-1].get("stopped"))
    summary = {"summary": True, "step": last_step, "trained_steps": last_step - start,
               "stopped_at_target": stopped, "wall_s": round(wall, 2),
               "seq_per_s": round(float(np.median(speed)), 1), "test": final,
               "baseline": task.baseline, "device": model.device}
    _write_jsonl(metrics_path, summary)
    why = f" (reached --stop-at {args.stop_at})" if stopped else ""
    halted = history[-1].get("halted")
    if halted:
        why = (f" (stopped: {history[-1]['nonfinite']}; {CHECKPOINT} holds the last good "
               f"weights)")
    print(f"\ndone: {last_step - start} steps in {wall:.1f} s on {model.device}{why}, "
          f"median {summary['seq_per_s']} sequences/s")
    for k, v in final.items():
        base = task.baseline.get(k)
        print(f"  test {k}: {v:.4g}" + (f"   (baseline: {base:.4g})" if base else ""))
    print(f"  wrote {', '.join(written)} in {out}")
    return 3 if halted else 0


# ---------------------------------------------------------------------------- gradflow
def cmd_gradflow(args):
    from .model import fit, gradient_flow, model_for_task
    from .optim import Adam
    from .plots import plot_gradflow
    from .tasks import make_task

    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    name = args.task or "adding"
    task = make_task(name, args.seq_len or (100 if name in ("adding", "charlm") else None))
    seed = 0 if args.seed is None else args.seed
    batch = task.batch(np.random.default_rng([seed, 3]), args.batch or 16)
    curves, reached = {}, {}
    for cell in [c.strip() for c in args.cells.split(",") if c.strip()]:
        model = model_for_task(task, cell=cell, hidden_size=args.hidden or 64, device=args.device,
                               dtype=args.dtype or "float64", seed=seed)
        if args.steps:
            history = fit(model, task, Adam(model.params, model.grads, lr=args.lr),
                          np.random.default_rng([seed, 2]), args.steps, 32, clip_norm=1.0)
            reached[cell] = history[-1]["test"][task.metric]
        curves[cell] = gradient_flow(model, batch, task.loss)
    T = task.seq_len
    rows = sorted({T - 1, *range(T - 1, -1, -max(1, T // 10)), 0}, reverse=True)
    when = f"after {args.steps} training steps" if args.steps else "at initialisation"
    print(f"mean ||dL/dh_t|| {when}, loss on the last step; {task.describe()}, "
          f"hidden {args.hidden or 64}, batch {batch.target.shape[0]}, seed {seed}")
    if reached:
        print(f"test {task.metric} after training: " +
              ", ".join(f"{c} {v:.4g}" for c, v in reached.items()))
    print("     t " + "".join(f"{c:>12}" for c in curves))
    for t in rows:
        print(f"{t:>6} " + "".join(f"{curves[c][t]:>12.3e}" for c in curves))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gradflow.json"), "w") as f:
        json.dump({"task": task.describe(), "steps": args.steps, "test": reached,
                   "curves": {c: [float(v) for v in n] for c, n in curves.items()}}, f)
    plot_gradflow(curves, os.path.join(args.out, "gradflow.png"),
                  f"||dL/dh_t|| {when}, {task.describe()}")
    print(f"wrote gradflow.png and gradflow.json in {args.out}")
    return 0


# ---------------------------------------------------------------------------- info
def _version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cmd_info(args):
    import numba

    from . import __version__, cuda_unavailable_reason

    print(f"gpurnn {__version__}")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, numba {numba.__version__}, "
          f"numba-cuda {_version('numba-cuda') or 'not installed'}")
    cupy_versions = [f"{d} {_version(d)}" for d in ("cupy-cuda12x", "cupy-cuda13x", "cupy")
                     if _version(d)]
    print(f"cupy: {', '.join(cupy_versions) if cupy_versions else 'not installed'}")
    reason = cuda_unavailable_reason()
    print("backends: cpu (NumPy + Numba CPU kernels): available")
    if reason is None:
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            print("          cuda: Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), not a GPU")
        else:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            print(f"          cuda (CuPy + Numba CUDA kernels): available, GPU {name}")
    else:
        print(f"          cuda: not used: {reason}")
    print(f"device='auto' picks: {'cuda' if reason is None else 'cpu'}")
    return 0


def _blas_threads(n):
    """Limit the BLAS threads while the command runs (no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=min(n, os.cpu_count() or 1), user_api="blas")  # C int


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .study import cmd_study

    commands = {"train": cmd_train, "gradflow": cmd_gradflow, "info": cmd_info,
                "study": cmd_study}
    limit = _blas_threads(args.blas_threads) if hasattr(args, "blas_threads") else \
        contextlib.nullcontext()
    try:
        with limit:
            return commands[args.command](args)
    except (ValueError, RuntimeError, FloatingPointError, OSError, MemoryError) as exc:
        print(f"gpurnn {args.command}: error: {exc}", file=sys.stderr)
        from .distributed import end_after_error

        end_after_error(2)  # under MPI, the other ranks must not wait for this one for ever
        return 2


if __name__ == "__main__":
    sys.exit(main())
