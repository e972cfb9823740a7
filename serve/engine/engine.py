"""`Engine`: one model's weights, KV pool and a background step thread; batch and streaming API.

    eng = Engine.from_pretrained(path, device="cpu")
    eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8))   # -> [[...]]
    h = eng.submit([1, 2, 3], params)       # thread-safe
    async for tok in h: ...                 # or: for tok in h.tokens(): ...
    h.cancel(); h.finish_reason             # "stop" | "length" | "cancelled" | "error"

Threads: callers only touch the scheduler under `_cond`; the step thread holds it while
scheduling and while applying a step's results, never during the forward pass. Tokens go
to each handle as they are sampled (async consumers are woken on their own event loop
with `call_soon_threadsafe`). A failed step (out of memory, an injected fault, NaN
logits) fails the requests of that step with `handle.error` set and the engine keeps
serving. Stop tokens (EOS, `stop_token_ids`) are included in the output, with
finish_reason "stop".

Tiers: `park()` moves the weights this engine holds alone to host memory (pinned on CUDA)
and drops its KV pool and CUDA graphs; `unpark()` brings them back. A parked engine
refuses `submit` with `EngineParkedError`. The engine decides when (idle, between steps,
one operation at a time); its `WeightParker` (slotserve.engine.parking) moves the tensors.

CUDA: each engine runs its steps on its own stream, and captures its decode graphs on
that stream in thread-local capture mode with a graph memory pool of its own, so one
engine can capture while another serves (slotserve.engine.cuda_graphs).

The request types are in slotserve.engine.request, loading (`from_pretrained`'s work) in
slotserve.engine.loader.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slotserve import kernels as K
from slotserve.engine.adapters import EngineAdapters
from slotserve.engine.cuda_graphs import DecodeGraphs, empty_cache, release_stream
from slotserve.engine.kv_cache import BLOCK_SIZE, BlockAllocator, KVCache, blocks_for, num_blocks_for_budget
from slotserve.engine.loader import load_engine
from slotserve.engine.parking import ParkState, WeightParker
from slotserve.engine.request import (AdmissionError, EngineClosedError, EngineParkedError, RequestHandle,
                                      SamplingParams, TokenLogprob)
from slotserve.engine.sampling_state import SamplingState
from slotserve.engine.scheduler import Scheduler, Sequence, SeqStatus
from slotserve.engine.weights import TensorPool, unique_bytes

log = logging.getLogger("slotserve.engine")


@dataclass(frozen=True)
class EngineMemory:
    weight_bytes: int                  # distinct weight storage this engine uses
    shared_weight_bytes: int           # of which another engine also holds (tensor pool)
    kv_bytes: int                      # the paged KV pool (0 on the transformers path: grows per request)
    sampler_bytes: int = 0             # penalties' token_state (allocated on the first request using one)


class Engine:
    """Use `Engine.from_pretrained`. `path` says which model code serves: "lean" or "transformers"."""

    def __init__(self, runner, *, eos_token_ids: tuple[int, ...], max_model_len: int, max_batch: int,
                 kv_tokens: int, block_size: int, max_prefill_tokens: int, kv: KVCache | None = None,
                 tensor_pool: TensorPool | None = None, owner: object = None, model_dir: str = "",
                 fallback_reason: str | None = None, stream: "torch.cuda.Stream | None" = None,
                 enable_prefix_caching: bool = False):
        self.runner = runner
        self.path: str = runner.path
        self.fallback_reason = fallback_reason
        self.model_dir = model_dir
        self.device = runner.device
        self.vocab_size = runner.vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = max_model_len
        self.max_batch = max_batch
        self.block_size = block_size
        self.kv = kv
        self.step_hook: Callable[[], None] | None = None          # before each forward (fault injection)
        self.logits_hook: Callable[[torch.Tensor], torch.Tensor | None] | None = None   # before sampling
        self._pool, self._owner = tensor_pool, owner
        self._stream = stream                                     # CUDA: this engine's own stream
        self._weight_bytes = unique_bytes(runner.weights())
        self._tier = "device"                                     # device | moving | host
        self._parked: ParkState | None = None
        self._parker = WeightParker(tensor_pool, owner, kv.layout if kv is not None else None)
        self._in_step = False                                     # a batch is between schedule and results
        self._op_lock = threading.RLock()                         # park / unpark / close, one at a time
        self.allocator = BlockAllocator(num_blocks_for_budget(kv_tokens, block_size), block_size)
        self.sampling = SamplingState(max_batch, self.vocab_size, self.device, self.eos_token_ids)
        self.scheduler = Scheduler(self.allocator, max_batch=max_batch, max_model_len=max_model_len,
                                   max_prefill_tokens=max_prefill_tokens, on_release=self._released,
                                   spread_blocks=runner.path == "lean" and runner.device.type == "cpu",
                                   # the transformers fallback keeps its own cache per sequence
                                   prefix_caching=enable_prefix_caching and runner.path == "lean")
        self.adapters = EngineAdapters(runner, max_batch, stream)   # LoRA adapters, by name
        self.default_adapter: str | None = None   # what a request without `adapter` runs (an adapter bundle's)
        self._cond = threading.Condition()
        self._closed = False
        self._next_id = 0
        self._rng = random.Random()
        self._counts = {"submitted": 0, "finished": 0, "errors": 0, "steps": 0, "prefill_steps": 0,
                        "mixed_steps": 0}
        self._thread = threading.Thread(target=self._loop, name="slotserve-engine-step", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, *, max_model_len=None, max_batch=None,
                        kv_cache_tokens=None, tensor_pool: TensorPool | None = None, block_size: int = BLOCK_SIZE,
                        max_prefill_tokens: int | None = None, enforce_eager: bool = False,
                        model_impl: str = "auto", enable_prefix_caching: bool | None = None) -> "Engine":
        """Load an HF model directory, a bundle directory (model/ + serving.json + manifest.json),
        or a hub checkpoint `hub:ORG/REPO[@REVISION]` (safetensors and configs only; see
        `slotserve.bundles.hub`).

        Explicit arguments override serving.json, which overrides the defaults. dtype None or
        "auto": the config's dtype on CUDA (bf16 if it names none), float32 on CPU.
        model_impl: "auto" (lean when the architecture allows), "lean" (refuse otherwise) or
        "transformers" (always the fallback).
        enable_prefix_caching: reuse the KV blocks of prompt prefixes computed before (None:
        serving.json's `enable_prefix_caching`, else on); the transformers fallback never does.
        """
        return load_engine(cls, path, device, dtype, max_model_len=max_model_len, max_batch=max_batch,
                           kv_cache_tokens=kv_cache_tokens, tensor_pool=tensor_pool, block_size=block_size,
                           max_prefill_tokens=max_prefill_tokens, enforce_eager=enforce_eager,
                           model_impl=model_impl, enable_prefix_caching=enable_prefix_caching)

    # ------------------------------------------------------------------------------ requests
    def use_tokenizer(self, tokenizer, *, prebuild: bool = True) -> None:
        """The tokenizer `params.grammar` is compiled against (the slot loader sets the bundle's);
        its grammar masker is built on a background thread unless `prebuild` is False."""
        self.sampling.use_tokenizer(tokenizer, prebuild=prebuild)

    def submit(self, prompt_ids, params: SamplingParams | None = None, adapter: str | None = None
               ) -> RequestHandle:
        """Queue one request (thread-safe). Raises AdmissionError if it can never be served,
        ValueError if its grammar does not compile for this engine's tokenizer.

        adapter: the name of a loaded LoRA adapter to decode with, "" for the plain base
        model, None for `default_adapter`."""
        params = params or SamplingParams()
        prompt = self._check(prompt_ids, params)
        matcher = self.sampling.matcher(params.grammar) if params.grammar is not None else None
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        with self._cond:
            if self._closed:
                raise EngineClosedError("engine is closed")
            if self._tier != "device":
                raise EngineParkedError(f"engine is parked in host memory (tier {self._tier!r}); "
                                        "unpark() it before submitting requests")
            rid = self._next_id
            self._next_id += 1
            handle = RequestHandle(self, rid, prompt, params)
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            seq = Sequence(seq_id=rid, prompt_len=len(prompt), token_ids=list(prompt), max_tokens=params.max_tokens,
                           stop_ids=frozenset(stop), seed=seed, handle=handle, params=params, matcher=matcher,
                           score_prompt=params.prompt_logprobs is not None)
            handle._seq = seq
            name = self.default_adapter if adapter is None else (adapter or None)
            try:
                self.adapters.bind(seq, name)
            except ValueError as e:
                raise AdmissionError(str(e)) from None
            self.scheduler.add(seq)
            self._counts["submitted"] += 1
            self._cond.notify_all()
        return handle

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 adapter: str | list[str | None] | None = None) -> list[list[int]]:
        """Run a batch to completion -> output ids per prompt (stop tokens included).

        Every request is checked before any is queued; a request that fails raises its error.
        """
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        for p, sp in zip(prompts, plist):
            self._check(p, sp)
        alist = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        handles = [self.submit(p, sp, a) for p, sp, a in zip(prompts, plist, alist)]
        try:
            return [h.result() for h in handles]
        finally:
            for h in handles:
                h.cancel()  # no-op for finished ones; frees the rest if we raise

    def _check(self, prompt_ids, params: SamplingParams) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise AdmissionError("prompt is empty; at least one token id is required")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise AdmissionError(f"token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        bad = [t for t, _ in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            raise AdmissionError(f"logit_bias token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise AdmissionError(f"prompt has {len(prompt)} tokens but max_model_len is {self.max_model_len}; "
                                 f"at most {self.max_model_len - 1} prompt tokens leave room to generate")
        # Worst case the sequence holds prompt + max_tokens - 1 tokens in the pool (the last
        # sampled one is never fed back; with max_tokens 0, the prompt); it must fit alone,
        # or it could never finish.
        need = max(min(len(prompt) + params.max_tokens, self.max_model_len) - 1, len(prompt))
        cap = self.allocator.capacity_tokens
        if blocks_for(need, self.block_size) > self.allocator.num_blocks:
            raise AdmissionError(
                f"request needs up to {need} KV tokens (prompt {len(prompt)} + max_tokens {params.max_tokens}, "
                f"max_model_len {self.max_model_len}) but the KV pool holds {cap}; lower max_tokens or raise "
                f"kv_cache_tokens")
        return prompt

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cond:
            seq = handle._seq
            if seq is None or seq.status is SeqStatus.FINISHED:
                return
            self.scheduler.finish(seq, "cancelled")
            self._counts["finished"] += 1
            handle._push(None, "cancelled")
            self._cond.notify_all()

    def _released(self, seq: Sequence) -> None:
        """The scheduler freed `seq`'s blocks (finish, cancel, preemption; lock held)."""
        self.runner.release(seq)
        self.sampling.release_row(seq)   # a preempted sequence rebuilds its counts when it runs again

    def _fail(self, seqs, error: BaseException) -> None:
        """Finish `seqs` with `error` (caller holds the lock)."""
        for seq in seqs:
            if seq.status is not SeqStatus.FINISHED:
                self.scheduler.finish(seq, "error")
                self._counts["finished"] += 1
                self._counts["errors"] += 1
                seq.handle._push(None, "error", error)

    # ------------------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, adapter_dir) -> int:
        """Load a PEFT LoRA adapter (checked against this model) under `name`; requests name it
        in `submit(adapter=...)`. Swapped in between two steps. Returns its bytes on the device."""
        with self._cond:
            while self._in_step:
                self._cond.wait()
            seqs = list(self.scheduler.running) + list(self.scheduler.waiting)
            return self.adapters.add(name, adapter_dir, seqs).nbytes

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name` (refused while requests use it)."""
        with self._cond:
            while self._in_step:
                self._cond.wait()
            self.adapters.remove(name, list(self.scheduler.running) + list(self.scheduler.waiting))
            if self.default_adapter == name:
                self.default_adapter = None

    # ------------------------------------------------------------------------------ state
    def memory(self) -> EngineMemory:
        shared = self._pool.shared_bytes(self._owner) if self._pool is not None and self._owner else 0
        return EngineMemory(self._weight_bytes, shared, self.kv.nbytes if self.kv is not None else 0,
                            self.sampling.nbytes)

    def stats(self) -> dict:
        with self._cond:
            return {"path": self.path, **self.scheduler.stats(), **self._counts,
                    "kv_capacity_tokens": self.allocator.capacity_tokens, "max_batch": self.max_batch,
                    "max_model_len": self.max_model_len, "closed": self._closed, "tier": self._tier}

    def weight_tensors(self) -> list[torch.Tensor]:
        """The tensors the model computes with now (device, or host copies while parked);
        tied and pool-deduplicated weights appear once per use."""
        return [t for t in self.runner.weights() if t is not None]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def tier(self) -> str:
        """"device" (serving), "host" (parked) or "moving" (between the two)."""
        return self._tier

    @property
    def parked(self) -> ParkState | None:
        """What the last `park()` did while the engine is parked; None on the device."""
        return self._parked

    def close(self) -> None:
        """Stop the step thread, fail what is still queued or running, free the KV pool."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        on_step_thread = threading.current_thread() is self._thread
        if not on_step_thread:
            self._thread.join()
        # a park/unpark in progress finishes first (not on the step thread: a park may be
        # waiting for this very step to end)
        with self._op_lock if not on_step_thread else contextlib.nullcontext():
            with self._cond:
                self._fail(list(self.scheduler.running) + list(self.scheduler.waiting),
                           EngineClosedError("engine closed before the request finished"))
            try:
                self._sync_stream()                        # a failed step may have left work queued
            except Exception:  # noqa: BLE001 - a broken device must not stop the rest of close
                log.exception("synchronizing the engine's stream at close failed")
            graphs = getattr(self.runner, "graphs", None)
            if graphs is not None:
                graphs.release()
                self.runner.graphs = None
            if self.kv is not None:
                self.kv.release()
            if self._pool is not None and self._owner is not None:
                self._pool.release(self._owner)
            self._parker.drop()
            self.runner = _ClosedRunner(self.runner)
            if self._stream is not None:
                release_stream(self._stream)
        if self.device.type == "cuda":
            empty_cache()

    # ------------------------------------------------------------------------------ tiers
    def park(self, pin_memory: bool = True) -> int:
        """Move the weights this engine holds alone to host memory (pinned when `pin_memory`
        and the device is CUDA) and free its KV pool and CUDA graphs -> weight bytes moved.

        The engine must be idle: with requests queued or running this raises RuntimeError
        (drain first); once parked, `submit` raises EngineParkedError until `unpark()`.
        Tensors another engine also holds through the TensorPool stay on the device, with
        this engine's claim (moving them would free nothing); `parked.shared_bytes` says
        how many. On CPU the "host" copy is a clone, so the path is the GPU one. Parking
        a parked engine returns 0. If a host copy cannot be made nothing changes.
        """
        with self._op_lock:
            with self._cond:
                if self._closed:
                    raise EngineClosedError("engine is closed")
                if self._tier != "device":
                    return 0
                busy = len(self.scheduler.running) + len(self.scheduler.waiting)
                if busy:
                    raise RuntimeError(f"cannot park: {busy} requests queued or running; let them finish "
                                       "(or cancel them) first")
                self._tier = "moving"                      # submit refuses from here on
                while self._in_step and not self._closed:  # a step whose requests were all cancelled
                    self._cond.wait()
                if self._closed:
                    raise EngineClosedError("engine closed while parking")
            try:
                state = self._park(pin_memory and self.device.type == "cuda")
            except BaseException:
                with self._cond:
                    self._tier = "device"
                raise
            with self._cond:
                self._parked, self._tier = state, "host"
            log.info("%s parked: %d weight bytes to host%s, %d shared bytes left on %s, %d KV bytes freed",
                     self.model_dir, state.moved_bytes, " (pinned)" if state.pinned else "",
                     state.shared_bytes, self.device, state.kv_bytes)
            return state.moved_bytes

    def _park(self, pin: bool) -> ParkState:
        self._sync_stream()                                # nothing of ours may still read them
        moved, kept, had_graphs = self._parker.park(self.runner, pin)
        kv_bytes = 0
        with self._cond:   # the prefix cache's keys name K/V in the pool dropped below
            self.scheduler.clear_prefix_cache()
            self.sampling.drop()
        if self.kv is not None:
            kv_bytes = self.kv.nbytes
            self.kv.release()
            self.kv = None
        if self.device.type == "cuda":
            empty_cache()
        return ParkState(moved, kept, kv_bytes, pin, had_graphs)

    def unpark(self) -> int:
        """Copy the parked weights back to the device, allocate a fresh KV pool and, on CUDA,
        recapture the decode graphs -> weight bytes copied. A weight another engine loaded
        meanwhile (same TensorPool key) is shared instead of copied. Raises (out of memory,
        ...) with the engine still parked. 0 when not parked."""
        with self._op_lock:
            with self._cond:
                if self._closed:
                    raise EngineClosedError("engine is closed")
                if self._tier != "host":
                    return 0
                state = self._parked
                self._tier = "moving"
            try:
                n = self._unpark(state)
            except BaseException:
                with self._cond:
                    self._tier = "host"
                raise
            with self._cond:
                self._parked, self._tier = None, "device"
            return n

    def _unpark(self, state: ParkState) -> int:
        nbytes, self.kv = self._parker.unpark(self.runner)
        if self.device.type == "cuda" and state.graphs and self.runner.path == "lean":
            self.runner.graphs = DecodeGraphs.try_capture(self.runner, self.max_batch, self._stream)
        return nbytes

    def _sync_stream(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    # ------------------------------------------------------------------------------ the step thread
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
                self.sampling.assign_rows(batch)
                self._in_step = True
            try:
                tokens, finite, lps, scored = self._run(batch)
            except Exception as e:
                if _is_oom(e):
                    log.warning("out of memory in a %s step of %d sequences: failing them", batch.kind,
                                len(batch.seqs))
                    if self.device.type == "cuda":
                        empty_cache()
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
                for i, prompt_lps in scored:   # before the first token: its reader finds them all
                    seq = batch.seqs[i]
                    if seq.status is not SeqStatus.RUNNING:
                        continue
                    if prompt_lps is None:
                        self._fail([seq], FloatingPointError(
                            f"non-finite logits for request {seq.seq_id} in its prompt"))
                    else:
                        seq.handle._push_prompt(prompt_lps)
                sampled, logprobs, row = {}, {}, 0
                for i, samples in enumerate(batch.samples):
                    if samples:
                        if finite[row]:
                            sampled[i] = tokens[row]
                            logprobs[batch.seqs[i].seq_id] = lps[row]
                        else:
                            seq = batch.seqs[i]
                            self._fail([seq], FloatingPointError(
                                f"non-finite logits for request {seq.seq_id} at output token {seq.num_output}"))
                        row += 1
                for seq, tok in self.scheduler.postprocess(batch, sampled):
                    if tok is not None or seq.status is SeqStatus.FINISHED:
                        if seq.status is SeqStatus.FINISHED:
                            self._counts["finished"] += 1
                            self._counts["errors"] += seq.error is not None
                        seq.handle._push(tok, seq.finish_reason if seq.status is SeqStatus.FINISHED else None,
                                         seq.error, logprobs.get(seq.seq_id) if tok is not None else None)

    @torch.inference_mode()
    def _run(self, batch) -> tuple[list[int], list[bool], list[TokenLogprob | None],
                                   list[tuple[int, list[TokenLogprob] | None]]]:
        """Forward + sample one step -> (token, logits finite, logprob or None) per sampling row,
        and (row, its scored prompt tokens' logprobs or None if non-finite) per `batch.scoring` row.

        The sampling pipeline (docs/engine.md): finite check and logprobs on the raw logits,
        then the grammar mask, logit_bias, penalties and min_p (slotserve.kernels.apply_penalties;
        min_p after the mask, so it is relative to the allowed tokens), and the sampler
        (greedy rows: argmax of the processed logits). Hooks run inside
        inference mode too, so `logits_hook` may edit the logits in place.
        """
        if self.step_hook is not None:
            self.step_hook()
        logits = self.runner.forward(batch)             # [R + Q, V] fp32: sampling rows, then scored positions
        scored = []
        if batch.scoring:                                # only requests scoring their prompt pay for this
            r = sum(batch.samples)
            scored = self._score_prompt(batch, logits[r:])
            logits = logits[:r]
        if self.logits_hook is not None:
            out = self.logits_hook(logits)
            logits = logits if out is None else out
        if logits.shape[0] == 0:
            return [], [], [], scored
        seqs = [s for s, f in zip(batch.seqs, batch.samples) if f]
        params = [s.params for s in seqs]
        # Before any processing: bias, min_p and the mask write -inf on purpose.
        finite = torch.isfinite(logits).all(-1)
        raw = self.sampling.raw_for_logprobs(logits, params)            # copy of the rows asking
        self.sampling.process(logits, seqs, params)                     # in place
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
        self.sampling.count(seqs, tok)                                  # before the host sync
        lp = self.sampling.logprobs(raw, tok, params)                   # device tensors or None
        both = torch.stack([tok.long(), finite.long()]).tolist()        # one host sync
        return both[0], [bool(x) for x in both[1]], self.sampling.logprobs_list(lp, len(seqs)), scored

    @staticmethod
    def _score_prompt(batch, logits: torch.Tensor) -> list[tuple[int, list[TokenLogprob] | None]]:
        """Logprobs of the prompt tokens `batch.scoring` covers, from the logits [Q, V] of their
        previous positions (raw logits, as for output tokens) -> (row, one per token or None)."""
        targets, top_n = [], 0
        for i, lo, hi in batch.scoring:
            seq = batch.seqs[i]
            targets += seq.token_ids[lo + 1:hi + 1]    # position p predicts the token at p + 1
            top_n = max(top_n, seq.params.prompt_logprobs)
        assert len(targets) == logits.shape[0], (len(targets), logits.shape)
        chosen, top_ids, top_lp = K.logprobs(logits, torch.tensor(targets, device=logits.device), top_n)
        # a NaN or +inf in a row makes its chosen logprob non-finite (logsumexp), as does a -inf
        # logit on the prompt's own token (JSON could not carry it); cheaper than isfinite on [Q, V]
        finite = torch.isfinite(chosen)
        chosen, top_ids, top_lp, finite = chosen.tolist(), top_ids.tolist(), top_lp.tolist(), finite.tolist()
        out, q = [], 0
        for i, lo, hi in batch.scoring:
            k, n = batch.seqs[i].params.prompt_logprobs, hi - lo
            ok = all(finite[q:q + n])
            out.append((i, [TokenLogprob(chosen[j], tuple(zip(top_ids[j][:k], top_lp[j][:k])))
                            for j in range(q, q + n)] if ok else None))
            q += n
        return out

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine(path={self.path!r}, model={self.model_dir!r}, device={self.device})"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class _ClosedRunner:
    """Keeps `path`/`device` readable after close while dropping the model's tensors."""

    def __init__(self, runner):
        self.path, self.device, self.vocab_size = runner.path, runner.device, runner.vocab_size

    def weights(self):
        return []
