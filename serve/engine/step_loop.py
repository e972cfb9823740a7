"""The engine's step thread: schedule a batch under the lock, run the forward pass and
sampling outside it, hand each sampled token to its request.

`StepLoop` is mixed into `Engine` (serve/engine.py), whose state it uses: `_cond`,
`scheduler`, `runner`, the hooks and the counters. A failed step (out of memory, an
injected fault) fails the requests of that step and the loop goes on; so do NaN logits,
for their request alone.
"""

from __future__ import annotations

import logging

import torch

from slotserve import kernels as K
from slotserve.engine.parking import _empty_cache
from slotserve.engine.scheduler import SeqStatus

log = logging.getLogger("slotserve.engine")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class StepLoop:
    """The step-loop half of `Engine`: `_loop` is the step thread's target."""

    def _loop(self) -> None:
        if self._stream is None:
            return self._steps()
        torch.cuda.set_device(self.device)  # Triton launches on the thread's current device
        with torch.cuda.stream(self._stream):  # every step's work goes to this engine's stream
            return self._steps()

    def _steps(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.scheduler.has_work():
                    self._cond.wait()
                if self._closed:
                    return
                try:
                    batch = self.scheduler.schedule()
                except Exception as e:  # a bug; never die silently, never wedge the queue
                    log.exception("scheduler failed; failing every request")
                    self._fail(list(self.scheduler.running) + list(self.scheduler.waiting), e)
                    continue
                if batch is None:
                    self._cond.wait(0.005)
                    continue
                self._in_step = True
            try:
                tokens, finite = self._run(batch)
            except Exception as e:
                if _is_oom(e):
                    log.warning("out of memory in a %s step of %d sequences: failing them", batch.kind,
                                len(batch.seqs))
                    if self.device.type == "cuda":
                        _empty_cache()
                else:
                    log.exception("%s step failed: failing its %d sequences", batch.kind, len(batch.seqs))
                with self._cond:
                    self._in_step = False
                    self._cond.notify_all()
                    self._fail(batch.seqs, e)
                continue
            with self._cond:
                self._in_step = False
                self._cond.notify_all()
                self._counts["steps"] += 1
                self._counts["prefill_steps"] += batch.kind != "decode"   # steps carrying prompt chunks
                self._counts["mixed_steps"] += batch.kind == "mixed"      # ... alongside decode rows
                sampled, row = {}, 0
                for i, samples in enumerate(batch.samples):
                    if samples:
                        if finite[row]:
                            sampled[i] = tokens[row]
                        else:
                            seq = batch.seqs[i]
                            self._fail([seq], FloatingPointError(
                                f"non-finite logits for request {seq.seq_id} at output token {seq.num_output}"))
                        row += 1
                for seq, tok in self.scheduler.postprocess(batch, sampled):
                    if tok is not None or seq.status is SeqStatus.FINISHED:
                        if seq.status is SeqStatus.FINISHED:
                            self._counts["finished"] += 1
                        seq.handle._push(tok, seq.finish_reason if seq.status is SeqStatus.FINISHED else None)

    @torch.inference_mode()
    def _run(self, batch) -> tuple[list[int], list[bool]]:
        """Forward + sample one step -> (token per sampling row, logits finite per row).

        Hooks run inside inference mode too, so `logits_hook` may edit the logits in place.
        """
        if self.step_hook is not None:
            self.step_hook()
        logits = self.runner.forward(batch)                              # [R, V] fp32
        if self.logits_hook is not None:
            out = self.logits_hook(logits)
            logits = logits if out is None else out
        if logits.shape[0] == 0:
            return [], []
        seqs = [s for s, f in zip(batch.seqs, batch.samples) if f]
        params = [s.handle.params for s in seqs]
        if all(p.temperature == 0 for p in params):
            tok = logits.argmax(-1)  # what `sample` does for temperature 0, without its sorts
        else:
            dev, vocab = logits.device, logits.shape[-1]
            # Only sampled rows with top-k/top-p need the threshold search (11 of the Triton
            # sampler's 13 launches); telling it none does is a promise, so it must be exact.
            filtered = any(p.temperature > 0 and (0 < p.top_k < vocab or p.top_p < 1.0) for p in params)
            tok = K.sample(
                logits,
                torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
                # top_k above the vocabulary means "off": clamp so no request's value can
                # overflow the shared int32 tensor and fail the whole batch.
                torch.tensor([min(p.top_k, logits.shape[-1]) for p in params], dtype=torch.int32, device=dev),
                torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
                torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev),
                torch.tensor([s.num_output for s in seqs], dtype=torch.int64, device=dev),
                filtered=filtered,
            )
        both = torch.stack([tok.long(), torch.isfinite(logits).all(-1).long()]).tolist()  # one host sync
        return both[0], [bool(x) for x in both[1]]
