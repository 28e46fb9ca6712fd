"""``gpurnn.torch.LSTM/GRU/RNN``: drop-in ``torch.nn`` modules running gpurnn's kernels.

Checked against ``torch.nn.LSTM/GRU/RNN`` with the same weights (float64, CPU): outputs, final
states and every gradient, for plain, batch_first, unbatched and PackedSequence input; a
training loop with torch.optim gives the same losses step for step; gradcheck; torch.compile;
no copy of the parameters or the input (same data pointers).  The CUDA path (DLPack to CuPy on
PyTorch's stream) cannot run here: no GPU.
"""
import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gpurnn.torch")
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

F64 = torch.float64
# Same math in another order of floating-point sums (gpurnn's whole-sequence GEMMs).
TOL = dict(rtol=1e-9, atol=1e-11)
CELLS = [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
         ("RNN", {"nonlinearity": "relu"})]
IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def twins(cell, opts, *args, **kwargs):
    """(torch.nn module, gpurnn.torch module) with the same weights, float64."""
    ref = getattr(torch.nn, cell)(*args, **opts, **kwargs, dtype=F64)
    mine = getattr(gt, cell)(*args, **opts, **kwargs, dtype=F64)
    mine.load_state_dict(ref.state_dict())  # strict: the same names and shapes
    assert isinstance(mine, type(ref))
    return ref, mine


def random_hx(cell, shape, gen):
    n = 2 if cell == "LSTM" else 1
    parts = tuple((0.5 * torch.randn(shape, dtype=F64, generator=gen)).requires_grad_()
                  for _ in range(n))
    return parts if n == 2 else parts[0]


def flat(result):
    """All tensors of a module's result, packed outputs as their data."""
    out, state = result
    out = out.data if hasattr(out, "batch_sizes") else out
    return [out] + (list(state) if isinstance(state, tuple) else [state])


def grads_of(module, result, leaves, gen):
    tensors = flat(result)
    loss = sum((t * torch.randn(t.shape, dtype=F64, generator=gen)).sum() for t in tensors)
    return torch.autograd.grad(loss, list(leaves) + list(module.parameters()))


def assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_allclose(x.detach().numpy(), y.detach().numpy(), err_msg=str(i), **TOL)


def compare(ref, mine, call, leaves, seed):
    """Run ``call(module)`` on both, compare results and gradients (same random cotangents)."""
    r, m = call(ref), call(mine)
    assert_same(flat(r), flat(m))
    gr = grads_of(ref, r, leaves, torch.Generator().manual_seed(seed))
    gm = grads_of(mine, m, leaves, torch.Generator().manual_seed(seed))
    assert_same(gr, gm)
    return r, m


@pytest.mark.parametrize("cell,opts", CELLS, ids=IDS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_matches_torch(cell, opts, batch_first):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    ref, mine = twins(cell, opts, 3, 5, num_layers=2, bidirectional=True,
                      batch_first=batch_first)
    T, B = 6, 4
    x = torch.randn((B, T, 3) if batch_first else (T, B, 3), dtype=F64, generator=gen,
                    requires_grad=True)
    x2 = torch.randn(x.shape, dtype=F64, generator=gen, requires_grad=True)
    hx = random_hx(cell, (4, B, 5), gen)
    hxs = hx if isinstance(hx, tuple) else (hx,)

    def two_calls(module):
        # Two forwards before one backward: each keeps its own activations.
        out, state = module(x, hx)
        out2, _ = module(x2, state)
        return out + 2 * out2, state

    compare(ref, mine, two_calls, (x, x2) + hxs, seed=3)


@pytest.mark.parametrize("cell,opts", CELLS, ids=IDS)
def test_packed_sequence_any_order(cell, opts):
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(5)
    ref, mine = twins(cell, opts, 3, 4, num_layers=2, bidirectional=True, batch_first=True)
    lengths = torch.tensor([3, 7, 1, 5, 7])  # not sorted; the reverse starts at each length
    x = torch.randn(5, 7, 3, dtype=F64, generator=gen, requires_grad=True)
    hx = random_hx(cell, (4, 5, 4), gen)
    hxs = hx if isinstance(hx, tuple) else (hx,)

    def call(module):
        return module(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), hx)

    r, m = compare(ref, mine, call, (x,) + hxs, seed=6)
    out = m[0]
    assert torch.equal(out.batch_sizes, r[0].batch_sizes)
    assert torch.equal(out.sorted_indices, r[0].sorted_indices)
    assert torch.equal(out.unsorted_indices, r[0].unsorted_indices)


