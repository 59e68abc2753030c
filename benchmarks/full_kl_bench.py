"""Microbenchmark of the exact full-vocabulary KL: naive eager, chunked eager, torch.compile, ours (Triton).

    python benchmarks/full_kl_bench.py --rows 8192 --vocab 151936 --json out.json   # every variant + hidden (CUDA)
    python benchmarks/full_kl_bench.py --figure kernel --json kernel.json           # figure 1 of gpu_check.py
    python benchmarks/full_kl_bench.py --figure hidden --json hidden.json           # figure 2 of gpu_check.py
    python benchmarks/full_kl_bench.py --profile cpu      # the hidden-state variant only, torch backend, seconds
    python benchmarks/full_kl_bench.py --profile dry --figure kernel   # tiny shapes on the CPU (CI's dry run)

Inputs are bf16 policy/reference logits (reference = policy + noise, so the KL is of realistic size).
"fwd" times the KL values; "fwd+bwd" also the gradient w.r.t. the policy logits. "extra GiB" is the
peak allocated memory minus the inputs and minus the outputs (KL values; the gradient for fwd+bwd), CUDA only.

``--figure kernel``: our kernel (``backend="auto"``: Triton on CUDA; on a CPU the torch backend stands in and the
report says the Triton call was skipped), on dense logits and on logits with an eighth of the vocabulary masked
(``-inf`` on both sides, as a padded vocabulary), against the memory-bandwidth floor: the bytes the kernels must
move (forward: read both tensors; backward: read both, write the gradient) over the device-to-device copy rate
measured in the same call. Accuracy against float32/float64 eager, and, masked, against float64 over the kept columns.

``--figure hidden``: ``full_vocab_kl_from_hidden`` (value + gradients of the hidden states and the LM-head weight)
against the LM-head compute floor 8 * N * H * V FLOPs (the 4 products of autograd through stored logits: policy
and reference logits forward, the gradients of hidden and of the weight backward) over the bf16 matrix rate
measured in the same call (an 8192^3 product), and against those 4 products timed at the real shapes.
Times are medians with a 95% bootstrap interval of the median over the timed calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from bench_common import spread, utc_now, write_json
from trl_regularizers.core.full_kl import full_vocab_kl, full_vocab_kl_from_hidden

GIB = 2**30
PROFILES = {
    "h100": dict(),  # the defaults of the arguments: Qwen2-0.5B's vocabulary and hidden size, 8 x 4096 positions
    "cpu": dict(hidden_rows=512, hidden_size=64, vocab=8192, matmul_size=1024),
    # CI's dry run of gpu_check.py: every step on tiny shapes (a vocabulary that is no power of 2, for the tails)
    "dry": dict(rows=32, vocab=1000, hidden_rows=64, hidden_size=16, hidden_chunk=16, matmul_size=256, accuracy_rows=8, rep_ms=20, hidden_rep_ms=60),
}


def do_bench(fn, warmup=25, rep=200, return_mode="median"):
    """Triton's ``do_bench`` on CUDA (imported on first use: this file also runs without Triton)."""
    from triton.testing import do_bench as triton_do_bench

    return triton_do_bench(fn, warmup=warmup, rep=rep, return_mode=return_mode)


def time_calls(fn, rep_ms: float = 200, warmup_ms: float = 25) -> list[float]:
    """Milliseconds of each timed call of ``fn()``: ``do_bench`` on CUDA; on the CPU one warm-up call, then calls
    for about ``rep_ms`` (at least 3)."""
    if torch.cuda.is_available():
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    fn()
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - begin) * 1e3 < rep_ms:
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def timed(times: list[float]) -> dict:
    """``{"ms": median, "ci95": [low, high], "calls": n}`` of per-call milliseconds."""
    s = spread(times)
    return {"ms": s["median"], "ci95": s["ci95"], "calls": len(times)}


