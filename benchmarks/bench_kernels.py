"""Benchmark (and, with --check, verify) each Triton kernel against its torch reference on CUDA.

    python benchmarks/bench_kernels.py [--check] [--json PATH] [--no-compile] [--budget SECONDS]

For every op at realistic decode shapes (Llama-3.2-1B / Llama-3-8B): the Triton kernel, the
eager reference and `torch.compile` of the reference, timed by `triton.testing.do_bench`
(median, L2 flushed between runs), with the bytes the op must move turned into GB/s and a
fraction of the device's peak bandwidth. `--check` first compares Triton with the reference
at those shapes (correctness on real hardware). Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import math
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
PEAK_TBS = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100-SXM4-80GB", 2.04), ("A100", 1.55)]


def _import_kernels():
    """slotserve.kernels, installed (pip install -e .) or else loaded straight from ./kernels."""
    try:
        return importlib.import_module("slotserve.kernels")
    except ImportError:
        pass
    # Not installed: register the package-dir mapping by hand (only slotserve.kernels is needed).
    import types

    parent = types.ModuleType("slotserve")
    parent.__path__ = []
    sys.modules.setdefault("slotserve", parent)
    spec = importlib.util.spec_from_file_location("slotserve.kernels", REPO / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["slotserve.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


def peak_tbs(name: str) -> float | None:
    for key, tbs in PEAK_TBS:
        if key in name:
            return tbs
    return None


# ----------------------------------------------------------------------------- cases
# Each case: (op, shape label, build() -> args tuple, bytes moved, triton fn, ref fn)

def cases(K, dev, dtype=torch.bfloat16, tiny: bool = False):
    """`tiny` shrinks every shape (a smoke test of this script on CPU through the interpreter)."""
    M = {name: importlib.import_module(f"slotserve.kernels.{name}")
         for name in ("rms_norm", "rope", "activation", "kv_store", "decode_attention", "sampling", "lora")}
    es = torch.tensor([], dtype=dtype).element_size()
    out = []
    sizes = (lambda *xs: tuple(max(1, x // 64) for x in xs)) if tiny else (lambda *xs: xs)
    for h in sizes(2048, 4096):
        for t in sizes(1, 64, 4096):
            def build(t=t, h=h):
                return (torch.randn(t, h, device=dev, dtype=dtype), torch.rand(h, device=dev, dtype=dtype) + 0.5,
                        1e-5, torch.randn(t, h, device=dev, dtype=dtype))
            out.append(("rms_norm+res", f"T={t} H={h}", build, (4 * t * h + h) * es,
                        M["rms_norm"].rms_norm_triton, K.rms_norm_ref))
    hq, hk = 32, 8
    for d in (128, 64):                                  # Llama-3-8B, Llama-3.2-1B heads
        cache = K.build_cos_sin_cache(8192, d, base=500000.0, device=dev)
        for t in sizes(1, 64, 4096):
            def build(t=t, d=d, cache=cache):
                return (torch.randn(t, hq, d, device=dev, dtype=dtype),
                        torch.randn(t, hk, d, device=dev, dtype=dtype), torch.randint(0, 8192, (t,), device=dev), cache)
            out.append(("rope", f"T={t} Hq={hq} Hk={hk} D={d}", build, 2 * t * (hq + hk) * d * es + t * d * 4,
                        M["rope"].apply_rope_triton, K.apply_rope_ref))
    d = 128
    for inter in sizes(8192, 14336):
        for t in sizes(1, 64, 4096):
            def build(t=t, inter=inter):
                return (torch.randn(t, 2 * inter, device=dev, dtype=dtype),)
            out.append(("silu_and_mul", f"T={t} I={inter}", build, 3 * t * inter * es,
                        M["activation"].silu_and_mul_triton, K.silu_and_mul_ref))
    nb, bs = 4096, 16
    kc = torch.zeros(nb, bs, hk, d, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    for t in sizes(1, 64, 4096):
        def build(t=t):
            return (torch.randn(t, hk, d, device=dev, dtype=dtype), torch.randn(t, hk, d, device=dev, dtype=dtype),
                    kc, vc, torch.randperm(nb * bs, device=dev)[:t])
        out.append(("store_kv", f"T={t} Hk={hk} D={d}", build, 4 * t * hk * d * es + 8 * t,
                    M["kv_store"].store_kv_triton, K.store_kv_ref))
    for b, seq in ((1, 1024), (1, 8192), (8, 4096), (32, 2048), (64, 1024), (64, 4096))[: 2 if tiny else 6]:
        seq = seq // 64 if tiny else seq
        def build(b=b, seq=seq):
            blocks = math.ceil(seq / bs)
            kcache = torch.randn(b * blocks, bs, hk, d, device=dev, dtype=dtype)
            vcache = torch.randn_like(kcache)
            tables = torch.randperm(b * blocks, device=dev, dtype=torch.int32).view(b, blocks)
            return (torch.randn(b, hq, d, device=dev, dtype=dtype), kcache, vcache, tables,
                    torch.full((b,), seq, device=dev, dtype=torch.int32), d ** -0.5)
        out.append(("decode_attention", f"B={b} seq={seq} Hq={hq} Hk={hk} D={d}", build,
                    2 * b * seq * hk * d * es + 2 * b * hq * d * es,
                    M["decode_attention"].paged_decode_attention_triton, K.paged_decode_attention_ref))
    vocab = 1000 if tiny else 128256
    for b in sizes(1, 16, 64):
        for label, tk, tp in (("T=0.7", 0, 1.0), ("T=0.7 k=50 p=0.9", 50, 0.9)):
            def build(b=b, tk=tk, tp=tp):
                return (torch.randn(b, vocab, device=dev) * 3, torch.full((b,), 0.7, device=dev),
                        torch.full((b,), tk, device=dev, dtype=torch.int32), torch.full((b,), tp, device=dev),
                        torch.arange(b, device=dev), torch.zeros(b, device=dev, dtype=torch.int64))
            out.append(("sample", f"B={b} V={vocab} {label}", build, b * vocab * 4,
                        M["sampling"].sample_triton, K.sample_ref))
        # the engine's hint when no request uses top-k/top-p: 2 launches instead of 13
        out.append(("sample", f"B={b} V={vocab} T=0.7 filtered=False", out[-2][2], b * vocab * 4,
                    functools.partial(M["sampling"].sample_triton, filtered=False), K.sample_ref))
    out += lora_cases(M["lora"], dev, dtype, sizes)
    return out


def lora_cases(lora, dev, dtype, sizes) -> list[tuple]:
    """Multi-adapter LoRA (4 adapter slots, rank 16) on Llama-3-8B projections; y is updated in place.

    q_proj: the q slice (columns 0:4096) of the fused qkv output [T, 6144]; down_proj: 14336 -> 4096.
    Decode batches mix the adapters row by row; prefill (T=4096) has 4 contiguous segments.
    Bytes: x, the distinct adapters' A and B, and y's slice read and written (s is ~T*R*4 per split).
    """
    es = torch.tensor([], dtype=dtype).element_size()
    n_slots, r = 4, 16
    out = []
    for label, h_in, w, y_cols in (("q of qkv", 4096, 4096, 6144), ("down", 14336, 4096, 4096)):
        h_in, w, y_cols = sizes(h_in, w, y_cols)
        a_stack = torch.randn(n_slots, r, h_in, device=dev, dtype=dtype) / h_in ** 0.5
        b_stack = torch.randn(n_slots, w, r, device=dev, dtype=dtype) / r ** 0.5
        scaling = torch.full((n_slots,), 2.0, device=dev)
        for t in sizes(1, 16, 64, 4096):
            def build(t=t, h_in=h_in, y_cols=y_cols, a_stack=a_stack, b_stack=b_stack, scaling=scaling):
                if t >= 1024:                                   # prefill: one contiguous segment per adapter
                    idx = torch.arange(t, device=dev) * n_slots // t
                else:                                           # decode: adapters mixed row by row
                    idx = torch.randint(0, n_slots, (t,), device=dev)
                return (torch.randn(t, y_cols, device=dev, dtype=dtype), torch.randn(t, h_in, device=dev, dtype=dtype),
                        a_stack, b_stack, scaling, idx.to(torch.int32), 0)
            used = min(t, n_slots)
            nbytes = (t * h_in + 2 * t * w + used * r * (h_in + w)) * es + 4 * t
            out.append(("lora", f"T={t} {label} H={h_in} W={w} R={r}", build, nbytes,
                        lora.lora_triton, lora.lora_ref))
    return out


# ----------------------------------------------------------------------------- check

def _rel_err(a, b) -> float:
    # |a - b| / (1 + |b|): relative for large values, absolute near zero
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return max(float(((x.float() - y.float()).abs() / (1 + y.float().abs())).max()) for x, y in zip(a, b))


def check(K, dev) -> list[dict]:
    """Triton vs reference at the benchmark shapes, in bf16 and fp16; sampling by its properties."""
    sampling = importlib.import_module("slotserve.kernels.sampling")
    results = []
    for dtype in (torch.bfloat16, torch.float16):
        # ~2 ulps of the output dtype (bf16: 2**-7 relative, fp16: 2**-10); attention twice that,
        # since the softmax weights are rounded to the input dtype before the P@V product.
        ulp2 = {torch.bfloat16: 2 * 2.0**-7, torch.float16: 2 * 2.0**-10}[dtype]
        for op, shape, build, _, fast, ref in cases(K, dev, dtype):
            if op == "sample":
                continue
            torch.manual_seed(0)
            args = build()
            if op == "store_kv":
                k, v, kc, vc, slots = args
                kc2, vc2 = kc.clone(), vc.clone()
                fast(k, v, kc, vc, slots)
                ref(k, v, kc2, vc2, slots)
                ok, err = torch.equal(kc, kc2) and torch.equal(vc, vc2), 0.0
            elif op == "lora":                                  # in place on y: each side its own copy
                y, rest = args[0], args[1:]
                err = _rel_err(fast(y.clone(), *rest), ref(y.clone(), *rest))
                ok = err <= ulp2
            else:
                err = _rel_err(fast(*args), ref(*args))
                ok = err <= ulp2 * (2 if op == "decode_attention" else 1)
            results.append({"op": op, "shape": shape, "dtype": str(dtype), "ok": ok, "max_abs_err": err})
            print(f"check {'PASS' if ok else 'FAIL'} {op:17s} {shape:38s} {dtype} max rel err={err:.3g}", flush=True)
    attn_case = [c for c in cases(K, dev) if c[0] == "decode_attention"][2]
    attn_args = attn_case[2]()
    attn_case[4](*attn_args)                                # compiled outside the no-sync check
    for name, ok, detail in check_sampling(sampling, dev, also_sync=lambda: attn_case[4](*attn_args)):
        results.append({"op": "sample", "shape": name, "ok": bool(ok), "detail": detail})
        print(f"check {'PASS' if ok else 'FAIL'} sample            {name} {detail}", flush=True)
    return results


def check_sampling(sampling, dev, b: int = 64, v: int = 128256, n: int = 20000, also_sync=None) -> list[tuple]:
    """Sampling by its properties -> [(name, ok, detail)]: greedy == argmax; draws inside the
    exact set; top-k sets identical to the reference's; chunking changes no token; top-k/top-p
    sets identical up to fp32 mass sums at a top-p boundary; chi-square; no host sync (CUDA;
    `also_sync` runs under the same check). Sizes shrink for a CPU smoke run (interpreter)."""
    torch.manual_seed(0)
    logits = torch.randn(b, v, device=dev) * 3
    seeds = torch.arange(b, device=dev)
    zeros = torch.zeros(b, device=dev, dtype=torch.int64)
    t0 = torch.zeros(b, device=dev)
    greedy = sampling.sample_triton(logits, t0, zeros.int(), torch.ones(b, device=dev), seeds, zeros)
    ok_greedy = torch.equal(greedy, logits.argmax(-1))
    row = logits[:1].repeat(b, 1)
    t, k, p = torch.full((b,), 0.7, device=dev), torch.full((b,), 50, device=dev, dtype=torch.int32), \
        torch.full((b,), 0.9, device=dev)
    allowed = sampling.allowed_mask_ref(row, t, k, p)
    ok_set = True
    for step in range(8):
        got = sampling.sample_triton(row, t, k, p, seeds, zeros + step)
        ok_set &= bool(allowed.gather(1, got[:, None]).all())

    def key(x):                      # the ordered int32 key the thresholds live on (-0.0 keyed as +0.0)
        bits = x.view(torch.int32)
        bits = torch.where(bits == -2**31, 0, bits)
        return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()

    # top-k alone: the Triton set is the reference's on every row, exactly (integer counts),
    # also with ties straddling the k-th value (rounded logits) and +-0.0 at the boundary
    tk = torch.randint(1, 200, (b,), device=dev, dtype=torch.int32)
    tied = logits.clone()
    tied[16:32] = torch.round(tied[16:32] * 2) / 2
    tied[32:48] = -tied[32:48].abs() - 1
    tied[32:48, :20] = 1.0
    tied[32:48, 20:100] = -0.0
    tied[32:48, 100:180] = 0.0
    tk[32:48] = torch.randint(21, 180, (16,), device=dev, dtype=torch.int32)
    ones = torch.ones(b, device=dev)
    _, thresh = sampling.sample_triton(tied, t, tk, ones, seeds, zeros, return_threshold=True)
    topk_rows = int(((key(tied / t[:, None]) >= thresh[:, None]) == sampling.allowed_mask_ref(tied, t, tk, ones))
                    .all(-1).sum())
    ok_topk = topk_rows == b
    # how a row is split into chunks changes no token (top-k only, so no fp32 mass sums)
    a = sampling.sample_triton(tied, t, tk, ones, seeds, zeros)
    ok_chunks = torch.equal(a, sampling.sample_triton(tied, t, tk, ones, seeds, zeros, chunk=32768))
    # top-k and top-p: the Triton thresholds give the reference's very sets (64 different rows)
    tk = torch.randint(0, 200, (b,), device=dev, dtype=torch.int32)
    tp = torch.rand(b, device=dev) * 0.5 + 0.5
    _, thresh = sampling.sample_triton(logits, t, tk, tp, seeds, zeros, return_threshold=True)
    ref_sets = sampling.allowed_mask_ref(logits, t, tk, tp)
    differ = (key(logits / t[:, None]) >= thresh[:, None]) != ref_sets
    same_rows = int((~differ).all(-1).sum())
    # A differing token must sit on a top-p boundary blurred by fp32 summation order: the
    # mass of the tokens above it (float64) within 1e-4 of top_p. Anything else is a bug.
    x64 = (logits / t[:, None]).double()
    probs = torch.softmax(x64.masked_fill(~sampling.allowed_mask_ref(logits, t, tk, torch.ones_like(tp)),
                                          float("-inf")), -1)
    rows, cols = differ.nonzero(as_tuple=True)
    above = [float(probs[r][x64[r] > x64[r, c]].sum()) for r, c in zip(rows.tolist(), cols.tolist())]
    worst = max([abs(a - float(tp[r])) for a, r in zip(above, rows.tolist())], default=0.0)
    ok_set &= worst < 1e-4
    small = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0, 0.3, -0.5, 1.5], device=dev)
    draws = sampling.sample_triton(small.repeat(n, 1), torch.full((n,), 0.8, device=dev),
                                   torch.zeros(n, device=dev, dtype=torch.int32), torch.ones(n, device=dev),
                                   torch.arange(n, device=dev), torch.zeros(n, device=dev, dtype=torch.int64))
    expected = torch.softmax(small / 0.8, 0).double() * n
    chi2 = float((((torch.bincount(draws, minlength=8).double() - expected) ** 2) / expected).sum())
    plain = (torch.zeros_like(k), torch.ones_like(p))
    # the engine's "no top-k/top-p" hint (2 launches) draws the very tokens of the full sequence
    ok_hint = torch.equal(sampling.sample_triton(logits, t, *plain, seeds, zeros, filtered=False),
                          sampling.sample_triton(logits, t, *plain, seeds, zeros))
    ok_sync = True
    if dev.type == "cuda":
        sampling.sample_triton(row, t, *plain, seeds, zeros)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:                                                # compiled already: launches only
            sampling.sample_triton(row, t, k, p, seeds, zeros)
            sampling.sample_triton(row, t, *plain, seeds, zeros)
            sampling.sample_triton(row, t, *plain, seeds, zeros, filtered=False)
            if also_sync is not None:
                also_sync()
        except RuntimeError:
            ok_sync = False
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [("greedy==argmax", ok_greedy, ""),
            ("top-k set exact", ok_topk, f"rows with the reference's set: {topk_rows}/{b} "
             f"(ties, +-0.0 at the boundary included)"),
            ("chunking changes no token", ok_chunks, ""),
            ("filtered=False hint: same tokens", ok_hint, ""),
            ("top-k/top-p set exact", ok_set, f"rows with the reference's set: {same_rows}/{b}; "
             f"differing tokens' |mass above - top_p| <= {worst:.2g}"),
            ("chi2(df=7) < 24.32", chi2 < 24.32, f"chi2={chi2:.2f}"),
            ("no host sync", ok_sync, "" if dev.type == "cuda" else "not checked off CUDA")]


# ----------------------------------------------------------------------------- bench

def bench(K, dev, use_compile: bool, budget: float, json_path: str | None, report: dict) -> None:
    from triton.testing import do_bench

    name = torch.cuda.get_device_name(dev)
    peak = peak_tbs(name)
    start = time.time()
    compiled = {}
    header = f"{'op':17s} {'shape':38s} {'triton us':>10s} {'eager us':>10s} {'compile us':>10s} " \
             f"{'GB/s':>8s} {'% peak':>7s} {'vs compile':>10s}"
    print(f"\n{name} (peak {peak or '?'} TB/s), bf16\n{header}\n{'-' * len(header)}", flush=True)
    for op, shape, build, nbytes, fast, ref in cases(K, dev):
        torch.manual_seed(0)
        args = build()
        t_fast = do_bench(lambda: fast(*args), warmup=10, rep=50, return_mode="median") * 1e3
        t_eager = do_bench(lambda: ref(*args), warmup=5, rep=25, return_mode="median") * 1e3
        t_comp = None
        if use_compile and time.time() - start < budget:
            try:
                # sample_ref's gathers break inductor's dynamic-shape codegen (torch 2.11): static
                fn = compiled.setdefault(op, torch.compile(ref, dynamic=False if op == "sample" else None))
                t_comp = do_bench(lambda: fn(*args), warmup=5, rep=25, return_mode="median") * 1e3
            except Exception as e:                          # a reference torch.compile cannot take
                print(f"  (torch.compile failed for {op}: {type(e).__name__}: {str(e)[:120]})", flush=True)
        gbs = nbytes / (t_fast * 1e-6) / 1e9
        row = {"op": op, "shape": shape, "triton_us": round(t_fast, 2), "eager_us": round(t_eager, 2),
               "compile_us": None if t_comp is None else round(t_comp, 2), "bytes": nbytes,
               "triton_gbs": round(gbs, 1), "pct_peak": None if peak is None else round(100 * gbs / (peak * 1e3), 1),
               "speedup_vs_compile": None if t_comp is None else round(t_comp / t_fast, 2)}
        report["bench"].append(row)
        print(f"{op:17s} {shape:38s} {t_fast:10.1f} {t_eager:10.1f} "
              f"{'-' if t_comp is None else f'{t_comp:.1f}':>10s} {gbs:8.0f} "
              f"{'-' if row['pct_peak'] is None else row['pct_peak']:>7} "
              f"{'-' if t_comp is None else f'{t_comp / t_fast:.2f}x':>10s}", flush=True)
        if json_path:                                       # incremental: a timeout keeps what ran
            pathlib.Path(json_path).write_text(json.dumps(report, indent=1))
        del args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="verify Triton vs reference at these shapes first")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds after which torch.compile timings stop")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device (the Triton kernels run on GPU); nothing to do here.")
        return 0
    K = _import_kernels()
    import triton

    dev = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
              "peak_tbs": peak_tbs(torch.cuda.get_device_name(dev)), "dtype": "bfloat16", "check": [], "bench": []}
    if args.check:
        report["check"] = check(K, dev)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    bench(K, dev, not args.no_compile, args.budget, args.json, report)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    failed = [r for r in report["check"] if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
