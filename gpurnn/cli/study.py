"""``gpurnn study``: the long-range claims of recurrent cells measured over cells, sequence
lengths and seeds, as the literature measured them.

    gpurnn study adding                       # the default grid (docs/study.md: hours on a CPU)
    gpurnn study adding --lengths 100,200 --seeds 5 --device cuda --out runs/study
    gpurnn study copy --lengths 20,50 --steps 1500

Each grid point (cell, hidden size, sequence length, seed) is a plain ``gpurnn train`` run in
its own directory ``<out>/runs/<cell>-h<H>-T<len>-seed<s>`` (``metrics.jsonl``,
``checkpoint.npz``), run in this process one after another.  The study is resumable: run the
same command again and finished runs are kept, a run stopped part-way continues from its last
checkpoint (its ``metrics.jsonl`` is first cut back to that checkpoint, so the records equal an
uninterrupted run's, timings apart), a run stopped before its first checkpoint starts afresh.

Equal budgets: every run gets the same optimiser, batch, learning rate and step budget.  The
cells named by ``--match-params`` run twice: at ``--hidden`` (equal H) and at the hidden size
whose parameter count is closest to the LSTM's at ``--hidden`` (equal parameters).

The outcome, written to ``<out>``: ``table.md`` and ``results.json`` (per cell and length: the
best test metric's median and min-max over seeds, the steps to the task's threshold per seed,
training time and sequences/s, the device), ``curves.png`` (the test metric against the step,
one panel per length, one line per cell, the seeds' min-max shaded) and ``gradflow.png``
(``||dL/dh_t||`` at initialisation and after training, each cell at the longest length, the
first seed).
"""
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..training.checkpoint import load_checkpoint
from ..training.gradflow import gradient_flow
from ..training.tasks import make_task, model_for_task
from . import commands as cli

#: per task: the threshold that counts as solved, and why (see docs/study.md)
THRESHOLDS = {
    # the and the literature's criterion: 6% of the 1/6 MSE of predicting the mean
    "adding": 0.01,
    # at most one recalled symbol in a hundred wrong: the copy is exact for almost every
    # sequence of 5 symbols (0.99^5 = 0.95), where chance is 1/8
    "copy": 0.99,
}
DEFAULTS = {
    "adding": {"lengths": "50,100,200,400", "steps": 2000, "lr": 1e-2},
    "copy": {"lengths": "20,50,100,200", "steps": 1500, "lr": 3e-3},
}
#: options that define every run of a study; a study directory refuses others
STUDY_OPTIONS = ("task", "hidden", "batch", "steps", "lr", "eval_every", "threshold",
                 "stop_at_threshold", "dtype")


@dataclass(frozen=True)
class Variant:
    """One model of the grid: a ``--cell`` choice at a hidden size; ``matched``: sized to the
    LSTM's parameter count rather than to ``--hidden``."""

    cell: str
    hidden: int
    params: int
    matched: bool = False

    @property
    def label(self):
        return f"{self.cell} H={self.hidden}" + (" (=LSTM params)" if self.matched else "")


@dataclass
class Study:
    task: str
    variants: list
    lengths: list
    seeds: list
    hidden: int
    batch: int
    steps: int
    lr: float
    eval_every: int
    threshold: float
    stop_at_threshold: bool
    dtype: str
    device: str
    gradflow_batch: int
    out: str

    def options(self):
        return {k: getattr(self, k) for k in STUDY_OPTIONS}

    def runs(self):
        """(variant, length, seed) in the order they run: seed by seed, so a study stopped
        early still covers every cell and length."""
        return [(v, T, s) for s in self.seeds for T in self.lengths for v in self.variants]

    def run_dir(self, variant, length, seed):
        return os.path.join(self.out, "runs", f"{variant.cell}-h{variant.hidden}-T{length}-"
                            f"seed{seed}")

    def command(self):
        cells = ",".join(dict.fromkeys(v.cell for v in self.variants if not v.matched))
        matched = ",".join(v.cell for v in self.variants if v.matched) or "''"
        return (f"gpurnn study {self.task} --cells {cells} --match-params {matched} "
                f"--lengths {','.join(map(str, self.lengths))} --seeds {len(self.seeds)} "
                f"--hidden {self.hidden} --batch {self.batch} --steps {self.steps} "
                f"--lr {self.lr:g} --eval-every {self.eval_every} --threshold {self.threshold:g}"
                + ("" if self.stop_at_threshold else " --full-budget") +
                f" --dtype {self.dtype} --device {self.device} --out {self.out}")