@pytest.mark.parametrize("cell,opts", CELLS[:2], ids=IDS[:2])
def test_unbatched_input(cell, opts):
    gen = torch.Generator().manual_seed(7)
    ref, mine = twins(cell, opts, 2, 3, num_layers=2)
    x = torch.randn(4, 2, dtype=F64, generator=gen, requires_grad=True)  # [T, I]
    hx = random_hx(cell, (2, 3), gen)
    hxs = hx if isinstance(hx, tuple) else (hx,)
    r, m = compare(ref, mine, lambda module: module(x, hx), (x,) + hxs, seed=8)
    assert m[0].shape == (4, 3)


def test_no_copy_of_parameters_or_input(monkeypatch):
    """The gpurnn layer computes from the torch parameters' own memory (also after an optimizer
    step), reads the input in place and returns its output without a copy."""
    torch.manual_seed(0)
    m = gt.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    m(x)
    layer = m._engines[("cpu", F64)].layer
    seen = {}
    forward = layer.forward_with_tape

    def spy(a, state=None, lengths=None, workspaces=None):
        out, final, tape = forward(a, state, lengths, workspaces)
        seen["x"], seen["out"] = a, out
        return out, final, tape

    monkeypatch.setattr(layer, "forward_with_tape", spy)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):
        out, _ = m(x)
        for name, p in m.named_parameters():
            a = layer.params[name]
            assert a.__array_interface__["data"][0] == p.data_ptr(), name
            assert np.shares_memory(a, p.detach().numpy()), name
        assert seen["x"].__array_interface__["data"][0] == x.data_ptr()
        assert seen["out"].__array_interface__["data"][0] == out.data_ptr()
        out.sum().backward()
        opt.step()  # in place: the next call must see the new weights through the same memory
    np.testing.assert_array_equal(layer.params["weight_hh_l1"], m.weight_hh_l1.detach().numpy())


def test_a_parameter_given_new_memory_is_followed():
    """The layer keeps its views of the parameters between calls; a parameter whose tensor is
    replaced (``.data =``, a non-contiguous stand-in) is viewed, or copied, anew."""
    torch.manual_seed(0)
    ref, mine = twins("GRU", {}, 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=F64)
    compare(ref, mine, lambda m: m(x), [], seed=1)
    with torch.no_grad():
        for name in ("weight_hh_l0", "bias_ih_l1"):
            new = torch.randn_like(getattr(ref, name))
            getattr(ref, name).data = new.clone()
            getattr(mine, name).data = new.clone()
        new = torch.randn(3 * 4, 4, dtype=F64)
        ref.weight_hh_l1.data = new.clone()
        mine.weight_hh_l1.data = torch.empty(3 * 4, 8, dtype=F64)[:, ::2]  # strided, same values
        mine.weight_hh_l1.data.copy_(new)
        assert not mine.weight_hh_l1.is_contiguous()
    compare(ref, mine, lambda m: m(x), [], seed=2)


@pytest.mark.parametrize("cell,opts", CELLS, ids=IDS)
def test_training_loop_same_losses(cell, opts):
    """torch.nn.X swapped for gpurnn.torch.X in a small training loop: the same losses, step
    for step, and the same weights at the end (float64, CPU, Adam)."""

    def run(rnn_module):
        torch.manual_seed(10)
        rnn = rnn_module(4, 6, num_layers=2, batch_first=True, dtype=F64, **opts)
        head = torch.nn.Linear(6, 2, dtype=F64)
        params = list(rnn.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=0.01)
        gen = torch.Generator().manual_seed(11)
        losses = []
        for _ in range(6):
            x = torch.randn(3, 8, 4, dtype=F64, generator=gen)
            y = torch.randn(3, 8, 2, dtype=F64, generator=gen)
            opt.zero_grad()
            out, _ = rnn(x)
            loss = torch.nn.functional.mse_loss(head(out), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in params]

    ref_losses, ref_params = run(getattr(torch.nn, cell))
    losses, params = run(getattr(gt, cell))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-11)
    assert ref_losses[-1] < ref_losses[0]
    assert_same(params, ref_params)


