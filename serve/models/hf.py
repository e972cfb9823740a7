"""Fallback: any other causal LM through transformers' own model, behind the runner interface.

Simple and correct rather than fast: each sequence keeps its own transformers
`DynamicCache`, and every row of a step is one forward call (a prefill chunk or a single
decode token). The scheduler still budgets KV tokens with its block allocator, so
admission, queueing, preemption and cancellation behave exactly as on the lean path;
a preempted or finished sequence simply drops its cache (`release`).
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import torch

from slotserve.models.checkpoint import safetensors_files


class HFRunner:
    path = "transformers"

    def __init__(self, model_dir: str | Path, device: torch.device | str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        safetensors_files(Path(model_dir))  # refuse pickle checkpoints before transformers sees them
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, trust_remote_code=False, use_safetensors=True,
        ).to(device).eval()
        self.device = torch.device(device)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self._caches: dict[int, object] = {}
        self._lock = threading.Lock()
        # transformers >= 5.2x names the cache argument `cache`; older ones `past_key_values`
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def weights(self) -> list[torch.Tensor]:
        return list(self.model.parameters()) + list(self.model.buffers())

    def release(self, seq) -> None:
        with self._lock:
            self._caches.pop(seq.seq_id, None)

    @torch.inference_mode()
    def forward(self, batch) -> torch.Tensor:
        """-> logits [R + Q, V] fp32: the sampling rows in batch order, then the prompt
        positions `batch.scoring` lists (transformers computes every position's logits anyway)."""
        rows, scored = [], {}
        score = {i: (lo, hi) for i, lo, hi in batch.scoring}
        for i, (seq, start, end, samples) in enumerate(zip(batch.seqs, batch.starts, batch.ends, batch.samples)):
            cache = None if start == 0 else self._caches.get(seq.seq_id)
            assert start == 0 or cache is not None, "a sequence's cache was dropped mid-prefill"
            assert cache is None or cache.get_seq_length() == start, (cache.get_seq_length(), start)
            ids = torch.tensor([seq.token_ids[start:end]], dtype=torch.int64, device=self.device)
            # Minimal call (positions follow from the cache length) so any causal LM works.
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache})
            new_cache = getattr(out, "cache", None)
            if new_cache is None:
                new_cache = out.past_key_values
            with self._lock:  # a cancel may have released this sequence while it ran
                if seq.running:
                    self._caches[seq.seq_id] = new_cache
            if samples:
                rows.append(out.logits[0, -1:].float())
            if i in score:
                lo, hi = score[i]
                scored[i] = out.logits[0, lo - start:hi - start].float()
        rows += [scored[i] for i, _, _ in batch.scoring]
        if not rows:
            return torch.zeros((0, self.vocab_size), dtype=torch.float32, device=self.device)
        return torch.cat(rows)