# ---------------------------------------------------------------------------- the grid
def _int_list(text, what):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return sorted(set(values))


def _cell_list(text, what, allow_empty=False):
    cells = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cells if c not in cli.CELL_CHOICES]
    if unknown or not (cells or allow_empty):
        raise ValueError(f"{what} must be comma-separated cells of {sorted(cli.CELL_CHOICES)}, "
                         f"got {text!r}")
    return list(dict.fromkeys(cells))


def parameter_count(cell, hidden, task):
    """Parameters of the ``gpurnn train`` model of ``--cell cell --hidden hidden`` on
    ``task``."""
    name, options = cli.CELL_CHOICES[cell]
    return model_for_task(task, cell=name, hidden_size=hidden, device="cpu", **options) \
        .num_params()


def matching_hidden(cell, target, task):
    """The hidden size whose parameter count is closest to ``target`` (the smaller on a tie)
    and its count: counts grow with H, so a bisection finds the first H at or above it."""
    lo, hi = 1, 1
    while parameter_count(cell, hi, task) < target:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if parameter_count(cell, mid, task) < target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [(abs(parameter_count(cell, h, task) - target), h) for h in (lo - 1, lo) if h]
    hidden = min(candidates)[1]
    return hidden, parameter_count(cell, hidden, task)


def parse_study(args):
    """The Study the ``gpurnn study`` arguments describe; ValueError naming the bad one."""
    task_name = args.task
    defaults = DEFAULTS[task_name]
    lengths = _int_list(args.lengths or defaults["lengths"], "--lengths")
    for T in lengths:
        make_task(task_name, T)  # the task's own limits (the adding problem: T >= 2)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.gradflow_batch < 0:
        raise ValueError(f"--gradflow-batch must be >= 0, got {args.gradflow_batch}")
    cells = _cell_list(args.cells, "--cells")
    matched = _cell_list(args.match_params, "--match-params", allow_empty=True)
    task = make_task(task_name, lengths[0])  # parameter counts do not depend on the length
    variants = [Variant(c, args.hidden, parameter_count(c, args.hidden, task)) for c in cells]
    target = parameter_count("lstm", args.hidden, task)
    for c in matched:
        hidden, count = matching_hidden(c, target, task)
        if hidden != args.hidden or c not in cells:
            variants.append(Variant(c, hidden, count, matched=True))
    threshold = THRESHOLDS[task_name] if args.threshold is None else args.threshold
    return Study(task=task_name, variants=variants, lengths=lengths,
                 seeds=list(range(args.seeds)), hidden=args.hidden, batch=args.batch,
                 steps=args.steps or defaults["steps"], lr=args.lr or defaults["lr"],
                 eval_every=args.eval_every, threshold=threshold,
                 stop_at_threshold=not args.full_budget, dtype=args.dtype, device=args.device,
                 gradflow_batch=args.gradflow_batch,
                 out=args.out or f"gpurnn-study-{task_name}")


def _check_study_dir(study):
    """Record the study's options in ``<out>/study.json``; refuse a directory holding a study
    with other run-defining options (other cells, lengths or seeds may be added)."""
    path = os.path.join(study.out, "study.json")
    mine = study.options()
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)["options"]
        clash = [f"{k} {mine[k]!r} (the study there: {saved.get(k)!r})" for k in STUDY_OPTIONS
                 if saved.get(k) != mine[k]]
        if clash:
            raise ValueError(f"{study.out} holds a study with other options: "
                             + ", ".join(clash) + "; give another --out")
    os.makedirs(study.out, exist_ok=True)
    _write_atomic(path, json.dumps({"options": mine}, indent=1) + "\n")


# ---------------------------------------------------------------------------- one run
def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_records(path):
    """(records, complete) of a ``metrics.jsonl``: a last line cut short by a kill is left out
    (complete False), any other unreadable line is an error.  No file: ([], True)."""
    if not os.path.exists(path):
        return [], True
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    complete = text.endswith("\n") or not text
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON; delete the run's "
                                 f"directory to redo it") from None
    return records, complete


