"""The PyTorch rows of `cargo run --release --example bench_step` (which runs this script).

Times one optimizer step on docs/design.md's parameter sets with torch.optim.Adam (foreach and fused)
on every variable, and with a Bop written with torch ops the way a PyTorch user would write it
(larq's formula, per tensor) for the binary variables plus fused Adam for the rest.

Two modes:

--serve (what bench_step uses): builds every implementation of one set once, prints one line
    {"ready": true, "impls": [...], "torch": VERSION}, then answers requests on stdin, one JSON
    line each: {"impl": NAME, "steps": K} runs K steps of that implementation and answers
    {"impl": NAME, "times_ms": [K step times]} (or {"error": MESSAGE}). It exits at the end of
    stdin. bench_step interleaves these requests with its own rows and bandwidth passes, so
    that every row is timed in the same minutes (this VM's bandwidth drifts by up to 2x over
    tens of seconds).

otherwise (standalone): times each implementation in turn and prints one JSON object per
    measurement on stdout: {"set", "impl", "ms" (median), "min_ms", "reps", "torch"}.

    scripts/env.sh python scripts/bench_torch.py --set binarynet --threads 2 --reps 20
    scripts/env.sh python scripts/bench_torch.py --serve --set many-small --threads 2
"""

import argparse
import json
import statistics
import sys
import time

import torch

GAMMA, THRESHOLD, LR = 1e-4, 1e-8, 0.01


def binarynet():
    """(name, shape, binary) of BinaryNet for CIFAR-10, as docs/design.md lists them."""
    out = []
    for i, (cin, cout) in enumerate([(3, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]):
        out.append((f"conv{i}.weight", (cout, cin, 3, 3), i > 0))
        out.append((f"bn_conv{i}.beta", (cout,), False))
    for i, (fin, fout) in enumerate([(8192, 1024), (1024, 1024), (1024, 10)]):
        out.append((f"dense{i}.weight", (fout, fin), i < 2))
        out.append((f"bn_dense{i}.beta", (fout,), False))
    return out


def many_small():
    return [(f"p{i}", (256,), i % 2 == 0) for i in range(2000)]


SETS = {"binarynet": binarynet, "many-small": many_small}


def make_params(spec, device, seed=0):
    """Fresh parameters (binary ones +-1) with N(0, 1) * 1e-3 gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, shape, binary in spec:
        init = torch.randn(shape, generator=gen)
        init = torch.where(init >= 0, 1.0, -1.0) if binary else init * 0.1
        p = torch.nn.Parameter(init.to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


class TorchOpsBop:
    """Bop as a PyTorch user writes it: larq's update with torch ops, one tensor at a time."""

    def __init__(self, params, gamma=GAMMA, threshold=THRESHOLD):
        self.params, self.gamma, self.threshold = params, gamma, threshold
        self.m = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.m):
            m.add_(p.grad - m, alpha=self.gamma)
            p.copy_(torch.sign(torch.sign(-torch.sign(p * m - self.threshold) * p) + 0.1))


def step_times(step, device, steps):
    """Wall time of each of `steps` calls of `step`, in ms (the device synchronised after each)."""

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def rows(set_name, device):
    """(name, make) for each implementation; make() builds it and returns its step function."""
    spec = SETS[set_name]()

    def adam(kind):
        def make():
            params = make_params(spec, device)
            opt = torch.optim.Adam(params, lr=LR, **{kind: True})
            return opt.step
        return make

    def bop_plus_adam():
        params = make_params(spec, device)
        binary = [p for p, (_, _, b) in zip(params, spec) if b]
        other = [p for p, (_, _, b) in zip(params, spec) if not b]
        bop = TorchOpsBop(binary)
        adam = torch.optim.Adam(other, lr=LR, fused=True)

        def step():
            bop.step()
            adam.step()
        return step

    yield "torch.optim.Adam foreach", adam("foreach")
    yield "torch.optim.Adam fused", adam("fused")
    yield "torch-ops Bop + fused Adam", bop_plus_adam


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(set_name, device):
    """Build every implementation of `set_name` once, then answer step requests from stdin."""
    steps = {impl: make() for impl, make in rows(set_name, device)}
    reply({"ready": True, "impls": list(steps), "torch": torch.__version__})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            impl, k = req["impl"], int(req["steps"])
            if impl not in steps:
                raise KeyError(f"unknown impl {impl!r}")
            reply({"impl": impl, "times_ms": step_times(steps[impl], device, k)})
        except Exception as e:  # the Rust side reports it and drops the PyTorch rows
            reply({"error": f"{type(e).__name__}: {e}"})


def standalone(sets, device, warmup, reps):
    for set_name in sets:
        for impl, make in rows(set_name, device):
            step = make()
            step_times(step, device, warmup)
            times = step_times(step, device, reps)
            print(json.dumps({"set": set_name, "impl": impl, "ms": statistics.median(times),
                              "min_ms": min(times), "reps": reps, "torch": torch.__version__}),
                  flush=True)
            del step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS) + ["all"], default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--serve", action="store_true",
                    help="answer step requests on stdin (one set; --reps and --warmup unused)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sets = sorted(SETS) if args.set == "all" else [args.set]
    if args.serve:
        if len(sets) != 1:
            ap.error("--serve takes one --set")
        serve(sets[0], args.device)
    else:
        standalone(sets, args.device, args.warmup, args.reps)


if __name__ == "__main__":
    main()
