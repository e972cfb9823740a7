"""`SamplingState`: what one engine keeps to process a step's logits before the sampler.

The engine's step applies, per sampling row and in this order (docs/engine.md):

    finite check -> logprobs copy (raw logits) -> grammar mask -> logit_bias -> repetition ->
    frequency -> presence -> min_p (slotserve.kernels.apply_penalties) -> sampler

* **Token counts** for the penalties: one int32 `token_state` [max_batch, V] (output counts
  plus a PROMPT_SEEN bit, slotserve.kernels.penalties), allocated on the first request that
  uses a penalty (the memory planner counts it up front: `token_state_bytes`). A sequence
  with a penalty gets a row when it is scheduled (`assign_rows`, under the engine lock), the
  row is built from its prompt (and, after a preemption, its output so far) at its next
  step, and one scatter per step counts the sampled tokens (`count`); the row is freed when
  the scheduler releases the sequence (finish, cancel, preemption).
* **Logprobs** come from the raw logits, before bias, penalties, mask and temperature: the
  model's own distribution, which is what OpenAI's `logprobs` report and what a
  transformers forward pass gives (vLLM's default too). The rows asking are copied before
  the in-place processing.
* **Grammar masks**: the engine's `TokenMasker` (slotserve.engine.constraints), built from
  the bundle's tokenizer on the first request with a grammar; each such sequence holds its
  `Matcher`, which the scheduler advances as tokens are appended. The mask comes first:
  min_p is then relative to the most likely token the grammar *allows* (with the mask
  after it, a min_p that kept only forbidden tokens left the row nothing to sample). A
  mask only writes -inf, which bias and penalties keep -inf, so the order changes nothing
  else, and a row always keeps a finite allowed token (EOS at least).
Rows that use none of this cost nothing: each launch is skipped when no row needs it.
"""

from __future__ import annotations

import threading

import torch

from slotserve import kernels as K
from slotserve.engine.request import TokenLogprob


def token_state_bytes(max_batch: int, vocab_size: int) -> int:
    """Bytes of the penalties' token_state for an engine (what the memory planner counts)."""
    return max_batch * vocab_size * 4


