"""Truncated BPTT: ``fit(tbptt=k)`` / ``gpurnn train --tbptt K`` trains in chunks of k steps
with the state carried (no gradient across chunks), one update per chunk with a loss; it equals
a hand-written chunked loop, equals plain training when k >= T, and holds the workspace of k
steps whatever T."""
import numpy as np
import pytest

import gpurnn
from gpurnn.engine import memory
from gpurnn.nn import losses
from gpurnn.training.checkpoint import load_checkpoint
from gpurnn.cli import main
from gpurnn.nn.inference import no_grad
from gpurnn.training.loop import fit
from gpurnn.nn.optim import Adam, clip_grad_norm
from gpurnn.training.tasks import make_task, model_for_task


def _run(task_name, T, cell="gru", seed=0):
    task = make_task(task_name, T)
    model = model_for_task(task, cell, hidden_size=6, seed=seed, dtype="float64")
    return model, task, Adam(model.params, model.grads, lr=1e-2), np.random.default_rng([seed, 2])


def _weights(model):
    return model.state_dict()


def _manual(model, task, opt, rng, steps, batch_size, k):
    """The chunked loop written out with the layer API: chunk i starts from the state chunk
    i-1 ended in (taken from an inference forward, so no gradient reaches it), loss on the
    chunk's own targets, backward, clip, update."""
    for _ in range(steps):
        batch = task.batch(rng, batch_size)
        T = batch.x.shape[0]
        state = None
        for s in range(0, T, k):
            x = model.inputs(batch.x[s:s + k])
            emb = model.embedding.forward(x) if model.embedding is not None else x
            with no_grad():
                _, next_state = model.rnn(emb, state)
            last = s + k >= T
            counted = batch.mask is None or batch.mask[s:s + k].any()
            if (model.head_mode == "all" and counted) or (model.head_mode == "last" and last):
                model.train()
                y = model(batch.x[s:s + k], None, state)
                if model.head_mode == "all":
                    mask = None if batch.mask is None else batch.mask[s:s + k]
                    loss, dy = losses.softmax_cross_entropy(y, batch.target[s:s + k], mask, "mean")
                else:
                    loss, dy = losses.mse(y, batch.target.astype(y.dtype), None, "mean")
                model.backward(dy)
                clip_grad_norm(model.grads, 1.0)
                opt.step()
            state = next_state


@pytest.mark.parametrize("task_name,T,k", [("copy", 11, 4), ("adding", 10, 3)])
def test_tbptt_equals_the_hand_written_chunked_loop(task_name, T, k):
    a = _run(task_name, T)
    history = fit(*a, steps=3, batch_size=4, clip_norm=1.0, tbptt=k)
    b = _run(task_name, T)
    _manual(*b, steps=3, batch_size=4, k=k)
    for name, w in _weights(a[0]).items():
        np.testing.assert_allclose(w, _weights(b[0])[name], rtol=1e-12, atol=1e-14, err_msg=name)
    # updates: one per chunk with a loss (copy: the recall steps are in the last 2 chunks of
    # T=11, k=4; adding: only the last chunk holds the output)
    assert a[2].t == b[2].t == 3 * (2 if task_name == "copy" else 1)
    assert all(np.isfinite(r["loss"]) for r in history)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_tbptt_of_at_least_T_is_plain_training_bit_for_bit(cell):
    plain = _run("copy", 9, cell)
    fit(*plain, steps=3, batch_size=4, clip_norm=1.0)
    for k in (9, 50):
        chunked = _run("copy", 9, cell)
        fit(*chunked, steps=3, batch_size=4, clip_norm=1.0, tbptt=k)
        for name, w in _weights(plain[0]).items():
            assert np.array_equal(w, _weights(chunked[0])[name]), (k, name)


def test_every_chunk_with_a_loss_updates():
    """Head "all" without a mask (the copy task's mask cleared): T=9, k=2 gives 5 updates (the
    last chunk is 1 step); with the mask, only the chunks holding recall steps update."""
    from gpurnn.training.tbptt import train_batch

    model, task, opt, rng = _run("copy", 9)
    batch = task.batch(rng, 3)
    train_batch(model, task, opt, batch, tbptt=2)
    assert opt.t == 3  # recall steps 5..8: chunks 4-5, 6-7 and 8
    batch.mask = None
    loss, _ = train_batch(model, task, opt, batch, tbptt=2)
    assert opt.t == 3 + 5 and np.isfinite(loss)


def test_activation_memory_is_that_of_k_steps(monkeypatch):
    """The layer's workspace after training on a batch of T=60 in chunks of k=5 is that of a
    batch of 5 steps; with free memory for k steps but not for T, training on the whole batch
    is refused before allocating and tbptt trains.  (fit's test-set evaluation is inference,
    a separate call: ``layer.stream`` bounds that.)"""
    from gpurnn.training.tbptt import train_batch

    T, k, B = 60, 5, 4
    long = _run("copy", T)
    train_batch(*long[:3], long[1].batch(long[3], B), tbptt=k)
    short = _run("copy", k)
    train_batch(*short[:3], short[1].batch(short[3], B))
    held = lambda m: sum(ws.nbytes() for ws in m.rnn._workspaces.values())  # noqa: E731
    assert held(long[0]) == held(short[0]) > 0
    for ws in long[0].rnn._workspaces.values():
        assert all(b.shape[0] <= k + 1 for b in ws._buffers.values())

    need_k = long[0].rnn.call_bytes(k, B, True)
    need_T = long[0].rnn.call_bytes(T, B, True)
    assert need_T > 10 * need_k
    monkeypatch.setattr(memory, "free_bytes", lambda backend: 2 * need_k)
    fresh = _run("copy", T)
    batch = fresh[1].batch(fresh[3], B)
    with pytest.raises(gpurnn.OutOfMemory, match=f"T={T}, B={B}"):
        train_batch(*fresh[:3], batch)
    assert not fresh[0].rnn._workspaces
    train_batch(*fresh[:3], batch, tbptt=k)
    # one update per chunk that holds recall steps (the last ceil(length / k) chunks)
    assert fresh[2].t == -(-fresh[1].length // k) >= 1


def test_bad_tbptt_values_and_short_sequences_with_a_last_step_head():
    model, task, opt, rng = _run("adding", 6)
    for bad in (0, -2, 2.5, True, "3"):
        with pytest.raises(ValueError, match="tbptt must be a positive int"):
            fit(model, task, opt, rng, steps=1, batch_size=2, tbptt=bad)
    from gpurnn.training.tbptt import chunks

    batch = task.batch(rng, 3)
    batch.lengths = np.array([6, 4, 6])
    with pytest.raises(ValueError, match="needs full-length sequences"):
        list(chunks(batch, 2, "last"))


def test_cli_tbptt_is_a_run_option(tmp_path, capsys):
    common = ["--task", "copy", "--seq-len", "9", "--hidden", "5", "--batch", "3", "--device",
              "cpu", "--quiet"]
    assert main(["train", "--steps", "2", "--tbptt", "4", "--out", str(tmp_path), *common]) == 0
    assert load_checkpoint(tmp_path / "checkpoint.npz")["config"]["tbptt"] == 4
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path), "--steps", "3", "--tbptt", "2"]) == 2
    assert "--tbptt 2 (checkpoint: 4)" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--steps", "3", "--quiet"]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--tbptt", "0"])
    assert "positive integer" in capsys.readouterr().err
