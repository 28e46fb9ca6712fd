"""The ``gpurnn`` commands ``train``, ``evaluate``, ``predict``, ``gradflow``, ``info`` (``study``
is cli/study.py; cli/app.py puts them together).

    gpurnn train                      # an LSTM on the adding problem, about a minute on a CPU
    gpurnn train --task digits --cell gru --steps 2000 --out runs/digits
    gpurnn train --resume runs/digits --steps 4000     # continue exactly where it stopped
    gpurnn train --data x.npz --epochs 20 --out runs/mine   # your own data (.npz or .csv)
    gpurnn evaluate runs/mine --data test.npz
    gpurnn predict runs/mine --data new.npz --out preds.npz
    gpurnn gradflow --task adding --seq-len 100        # ||dL/dh_t|| of RNN vs LSTM vs GRU
    gpurnn study adding                                # cells x lengths x seeds (cli/study.py)
    gpurnn info
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

from ..engine.backend import DEVICES
from ..nn.data import HEADS
from ..nn.losses import LOSSES, REDUCTIONS
from ..nn.model import CELLS
from ..nn.optim import OPTIMIZERS
from ..nn.validation import DTYPES
from ..training.model import CHECKPOINT, DEFAULT_LR, EVAL_BATCH
from ..training.nonfinite import POLICIES
from ..training.tasks import TASK_DEFAULTS, TASKS

#: --cell choices: the model's cell and its options (gru: the source document's form, reset
#: before the recurrent product; gru-reset-after: cuDNN's and PyTorch's)
CELL_CHOICES = {**{name: (name, {}) for name in CELLS},
                "gru-reset-after": ("gru", {"reset_after": True})}
#: options that define a run; on --resume they come from the checkpoint
RUN_OPTIONS = ("task", "data", "val_data", "val_split", "loss", "head", "cell", "seq_len",
               "hidden", "layers", "batch", "lr", "optimizer", "clip", "clip_value", "seed",
               "dtype", "reduction", "tbptt")
#: options of a run on the user's data only (--data)
DATA_OPTIONS = ("val_data", "val_split", "loss", "head")
#: the defaults of a run on the user's data (the learning rate: DEFAULT_LR of the optimiser)
DATA_DEFAULTS = {"cell": "lstm", "hidden": 64, "layers": 1, "batch": 32, "optimizer": "adam",
                 "clip": 1.0, "clip_value": None, "seed": 0, "dtype": "float32",
                 "reduction": "mean", "val_data": None, "val_split": None, "loss": None,
                 "head": None, "epochs": 10}


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


def _fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}")
    return value


def _add_device_options(p):
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--blas-threads", type=_positive_int, default=1,
                   help="BLAS threads on the CPU (default 1: the per-step products are small, "
                   "and threads spinning on a busy CPU cost up to 6x here; needs threadpoolctl). "
                   "Runs repeat bit for bit at one thread count; another count changes "
                   "results by float32 rounding")


def _add_model_options(p):
    p.add_argument("--task", choices=list(TASKS))
    p.add_argument("--seq-len", type=_positive_int, help="sequence length (task's default)")
    p.add_argument("--hidden", type=_positive_int, help="hidden size")
    p.add_argument("--batch", type=_positive_int, help="sequences per step")
    p.add_argument("--seed", type=int, help="seed of the weights and the data (default 0)")
    p.add_argument("--dtype", choices=DTYPES)
    _add_device_options(p)


def build_parser(extra=()):
    """The parser of these commands, and of the commands ``extra`` adds: each an
    ``add_parser(subparsers)`` of a module above this one (cli/app.py)."""
    parser = argparse.ArgumentParser(prog="gpurnn", description="Recurrent networks (RNN, LSTM, "
                                     "GRU) with BPTT on GPUs and CPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model on your data or an embedded task",
                        description="Train a recurrent model on your data (--data) or on an "
                        "embedded task. With no options: an LSTM on the adding problem (length "
                        f"{TASK_DEFAULTS['adding']['seq_len']}), about a minute on a laptop CPU.")
    _add_model_options(tr)
    tr.add_argument("--data", help="train on this file instead of a task: .npz with x, y "
                    "(optional lengths, x_val, y_val, lengths_val) or .csv (docs/training.md)")
    tr.add_argument("--val-data", help="validation file (format of --data), scored after "
                    "every epoch")
    tr.add_argument("--val-split", type=_fraction, help="hold out this fraction of --data "
                    "(its last sequences) for validation")
    tr.add_argument("--loss", choices=sorted(LOSSES), help="with --data: default from y "
                    "(integer labels: cross_entropy; floats: mse)")
    tr.add_argument("--head", choices=HEADS, help="with --data: an output at every step (all) "
                    "or per sequence (last); default from y's shape")
    tr.add_argument("--epochs", type=_positive_int, help="with --data: passes over the data "
                    f"(default {DATA_DEFAULTS['epochs']}; --steps counts batches instead)")
    tr.add_argument("--cell", choices=list(CELL_CHOICES), help="gru: the source document's "
                    "form (reset before the recurrent product); gru-reset-after: PyTorch's "
                    "(default lstm)")
    tr.add_argument("--layers", type=_positive_int, help="stacked recurrent layers (default 1)")
    tr.add_argument("--steps", type=_positive_int, help="total training steps (a resumed run "
                    "continues up to this many)")
    tr.add_argument("--lr", type=_positive_float, help="learning rate")
    tr.add_argument("--optimizer", choices=list(OPTIMIZERS))
    tr.add_argument("--clip", type=float, help="clip gradients to this global norm "
                    "(default 1.0; 0 for none)")
    tr.add_argument("--clip-value", type=_positive_float, help="clip each gradient entry to "
                    "[-v, v]")
    tr.add_argument("--tbptt", type=_positive_int, help="truncated BPTT: train in chunks of "
                    "this many steps, the state carried across, an update per chunk")
    tr.add_argument("--on-nonfinite", choices=POLICIES, default="stop",
                    help="a NaN or Inf in the loss or gradients (never applied to the weights): "
                    "stop at the last good weights and save them, exit 3 (default); skip the "
                    "batch; or raise an error, exit 2")
    tr.add_argument("--reduction", choices=REDUCTIONS, help="loss over positions: mean "
                    "(default) or sum (the seed's sum over time)")
    tr.add_argument("--eval-every", type=_positive_int, help="steps between test evaluations "
                    "(default steps/10; with --data every epoch)")
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

    ev = sub.add_parser("evaluate", help="score a trained run on data",
                        description="Load a run's checkpoint (architecture and weights) and "
                        "print its metrics on a data file, or, for a run on an embedded task "
                        "given no --data, on the task's test set.")
    ev.add_argument("run", help="a run directory (holding checkpoint.npz) or a checkpoint file")
    ev.add_argument("--data", help=".npz or .csv with x, y (and lengths), as for train")
    ev.add_argument("--batch", type=_positive_int, default=EVAL_BATCH,
                    help=f"sequences per forward (default {EVAL_BATCH})")
    _add_device_options(ev)

    pr = sub.add_parser("predict", help="run a trained model on data, write its outputs",
                        description="Load a run's checkpoint and write the model's outputs on "
                        "the inputs of a data file to an .npz: y_pred ([N, T, K] per step, zero "
                        "past each length, or [N, K]), and for a classifier labels (argmax; -1 "
                        "past each length).")
    pr.add_argument("run", help="a run directory (holding checkpoint.npz) or a checkpoint file")
    pr.add_argument("--data", required=True, help=".npz or .csv with x (and lengths); y unused")
    pr.add_argument("--out", required=True, help="the .npz to write (atomically)")
    pr.add_argument("--batch", type=_positive_int, default=EVAL_BATCH,
                    help=f"sequences per forward (default {EVAL_BATCH})")
    _add_device_options(pr)

    sub.add_parser("info", help="version, backends, GPU, and why CUDA is not used")
    for add_parser in extra:
        add_parser(sub)
    return parser


# ---------------------------------------------------------------------------- train
def _run_config(args, checkpoint):
    """The run's options: from the checkpoint on resume (explicit options must agree), else
    from the arguments and the defaults (the task's, or ``DATA_DEFAULTS`` for --data)."""
    given = {k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k) is not None}
    for k in ("data", "val_data"):
        if k in given:
            given[k] = os.path.abspath(given[k])
    if checkpoint is not None:
        config = dict(checkpoint["config"])
        if config.get("task") not in TASKS and not isinstance(config.get("data"), str):
            raise ValueError("the checkpoint is not of a gpurnn train run (no task nor data "
                             "file in its config; Model.fit writes such): gpurnn evaluate and "
                             "predict read it, and gpurnn.load_model in Python")
        clash = {k: (v, config.get(k)) for k, v in given.items() if config.get(k) != v}
        if clash:
            raise ValueError("options differ from the checkpoint's run: " + ", ".join(
                f"--{k.replace('_', '-')} {v} (checkpoint: {c})" for k, (v, c) in clash.items()))
        return config
    if "data" in given:
        wrong = [k for k in ("task", "seq_len") if k in given]
        if wrong:
            raise ValueError(f"--data trains on your file: {', '.join(_flag(k) for k in wrong)} "
                             f"do not apply")
        config = {**DATA_DEFAULTS, **given}
        config.pop("epochs")
        config.setdefault("lr", DEFAULT_LR[config["optimizer"]])
        return config
    wrong = [k for k in DATA_OPTIONS if k in given]
    if wrong:
        verb = "applies" if len(wrong) == 1 else "apply"
        raise ValueError(f"{', '.join(_flag(k) for k in wrong)} {verb} to --data runs only")
    task = given.get("task", "adding")
    config = {"task": task, "cell": "lstm", "layers": 1, "optimizer": "adam", "clip": 1.0,
              "clip_value": None, "seed": 0, "dtype": "float32", "reduction": "mean",
              **{k: v for k, v in TASK_DEFAULTS[task].items() if k != "steps"}}
    config.update(given)
    return config