def _finished(record, steps):
    return "loss" in record and (record["step"] >= steps or record.get("stopped")
                                 or record.get("halted"))


def prepare_run(run_dir, expected, steps):
    """Bring a run directory into a state ``gpurnn train`` can continue, and say which:
    "new" (nothing there, or stopped before its first checkpoint: cleared), "resume" (cut back
    to its checkpoint) or "done".  ``expected``: the run's options, which a checkpoint there
    must hold."""
    ckpt_path = os.path.join(run_dir, cli.CHECKPOINT)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(ckpt_path):
        if os.path.isdir(run_dir):
            for name in os.listdir(run_dir):
                os.unlink(os.path.join(run_dir, name))
        return "new"
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt["config"]
    clash = {k: (v, config.get(k)) for k, v in expected.items() if config.get(k) != v}
    if clash:
        raise ValueError(f"{run_dir} holds a run with other options: " + ", ".join(
            f"{k} {c!r} (this study: {v!r})" for k, (v, c) in clash.items()))
    step = ckpt["step"]
    records, complete = read_records(metrics_path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records) or not complete:
        _write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    return "done" if any(_finished(r, steps) and r["step"] == step for r in kept) else "resume"


def _train_argv(study, variant, length, seed, run_dir, state):
    common = ["--steps", str(study.steps), "--eval-every", str(study.eval_every), "--device",
              study.device, "--quiet"]
    if study.stop_at_threshold:
        common += ["--stop-at", repr(study.threshold)]
    if state == "resume":
        return ["train", "--resume", run_dir, *common]
    return ["train", "--task", study.task, "--cell", variant.cell, "--seq-len", str(length),
            "--hidden", str(variant.hidden), "--batch", str(study.batch), "--lr",
            repr(study.lr), "--seed", str(seed), "--dtype", study.dtype, "--out", run_dir,
            *common]


def run_one(study, variant, length, seed):
    """Train one grid point to its budget (or threshold); returns what was done: "trained",
    "resumed" or "kept"."""
    run_dir = study.run_dir(variant, length, seed)
    expected = {"task": study.task, "cell": variant.cell, "seq_len": length,
                "hidden": variant.hidden, "batch": study.batch, "lr": study.lr, "seed": seed,
                "dtype": study.dtype, "steps": study.steps}
    state = prepare_run(run_dir, expected, study.steps)
    if state == "done":
        return "kept"
    args = cli.build_parser().parse_args(_train_argv(study, variant, length, seed, run_dir,
                                                     state))
    try:
        rc = cli.cmd_train(args)
    except (ValueError, RuntimeError, FloatingPointError, OSError, MemoryError) as exc:
        raise type(exc)(f"run {run_dir}: {exc}") from exc
    if rc not in (0, 3):  # 3: stopped at a non-finite loss, recorded as halted
        raise RuntimeError(f"run {run_dir}: gpurnn train returned {rc}")
    return "resumed" if state == "resume" else "trained"


# ---------------------------------------------------------------------------- results
def run_result(run_dir, task, threshold):
    """What a finished run's ``metrics.jsonl`` says: the test metric at each evaluation, its
    best, the first evaluation step at the threshold (None: not reached), the steps trained,
    the training time (the sum of the step times: evaluations and checkpoints left out), the
    wall time (of the ``gpurnn train`` calls that finished: evaluations included, a call
    killed part-way not counted), the median sequences/s, the devices and whether it stopped at
    a non-finite loss."""
    records, _ = read_records(os.path.join(run_dir, "metrics.jsonl"))
    batch = records[0]["config"]["batch"]
    steps = [r for r in records if "loss" in r]
    curve = [(r["step"], r["test"][task.metric]) for r in steps if "test" in r]
    if not curve:
        raise ValueError(f"{run_dir} holds no evaluation: the run did not finish")
    better = max if task.higher_is_better else min
    reached = [s for s, v in curve if (v >= threshold if task.higher_is_better
                                       else v <= threshold)]
    devices = sorted({r["device"] for r in records if r.get("summary")})
    return {"curve": curve, "best": better(v for _, v in curve),
            "steps_to_threshold": reached[0] if reached else None,
            "steps_trained": steps[-1]["step"],
            "train_s": float(sum(batch / r["seq_per_s"] for r in steps)),
            "wall_s": float(sum(r["wall_s"] for r in records if r.get("summary"))),
            "seq_per_s": float(np.median([r["seq_per_s"] for r in steps])),
            "devices": devices, "halted": bool(steps[-1].get("halted"))}


