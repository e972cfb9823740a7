"""Compile every Triton kernel for a CUDA target ahead of time, without a GPU.

    python -m slotserve.kernels.aot [--arch 90] [--json PATH] [--ptx-dir DIR]

Triton's interpreter (the CPU tests) accepts code the real compiler may reject, and says
nothing about registers, spills or how wide the memory accesses are. This runs each
op's real launcher on CPU tensors at H100-sized shapes with `JITFunction.run` replaced by
a recorder, so the kernels, their constexprs, `num_warps` and Triton's own argument
specialisation (16-byte alignment, divisibility by 16) are exactly what the launcher
would launch; then compiles each distinct launch with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` down to a cubin with Triton's bundled ptxas, and
reads registers, spills and stack from ptxas' own report (`-v`). Device-dependent launch
choices (split counts, sampling chunks) see `dispatch.sm_count` = 132, an H100 SXM.

Needs Triton imported *without* TRITON_INTERPRET=1 (run it in a fresh process);
`tests/test_kernels_sm90_compile.py` does. Nothing here touches a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

H100_SMS = 132
KERNEL_MODULES = ("rms_norm", "rope", "activation", "kv_store", "decode_attention", "sampling", "lora", "penalties")


@dataclass
class Launch:
    """One launcher call, as the recorder saw it."""
    case: str
    kernel: object                                      # the JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Compiled:
    case: str
    module: str                                         # kernel module, e.g. "rope"
    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    ok: bool
    seconds: float = 0.0
    n_regs: int | None = None
    spill_stores: int | None = None                    # bytes, from ptxas -v
    spill_loads: int | None = None
    stack: int | None = None                           # bytes of stack frame
    shared: int | None = None                          # bytes, Triton's metadata
    cubin_bytes: int = 0
    ptx_mem: dict = field(default_factory=dict)        # global/shared load/store opcodes -> count
    error: str = ""


def _cases(torch, K, M):
    """(label, thunk) per launcher call at Llama-3.2-1B / Llama-3-8B / Qwen3 decode and prefill shapes (bf16)."""
    bf = torch.bfloat16
    out = []

    def add(label, fn, *args, **kw):
        out.append((label, lambda: fn(*args, **kw)))

    for h in (2048, 4096):
        for t in (1, 4096):
            x = torch.empty(t, h, dtype=bf)
            w = torch.empty(h, dtype=bf)
            add(f"rms_norm T={t} H={h}", M["rms_norm"].rms_norm_triton, x, w, 1e-5)
            add(f"rms_norm+res T={t} H={h}", M["rms_norm"].rms_norm_triton, x, w, 1e-5, torch.empty_like(x))
    add("rms_norm q_norm D=128", M["rms_norm"].rms_norm_triton, torch.empty(64 * 32, 128, dtype=bf),
        torch.empty(128, dtype=bf), 1e-6)
    for hq, hk, d in ((32, 8, 64), (32, 8, 128), (16, 8, 128)):
        cache = torch.empty(8192, d)
        for t in (1, 64, 4096):
            qkv = torch.empty(t, (hq + 2 * hk) * d, dtype=bf)    # q, k as views of a fused projection
            q = qkv[:, : hq * d].view(t, hq, d)
            k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
            add(f"rope T={t} Hq={hq} Hk={hk} D={d}", M["rope"].apply_rope_triton, q, k,
                torch.zeros(t, dtype=torch.int64), cache)
    for inter in (8192, 14336):
        add(f"silu_and_mul I={inter}", M["activation"].silu_and_mul_triton, torch.empty(64, 2 * inter, dtype=bf))
    for hk, d in ((8, 64), (8, 128)):
        kc = torch.empty(64, 16, hk, d, dtype=bf)
        for t in (1, 64, 4096):
            kv = torch.empty(t, 2, hk, d, dtype=bf)
            add(f"store_kv T={t} Hk={hk} D={d}", M["kv_store"].store_kv_triton, kv[:, 0], kv[:, 1], kc,
                torch.empty_like(kc), torch.zeros(t, dtype=torch.int64))
    for d in (64, 128):
        hq, hk, bs = 32, 8, 16
        for b, seq in ((1, 8192), (64, 1024)):
            blocks = seq // bs
            kc = torch.empty(b * blocks, bs, hk, d, dtype=bf)
            add(f"decode_attention B={b} seq={seq} D={d}", M["decode_attention"].paged_decode_attention_triton,
                torch.empty(b, hq, d, dtype=bf), kc, torch.empty_like(kc),
                torch.zeros(b, blocks, dtype=torch.int32), torch.full((b,), seq, dtype=torch.int32), d ** -0.5)
    for b in (1, 64):
        v = 128256
        # top-k and top-p on, so the launcher issues its whole launch sequence (CPU skips idle ones)
        args = (torch.zeros(b, v), torch.full((b,), 0.7), torch.full((b,), 50, dtype=torch.int32),
                torch.full((b,), 0.9), torch.arange(b), torch.zeros(b, dtype=torch.int64))
        add(f"sample B={b} V={v}", M["sampling"].sample_triton, *args)
        add(f"sample B={b} V={v} filtered=False", M["sampling"].sample_triton, *args, filtered=False)
    for t in (1, 64, 4096):  # LoRA: the q slice of a fused qkv; down_proj at a larger rank
        for h_in, w, cols, r in ((4096, 4096, 6144, 16), (14336, 4096, 4096, 64)):
            add(f"lora T={t} H={h_in} W={w} R={r}", M["lora"].lora_triton, torch.empty(t, cols, dtype=bf),
                torch.empty(t, h_in, dtype=bf), torch.empty(8, r, h_in, dtype=bf), torch.empty(8, w, r, dtype=bf),
                torch.ones(8), torch.zeros(t, dtype=torch.int32))
    for b in (1, 64):  # logits processing at Llama-3's vocabulary
        v = 128256
        kw = dict(temperature=torch.full((b,), 0.7), min_p=torch.full((b,), 0.05),
                  token_state=torch.zeros(b, v, dtype=torch.int32), state_rows=torch.arange(b),
                  repetition=torch.full((b,), 1.1), frequency=torch.zeros(b), presence=torch.zeros(b),
                  bias_ids=torch.zeros(b, 300, dtype=torch.int64), bias_values=torch.zeros(b, 300))
        add(f"apply_penalties B={b} V={v}", M["penalties"].apply_penalties_triton, torch.zeros(b, v), **kw)
        add(f"apply_penalties B={b} V={v} min_p only", M["penalties"].apply_penalties_triton, torch.zeros(b, v),
            temperature=kw["temperature"], min_p=kw["min_p"])
    return out


def record_launches() -> list[Launch]:
    """Run every launcher once per case with kernel launches recorded instead of run."""
    import torch
    from triton.runtime.jit import JITFunction

    import importlib

    K = importlib.import_module(f"{__package__}")
    dispatch = importlib.import_module(f"{__package__}.dispatch")
    M = {name: importlib.import_module(f"{__package__}.{name}") for name in KERNEL_MODULES}
    for mod in M.values():
        for name, value in vars(mod).items():
            if name.endswith("_kernel") and not isinstance(value, JITFunction):
                raise RuntimeError(f"{mod.__name__}.{name} is not a JITFunction (TRITON_INTERPRET=1 set?)")
    launches: list[Launch] = []
    current = [""]

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(current[0], self, args, dict(kwargs)))

    saved_run, saved_sms = JITFunction.run, dispatch.sm_count
    JITFunction.run = record
    dispatch.sm_count = lambda device: H100_SMS
    try:
        for label, thunk in _cases(torch, K, M):
            current[0] = label
            thunk()
    finally:
        JITFunction.run, dispatch.sm_count = saved_run, saved_sms
    return launches


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_MEM = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:ld|st)\.global(?:\.[a-z0-9]+)*|(?:ld|st)\.shared(?:\.[a-z0-9]+)*)\s",
                  re.MULTILINE)


def _specialise(launch: Launch, backend):
    """What `JITFunction.run` would hand `triton.compile` for this call (Triton 3.x internals)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn, kwargs = launch.kernel, dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.9 only
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def compile_launch(launch: Launch, arch: int = 90, ptx_dir: Path | None = None) -> Compiled:
    """Compile one recorded launch for sm_`arch` -> registers, spills, shared memory, PTX memory opcodes."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options, signature, constexprs, attrs = _specialise(launch, backend)
    names = launch.kernel.arg_names
    consts = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
    res = Compiled(launch.case, launch.kernel.__module__.rsplit(".", 1)[-1], launch.kernel.__name__, consts,
                   options.num_warps, options.num_stages, ok=False)
    log = io.StringIO()
    start = time.perf_counter()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True                 # ptxas -v report, printed by Triton after ptxas
    try:
        with contextlib.redirect_stdout(log):
            kernel = compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                             options=options.__dict__)
    except Exception as e:                              # the real compiler rejected it: report, don't hide
        res.error = f"{type(e).__name__}: {str(e)[:2000]}"
        return res
    finally:
        knobs.nvidia.dump_ptxas_log = saved
        res.seconds = round(time.perf_counter() - start, 2)
    text = log.getvalue()
    cubin = kernel.asm.get("cubin", b"")
    res.cubin_bytes = len(cubin)
    res.ok = bool(cubin)
    res.shared = kernel.metadata.shared
    if (m := _PTXAS.search(text)):
        res.n_regs = int(m.group(1))
    if (m := _SPILL.search(text)):
        res.stack, res.spill_stores, res.spill_loads = map(int, m.groups())
    elif not text:
        res.error = "no ptxas report (cache hit? run with a fresh TRITON_CACHE_DIR)"
    ptx = kernel.asm.get("ptx", "")
    res.ptx_mem = dict(sorted(Counter(_MEM.findall(ptx)).items()))
    if ptx_dir is not None:
        ptx_dir.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9=]+", "_", f"{res.case}_{res.kernel}_{len(list(ptx_dir.iterdir()))}")
        (ptx_dir / f"{slug}.ptx").write_text(ptx)
    return res


def _key(launch: Launch, backend) -> str:
    options, signature, constexprs, attrs = _specialise(launch, backend)
    return repr((launch.kernel.__module__, launch.kernel.__name__, sorted(signature.items()),
                 sorted(constexprs.items()), sorted(attrs.items()), sorted(options.__dict__.items())))


def defined_kernels() -> list[str]:
    """`module.name` of every launchable kernel (`*_kernel` JITFunction) in the kernel modules."""
    import importlib

    from triton.runtime.jit import JITFunction

    out = []
    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"{__package__}.{name}")
        out += [f"{name}.{k}" for k, v in vars(mod).items() if k.endswith("_kernel") and isinstance(v, JITFunction)]
    return out


def run(arch: int = 90, ptx_dir: Path | None = None, verbose: bool = True) -> list[Compiled]:
    """Record every launcher's launches, compile each distinct one; -> one Compiled per distinct launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    seen: dict[str, Compiled] = {}
    results = []
    for launch in record_launches():
        key = _key(launch, backend)
        if key in seen:
            continue
        res = compile_launch(launch, arch, ptx_dir)
        seen[key] = res
        results.append(res)
        if verbose:
            print(_row(res), flush=True)
    return results