@pytest.mark.parametrize("cell,opts", CELLS[:3], ids=IDS[:3])
def test_gradcheck(cell, opts):
    torch.manual_seed(12)
    m = getattr(gt, cell)(2, 3, num_layers=2, bidirectional=True, dtype=F64, **opts)
    names = [n for n, _ in m.named_parameters()]
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 3, 2, dtype=F64, generator=gen, requires_grad=True)
    hx = random_hx(cell, (4, 3, 3), gen)
    hxs = hx if isinstance(hx, tuple) else (hx,)
    lengths = torch.tensor([2, 4, 1])
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def fn(x, *rest):
        state = rest[:len(hxs)]
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        args = (packed, state if len(state) == 2 else state[0])
        out, final = torch.func.functional_call(m, dict(zip(names, rest[len(hxs):])), args)
        return (out.data,) + (final if isinstance(final, tuple) else (final,))

    assert torch.autograd.gradcheck(fn, (x, *hxs, *params))


def test_retain_graph_repeats_backward():
    torch.manual_seed(14)
    m = gt.GRU(3, 4, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    out, h = m(x)
    loss = out.pow(2).sum() + h.sum()
    first = torch.autograd.grad(loss, [x, m.weight_hh_l0], retain_graph=True)
    kept = [g.clone() for g in first]
    m(torch.randn(5, 2, 3, dtype=F64, requires_grad=True))[0].sum().backward()  # another call between
    assert_same(first, kept)  # gradients handed out are not written by a later backward
    second = torch.autograd.grad(loss, [x, m.weight_hh_l0])
    assert_same(first, second)


def test_backward_runs_with_its_own_forwards_weights():
    """Two forwards with different weights (``functional_call``) before the first's backward:
    the gpurnn layer is bound to the second's weights then, and the first's backward must run
    with its own, as torch.nn's does."""
    torch.manual_seed(16)
    m = gt.LSTM(3, 4, dtype=F64)
    ref = torch.nn.LSTM(3, 4, dtype=F64)
    first = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()}
    second = {n: (2 * p.detach()).requires_grad_() for n, p in m.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=F64)
    out = torch.func.functional_call(m, first, (x,))[0]
    torch.func.functional_call(m, second, (x,))
    want = torch.autograd.grad(torch.func.functional_call(ref, first, (x,))[0].sum(),
                               list(first.values()))
    assert_same(torch.autograd.grad(out.sum(), list(first.values())), want)


def test_a_parameter_changed_in_place_before_backward_is_an_error():
    """The backward runs on views of the forward's weights, as torch.nn's does on the weights
    it saved: a change in place between the two is refused, as there."""
    m = gt.GRU(3, 4, dtype=F64)
    out, _ = m(torch.randn(5, 2, 3, dtype=F64))
    with torch.no_grad():
        m.weight_hh_l0.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_dropout_follows_torch_seed_and_eval():
    def outputs():
        torch.manual_seed(15)
        m = gt.LSTM(3, 4, num_layers=2, dropout=0.5, dtype=F64)
        x = torch.randn(5, 2, 3, dtype=F64)
        return m(x)[0], m.eval()(x)[0], m, x

    train1, eval1, m, x = outputs()
    train2, eval2, _, _ = outputs()
    assert torch.equal(train1, train2)  # reproducible under torch.manual_seed
    assert not torch.allclose(train1, eval1)  # dropout is on in training only
    ref = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.5, dtype=F64).eval()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        np.testing.assert_allclose(eval1.detach(), ref(x)[0], **TOL)


@pytest.mark.parametrize("allow_rnn", [False, True])
def test_torch_compile_falls_back(allow_rnn):
    """Dynamo refuses RNN modules by default (a graph break at the module); with allow_rnn it
    traces our forward and breaks at the call into gpurnn.  Either way: eager's results."""
    from torch._dynamo.utils import counters

    torch.manual_seed(16)
    rnn = gt.LSTM(3, 4, batch_first=True, dtype=F64)
    head = torch.nn.Linear(4, 1, dtype=F64)

    def model(x):
        out, _ = rnn(torch.tanh(x))
        return head(out).sum()

    x = torch.randn(2, 5, 3, dtype=F64)
    eager_loss = model(x)
    eager_grads = torch.autograd.grad(eager_loss, list(rnn.parameters()))
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(allow_rnn=allow_rnn):
        loss = torch.compile(model, backend="aot_eager")(x)
    grads = torch.autograd.grad(loss, list(rnn.parameters()))
    assert_same([loss] + list(grads), [eager_loss] + list(eager_grads))
    assert sum(counters["graph_break"].values()) >= 1