def _spread(values):
    return {"median": float(np.median(values)), "min": float(min(values)),
            "max": float(max(values))}


def summarise(study, results):
    """One table row per (variant, length): results {(variant, length, seed): run_result}."""
    rows = []
    for variant in study.variants:
        for T in study.lengths:
            per_seed = [results[(variant, T, s)] for s in study.seeds]
            rows.append({
                "cell": variant.cell, "hidden": variant.hidden, "params": variant.params,
                "matched_to_lstm_params": variant.matched, "seq_len": T,
                "seeds": study.seeds,
                "best": _spread([r["best"] for r in per_seed]),
                "best_per_seed": [r["best"] for r in per_seed],
                "reached": sum(r["steps_to_threshold"] is not None for r in per_seed),
                "steps_to_threshold_per_seed": [r["steps_to_threshold"] for r in per_seed],
                "steps_trained_per_seed": [r["steps_trained"] for r in per_seed],
                "halted": sum(r["halted"] for r in per_seed),
                "train_s_median": float(np.median([r["train_s"] for r in per_seed])),
                "wall_s_median": float(np.median([r["wall_s"] for r in per_seed])),
                "seq_per_s_median": float(np.median([r["seq_per_s"] for r in per_seed])),
                "devices": sorted({d for r in per_seed for d in r["devices"]}),
            })
    return rows


def _fmt(v):
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.1e}"