def _row(r: Compiled) -> str:
    wide = sum(n for op, n in r.ptx_mem.items() if ".v4" in op and ".global" in op)
    if not r.ok:
        return f"FAIL {r.case:38s} {r.kernel:22s} {r.error[:300]}"
    return (f"ok   {r.case:38s} {r.kernel:22s} regs={r.n_regs!s:>3} spill={r.spill_stores}/{r.spill_loads} "
            f"stack={r.stack} smem={r.shared:>6} warps={r.num_warps} v4-global={wide:<3d} {r.seconds:5.1f}s "
            f"{r.constexprs}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100)")
    ap.add_argument("--json", help="write the per-kernel results here")
    ap.add_argument("--ptx-dir", help="also write each kernel's PTX here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: TRITON_INTERPRET is set; the kernels would be interpreted, not compiled", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as cache:
        # a fresh cache: every kernel really goes through ptxas (and reports), none comes from disk
        os.environ.setdefault("TRITON_CACHE_DIR", cache)
        start = time.perf_counter()
        results = run(args.arch, Path(args.ptx_dir) if args.ptx_dir else None)
        total = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    compiled = {f"{r.module}.{r.kernel}" for r in results if r.ok}
    uncovered = [k for k in defined_kernels() if k not in compiled]
    print(f"{len(results) - len(failed)}/{len(results)} launches compiled for sm_{args.arch} in {total:.1f}s; "
          f"kernels never launched by a case: {uncovered or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "seconds": round(total, 1), "uncovered": uncovered,
                                               "kernels": [asdict(r) for r in results]}, indent=1))
    return 1 if failed or uncovered else 0


if __name__ == "__main__":
    sys.exit(main())