def test_copy_and_pickle():
    torch.manual_seed(17)
    m = gt.RNN(2, 3, dtype=F64)
    x = torch.randn(4, 1, 2, dtype=F64)
    expected = m(x)[0]
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone._engines == {}
        assert torch.equal(clone(x)[0], expected)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_bad_input():
    with pytest.raises(ValueError, match="proj_size=2 is not supported"):
        gt.LSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        gt.GRU(3, 4, num_layers=2, dropout=1.0)
    m = gt.LSTM(3, 4)
    with pytest.raises(TypeError, match="gpurnn runs float32, float64, float16, bfloat16; the "
                                        "parameters are torch.complex64"):
        m.to(torch.complex64)(torch.randn(2, 1, 3).to(torch.complex64))
    m = gt.LSTM(3, 4)
    with pytest.raises(TypeError, match="input must be torch.float16 .* got torch.float32"):
        m.half()(torch.randn(2, 1, 3))
    m = gt.LSTM(3, 4)
    with pytest.raises(TypeError, match="input must be torch.float32.*got torch.float64"):
        m(torch.randn(2, 1, 3, dtype=F64))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        m(torch.randn(2, 1, 3), torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="hx must be 3-D, got 2-D"):
        m(torch.randn(2, 1, 3), (torch.zeros(1, 4), torch.zeros(1, 4)))
    with pytest.raises(ValueError, match="input must be a 2-D .* got a 4-D tensor"):
        m(torch.randn(2, 1, 1, 3))
    with pytest.raises(ValueError, match=r"h must have shape \(1, 1, 4\)"):
        m(torch.randn(2, 1, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))


def test_import_error_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import gpurnn.torch\nexcept ImportError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert "gpurnn.torch needs PyTorch, which is not installed" in result.stdout, result.stderr


_TORCH_CLASSES = [(gt.LSTM, torch.nn.LSTM), (gt.GRU, torch.nn.GRU), (gt.RNN, torch.nn.RNN)]


@pytest.mark.parametrize("classes", _TORCH_CLASSES, ids=["lstm", "gru", "rnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_modules_behave_as_torch_nn(classes, dtype):
    """Parameters, input, output and gradients in 16 bits, as torch.nn's module in 16 bits;
    the outputs within 4 unit roundoffs of torch's (two implementations rounding at different
    points: see tests/test_half_precision.py for the bound)."""
    ours_class, torch_class = classes
    torch.manual_seed(5)
    ours = ours_class(3, 4, num_layers=2).to(dtype)
    ref = torch_class(3, 4, num_layers=2).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(6, 2, 3, dtype=dtype)
    out, _ = ours(x)
    want, _ = ref(x)
    out.float().square().sum().backward()
    want.float().square().sum().backward()
    assert out.dtype == want.dtype == dtype
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.grad.dtype == q.grad.dtype == dtype, name
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert (out.float() - want.float()).abs().max().item() <= 4 * u


@pytest.mark.parametrize("classes", _TORCH_CLASSES, ids=["lstm", "gru", "rnn"])
def test_autocast_gives_torch_nns_dtypes(classes):
    """Under torch.autocast a float32 module runs where torch.nn's does: outputs in the autocast
    dtype or float32 as torch.nn's (its CPU lists cast the LSTM and RNN, not the GRU), the
    float32 parameters' and input's gradients in float32."""
    ours_class, torch_class = classes
    torch.manual_seed(6)
    ours = ours_class(3, 4)
    ref = torch_class(3, 4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours(x)
        want, _ = ref(x_ref)
    out.float().sum().backward()
    want.float().sum().backward()
    assert out.dtype == want.dtype
    assert x.grad.dtype == x_ref.grad.dtype == torch.float32
    assert ours.weight_hh_l0.grad.dtype == ref.weight_hh_l0.grad.dtype == torch.float32
    assert (out.float() - want.float()).abs().max().item() <= 4 * 2.0 ** -8
