"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(records, path, title, metric, baseline=None, scored_on="test"):
    """Training loss per step (left) and the metric at each evaluation (right), on the test
    set, or the validation set of a run on data (``scored_on``).

    records: dicts as written to metrics.jsonl (``step``, ``loss``, optional ``test``)."""
    steps = [r["step"] for r in records if "loss" in r]
    loss = [r["loss"] for r in records if "loss" in r]
    tests = [(r["step"], r["test"][metric]) for r in records
             if metric in r.get("test", {}) and "loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(steps, loss, lw=0.6, color="tab:blue")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_title("training loss")
    if tests:
        ax2.plot(*zip(*tests), marker="o", ms=3, color="tab:orange", label="model")
    if baseline is not None:
        ax2.axhline(baseline, ls="--", color="gray", label="baseline")
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"{scored_on} {metric}")
    ax2.set_title(f"{scored_on} {metric}")
    if tests or baseline is not None:
        ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_gradflow(curves, path, title):
    """``||dL/dh_t||`` against t, one curve per label: curves {label: [T] norms}."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, norms in curves.items():
        ax.semilogy(range(len(norms)), norms, label=label)
    ax.set_xlabel("time step t")
    ax.set_ylabel("mean ||dL/dh_t||")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