def naive_kl(logits, ref_logits, reverse=True):
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for the exact reference
    logp = torch.log_softmax(logits.to(dtype), -1)
    logq = torch.log_softmax(ref_logits.to(dtype), -1)
    return (logp.exp() * (logp - logq)).sum(-1) if reverse else (logq.exp() * (logq - logp)).sum(-1)


def peak_extra_GiB(fn) -> float | None:
    """Peak allocated CUDA memory of one ``fn()`` beyond what was allocated before and what it returns (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outputs = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - sum(t.numel() * t.element_size() for t in outputs)
    del outputs
    return extra / GIB


def measure(fn, *, backward: bool, rep_ms: float):
    """Timing (``timed``) and extra GiB of fn() or of fn() plus the gradient w.r.t. its first input."""

    def step():
        kl, z = fn()
        if backward:
            (grad,) = torch.autograd.grad(kl.sum(), z)
            return kl, grad
        return (kl,)

    step()
    extra = peak_extra_GiB(step)
    return timed(time_calls(step, rep_ms=rep_ms)), extra


def copy_bandwidth(device: str, size_bytes: int) -> float:
    """Bytes/s of a large copy on ``device``, counting bytes read plus written."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.random_(0, 255)
    ms = statistics.median(time_calls(lambda: dst.copy_(src), rep_ms=100, warmup_ms=10))
    return 2 * src.numel() / (ms * 1e-3)


def matmul_rate(device: str, size: int, rep_ms: float) -> float:
    """FLOP/s of one ``size``^3 product on random data (bf16 on CUDA, float32 on the CPU)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    ms = statistics.median(time_calls(lambda: a @ b, rep_ms=rep_ms))
    return 2 * size**3 / (ms * 1e-3)


def hbm_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus written."""
    return copy_bandwidth("cuda", 2 * GIB)


def kernel_backend() -> tuple[str, str | None]:
    """The backend the kernel figure times, and a note when the Triton kernel cannot run here."""
    from trl_regularizers.core.full_kl import triton_available

    if triton_available():
        return "triton", None
    return "torch", "no CUDA device with Triton here: the Triton kernel call is skipped, the torch backend stands in"


