"""The engine's sampling pipeline (slotserve.engine.sampling_state): logit_bias, penalties,
min_p, grammar masks and raw-logit logprobs, on the torch path and on the Triton kernels
under Triton's interpreter (a fresh process, as tests/test_engine_triton_interp.py does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from slotserve.engine import Engine, SamplingParams
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
    p = [1, 5, 9, 20, 33]
    out = {}
    with Engine.from_pretrained(sys.argv[1], kv_cache_tokens=512) as eng:
        g = dict(max_tokens=10, ignore_eos=True)
        out["plain"] = eng.generate([p], SamplingParams(temperature=0, **g))[0]
        out["penalized"] = eng.generate([p], SamplingParams(temperature=0, frequency_penalty=2.0,
                                                            presence_penalty=1.0, repetition_penalty=1.5, **g))[0]
        out["bias"] = eng.generate([p], SamplingParams(temperature=0, logit_bias=((7, 100.0),), **g))[0]
        sp = SamplingParams(temperature=0.9, min_p=0.2, seed=5, frequency_penalty=0.5, **g)
        out["min_p"] = eng.generate([p, p[:3]], [sp, SamplingParams(temperature=0, **g)])
        h = eng.submit(p, SamplingParams(temperature=0, logprobs=3, **g))
        h.result()
        out["logprobs"] = [[x.logprob, list(x.top)] for x in h.logprobs]
        # prompt logprobs: the scored positions' rows through the final norm and LM head, in a
        # batch with an ordinary request (mixed rows: sampling first, then the scored ones)
        hs = [eng.submit(p * 3, SamplingParams(max_tokens=0, prompt_logprobs=2)), eng.submit(p, SamplingParams(**g))]
        [x.result() for x in hs]
        out["prompt"] = [[x.logprob, list(x.top)] for x in hs[0].prompt_logprobs]
    print("RESULT" + json.dumps(out))
""")


def _run(tmp_path, env_extra):
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, "-P", "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the GPU tests run the real kernels")
def test_knobs_torch_path_and_triton_interpreter_agree(tmp_path):
    ref = _run(tmp_path / "ref", {"SLOTSERVE_KERNELS": "torch"})
    # what each knob does, on the torch path
    assert ref["bias"] == [7] * 10
    assert ref["penalized"] != ref["plain"]
    assert len(set(ref["penalized"])) > len(set(ref["plain"]))          # penalties discourage repeats
    assert ref["logprobs"][0][1][0][0] == ref["plain"][0]                # greedy: the top-1 alternative
    assert all(abs(lp - top[0][1]) < 1e-6 for lp, top in ref["logprobs"])
    tri = _run(tmp_path / "tri", {"SLOTSERVE_KERNELS": "triton", "TRITON_INTERPRET": "1"})
    # the penalty kernels are bit-identical to their references, so greedy tokens are too (the
    # sampled min_p row runs the Triton launches, but the two samplers draw different streams)
    for k in ("plain", "penalized", "bias"):
        assert tri[k] == ref[k], k
    assert tri["min_p"][1] == ref["min_p"][1] and len(tri["min_p"][0]) == 10
    for k in ("logprobs", "prompt"):
        assert len(ref[k]) == len(tri[k]) == {"logprobs": 10, "prompt": 14}[k]
        for (a, ta), (b, tb) in zip(ref[k], tri[k]):
            assert abs(a - b) < 1e-5 and [t[0] for t in ta] == [t[0] for t in tb], k


def test_nan_guard_still_fails_a_penalized_row(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from slotserve.engine import Engine, SamplingParams
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with Engine.from_pretrained(str(tmp_path), kv_cache_tokens=512) as eng:
        def poison(logits):
            logits[:, 3] = float("nan")
        eng.logits_hook = poison
        h = eng.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, min_p=0.5, logit_bias=((9, -100.0),),
                                                 presence_penalty=1.0))
        with pytest.raises(FloatingPointError):
            h.result(timeout=60)


def test_grammar_constrains_the_engine_on_the_demo_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from slotserve.api.structured import grammar_for
    from slotserve.bundles import demo
    from slotserve.engine import Engine, SamplingParams
    tok = PreTrainedTokenizerFast(tokenizer_object=demo.build_tokenizer(), eos_token=demo.EOS)
    path = demo.build_demo_model("llama", 0, tmp_path / "m")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    g = grammar_for({"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}},
                    None, None)
    with Engine.from_pretrained(str(path), kv_cache_tokens=1024) as eng:
        with pytest.raises(ValueError, match="tokenizer"):
            eng.submit([1, 2], SamplingParams(grammar=g))
        eng.use_tokenizer(tok)
        # random weights: only the mask can make this JSON, sampled or greedy
        outs = eng.generate([[1, 2, 3]] * 3, [SamplingParams(temperature=t, seed=s, max_tokens=300, grammar=g)
                                              for t, s in ((0, 0), (1.0, 1), (1.0, 2))])
    for ids in outs:
        assert json.loads(tok.decode(ids, skip_special_tokens=True)).keys() == {"ok"}


def test_park_frees_the_token_counts_and_penalties_work_after_unpark(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from slotserve.engine import Engine, SamplingParams
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, frequency_penalty=2.0)
    with Engine.from_pretrained(str(tmp_path), kv_cache_tokens=512, max_batch=4) as eng:
        assert eng.memory().sampler_bytes == 0                   # nothing asked for a penalty yet
        before = eng.generate([[1, 2, 3]], sp)[0]
        assert eng.memory().sampler_bytes == 4 * 256 * 4         # max_batch x vocab x int32
        eng.park()
        assert eng.memory().sampler_bytes == 0
        eng.unpark()
        assert eng.generate([[1, 2, 3]], sp)[0] == before


GRAMMAR_MIN_P = textwrap.dedent("""
    import json, sys
    from transformers import PreTrainedTokenizerFast
    from slotserve.api.structured import grammar_for
    from slotserve.bundles import demo
    from slotserve.engine import Engine, SamplingParams
    tok = PreTrainedTokenizerFast(tokenizer_object=demo.build_tokenizer(), eos_token=demo.EOS)
    path = demo.build_demo_model("llama", 0, sys.argv[1])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    g = grammar_for({"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}},
                    None, None)
    with Engine.from_pretrained(str(path), kv_cache_tokens=1024) as eng:
        eng.use_tokenizer(tok, prebuild=False)
        # min_p 0.9 keeps only tokens within 10% of the most likely one: on random weights that
        # is almost never a token the grammar allows, unless min_p looks at the allowed ones only
        outs = eng.generate([[1, 2, 3]] * 3, [SamplingParams(temperature=1.0, min_p=mp, seed=s, max_tokens=60,
                                                             grammar=g)
                                              for mp, s in ((0.9, 1), (0.9, 2), (1.0, 3))])
    print("RESULT" + json.dumps([tok.decode(ids, skip_special_tokens=True) for ids in outs]))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the GPU tests run the real kernels")
@pytest.mark.parametrize("side", ["torch", "triton"])
def test_min_p_is_relative_to_the_tokens_the_grammar_allows(tmp_path, side):
    env = {"SLOTSERVE_KERNELS": side, **({"TRITON_INTERPRET": "1"} if side == "triton" else {})}
    env = dict(os.environ, **env)
    proc = subprocess.run([sys.executable, "-P", "-c", GRAMMAR_MIN_P, str(tmp_path / "m")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in json.loads(proc.stdout.split("RESULT", 1)[1]):
        assert json.loads(text).keys() == {"ok"}, text
