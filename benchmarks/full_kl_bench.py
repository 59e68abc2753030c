"""Microbenchmark of the exact full-vocabulary KL on a CUDA GPU: naive eager, chunked eager, torch.compile, ours.

    python benchmarks/full_kl_bench.py --rows 8192 --vocab 151936 --json out.json
    python benchmarks/full_kl_bench.py --profile cpu      # the hidden-state variant only, torch backend, seconds

The hidden-state variant (``--hidden-rows`` positions of size ``--hidden-size``) also times the LM-head floor: the
4 products autograd needs with stored logits (policy and reference logits forward, gradient of hidden and of the
weight backward, 8 * N * H * V FLOPs), and reports each variant's time over it.

Inputs are bf16 policy/reference logits (reference = policy + noise, so the KL is of realistic size).
"fwd" times the KL values; "fwd+bwd" also the gradient w.r.t. the policy logits. "extra GiB" is the
peak allocated memory minus the inputs and minus the outputs (KL values; the gradient for fwd+bwd).
Accuracy is the max |KL - KL_naive_fp32| and |KL - KL_fp64| over all positions, both directions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import statistics

import torch

from trl_regularizers.core.full_kl import full_vocab_kl, full_vocab_kl_from_hidden

GIB = 2**30
PROFILES = {
    "h100": dict(),  # the defaults of the arguments: Qwen2-0.5B's vocabulary and hidden size, 8 x 4096 positions
    "cpu": dict(hidden_rows=512, hidden_size=64, vocab=8192),
}


def do_bench(fn, warmup=25, rep=200, return_mode="median"):
    """Triton's ``do_bench`` on CUDA (imported on first use: this file also runs without Triton)."""
    from triton.testing import do_bench as triton_do_bench

    return triton_do_bench(fn, warmup=warmup, rep=rep, return_mode=return_mode)