def _flag(option):
    return "--" + option.replace("_", "-")


def _make_run(config, device):
    """(task, model, optimizer, data generator) of a run on an embedded task."""
    from ..engine.backend import get_backend
    from ..training.tasks import make_task, model_for_task
    from .preflight import check_run_fits

    task = make_task(config["task"], config["seq_len"])
    cell, options = CELL_CHOICES[config["cell"]]
    check_run_fits({**config, "cell": cell}, task.model_kwargs(), get_backend(device))
    model = model_for_task(task, cell=cell, hidden_size=config["hidden"],
                           num_layers=config["layers"], device=device, dtype=config["dtype"],
                           seed=config["seed"], **options)
    return task, model, _optimizer(config, model), _data_rng(config)


def _optimizer(config, model):
    return OPTIMIZERS[config["optimizer"]](model.params, model.grads, lr=config["lr"])


def _data_rng(config):
    return np.random.default_rng([config["seed"], 2])  # the data stream, apart from the weights'


def _read_data(path, need_y, what="--data"):
    """The arrays of a data file; y required when ``need_y``."""
    from ..interop.datafiles import DataError, read_data

    data = read_data(path)
    if need_y and "y" not in data:
        raise DataError(f"{path}: no targets (y): {what} needs them"
                        + ("" if path.lower().endswith(".npz") else
                           " (a CSV column named y or y_...)"))
    return data


