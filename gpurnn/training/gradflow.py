"""How far the gradient of the last step's loss reaches back in time: ``||dL/dh_t||``."""
import numpy as np

from ..nn.inference import no_grad


def gradient_flow(model, batch, loss_name):
    """``||dL/dh_t||`` for t = 0..T-1, where ``L`` is the loss on the last step only and
    ``h_t`` the top recurrent layer's hidden state after step t: [T] NumPy, the mean over the
    batch of each sequence's norm (loss summed over sequences, so each is its own loss's).

    Exact, through the layers' own backward: the state after step t is the initial state of
    the rest of the sequence, and a layer's backward returns the gradient of its initial
    state.  So (1) one inference forward of T copies of the batch with lengths 1..T gives the
    states after every step t (all layers; h and c); (2) one training forward of the T
    suffixes x[t+1:], started from those states (lengths T-1-t), and its backward with
    ``dstate = dL/dh_{T-1}`` from the head and no output gradient, give ``dL/dh_t`` (for the
    LSTM: with c_t held, c_t being a state of its own) as the initial-state gradients.
    Needs full-length sequences (``batch.lengths`` None) and a single-direction model.
    """
    if batch.lengths is not None:
        raise ValueError("gradient_flow needs full-length sequences (batch.lengths None)")
    if model.rnn.bidirectional:
        raise ValueError("gradient_flow needs a single-direction model")
    be, xp = model.backend, model.backend.xp
    x = model.inputs(batch.x)
    xe = model.embedding.forward(x) if model.embedding is not None else x  # [T, B, I]
    T, B, I = xe.shape
    lstm = model.rnn.cell.has_cell_state
    # (1) states after each step: column block t holds the batch run for t+1 steps.
    tiled = xp.tile(xe, (1, T, 1))  # [T, T*B, I]
    prefix = np.repeat(np.arange(1, T + 1), B)  # [T*B]
    with no_grad():
        _, states = model.rnn(tiled, lengths=prefix)  # h [L, T*B, H] (and c)
    h_top = states[0][-1] if lstm else states[-1]  # [T*B, H]
    # dL/dh_{T-1} from the head on the last step (sum over sequences).
    h_last = h_top[(T - 1) * B:]  # [B, H]
    y = model.head.forward(h_last)
    target = batch.target[-1] if model.head_mode == "all" else batch.target
    last = type(batch)(x=None, target=target)
    _, dy = model.loss(y, last, loss_name, "sum")
    g = model.head.backward(dy)  # [B, H]
    # (2) suffixes x[t+1:] from the state after step t.
    steps = np.arange(T)[:, None] + 1 + np.arange(T)[None, :]  # [T(t), T(k)] source step
    valid = steps < T
    src = be.asarray(np.where(valid, steps, 0).T)  # [T(k), T(t)]
    suffix = xe[src]  # [T(k), T(t), B, I]
    suffix *= be.asarray(valid.T[:, :, None, None].astype(model.dtype))
    suffix = xp.ascontiguousarray(suffix.reshape(T, T * B, I))
    lengths = np.repeat(T - 1 - np.arange(T), B)  # [T*B]
    model.rnn.train()
    out, _ = model.rnn(suffix, states, lengths=lengths)
    dh_final = be.zeros(states[0].shape if lstm else states.shape, model.dtype)  # [L, T*B, H]
    dh_final[-1] = xp.tile(g, (T, 1))
    dstate = (dh_final, be.zeros(dh_final.shape, model.dtype)) if lstm else dh_final
    _, dstate0 = model.rnn.backward(be.zeros(out.shape, model.dtype), dstate)
    dh = (dstate0[0] if lstm else dstate0)[-1].reshape(T, B, -1)  # [T, B, H]
    norms = xp.sqrt((dh.astype(np.float64) ** 2).sum(axis=2)).mean(axis=1)  # [T]
    return np.asarray(be.to_numpy(norms))