def cpu_bench(fn, repeats: int = 3) -> float:
    """Median milliseconds of ``fn()`` on the CPU (one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def naive_kl(logits, ref_logits, reverse=True):
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for the exact reference
    logp = torch.log_softmax(logits.to(dtype), -1)
    logq = torch.log_softmax(ref_logits.to(dtype), -1)
    return (logp.exp() * (logp - logq)).sum(-1) if reverse else (logq.exp() * (logq - logp)).sum(-1)


def measure(fn, *, backward: bool, warmup=25, rep=200):
    """(median ms, extra GiB) of fn() or of fn() plus the gradient w.r.t. its first input."""

    def step():
        kl, z = fn()
        if backward:
            (grad,) = torch.autograd.grad(kl.sum(), z)
            return kl, grad
        return (kl,)

    step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outputs = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - sum(t.numel() * t.element_size() for t in outputs)
    del outputs
    ms = do_bench(step, warmup=warmup, rep=rep, return_mode="median")
    return ms, extra / GIB


def hbm_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    src = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def accuracy(rows: int, vocab: int, device="cuda") -> dict:
    torch.manual_seed(0)
    out = {}
    for reverse, direction in ((True, "reverse"), (False, "forward")):
        z = (2 * torch.randn(rows, vocab, device=device)).to(torch.bfloat16).requires_grad_()
        r = (z.detach().float() + 0.5 * torch.randn(rows, vocab, device=device)).to(torch.bfloat16)
        ours = full_vocab_kl(z, r, direction=direction, backend="triton")
        (g_ours,) = torch.autograd.grad(ours.sum(), z)
        z32 = z.detach().float().requires_grad_()
        ref32 = naive_kl(z32, r, reverse)
        (g32,) = torch.autograd.grad(ref32.sum(), z32)
        ref64 = naive_kl(z.detach().double(), r.double(), reverse)
        chunked = full_vocab_kl(z.detach(), r, direction=direction, backend="torch")
        out[direction] = {
            "kl_mean": ref64.mean().item(),
            "max_abs_vs_naive_fp32": (ours - ref32).abs().max().item(),
            "max_abs_vs_fp64": (ours.double() - ref64).abs().max().item(),
            "naive_fp32_max_abs_vs_fp64": (ref32.double() - ref64).abs().max().item(),
            "torch_backend_max_abs_vs_triton": (chunked - ours).abs().max().item(),
            "grad_max_abs_vs_naive_fp32": (g_ours.float() - g32).abs().max().item(),
            "grad_bf16_rounding_bound": (g32.abs().max() * 2**-8).item(),
        }
    return out


def sweep(z, r):
    from trl_regularizers.kernels import full_kl_triton

    rows = []
    for block in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            full_kl_triton.FWD_BLOCK_V, full_kl_triton.FWD_NUM_WARPS = block, warps
            full_kl_triton.BWD_BLOCK_V, full_kl_triton.BWD_NUM_WARPS = block, warps
            kl, *stats = full_kl_triton.full_kl_forward(z, r, True)  # kl, then max and log-sum of each side
            fwd = do_bench(lambda: full_kl_triton.full_kl_forward(z, r, True), warmup=10, rep=60, return_mode="median")
            ones = torch.ones_like(kl)
            grad = torch.empty_like(z)
            bwd = do_bench(
                lambda: full_kl_triton.full_kl_backward(z, r, *stats, kl, ones, True, out=grad),
                warmup=10, rep=60, return_mode="median",
            )
            rows.append({"block": block, "warps": warps, "fwd_ms": fwd, "bwd_ms": bwd})
            print(f"sweep BLOCK_V={block:6d} warps={warps:2d}: fwd {fwd:.3f} ms  bwd {bwd:.3f} ms", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", choices=sorted(PROFILES), default="h100", help="cpu: the hidden-state variant only")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden-rows", type=int, default=32768, help="positions for the hidden-state variant (0: skip)")
    parser.add_argument("--hidden-size", type=int, default=896)
    parser.add_argument("--sweep", action="store_true", help="time Triton block/warp configurations first")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for name, value in PROFILES[args.profile].items():
        setattr(args, name, value)
    if args.profile == "cpu":
        report = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "vocab": args.vocab, "hidden": hidden_variant(args.hidden_rows, args.hidden_size, args.vocab)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        print(json.dumps(report, indent=1))
        return
    import triton

    from trl_regularizers.kernels import full_kl_triton

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "rows": args.rows,
        "vocab": args.vocab,
    }
    bandwidth = hbm_bandwidth()
    report["copy_TBps"] = bandwidth / 1e12
    report["read_both_once_ms"] = 2 * args.rows * args.vocab * 2 / bandwidth * 1e3
    report["accuracy"] = {"rows_512": accuracy(512, args.vocab), "rows_64_vocab_50257": accuracy(64, 50257)}
    print(json.dumps(report, indent=1), flush=True)

    torch.manual_seed(1)
    z = (2 * torch.randn(args.rows, args.vocab, device="cuda")).to(torch.bfloat16)
    r = (z.float() + 0.5 * torch.randn_like(z, dtype=torch.float32)).to(torch.bfloat16)
    if args.sweep:
        defaults = (full_kl_triton.FWD_BLOCK_V, full_kl_triton.FWD_NUM_WARPS, full_kl_triton.BWD_BLOCK_V, full_kl_triton.BWD_NUM_WARPS)
        report["sweep"] = sweep(z, r)
        best_fwd = min(report["sweep"], key=lambda row: row["fwd_ms"])
        best_bwd = min(report["sweep"], key=lambda row: row["bwd_ms"])
        print("best fwd", best_fwd, "best bwd", best_bwd, flush=True)
        full_kl_triton.FWD_BLOCK_V, full_kl_triton.FWD_NUM_WARPS = defaults[:2]
        full_kl_triton.BWD_BLOCK_V, full_kl_triton.BWD_NUM_WARPS = defaults[2:]

    zg = z.detach().requires_grad_()
    variants = {
        "naive eager": lambda: (naive_kl(zg, r), zg),
        "chunked eager (backend=torch)": lambda: (full_vocab_kl(zg, r, backend="torch"), zg),
        "ours (backend=triton)": lambda: (full_vocab_kl(zg, r, backend="triton"), zg),
    }
    if not args.no_compile:
        compiled = torch.compile(naive_kl)
        variants["naive under torch.compile"] = lambda: (compiled(zg, r), zg)
    timings = {}
    for name, fn in variants.items():
        fwd = measure(fn, backward=False)
        both = measure(fn, backward=True)
        timings[name] = {"fwd_ms": fwd[0], "fwd_extra_GiB": fwd[1], "fwd_bwd_ms": both[0], "fwd_bwd_extra_GiB": both[1]}
        print(f"{name:32s} fwd {fwd[0]:7.3f} ms  +{fwd[1]:6.2f} GiB | fwd+bwd {both[0]:7.3f} ms  +{both[1]:6.2f} GiB", flush=True)
    report["timings"] = timings
    del z, r, zg
    torch.cuda.empty_cache()

    if args.hidden_rows:
        report["hidden"] = hidden_variant(args.hidden_rows, args.hidden_size, args.vocab)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


def hidden_variant(rows: int, size: int, vocab: int) -> dict:
    """Time (and on CUDA peak extra memory) of KL + gradients from hidden states vs. materialized logits, and the
    LM-head floor; bf16 with the Triton backend on CUDA, float32 with the torch backend on the CPU."""
    on_gpu = torch.cuda.is_available()
    device, dtype, backend = ("cuda", torch.bfloat16, "triton") if on_gpu else ("cpu", torch.float32, "torch")
    timer = (lambda fn: do_bench(fn, warmup=3, rep=30, return_mode="median")) if on_gpu else cpu_bench
    torch.manual_seed(2)
    h = torch.randn(rows, size, device=device, dtype=dtype).requires_grad_()
    h_ref = (h.detach() + 0.1 * torch.randn_like(h)).to(dtype)
    w = (0.05 * torch.randn(vocab, size, device=device)).to(dtype).requires_grad_()
    w_ref = (w.detach() + 0.005 * torch.randn_like(w)).to(dtype)

    def from_hidden(chunk_size):
        kl = full_vocab_kl_from_hidden(h, h_ref, w, w_ref, backend=backend, chunk_size=chunk_size)
        return kl, torch.autograd.grad(kl.sum(), (h, w))

    def materialized():
        kl = full_vocab_kl(h @ w.T, h_ref @ w_ref.T, backend=backend)
        return kl, torch.autograd.grad(kl.sum(), (h, w))

    def floor():
        """The LM-head products alone: 2 forward, 2 backward (the gradient reuses one [N, V] buffer)."""
        with torch.no_grad():
            logits = h @ w.T
            h_ref @ w_ref.T
            return logits @ w, logits.T @ h

    out = {"rows": rows, "hidden_size": size, "backend": backend, "dtype": str(dtype), "floor_ms": timer(floor)}
    results = {}
    variants = (("from_hidden (default chunk)", lambda: from_hidden(None)), ("from_hidden (chunk 1024)", lambda: from_hidden(1024)),
                ("materialized logits", materialized))
    for name, fn in variants:
        kl, grads = fn()
        results[name] = (kl.detach(), [g.detach() for g in grads])
        del kl, grads
        extra = None
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            kl, grads = fn()
            torch.cuda.synchronize()
            outputs = kl.numel() * 4 + sum(g.numel() * g.element_size() for g in grads)
            extra = (torch.cuda.max_memory_allocated() - base - outputs) / GIB
            del kl, grads
        ms = timer(fn)
        out[name] = {"fwd_bwd_ms": ms, "over_floor": ms / out["floor_ms"], "extra_GiB": extra}
        memory = f"  extra {extra:6.2f} GiB" if extra is not None else ""
        print(f"{name:32s} fwd+bwd {ms:8.2f} ms  ({ms / out['floor_ms']:.2f}x the LM-head floor){memory}", flush=True)
    (kl_a, g_a), _, (kl_b, g_b) = results.values()
    out["kl_max_abs_diff"] = (kl_a - kl_b).abs().max().item()
    out["grad_hidden_max_abs_diff"] = (g_a[0].float() - g_b[0].float()).abs().max().item()
    out["grad_weight_rel_diff"] = ((g_a[1].float() - g_b[1].float()).norm() / g_b[1].float().norm()).item()
    return out


if __name__ == "__main__":
    main()