def random_logits(rows: int, vocab: int, device: str, seed: int, masked_fraction: float = 0.0):
    """bf16 policy logits ``z`` and reference ``r = z + N(0, 0.5^2)``; ``masked_fraction`` of the vocabulary (the same
    columns on both sides and every row) set to -inf. Returns (z, r, kept columns or None)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    z = (2 * torch.randn(rows, vocab, device=device, generator=generator)).to(torch.bfloat16)
    r = (z.float() + 0.5 * torch.randn(rows, vocab, device=device, generator=generator)).to(torch.bfloat16)
    if not masked_fraction:
        return z, r, None
    order = torch.randperm(vocab, device=device, generator=generator)
    masked, kept = order[: int(masked_fraction * vocab)], order[int(masked_fraction * vocab) :].sort().values
    z[:, masked] = float("-inf")
    r[:, masked] = float("-inf")
    return z, r, kept


def accuracy(rows: int, vocab: int, device="cuda", backend="triton") -> dict:
    torch.manual_seed(0)
    out = {}
    for reverse, direction in ((True, "reverse"), (False, "forward")):
        z = (2 * torch.randn(rows, vocab, device=device)).to(torch.bfloat16).requires_grad_()
        r = (z.detach().float() + 0.5 * torch.randn(rows, vocab, device=device)).to(torch.bfloat16)
        ours = full_vocab_kl(z, r, direction=direction, backend=backend)
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
            "torch_backend_max_abs_vs_ours": (chunked - ours).abs().max().item(),
            "grad_max_abs_vs_naive_fp32": (g_ours.float() - g32).abs().max().item(),
            "grad_bf16_rounding_bound": (g32.abs().max() * 2**-8).item(),
        }
    return out


def masked_accuracy(rows: int, vocab: int, device: str, backend: str) -> dict:
    """Ours on logits with an eighth of the vocabulary masked vs float64 eager over the kept columns only (the same
    columns are masked on both sides, so the KL over the kept ones is the whole KL); masked columns must get
    gradient 0."""
    out = {}
    for reverse, direction in ((True, "reverse"), (False, "forward")):
        z, r, kept = random_logits(rows, vocab, device, seed=3, masked_fraction=0.125)
        zg = z.requires_grad_()
        ours = full_vocab_kl(zg, r, direction=direction, backend=backend)
        (grad,) = torch.autograd.grad(ours.sum(), zg)
        z64 = z.detach()[:, kept].double().requires_grad_()
        ref = naive_kl(z64, r[:, kept].double(), reverse)
        (g64,) = torch.autograd.grad(ref.sum(), z64)
        masked_grad = grad.clone()
        masked_grad[:, kept] = 0
        out[direction] = {
            "max_abs_vs_fp64_kept_columns": (ours.double() - ref).abs().max().item(),
            "grad_max_abs_vs_fp64_kept_columns": (grad[:, kept].double() - g64).abs().max().item(),
            "grad_bf16_rounding_bound": (g64.abs().max() * 2**-8).item(),
            "grad_max_abs_at_masked_columns": masked_grad.abs().max().item(),
        }
    return out


def kernel_figure(rows: int, vocab: int, accuracy_rows: int, rep_ms: float, on_update=None) -> dict:
    """Figure 1: our kernel, forward and forward+backward, dense and masked, against the memory-bandwidth floor;
    ``on_update(report so far)`` after each part."""
    on_update = on_update or (lambda report: None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend, note = kernel_backend()
    if note:
        print(f"kernel figure: {note}", flush=True)
    bandwidth = copy_bandwidth(device, 2 * GIB if device == "cuda" else 64 * 2**20)
    tensor_bytes = rows * vocab * 2  # one bf16 [rows, V] tensor
    floor_fwd_ms = 2 * tensor_bytes / bandwidth * 1e3  # read logits and reference once
    floor_fwd_bwd_ms = 5 * tensor_bytes / bandwidth * 1e3  # forward, then backward: read both again, write the gradient
    report = {"figure": "full-KL kernel", "rows": rows, "vocab": vocab, "dtype": "bfloat16", "backend": backend, "note": note,
              "copy_TBps": bandwidth / 1e12, "floor_fwd_ms": floor_fwd_ms, "floor_fwd_bwd_ms": floor_fwd_bwd_ms}
    on_update(report)
    for case, fraction in (("dense", 0.0), ("masked", 0.125)):
        z, r, _ = random_logits(rows, vocab, device, seed=1, masked_fraction=fraction)
        zg = z.requires_grad_()
        variant = lambda: (full_vocab_kl(zg, r, backend=backend), zg)  # noqa: E731
        fwd, fwd_extra = measure(variant, backward=False, rep_ms=rep_ms)
        both, both_extra = measure(variant, backward=True, rep_ms=rep_ms)
        report[case] = {"masked_fraction": fraction, "fwd": fwd, "fwd_extra_GiB": fwd_extra, "fwd_bwd": both,
                        "fwd_bwd_extra_GiB": both_extra, "fwd_over_floor": fwd["ms"] / floor_fwd_ms,
                        "fwd_bwd_over_floor": both["ms"] / floor_fwd_bwd_ms}
        memory = "" if fwd_extra is None else f"  extra +{fwd_extra:.2f} / +{both_extra:.2f} GiB"
        print(f"{case:6s} ({backend}) fwd {fwd['ms']:8.3f} ms ({report[case]['fwd_over_floor']:.2f}x the floor {floor_fwd_ms:.3f})"
              f" | fwd+bwd {both['ms']:8.3f} ms ({report[case]['fwd_bwd_over_floor']:.2f}x the floor {floor_fwd_bwd_ms:.3f}){memory}", flush=True)
        del z, r, zg
        on_update(report)
    report["accuracy"] = accuracy(accuracy_rows, vocab, device, backend)
    report["accuracy_masked"] = masked_accuracy(accuracy_rows, vocab, device, backend)
    on_update(report)
    return report


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


def environment() -> dict:
    on_gpu = torch.cuda.is_available()
    report = {"date": utc_now(), "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
              "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    if on_gpu:
        import triton

        report["triton"] = triton.__version__
    return report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", choices=sorted(PROFILES), default="h100", help="cpu: the hidden-state variant only; dry: tiny shapes")
    parser.add_argument("--figure", choices=["all", "kernel", "hidden"], default="all",
                        help="all: every variant (CUDA); kernel, hidden: the figures of gpu_check.py")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden-rows", type=int, default=32768, help="positions for the hidden-state variant (0: skip)")
    parser.add_argument("--hidden-size", type=int, default=896)
    parser.add_argument("--hidden-chunk", type=int, default=1024, help="the fixed chunk size timed beside the default")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the product that measures the matrix rate")
    parser.add_argument("--accuracy-rows", type=int, default=512)
    parser.add_argument("--rep-ms", type=float, default=200, help="milliseconds of timed calls per kernel measurement")
    parser.add_argument("--hidden-rep-ms", type=float, default=1500, help="milliseconds of timed calls per hidden-state measurement")
    parser.add_argument("--sweep", action="store_true", help="time Triton block/warp configurations first")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for name, value in PROFILES[args.profile].items():
        setattr(args, name, value)
    if args.profile == "cpu":
        args.figure = "hidden"
    if args.figure != "all":
        report = {**environment(), "profile": args.profile}

        def partial(figure: dict) -> None:  # rewrite the JSON after each part: a kill leaves what was measured
            write_json(args.json, report | figure)

        if args.figure == "kernel":
            report |= kernel_figure(args.rows, args.vocab, args.accuracy_rows, args.rep_ms, partial)
        else:
            report |= hidden_variant(args.hidden_rows, args.hidden_size, args.vocab, args.hidden_chunk, args.matmul_size, args.hidden_rep_ms, partial)
        write_json(args.json, report)
        print(json.dumps(report, indent=1))
        return
    from trl_regularizers.kernels import full_kl_triton

    report = {**environment(), "rows": args.rows, "vocab": args.vocab}
    bandwidth = hbm_bandwidth()
    report["copy_TBps"] = bandwidth / 1e12
    report["read_both_once_ms"] = 2 * args.rows * args.vocab * 2 / bandwidth * 1e3
    report["accuracy"] = {"rows_512": accuracy(512, args.vocab), "rows_64_vocab_50257": accuracy(64, 50257)}
    print(json.dumps(report, indent=1), flush=True)

    z, r, _ = random_logits(args.rows, args.vocab, "cuda", seed=1)
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
        (fwd, fwd_extra), (both, both_extra) = measure(fn, backward=False, rep_ms=args.rep_ms), measure(fn, backward=True, rep_ms=args.rep_ms)
        timings[name] = {"fwd_ms": fwd["ms"], "fwd_extra_GiB": fwd_extra, "fwd_bwd_ms": both["ms"], "fwd_bwd_extra_GiB": both_extra}
        print(f"{name:32s} fwd {fwd['ms']:7.3f} ms  +{fwd_extra:6.2f} GiB | fwd+bwd {both['ms']:7.3f} ms  +{both_extra:6.2f} GiB", flush=True)
    report["timings"] = timings
    del z, r, zg
    torch.cuda.empty_cache()

    if args.hidden_rows:
        report["hidden"] = hidden_variant(args.hidden_rows, args.hidden_size, args.vocab, args.hidden_chunk, args.matmul_size, args.hidden_rep_ms)
    write_json(args.json, report)
    print(json.dumps(report, indent=1))


def hidden_variant(rows: int, size: int, vocab: int, chunk: int = 1024, matmul_size: int = 8192, rep_ms: float = 1500,
                   on_update=None) -> dict:
    """Time (and on CUDA peak extra memory) of KL + gradients from hidden states vs. materialized logits, against the
    LM-head floor (8 N H V FLOPs over the measured matrix rate) and the 4 LM-head products timed; bf16 with the
    Triton backend on CUDA, float32 with the torch backend on the CPU. ``on_update(report so far)`` after each part."""
    on_update = on_update or (lambda report: None)
    on_gpu = torch.cuda.is_available()
    device, dtype, backend = ("cuda", torch.bfloat16, "triton") if on_gpu else ("cpu", torch.float32, "torch")
    rate = matmul_rate(device, matmul_size, min(rep_ms, 200))
    torch.manual_seed(2)
    h = torch.randn(rows, size, device=device, dtype=dtype).requires_grad_()
    h_ref = (h.detach() + 0.1 * torch.randn_like(h)).to(dtype)
    w = (0.05 * torch.randn(vocab, size, device=device)).to(dtype).requires_grad_()
    w_ref = (w.detach() + 0.005 * torch.randn_like(w)).to(dtype)

    def from_hidden(chunk_size):
        kl = full_vocab_kl_from_hidden(h, h_ref, w, w_ref, backend=backend, chunk_size=chunk_size)
        return (kl, *torch.autograd.grad(kl.sum(), (h, w)))

    def materialized():
        kl = full_vocab_kl(h @ w.T, h_ref @ w_ref.T, backend=backend)
        return (kl, *torch.autograd.grad(kl.sum(), (h, w)))

    def products():
        """The LM-head products alone: 2 forward, 2 backward (the gradient reuses one [N, V] buffer)."""
        with torch.no_grad():
            logits = h @ w.T
            h_ref @ w_ref.T
            return logits @ w, logits.T @ h

    flops = 8 * rows * size * vocab
    floor_ms = flops / rate * 1e3
    products_ms = timed(time_calls(products, rep_ms=rep_ms, warmup_ms=100))
    out = {"figure": "hidden-state exact KL", "rows": rows, "hidden_size": size, "vocab": vocab, "backend": backend, "dtype": str(dtype),
           "lm_head_TFLOP": flops / 1e12, "matmul_TFLOPs": rate / 1e12, "matmul_size": matmul_size, "floor_ms": floor_ms,
           "products": products_ms, "products_over_floor": products_ms["ms"] / floor_ms}
    print(f"LM-head floor {flops / 1e12:.3g} TFLOP at {rate / 1e12:.3g} TFLOP/s = {floor_ms:.2f} ms; the 4 products timed: "
          f"{products_ms['ms']:.2f} ms", flush=True)
    on_update(out)
    results = {}
    variants = (("from_hidden (default chunk)", lambda: from_hidden(None)), (f"from_hidden (chunk {chunk})", lambda: from_hidden(chunk)),
                ("materialized logits", materialized))
    for name, fn in variants:
        results[name] = [t.detach() for t in fn()]
        extra = peak_extra_GiB(fn)
        t = timed(time_calls(fn, rep_ms=rep_ms, warmup_ms=100))
        out[name] = {"fwd_bwd": t, "fwd_bwd_ms": t["ms"], "over_floor": t["ms"] / floor_ms, "over_floor_ci95": [x / floor_ms for x in t["ci95"]],
                     "over_products": t["ms"] / products_ms["ms"], "extra_GiB": extra}
        memory = f"  extra {extra:6.2f} GiB" if extra is not None else ""
        print(f"{name:32s} fwd+bwd {t['ms']:8.2f} ms [{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}] "
              f"({out[name]['over_floor']:.2f}x the LM-head floor, {out[name]['over_products']:.2f}x the products){memory}", flush=True)
        on_update(out)
    (kl_a, *g_a), _, (kl_b, *g_b) = results.values()
    out["kl_max_abs_diff"] = (kl_a - kl_b).abs().max().item()
    out["grad_hidden_max_abs_diff"] = (g_a[0].float() - g_b[0].float()).abs().max().item()
    out["grad_weight_rel_diff"] = ((g_a[1].float() - g_b[1].float()).norm() / g_b[1].float().norm()).item()
    return out


if __name__ == "__main__":
    main()