class SamplingState:
    def __init__(self, max_batch: int, vocab_size: int, device: torch.device, eos_token_ids: tuple[int, ...]):
        self.max_batch, self.vocab_size, self.device = max_batch, vocab_size, device
        self.eos_token_ids = eos_token_ids
        self.token_state: torch.Tensor | None = None
        self._free_rows = list(range(max_batch - 1, -1, -1))
        self._tokenizer = None
        self._masker = None
        self._bitmask: torch.Tensor | None = None
        self._masker_lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return 0 if self.token_state is None else self.token_state.numel() * 4

    # ---------------------------------------------------------------- grammar
    def use_tokenizer(self, tokenizer, *, prebuild: bool = True) -> None:
        """Compile grammars against `tokenizer`. With `prebuild`, its masker (~0.4 s for a 49k
        vocabulary, more on a busy CPU) is built now on a background thread, so the first
        request with a grammar does not stall the caller (`submit` runs on the event loop)."""
        with self._masker_lock:
            self._tokenizer, self._masker = tokenizer, None
        if prebuild:
            threading.Thread(target=self._build_quietly, name="slotserve-masker", daemon=True).start()

    def _build_quietly(self) -> None:
        try:
            self._get_masker()
        except Exception:   # noqa: BLE001 - the first grammar request raises it again, to its caller
            pass

    def _get_masker(self):
        with self._masker_lock:
            if self._masker is None:
                if self._tokenizer is None:
                    raise ValueError("this engine has no tokenizer to compile a grammar against "
                                     "(Engine.use_tokenizer)")
                from slotserve.engine.constraints import TokenMasker   # llguidance: loaded on first use
                # 2 fill threads: on a CPU engine they compete with torch's own
                self._masker = TokenMasker(self._tokenizer, eos_token_ids=self.eos_token_ids, threads=2)
                self._bitmask = self._masker.allocate_bitmask(self.max_batch)
            return self._masker

    def matcher(self, grammar: str):
        """A fresh Matcher of `grammar` (ValueError if it does not compile for this tokenizer)."""
        return self._get_masker().matcher(grammar)

    # ---------------------------------------------------------------- token counts
    def assign_rows(self, batch) -> None:
        """Give each sampling sequence with a penalty a token_state row (engine lock held)."""
        for seq, samples in zip(batch.seqs, batch.samples):
            if samples and seq.state_row < 0 and seq.params is not None and seq.params.penalized:
                if self.token_state is None:
                    self.token_state = K.new_token_state(self.max_batch, self.vocab_size, self.device)
                seq.state_row = self._free_rows.pop()   # running <= max_batch, so one is free
                seq.state_fresh = True

    def drop(self) -> None:
        """Free the token counts (parking: no sequence is running); the next penalty reallocates."""
        self.token_state = None
        self._free_rows = list(range(self.max_batch - 1, -1, -1))

    def release_row(self, seq) -> None:
        if seq.state_row >= 0:
            self._free_rows.append(seq.state_row)
            seq.state_row, seq.state_fresh = -1, False

    def count(self, seqs, tokens: torch.Tensor) -> None:
        """Count the step's sampled tokens in their sequences' rows (no host sync)."""
        if self.token_state is None or all(s.state_row < 0 for s in seqs):
            return
        rows = torch.tensor([s.state_row for s in seqs], dtype=torch.int64, device=tokens.device)
        K.add_output_tokens(self.token_state, rows, tokens)

    # ---------------------------------------------------------------- the pipeline
    def raw_for_logprobs(self, logits: torch.Tensor, params) -> torch.Tensor | None:
        idx = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not idx:
            return None
        if len(idx) == len(params):
            return logits.clone()
        return logits[torch.tensor(idx, device=logits.device)]        # a copy

    def process(self, logits: torch.Tensor, seqs, params) -> None:
        """The grammar masks, then logit_bias, penalties and min_p, in place on `logits` [R, V]."""
        dev = logits.device
        matchers = [s.matcher for s in seqs]
        if any(m is not None for m in matchers):   # first: min_p must see only the allowed tokens
            self._masker.mask_logits_(logits, matchers, self._bitmask)
        for s in seqs:
            if s.state_fresh and s.state_row >= 0:   # first step since admission (or re-admission after a preemption)
                ids = torch.tensor(s.token_ids, dtype=torch.long)
                K.init_token_row(self.token_state, s.state_row, ids[:s.prompt_len], ids[s.prompt_len:])
                s.state_fresh = False
        kw = {}
        if any(p.logit_bias for p in params):
            k = max(len(p.logit_bias) for p in params)
            ids = [[t for t, _ in p.logit_bias] + [-1] * (k - len(p.logit_bias)) for p in params]
            vals = [[v for _, v in p.logit_bias] + [0.0] * (k - len(p.logit_bias)) for p in params]
            kw["bias_ids"] = torch.tensor(ids, dtype=torch.int32, device=dev)
            kw["bias_values"] = torch.tensor(vals, dtype=torch.float32, device=dev)
        if any(s.state_row >= 0 for s in seqs):
            f32 = torch.float32
            kw.update(token_state=self.token_state,
                      state_rows=torch.tensor([s.state_row for s in seqs], dtype=torch.int32, device=dev),
                      repetition=torch.tensor([p.repetition_penalty for p in params], dtype=f32, device=dev),
                      frequency=torch.tensor([p.frequency_penalty for p in params], dtype=f32, device=dev),
                      presence=torch.tensor([p.presence_penalty for p in params], dtype=f32, device=dev))
        if any(p.min_p > 0 and p.temperature > 0 for p in params):
            kw["temperature"] = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
            kw["min_p"] = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
        if kw:
            K.apply_penalties(logits, **kw)

    def logprobs(self, raw: torch.Tensor | None, tokens: torch.Tensor, params):
        if raw is None:
            return None
        idx = [i for i, p in enumerate(params) if p.logprobs is not None]
        top_n = max(params[i].logprobs for i in idx)
        chosen = tokens if len(idx) == len(params) else tokens[torch.tensor(idx, device=tokens.device)]
        return idx, [params[i].logprobs for i in idx], K.logprobs(raw, chosen, top_n)

    @staticmethod
    def logprobs_list(lp, rows: int) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = [None] * rows
        if lp is None:
            return out
        idx, ns, (chosen, top_ids, top_lp) = lp
        chosen, top_ids, top_lp = chosen.tolist(), top_ids.tolist(), top_lp.tolist()
        for j, (i, n) in enumerate(zip(idx, ns)):
            out[i] = TokenLogprob(chosen[j], tuple(zip(top_ids[j][:n], top_lp[j][:n])))
        return out
