"""gpurnn.torch's modules on a GPU against gpurnn's own layers and torch.nn, one training step.

For each configuration the same weights run three ways on the same GPU, on PyTorch's current
stream (CuPy is pointed at it for the gpurnn layer):

* ``torch.nn.LSTM``/``GRU``/``RNN`` (cuDNN);
* ``gpurnn.torch.LSTM``/``GRU``/``RNN``: ``out, _ = m(x); out.backward(dout)``;
* the gpurnn layer itself (``gpurnn.from_torch``): ``layer(x)``, ``layer.backward(dout)`` on
  CuPy views of the same tensors.

Reported: medians in ms (CUDA events, ``--warmup`` calls first, then ``--repeat``), the ratio of
the module to the layer (the overhead of the torch binding; the target is at most 1.1) and to
torch.nn, the largest relative difference of the module's output and input gradient from
torch.nn's, and whether the module's gpurnn layer reads the torch parameters in place (the data
pointers of its weights are the parameters'; no copy).  Without a usable GPU it prints why and
exits with status 2, measuring nothing.

    python benchmarks/torch_modules_compare.py [--json out.json]
"""
import argparse
import json
import sys

from gpu_compare import event_median, no_gpu_reason, torch_events  # this folder is on sys.path

#: (cell, T, B, H, num_layers, bidirectional), I = H
CONFIGS = [("LSTM", 100, 64, 256, 2, True), ("LSTM", 1000, 4, 128, 1, False),
           ("GRU", 100, 64, 256, 2, True), ("GRU", 1000, 4, 128, 1, False),
           ("RNN", 100, 64, 256, 2, True)]


def _data_pointer(a):
    """The address of a CuPy (or NumPy) array's first element."""
    return int(a.data.ptr) if hasattr(a.data, "ptr") else a.__array_interface__["data"][0]


def measure(cell, T, B, H, num_layers, bidirectional, warmup, repeat):
    import cupy
    import torch

    import gpurnn
    import gpurnn.torch

    torch.manual_seed(0)
    options = dict(num_layers=num_layers, bidirectional=bidirectional)
    reference = getattr(torch.nn, cell)(H, H, **options).cuda()
    module = getattr(gpurnn.torch, cell)(H, H, **options).cuda()
    module.load_state_dict(reference.state_dict())
    layer = gpurnn.from_torch(reference, device="cuda")
    D = 2 if bidirectional else 1
    x = torch.randn(T, B, H, device="cuda", requires_grad=True)  # [T, B, I]
    dout = torch.randn(T, B, D * H, device="cuda")  # [T, B, D*H]

    def step(m):
        x.grad = None
        m.zero_grad(set_to_none=True)
        out, _ = m(x)
        out.backward(dout)
        return out

    results = {}
    for name, m in (("torch_nn", reference), ("gpurnn_torch", module)):
        out = step(m)
        results[name] = (out.detach().clone(), x.grad.clone())
    rel = max(float((results["gpurnn_torch"][i] - results["torch_nn"][i]).abs().max()
                    / results["torch_nn"][i].abs().max()) for i in range(2))
    names = tuple(module._flat_weights_names)
    engine = module._engines[(str(x.device), torch.float32)]
    in_place = all(_data_pointer(engine.layer.params[n]) == getattr(module, n).data_ptr()
                   for n in names)

    stream = torch.cuda.current_stream()
    with cupy.cuda.ExternalStream(stream.cuda_stream):
        x_array = cupy.from_dlpack(x.detach())  # [T, B, I], the tensor's memory
        dout_array = cupy.from_dlpack(dout)  # [T, B, D*H]

        def layer_step(_):
            layer(x_array)
            layer.backward(dout_array)

        layer_ms = event_median(layer_step, warmup, repeat, torch_events)
    torch_ms = event_median(lambda _: step(reference), warmup, repeat, torch_events)
    module_ms = event_median(lambda _: step(module), warmup, repeat, torch_events)
    return {"cell": cell, "T": T, "B": B, "H": H, "num_layers": num_layers,
            "bidirectional": bidirectional, "torch_nn_ms": torch_ms,
            "gpurnn_torch_ms": module_ms, "gpurnn_layer_ms": layer_ms,
            "module_over_layer": module_ms / layer_ms, "module_over_torch": module_ms / torch_ms,
            "rel_err": rel, "weights_in_place": in_place}


def fmt_row(r):
    config = (f"{r['cell']} T={r['T']} B={r['B']} H={r['H']} L={r['num_layers']} "
              f"bi={r['bidirectional']}")
    return (f"{config:<40} torch.nn {r['torch_nn_ms']:8.2f} ms  gpurnn.torch "
            f"{r['gpurnn_torch_ms']:8.2f} ms  layer {r['gpurnn_layer_ms']:8.2f} ms  "
            f"module/layer {r['module_over_layer']:5.2f}  module/torch.nn "
            f"{r['module_over_torch']:6.2f}  rel err {r['rel_err']:.1e}  weights in place "
            f"{'yes' if r['weights_in_place'] else 'NO'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cells", nargs="+", default=["LSTM", "GRU", "RNN"],
                        choices=["LSTM", "GRU", "RNN"])
    parser.add_argument("--json", help="write the rows here as well")
    args = parser.parse_args(argv)
    reason = no_gpu_reason()
    if reason is not None:
        print(f"torch_modules_compare: no GPU, nothing measured: {reason}", file=sys.stderr)
        return 2
    rows = []
    for config in CONFIGS:
        if config[0] in args.cells:
            rows.append(measure(*config, args.warmup, args.repeat))
            print(fmt_row(rows[-1]), flush=True)
    if args.json:
        from gpurnn.engine.files import write_atomically

        write_atomically(args.json, lambda f: f.write(json.dumps(rows, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
