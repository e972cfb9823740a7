"""Rollback by slot swap vs by reload, and live's latency while a candidate loads.

In one run, on the same bundle:
  swap    SlotManager.rollback(): previous <-> live pointer swap (what slotserve does)
  reload  what a server without a warm previous does: open + verify every file's sha256
          (Store.verify) + Engine.from_pretrained + tokenizer
  fresh   Engine.from_pretrained alone (files already in the page cache), for scale
and live's request latency (p50/p99) idle vs while a third bundle with its own weights
loads and is released back to back (the stress case: a demo load is over in ~0.1 s, so
every measured request overlaps a load). Idle and loading phases are interleaved.

    python benchmarks/bench_rollback.py                 # demo bundles, CPU
    python benchmarks/bench_rollback.py --json          # one JSON object on stdout
    python benchmarks/bench_rollback.py --hidden 512 --layers 8 # a ~100 MB model instead
    python benchmarks/bench_rollback.py --device cuda --store DIR --bundle m:1 --other m:2 --candidate m:3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(xs_s):
    ms = [x * 1e3 for x in xs_s]
    return {"median": statistics.median(ms), "p99": pct(ms, 99), "n": len(ms)}


def demo_store(root: Path, arch: str, hidden: int | None, layers: int | None):
    """Three bundles (seeds 0, 1, 2) of the demo model, optionally resized to
    hidden/layers so reload cost can be seen growing with size while swap does not."""
    from slotserve.bundles.demo import build_demo_model
    from slotserve.bundles.store import Store

    st = Store(root / "home")
    for seed in (0, 1, 2):
        build_demo_model(arch, seed, root / f"s{seed}")
        if hidden or layers:
            resize(root / f"s{seed}", hidden or 64, layers or 2, seed)
        st.publish(root / f"s{seed}", "bench")
    # previous, live, and the candidate loaded during the latency phase: its own weights,
    # so every load really reads, casts and places them (nothing comes from the pool)
    return st, "bench:1", "bench:2", "bench:3"


def resize(model_dir: Path, hidden: int, layers: int, seed: int):
    from safetensors.torch import save_file

    from slotserve.bundles.demo import random_weights

    cfg = json.loads((model_dir / "config.json").read_text())
    heads, d = max(1, hidden // 64), 64
    kv = max(1, heads // 4)
    inter, vocab = hidden * 3, cfg["vocab_size"]
    cfg.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv, head_dim=d, intermediate_size=inter)
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    arch = "qwen3" if cfg.get("model_type") == "qwen3" else "llama"
    tensors = random_weights(arch, seed, cfg, vocab)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def time_swaps(mgr, n):
    out = []
    for i in range(n):
        t = time.perf_counter()
        mgr.rollback("bench")
        out.append(time.perf_counter() - t)
    return out


def time_reloads(store, ref, device, n):
    from slotserve.engine import Engine
    from slotserve.slots.loader import load_tokenizer

    reload, fresh = [], []
    for _ in range(n):
        t = time.perf_counter()
        b = store.verify(ref)                         # rehash every byte, as a cold replica must
        eng = Engine.from_pretrained(b.path, device=device)
        load_tokenizer(b)
        _sync(device)
        reload.append(time.perf_counter() - t)
        eng.close()
        t = time.perf_counter()
        eng = Engine.from_pretrained(b.path, device=device)
        _sync(device)
        fresh.append(time.perf_counter() - t)
        eng.close()
    return reload, fresh


def _sync(device):
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def live_latency(mgr, seconds, prompt, params):
    async def run():
        lat, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            await (await mgr.generate("live", prompt, params)).result()
            lat.append(time.perf_counter() - t)
        return lat
    return asyncio.run(run())


def loading_loop(mgr, ref, stop, counter):
    while not stop.is_set():
        mgr.load(ref, "candidate")
        mgr.release("candidate")
        counter[0] += 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="llama", help="demo arch when no --store is given")
    ap.add_argument("--hidden", type=int, help="resize the demo model: hidden size (head_dim 64)")
    ap.add_argument("--layers", type=int, help="resize the demo model: number of layers")
    ap.add_argument("--store", help="an existing store (default: demo bundles in a temp dir)")
    ap.add_argument("--bundle", help="the bundle rolled back to (previous); needs --store")
    ap.add_argument("--other", help="the bundle live holds; needs --store")
    ap.add_argument("--candidate", help="the bundle loaded (and released) again and again while "
                                        "live's latency is measured; needs --store")
    ap.add_argument("--swaps", type=int, default=2000)
    ap.add_argument("--reloads", type=int, default=30)
    ap.add_argument("--phase-s", type=float, default=5.0, help="seconds per latency phase")
    ap.add_argument("--phases", type=int, default=3, help="idle/loading phase pairs (interleaved)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="intra-op threads (default: 1 on CPU, leaving a core to the Python "
                         "threads on small boxes; torch's default on CUDA)")
    ap.add_argument("--loader-slice-ms", type=float, default=0.5, help="loader duty cycle: work ...")
    ap.add_argument("--loader-pause-ms", type=float, default=5.0, help="... then pause (while serving)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from slotserve.engine import SamplingParams
    from slotserve.slots import SlotManager

    threads = args.torch_threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)

    tmp = None
    if args.store:
        from slotserve.bundles.store import Store

        store, prev_ref, live_ref = Store(args.store, create=False), args.bundle, args.other
        cand_ref = args.candidate
        assert prev_ref and live_ref and cand_ref, "--store needs --bundle, --other and --candidate"
    else:
        tmp = tempfile.TemporaryDirectory(prefix="slotserve-bench-")
        store, prev_ref, live_ref, cand_ref = demo_store(Path(tmp.name), args.arch, args.hidden, args.layers)

    mgr = SlotManager(store, device=args.device, loader_slice_s=args.loader_slice_ms / 1e3,
                      loader_pause_s=args.loader_pause_ms / 1e3)
    mgr.load(prev_ref, "live")
    mgr.load(live_ref, "candidate")
    mgr.promote()                                     # live = other, previous = bundle
    for _ in range(20):                               # warm-up
        mgr.rollback("warm-up")
    swaps = time_swaps(mgr, args.swaps)
    if mgr.slot("live").ref != live_ref:
        mgr.rollback("restore")
    reload, fresh = time_reloads(store, prev_ref, args.device, args.reloads)

    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    prompt = list(range(1, 17))
    live_latency(mgr, 0.5, prompt, params)            # warm-up
    idle, loading, loads = [], [], [0]
    for _ in range(args.phases):
        idle += live_latency(mgr, args.phase_s, prompt, params)
        stop = threading.Event()
        th = threading.Thread(target=loading_loop, args=(mgr, cand_ref, stop, loads))
        th.start()
        try:
            loading += live_latency(mgr, args.phase_s, prompt, params)
        finally:
            stop.set()
            th.join()
    mgr.close()

    s, r, f = summary(swaps), summary(reload), summary(fresh)
    li, ll = summary(idle), summary(loading)
    out = {
        "device": args.device,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu"
                   + (f" {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "bundle": prev_ref, "candidate_loaded_meanwhile": cand_ref,
        "weight_file_bytes": sum(e.size for r, e in store.open(prev_ref).manifest.files.items()
                                 if r.endswith(".safetensors")),
        "swap_ms_median": s["median"], "swap_ms_p99": s["p99"], "swaps": s["n"],
        "reload_ms_median": r["median"], "reload_ms_p99": r["p99"], "reloads": r["n"],
        "fresh_engine_ms_median": f["median"], "fresh_engine_ms_p99": f["p99"],
        "reload_over_swap_median": r["median"] / s["median"],
        "live_p50_ms_idle": li["median"], "live_p99_ms_idle": li["p99"], "live_requests_idle": li["n"],
        "live_p50_ms_loading": ll["median"], "live_p99_ms_loading": ll["p99"],
        "live_requests_loading": ll["n"], "candidate_loads_during_measure": loads[0],
        "live_p99_loading_over_idle": ll["p99"] / li["p99"],
        "max_tokens": args.max_tokens, "load_avg_1m_at_end": os.getloadavg()[0],
        "loader": {"nice": mgr.loader.nice, "slice_s": mgr.loader.slice_s, "pause_s": mgr.loader.pause_s},
    }
    if args.json:
        print(json.dumps(out))
    else:
        w = max(map(len, out))
        for k, v in out.items():
            print(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) else f"{k:<{w}}  {v}")
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