def _file_digest(path):
    """SHA-256 of the file at ``path``, hex (read in 1 MiB blocks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_data_unchanged(config):
    """Record the SHA-256 of the run's data files in ``config`` (a new run), or refuse a resumed
    run whose files changed since: its batches would no longer be the ones it started on."""
    for key in ("data", "val_data"):
        path = config.get(key)
        if not path:
            continue
        seen, now = config.get(f"{key}_sha256"), _file_digest(path)
        if seen is not None and seen != now:
            raise ValueError(f"{path} changed since this run started (SHA-256 {now[:12]}..., "
                             f"the run's {seen[:12]}...): a resumed run must train on the same "
                             f"data; start a new run (another --out) to train on this file")
        config[f"{key}_sha256"] = now


def _on_data(path, work):
    """``work()``, its ValueError or TypeError about the data said as a ``DataError`` of
    ``path``: one line, whatever the kind."""
    from ..interop.datafiles import DataError

    try:
        return work()
    except DataError:
        raise
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: {exc}") from exc


def _make_data_run(config, device):
    """(task, model, optimizer, data generator) of a run on the user's data (--data); fills
    the config's ``loss`` and ``head`` from the data where they were not given."""
    from ..engine.backend import get_backend
    from ..training.data import ArrayTask, describe_arrays, split_validation
    from ..training.model import Model
    from .preflight import check_run_fits

    data = _read_data(config["data"], need_y=True)
    train = (data["x"], data["y"], data.get("lengths"))
    validation = None
    if "x_val" in data:
        if config["val_data"] or config["val_split"]:
            raise ValueError(f"{config['data']} holds x_val: give no --val-data or --val-split")
        validation = (data["x_val"], data["y_val"], data.get("lengths_val"))
    if config["val_data"] and config["val_split"]:
        raise ValueError("give --val-data or --val-split, not both")
    if config["val_data"]:
        v = _read_data(config["val_data"], need_y=True, what="--val-data")
        validation = (v["x"], v["y"], v.get("lengths"))
    kwargs, _ = _on_data(config["data"], lambda: describe_arrays(
        *train, config["loss"], config["head"], validation))
    config["loss"], config["head"] = kwargs.pop("loss"), kwargs["head"]
    cell, options = CELL_CHOICES[config["cell"]]
    check_run_fits({**config, "cell": cell}, kwargs, get_backend(device))
    model = Model(cell, hidden_size=config["hidden"], num_layers=config["layers"],
                  device=device, dtype=config["dtype"], seed=config["seed"], **kwargs, **options)
    if config["val_split"]:
        train, validation = _on_data(config["data"], lambda: split_validation(
            model, *train, config["loss"], config["val_split"]))
    task = _on_data(config["data"], lambda: ArrayTask(model, train, validation, config["loss"],
                                                      eval_batch=EVAL_BATCH))
    return task, model, _optimizer(config, model), _data_rng(config)


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
    from ..training.gradflow import gradient_flow

    norms = gradient_flow(model, batch, task.loss)
    return {"label": label, "norms": [float(v) for v in norms]}