def markdown_table(study, rows, task):
    metric = task.metric
    op = ">=" if task.higher_is_better else "<="  # as gpurnn train --stop-at compares
    lines = [
        f"| cell | H | params | T | best test {metric}: median (min-max) | "
        f"steps to {metric} {op} {study.threshold:g}, per seed | training s, wall s "
        f"(medians) | sequences/s (median) | device |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["best"]
        steps = ", ".join("not reached" if s is None else str(s)
                          for s in r["steps_to_threshold_per_seed"])
        halted = f" ({r['halted']} stopped at a non-finite loss)" if r["halted"] else ""
        label = r["cell"] + (" (=LSTM params)" if r["matched_to_lstm_params"] else "")
        lines.append(f"| {label} | {r['hidden']} | {r['params']} | {r['seq_len']} | "
                     f"{_fmt(b['median'])} ({_fmt(b['min'])}-{_fmt(b['max'])}) | "
                     f"{steps}{halted} | {r['train_s_median']:.0f}, {r['wall_s_median']:.0f} | "
                     f"{r['seq_per_s_median']:.0f} | {', '.join(r['devices']) or '?'} |")
    return "\n".join(lines) + "\n"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit():
    """The git commit of this gpurnn checkout (``+dirty`` with uncommitted changes), or None
    for an installed copy."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------- gradient flow
def gradflow_curves(study, variant, seed, length):
    """``||dL/dh_t||`` of one run's model at initialisation and with its final weights, on
    ``study.gradflow_batch`` sequences drawn as ``gpurnn train --gradflow`` draws them; kept
    in the run's ``gradflow.json`` and read from there when it is already computed."""
    run_dir = study.run_dir(variant, length, seed)
    path = os.path.join(run_dir, "gradflow.json")
    ckpt = load_checkpoint(os.path.join(run_dir, cli.CHECKPOINT))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["batch"] == study.gradflow_batch and saved["trained_step"] == ckpt["step"]:
            return saved
    task = make_task(study.task, length)
    name, options = cli.CELL_CHOICES[variant.cell]
    model = model_for_task(task, cell=name, hidden_size=variant.hidden, device=study.device,
                           dtype=study.dtype, seed=seed, **options)
    batch = task.batch(np.random.default_rng([seed, 3]), study.gradflow_batch)
    init = gradient_flow(model, batch, task.loss)
    model.load_state_dict(ckpt["model"])
    trained = gradient_flow(model, batch, task.loss)
    saved = {"batch": study.gradflow_batch, "trained_step": ckpt["step"],
             "init": [float(v) for v in init], "trained": [float(v) for v in trained]}
    _write_atomic(path, json.dumps(saved) + "\n")
    return saved


# ---------------------------------------------------------------------------- figures
def plot_curves(study, results, task, path):
    """Test metric against step, one panel per length, one line per variant: the median over
    seeds, the seeds' min-max shaded.  A run stopped at the threshold keeps its last value."""
    from .plots import plt

    n = len(study.lengths)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.6, 3.6), squeeze=False, sharey=True)
    baseline = task.baseline.get(task.metric)
    for ax, T in zip(axes[0], study.lengths):
        for i, variant in enumerate(study.variants):
            curves = [np.array(results[(variant, T, s)]["curve"]) for s in study.seeds]
            steps = np.unique(np.concatenate([c[:, 0] for c in curves]))  # [E]
            latest = [np.searchsorted(c[:, 0], steps, side="right") - 1 for c in curves]
            table = np.stack([np.where(i >= 0, c[np.maximum(i, 0), 1], np.nan)
                              for c, i in zip(curves, latest)])  # [seeds, E]: latest value
            color = f"C{i}"
            ax.plot(steps, np.nanmedian(table, axis=0), color=color, lw=1.4,
                    ls="--" if variant.matched else "-", label=variant.label)
            ax.fill_between(steps, np.nanmin(table, axis=0), np.nanmax(table, axis=0),
                            color=color, alpha=0.18, lw=0)
        if baseline is not None:
            ax.axhline(baseline, color="gray", lw=0.8, ls=":", label="baseline")
        ax.axhline(study.threshold, color="black", lw=0.8, ls="-.", label="threshold")
        if not task.higher_is_better:
            ax.set_yscale("log")
        ax.set_title(f"T = {T}", fontsize=10)
        ax.set_xlabel("training step")
    axes[0][0].set_ylabel(f"test {task.metric}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    held = "; a run stopped at the threshold keeps its last value" \
        if study.stop_at_threshold else ""
    fig.suptitle(f"{study.task}: median over {len(study.seeds)} seeds, min-max shaded{held}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_gradflow_panels(curves, path, title):
    """Two panels, at initialisation and after training: ``||dL/dh_t||`` against t, one line
    per label; curves {label: gradflow_curves(...)}."""
    from .plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, name in zip(axes, ("init", "trained"), ("at initialisation", "after training")):
        for i, (label, c) in enumerate(curves.items()):
            norms = np.asarray(c[key])
            ax.semilogy(np.arange(norms.shape[0]), np.where(norms > 0, norms, np.nan),
                        color=f"C{i}", label=label + (f" (step {c['trained_step']})"
                                                      if key == "trained" else ""))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("time step t")
    axes[0].set_ylabel("mean ||dL/dh_t||")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- command
def add_parser(sub):
    st = sub.add_parser("study", help="a grid of training runs: cells x lengths x seeds",
                        description="Train every cell at every sequence length with every "
                        "seed (each a gpurnn train run in its own directory), then write the "
                        "table (table.md, results.json) and the figures (curves.png, "
                        "gradflow.png). Run the same command again to continue a stopped "
                        "study: finished runs are kept.")
    st.add_argument("task", choices=sorted(DEFAULTS))
    st.add_argument("--cells", default="rnn,lstm,gru,gru-reset-after",
                    help=f"comma-separated cells of {', '.join(cli.CELL_CHOICES)} "
                    f"(default: all)")
    st.add_argument("--match-params", default="gru", help="cells also run at the hidden size "
                    "whose parameter count is closest to the LSTM's at --hidden (default gru; "
                    "'' for none)")
    st.add_argument("--lengths", help="comma-separated sequence lengths (adding: "
                    f"{DEFAULTS['adding']['lengths']}; copy: {DEFAULTS['copy']['lengths']})")
    st.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    st.add_argument("--hidden", type=cli._positive_int, default=64, help="hidden size (64)")
    st.add_argument("--batch", type=cli._positive_int, default=32, help="sequences per step (32)")
    st.add_argument("--steps", type=cli._positive_int, help="step budget of every run "
                    f"(adding: {DEFAULTS['adding']['steps']}; copy: "
                    f"{DEFAULTS['copy']['steps']})")
    st.add_argument("--lr", type=cli._positive_float, help="Adam's learning rate (adding: "
                    f"{DEFAULTS['adding']['lr']:g}; copy: {DEFAULTS['copy']['lr']:g})")
    st.add_argument("--eval-every", type=cli._positive_int, default=50,
                    help="steps between test evaluations and checkpoints (50)")
    st.add_argument("--threshold", type=float, help="test metric that counts as solved "
                    f"(adding: MSE {THRESHOLDS['adding']}; copy: accuracy {THRESHOLDS['copy']})")
    st.add_argument("--full-budget", action="store_true", help="train every run for all "
                    "--steps (default: stop at the first evaluation at the threshold)")
    st.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    st.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    st.add_argument("--blas-threads", type=cli._positive_int, default=1,
                    help="BLAS threads on the CPU (1)")
    st.add_argument("--gradflow-batch", type=int, default=4, help="sequences of the gradient-"
                    "flow measurement at the longest length (4; 0 for none): it holds T copies "
                    "of them, 2.6 GB for an LSTM at T=400, H=64")
    st.add_argument("--out", help="study directory (default gpurnn-study-<task>)")
    return st


def cmd_study(args):
    study = parse_study(args)
    commit = _commit()  # of the code that trains, should the checkout change meanwhile
    _check_study_dir(study)
    task = make_task(study.task, study.lengths[0])
    print(f"gpurnn study: {len(study.runs())} runs ({len(study.variants)} models x "
          f"{len(study.lengths)} lengths x {len(study.seeds)} seeds) in {study.out}; models: "
          + "; ".join(f"{v.label}: {v.params} parameters" for v in study.variants),
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    results = {}
    for i, (variant, T, seed) in enumerate(study.runs()):
        t_run = time.perf_counter()
        done = run_one(study, variant, T, seed)
        results[(variant, T, seed)] = run_result(study.run_dir(variant, T, seed),
                                                 make_task(study.task, T), study.threshold)
        r = results[(variant, T, seed)]
        print(f"[{i + 1}/{len(study.runs())}] {variant.label} T={T} seed {seed}: {done}; "
              f"best {task.metric} {_fmt(r['best'])}, threshold at step "
              f"{r['steps_to_threshold'] or 'not reached'} "
              f"({time.perf_counter() - t_run:.0f} s)", file=sys.stderr, flush=True)
    rows = summarise(study, results)
    gradflow = {}
    if study.gradflow_batch:
        T = study.lengths[-1]
        for variant in study.variants:
            gradflow[variant.label] = gradflow_curves(study, variant, study.seeds[0], T)
        plot_gradflow_panels(gradflow, os.path.join(study.out, "gradflow.png"),
                             f"||dL/dh_t||, loss on the last step: {study.task} T={T}, seed "
                             f"{study.seeds[0]}, {study.gradflow_batch} sequences")
    plot_curves(study, results, task, os.path.join(study.out, "curves.png"))
    info = {"command": study.command(), "date": datetime.datetime.now().isoformat(
        timespec="seconds"), "commit": commit, "cpu": _cpu_model(),
        "python": platform.python_version(), "study_wall_s_this_call":
        round(time.perf_counter() - t0, 1)}
    table = markdown_table(study, rows, task)
    _write_atomic(os.path.join(study.out, "table.md"), table)
    payload = {"info": info, "options": study.options(),
               "models": [asdict(v) for v in study.variants],
               "lengths": study.lengths, "seeds": study.seeds,
               "metric": task.metric, "higher_is_better": task.higher_is_better,
               "baseline": task.baseline.get(task.metric), "rows": rows,
               "runs": [{"cell": v.cell, "hidden": v.hidden, "seq_len": T, "seed": s,
                         **results[(v, T, s)]} for v, T, s in study.runs()],
               "gradflow": {"seq_len": study.lengths[-1], "seed": study.seeds[0],
                            "curves": gradflow} if gradflow else None}
    _write_atomic(os.path.join(study.out, "results.json"), json.dumps(payload, indent=1) + "\n")
    print(table)
    print(f"wrote table.md, results.json, curves.png{', gradflow.png' if gradflow else ''} in "
          f"{study.out} ({info['study_wall_s_this_call']:.0f} s)")
    return 0