def _steps(args, checkpoint, config, per_epoch):
    """Total steps of the run: --steps, else --epochs (runs on data), else the checkpoint's
    total, else the default (the task's steps, or DATA_DEFAULTS' epochs)."""
    if args.steps:
        return args.steps
    if args.epochs:
        if per_epoch is None:
            raise ValueError("--epochs applies to --data runs; give --steps for a task")
        return args.epochs * per_epoch
    if checkpoint and checkpoint["config"].get("steps"):
        return checkpoint["config"]["steps"]
    if per_epoch is None:
        return TASK_DEFAULTS[config["task"]]["steps"]
    return DATA_DEFAULTS["epochs"] * per_epoch


def cmd_train(args):
    from tqdm import tqdm

    from ..training import distributed
    from ..training.checkpoint import load_checkpoint, restore, save_checkpoint
    from ..training.loop import fit
    from ..training.loss_scale import scaler_for
    from .plots import plot_gradflow, plot_training

    checkpoint = None
    if args.resume is not None:  # an empty path is an error, not "no resume"
        resume_path = _resolve_resume(args.resume)
        checkpoint = load_checkpoint(resume_path)
    config = _run_config(args, checkpoint)
    on_data = config.get("data") is not None
    dp = distributed.data_parallel(config["batch"], args.device)  # None unless under MPI
    if dp is not None and on_data:
        raise ValueError("data-parallel training (mpirun) runs on the embedded tasks; train on "
                         "--data in one process")
    root = distributed.world().is_root  # rank 0 alone writes files and shows progress
    name = os.path.splitext(os.path.basename(config["data"]))[0] if on_data else config["task"]
    out = args.out if args.out is not None else (
        os.path.dirname(os.path.abspath(resume_path)) if checkpoint else
        os.path.join("gpurnn-runs", f"{name}-{config['cell']}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if not checkpoint and any(os.path.exists(os.path.join(out, f))
                              for f in (CHECKPOINT, "metrics.jsonl")):
        raise ValueError(f"{out} already holds a run: continue it with --resume {out}, or give "
                         f"another --out")
    inferred = on_data and not checkpoint and (config["loss"] is None or config["head"] is None)
    if on_data:
        _check_data_unchanged(config)
    make = _make_data_run if on_data else _make_run
    task, model, optimizer, rng = make(config, args.device)
    per_epoch = task.steps_per_epoch(config["batch"]) if on_data else None
    steps = _steps(args, checkpoint, config, per_epoch)
    config["steps"] = steps
    if root:  # only once the run could be built: a refused run leaves no empty directory
        os.makedirs(out, exist_ok=True)
    scaler = scaler_for(model)  # float16: dynamic loss scaling, resumed with the run
    start = restore(checkpoint, model, optimizer, rng, scaler) if checkpoint else 0
    if dp is not None:
        dp.broadcast_start(model, rng)
    if start >= steps:
        raise ValueError(f"the checkpoint is at step {start}: give --steps above it to continue")
    metrics_path = os.path.join(out, "metrics.jsonl")
    ckpt_path = os.path.join(out, CHECKPOINT)
    eval_every = args.eval_every or per_epoch or max(1, steps // 10)
    ckpt_every = args.checkpoint_every or eval_every
    clip = config["clip"] or None
    scored_on = "validation" if on_data else "test"
    if root:
        how = " (loss and head inferred from y; override with --loss, --head)" if inferred else ""
        epochs = f" ({steps / per_epoch:.3g} epochs of {per_epoch})" if on_data else ""
        print(f"gpurnn train: {task.describe()}{how}; {model!r}, {model.num_params()} "
              f"parameters; {config['optimizer']} lr {config['lr']}, batch {config['batch']}, "
              f"steps {start + 1}..{steps}{epochs}; run directory {out}", file=sys.stderr)
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
        if record.get("test"):
            bar.write(f"step {record['step']}: {scored_on} " + ", ".join(
                f"{k} {v:.4g}" for k, v in record["test"].items()))
        if record["step"] % ckpt_every == 0 or record["step"] == steps or record.get("stopped") \
                or record.get("halted"):
            save_checkpoint(ckpt_path, model, optimizer, record["step"], rng, config, scaler)
        bar.set_postfix(loss=f"{record['loss']:.4g}", seq_s=f"{record['seq_per_s']:.0f}",
                        refresh=False)
        bar.update(1)

    t0 = time.perf_counter()
    history = fit(model, task, optimizer, rng, steps, config["batch"], start_step=start,
                  reduction=config["reduction"], clip_norm=clip, clip_value=config["clip_value"],
                  eval_every=eval_every, stop_at=args.stop_at,
                  on_step=on_step if root else None, data_parallel=dp,
                  tbptt=config.get("tbptt"), on_nonfinite=args.on_nonfinite, scaler=scaler)
    bar.close()
    if not root:
        return 0
    wall = time.perf_counter() - t0
    final = history[-1]["test"]
    last_step = history[-1]["step"]

    records = _read_jsonl(metrics_path)
    metric = task.metric
    shape = f"T={task.seq_len}"
    title = f"{name} ({shape}), {config['cell']} H={config['hidden']}"
    plot_training(records, os.path.join(out, "loss.png"), title, metric,
                  task.baseline.get(metric), scored_on)
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
    if "loss_scale" in history[-1]:  # float16: dynamic loss scaling (training/loss_scale.py)
        summary["overflow_skipped"] = sum(r["overflow_skipped"] for r in history)
        summary["loss_scale"] = history[-1]["loss_scale"]
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
        print(f"  {scored_on} {k}: {v:.4g}" + (f"   (baseline: {base:.4g})" if base else ""))
    if "overflow_skipped" in summary:
        print(f"  float16 loss scaling: {summary['overflow_skipped']} update(s) skipped on "
              f"overflow, final scale {summary['loss_scale']:g}")
    if on_data and not final:
        print("  no validation data: --val-split, --val-data or x_val/y_val score the model")
    print(f"  wrote {', '.join(written)} in {out}")
    return 3 if halted else 0


# ---------------------------------------------------------------------------- evaluate, predict
def _load_run(path, device):
    """(model, run config) of a run directory or checkpoint file."""
    from ..training.checkpoint import load_checkpoint
    from ..training.model import model_from_checkpoint, run_file

    loaded = load_checkpoint(run_file(path))
    return model_from_checkpoint(loaded, device), loaded["config"], loaded["step"]


def _run_loss(config):
    """The loss a run trained with: its config's (runs on data, ``Model.fit``), else its
    task's."""
    if config.get("loss") in LOSSES:
        return config["loss"]
    if config.get("task") in TASKS:
        return TASKS[config["task"]].loss
    raise ValueError(f"the run's config names no loss nor embedded task: {sorted(config)}")


def cmd_evaluate(args):
    from ..training.loop import evaluate
    from ..training.tasks import make_task

    model, config, step = _load_run(args.run, args.device)
    if args.data is None:
        if config.get("task") not in TASKS:
            raise ValueError("give --data FILE: this run did not train on an embedded task")
        task = make_task(config["task"], config.get("seq_len"))
        what = f"the test set of {task.describe()}"
        metrics = evaluate(model, task)
    else:
        data = _read_data(args.data, need_y=True, what="evaluate")
        what = args.data
        metrics = _on_data(args.data, lambda: model.evaluate(
            data["x"], data["y"], data.get("lengths"), loss=_run_loss(config),
            batch_size=args.batch))
    print(f"gpurnn evaluate: {model!r} (step {step} of {args.run}) on {what}", file=sys.stderr)
    for k, v in metrics.items():
        print(f"{k} {v:.6g}")
    return 0


def cmd_predict(args):
    from ..interop.datafiles import write_predictions

    model, config, step = _load_run(args.run, args.device)
    data = _read_data(args.data, need_y=False)
    lengths = data.get("lengths")
    y = _on_data(args.data, lambda: model.predict(data["x"], lengths, batch_size=args.batch))
    out = {"y_pred": model.backend.to_numpy(y)}
    if _run_loss(config) == "cross_entropy":
        labels = out["y_pred"].argmax(axis=-1)  # [N, T] or [N]
        if lengths is not None and model.head_mode == "all":
            labels[np.arange(labels.shape[1])[None, :] >= np.asarray(lengths)[:, None]] = -1
        out["labels"] = labels
    if lengths is not None:
        out["lengths"] = np.asarray(lengths)
    if "sequence" in data:
        out["sequence"] = data["sequence"]
    write_predictions(args.out, out)
    print(f"gpurnn predict: {model!r} (step {step} of {args.run}) on {args.data}: wrote "
          + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items()) + f" to {args.out}")
    return 0


# ---------------------------------------------------------------------------- gradflow
def cmd_gradflow(args):
    from ..nn.optim import Adam
    from ..training.gradflow import gradient_flow
    from ..training.loop import fit
    from ..training.tasks import make_task, model_for_task
    from .plots import plot_gradflow

    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    name = args.task or "adding"
    task = make_task(name, args.seq_len)
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

    from .. import __version__, cuda_unavailable_reason

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
            print(f"          {_cuda_paths()}")
    else:
        print(f"          cuda: not used: {reason}")
    print(f"device='auto' picks: {'cuda' if reason is None else 'cpu'}")
    return 0


def _cuda_paths():
    """One line on how the CUDA backend runs a layer here: launches, graphs, fused step kernels
    when asked for, GEMM precision."""
    from ..engine.backend import get_backend

    be = get_backend("cuda")
    reason = be.graphs_unavailable_reason()
    graphs = ("time loops replayed as CUDA graphs" if be.graphs_active()
              else f"no CUDA graphs ({reason or 'GPURNN_CUDA_GRAPHS=0'})")
    fused = ", fused step kernels (GPURNN_FUSED_STEPS=1)" if be.fused else ""
    tf32 = "TF32 GEMMs (GPURNN_TF32=0: strict float32)" if be.tf32 else "strict float32 GEMMs"
    return f"launch={be.launch}, {graphs}{fused}, {tf32}"


def _blas_threads(n):
    """Limit the BLAS threads while the command runs (no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=min(n, os.cpu_count() or 1), user_api="blas")  # C int


#: the commands defined here, by name
COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "gradflow": cmd_gradflow, "info": cmd_info}


def run(args, commands):
    """Run the command ``args`` names (``commands``: name -> function of ``args``): its
    errors become one line on stderr and exit status 2, never a traceback."""
    limit = _blas_threads(args.blas_threads) if hasattr(args, "blas_threads") else \
        contextlib.nullcontext()
    try:
        with limit:
            return commands[args.command](args)
    except (ValueError, RuntimeError, FloatingPointError, OSError, MemoryError) as exc:
        print(f"gpurnn {args.command}: error: {exc}", file=sys.stderr)
        from ..training.distributed import end_after_error

        end_after_error(2)  # under MPI, the other ranks must not wait for this one for ever
        return 2

