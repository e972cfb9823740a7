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
refuses `submit` with `EngineParkedError`. Tensors shared through the `TensorPool` with
another engine stay where they are (moving them would free nothing and pull them out
from under that engine).

CUDA: each engine runs its steps on its own stream, and captures its decode graphs on
that stream in thread-local capture mode with a graph memory pool of its own, so one
engine can capture while another serves (see serve/cuda_graphs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from slotserve import kernels as K
from slotserve.kv_cache import BlockAllocator, KVCache, KVLayout, blocks_for, num_blocks_for_budget
from slotserve.scheduler import Scheduler, Sequence, SeqStatus
from slotserve.weights import TensorPool, load_weights, safetensors_files, unique_bytes

log = logging.getLogger("slotserve.engine")

FINISH_REASONS = ("stop", "length", "cancelled", "error")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class AdmissionError(ValueError):
    """A request the engine can never serve (too long for the context or the KV pool)."""


class EngineClosedError(RuntimeError):
    """The engine was closed while the request was queued or running."""


class EngineParkedError(RuntimeError):
    """The engine's weights are parked in host memory; `unpark()` it to serve again."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0           # 0 = greedy
    top_p: float = 1.0                 # 1.0 = off
    top_k: int = 0                     # 0 = off
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None            # None = a fresh random seed per request
    ignore_eos: bool = False           # benchmarks: generate exactly max_tokens unless a stop id

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass(frozen=True)
class EngineMemory:
    weight_bytes: int                  # distinct weight storage this engine uses
    shared_weight_bytes: int           # of which another engine also holds (tensor pool)
    kv_bytes: int                      # the paged KV pool (0 on the transformers path: grows per request)


@dataclass(frozen=True)
class ParkState:
    """What `Engine.park` did (and `unpark` will undo)."""
    moved_bytes: int                   # weight bytes copied to host; unpark copies them back
    shared_bytes: int                  # weight bytes left on the device: another engine holds them too
    kv_bytes: int                      # KV pool freed; unpark allocates it again
    pinned: bool                       # host copies are in pinned memory (CUDA)
    graphs: bool                       # CUDA graphs were dropped; unpark recaptures them


class RequestHandle:
    """A submitted request: iterate its tokens (async or sync), cancel it, read the outcome."""

    def __init__(self, engine: "Engine", request_id: int, prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._engine = engine
        self._seq: Sequence | None = None
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    # --- engine side (called with the engine lock held) --------------------------------
    def _push(self, token: int | None, finish_reason: str | None = None, error: BaseException | None = None):
        with self._cond:
            if self.finish_reason is not None:
                return
            now = time.perf_counter()
            if token is not None:
                self.output_ids.append(token)
                if self.first_token_at is None:
                    self.first_token_at = now
            if finish_reason is not None:
                self.finish_reason, self.error, self.finished_at = finish_reason, error, now
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # the consumer's loop is closed; nobody is listening
                pass

    # --- consumer side ------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        """Seconds from submit to the first token."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    def cancel(self) -> None:
        """Stop generating and free the request's KV blocks now (no-op once finished)."""
        self._engine._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.finish_reason is not None, timeout)

    def result(self, timeout: float | None = None) -> list[int]:
        """Block until finished; the output ids, or raise the request's error."""
        if not self.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout}s")
        if self.error is not None:
            raise self.error
        return list(self.output_ids)

    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        """Synchronous token iterator (for threads); raises the request's error at the end."""
        i = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: i < len(self.output_ids) or self.finish_reason is not None,
                                           timeout):
                    raise TimeoutError(f"no token from request {self.request_id} in {timeout}s")
                if i < len(self.output_ids):
                    tok = self.output_ids[i]
                elif self.error is not None:
                    raise self.error
                else:
                    return
            i += 1
            yield tok

    def __aiter__(self) -> AsyncIterator[int]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[int]:
        i = 0
        while True:
            with self._cond:
                if i < len(self.output_ids):
                    tok = self.output_ids[i]
                    fut = None
                elif self.finish_reason is not None:
                    if self.error is not None:
                        raise self.error
                    return
                else:
                    loop = asyncio.get_running_loop()
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if fut is None:
                i += 1
                yield tok
            else:
                await fut

    def __repr__(self) -> str:
        return (f"RequestHandle(id={self.request_id}, tokens={len(self.output_ids)}, "
                f"finish_reason={self.finish_reason!r})")


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Engine:
    """Use `Engine.from_pretrained`. `path` says which model code serves: "lean" or "transformers"."""

    def __init__(self, runner, *, eos_token_ids: tuple[int, ...], max_model_len: int, max_batch: int,
                 kv_tokens: int, block_size: int, max_prefill_tokens: int, kv: KVCache | None = None,
                 tensor_pool: TensorPool | None = None, owner: object = None, model_dir: str = "",
                 fallback_reason: str | None = None, stream: "torch.cuda.Stream | None" = None):
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
        self._host: dict[int, tuple[torch.Tensor, object]] = {}   # id(host copy) -> (it, pool key)
        self._kv_layout = kv.layout if kv is not None else None
        self._in_step = False                                     # a batch is between schedule and results
        self._op_lock = threading.RLock()                         # park / unpark / close, one at a time
        self.allocator = BlockAllocator(num_blocks_for_budget(kv_tokens, block_size), block_size)
        self.scheduler = Scheduler(self.allocator, max_batch=max_batch, max_model_len=max_model_len,
                                   max_prefill_tokens=max_prefill_tokens, on_release=runner.release,
                                   spread_blocks=runner.path == "lean" and runner.device.type == "cpu")
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
                        kv_cache_tokens=None, tensor_pool: TensorPool | None = None, block_size: int = 16,
                        max_prefill_tokens: int | None = None, enforce_eager: bool = False,
                        model_impl: str = "auto") -> "Engine":
        """Load an HF model directory or a bundle directory (model/ + serving.json + manifest.json).

        Explicit arguments override serving.json, which overrides the defaults. dtype None or
        "auto": the config's dtype on CUDA (bf16 if it names none), float32 on CPU.
        model_impl: "auto" (lean when the architecture allows), "lean" (refuse otherwise) or
        "transformers" (always the fallback).
        """
        path = Path(path)
        model_dir, serving, file_sha = _resolve(path)
        safetensors_files(model_dir)  # refuse pickle-only checkpoints up front, naming what is there
        from transformers import AutoConfig

        hf_cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = _resolve_dtype(dtype if dtype is not None else serving.get("dtype"), hf_cfg, device)
        eos = _eos_ids(model_dir, hf_cfg)
        max_batch = int(max_batch or serving.get("max_batch") or 64)

        from slotserve.model import LeanConfig, LeanModel, LeanRunner, weight_specs

        lean = LeanConfig.from_hf(hf_cfg)
        if model_impl not in ("auto", "lean", "transformers"):
            raise ValueError(f"model_impl must be auto, lean or transformers, got {model_impl!r}")
        reason = lean if isinstance(lean, str) else None
        if model_impl == "transformers":
            reason = "model_impl='transformers' requested"
        elif model_impl == "lean" and reason:
            raise ValueError(f"{model_dir}: the lean model cannot serve it: {reason}")
        model_max = _max_positions(hf_cfg)
        if reason is None and lean.sliding_window:
            # full attention equals sliding-window attention while a sequence fits the window
            model_max = min(model_max, lean.sliding_window)
        req_len = max_model_len or serving.get("max_model_len")
        if req_len is not None and int(req_len) > model_max:
            raise ValueError(f"max_model_len={req_len} exceeds what this model supports ({model_max} positions"
                             f"{', its sliding window' if reason is None and lean.sliding_window else ''})")
        max_model_len = int(req_len or model_max)
        if max_prefill_tokens is None:
            max_prefill_tokens = int(serving.get("max_prefill_tokens") or (2048 if device.type == "cuda" else 512))

        if reason is None:
            owner = object()
            stream = None
            weights = model = kv = runner = None
            try:
                if device.type == "cuda":
                    from slotserve.cuda_graphs import acquire_stream
                    stream = acquire_stream(device)         # this engine's alone
                weights = load_weights(model_dir, weight_specs(lean), device=device, dtype=dtype,
                                       pool=tensor_pool, owner=owner, file_sha256=file_sha)
                model = LeanModel(lean, weights, max_model_len, device, dtype)
                per_token = KVLayout(lean.num_layers, 1, 1, lean.num_kv_heads, lean.head_dim, dtype).bytes_per_token
                kv_tokens = _kv_tokens(kv_cache_tokens, serving, per_token, max_batch, max_model_len, device)
                layout = KVLayout(lean.num_layers, num_blocks_for_budget(kv_tokens, block_size), block_size,
                                  lean.num_kv_heads, lean.head_dim, dtype)
                kv = KVCache(layout, device)
                model.kv_layers = kv.layers
                runner = LeanRunner(model, block_size, blocks_for(max_model_len, block_size))
                if device.type == "cuda":
                    # weights and KV were written on this thread's stream; the engine's own
                    # stream (graph capture, steps) must see them finished
                    torch.cuda.current_stream(device).synchronize()
                    if not enforce_eager:
                        from slotserve.cuda_graphs import DecodeGraphs
                        runner.graphs = DecodeGraphs.try_capture(runner, max_batch, stream)
                eng = cls(runner, eos_token_ids=eos, max_model_len=max_model_len, max_batch=max_batch,
                          kv_tokens=kv_tokens, block_size=block_size, max_prefill_tokens=max_prefill_tokens,
                          kv=kv, tensor_pool=tensor_pool, owner=owner, model_dir=str(model_dir), stream=stream)
            except BaseException:
                # A failed load (OOM in the KV pool, a missing tensor, ...) must not leak: drop
                # every pool claim this engine made and the tensors it allocated. The frame
                # (kept alive by the traceback) must not pin them either.
                if runner is not None and runner.graphs is not None:
                    runner.graphs.release()
                if kv is not None:
                    kv.release()
                if tensor_pool is not None:
                    tensor_pool.release(owner)
                weights = model = kv = runner = None
                if device.type == "cuda":
                    from slotserve.cuda_graphs import release_stream
                    release_stream(stream)
                    # the inner frames (load_weights, KVCache, ...) have ended; their locals
                    # would keep device tensors alive as long as the exception is referenced
                    tb = sys.exc_info()[2]
                    if tb is not None and tb.tb_next is not None:
                        traceback.clear_frames(tb.tb_next)
                    _empty_cache()
                raise
            log.info("%s: lean model (%s), %s on %s", model_dir, lean.arch, dtype, device)
            return eng

        from slotserve.hf_model import HFRunner

        log.warning("%s: serving through transformers (fallback): %s", model_dir, reason)
        runner = HFRunner(model_dir, device, dtype)
        kv_tokens = int(kv_cache_tokens or serving.get("kv_cache_tokens") or min(max_batch * max_model_len, 1 << 16))
        stream = None
        if device.type == "cuda":
            from slotserve.cuda_graphs import acquire_stream

            torch.cuda.current_stream(device).synchronize()   # weights written on this thread's stream
            stream = acquire_stream(device)
        # No chunking on this path: a whole prompt is one forward call.
        return cls(runner, eos_token_ids=eos, max_model_len=max_model_len, max_batch=max_batch,
                   kv_tokens=kv_tokens, block_size=block_size, max_prefill_tokens=max(max_prefill_tokens, max_model_len),
                   model_dir=str(model_dir), fallback_reason=reason, stream=stream)

    # ------------------------------------------------------------------------------ requests
    def submit(self, prompt_ids, params: SamplingParams | None = None) -> RequestHandle:
        """Queue one request (thread-safe). Raises AdmissionError if it can never be served."""
        params = params or SamplingParams()
        prompt = self._check(prompt_ids, params)
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
                           stop_ids=frozenset(stop), seed=seed, handle=handle)
            handle._seq = seq
            self.scheduler.add(seq)
            self._counts["submitted"] += 1
            self._cond.notify_all()
        return handle

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Run a batch to completion -> output ids per prompt (stop tokens included).

        Every request is checked before any is queued; a request that fails raises its error.
        """
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        for p, sp in zip(prompts, plist):
            self._check(p, sp)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
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
        if len(prompt) >= self.max_model_len:
            raise AdmissionError(f"prompt has {len(prompt)} tokens but max_model_len is {self.max_model_len}; "
                                 f"at most {self.max_model_len - 1} prompt tokens leave room to generate")
        # Worst case the sequence holds prompt + max_tokens - 1 tokens in the pool (the last
        # sampled one is never fed back); it must fit alone, or it could never finish.
        need = min(len(prompt) + params.max_tokens, self.max_model_len) - 1
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

    def _fail(self, seqs, error: BaseException) -> None:
        """Finish `seqs` with `error` (caller holds the lock)."""
        for seq in seqs:
            if seq.status is not SeqStatus.FINISHED:
                self.scheduler.finish(seq, "error")
                self._counts["finished"] += 1
                self._counts["errors"] += 1
                seq.handle._push(None, "error", error)

    # ------------------------------------------------------------------------------ step loop
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
            dev = logits.device
            tok = K.sample(
                logits,
                torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
                torch.tensor([p.top_k for p in params], dtype=torch.int32, device=dev),
                torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
                torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev),
                torch.tensor([s.num_output for s in seqs], dtype=torch.int64, device=dev),
            )
        both = torch.stack([tok.long(), torch.isfinite(logits).all(-1).long()]).tolist()  # one host sync
        return both[0], [bool(x) for x in both[1]]

    # ------------------------------------------------------------------------------ state
    def memory(self) -> EngineMemory:
        shared = self._pool.shared_bytes(self._owner) if self._pool is not None and self._owner else 0
        return EngineMemory(self._weight_bytes, shared, self.kv.nbytes if self.kv is not None else 0)

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
        runner = self.runner
        self._sync_stream()                                # nothing of ours may still read them
        claims = self._pool.claims(self._owner) if self._pool is not None and self._owner is not None else {}
        key_of = {id(t): k for k, (t, _) in claims.items()}
        shared = {id(t) for t, holders in claims.values() if holders > 1}
        del claims
        # 1. host copies of what we hold alone (may fail, e.g. host OOM: nothing changed yet)
        host, moved, kept, seen = {}, 0, 0, set()
        for t in self.weight_tensors():
            if id(t) in seen:
                continue
            seen.add(id(t))
            if id(t) in shared:
                kept += t.nbytes
            else:
                host[id(t)] = _to_host(t, pin)
                moved += t.nbytes
        t = None
        # 2. point the model at them and drop every device reference we own (no allocation)
        had_graphs = getattr(runner, "graphs", None) is not None
        if had_graphs:
            runner.graphs.release()
            runner.graphs = None
        if runner.path == "lean":
            runner.model.replace_weights(host)
            runner.model.kv_layers = []
            self._host = {id(h): (h, key_of.get(i)) for i, h in host.items()}
        else:  # transformers fallback: never pooled; in place, so the Parameter objects stay
            params = [p for p in self.weight_tensors() if id(p) in host]
            for p in params:
                p.data = host[id(p)]
            self._host = {id(p): (p, None) for p in params}
            del params
        for i in host:
            if key_of.get(i) is not None:
                self._pool.release_key(key_of[i], self._owner)
        kv_bytes = 0
        if self.kv is not None:
            kv_bytes = self.kv.nbytes
            self.kv.release()
            self.kv = None
        if self.device.type == "cuda":
            _empty_cache()
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
        dev, runner = self.device, self.runner
        pool, owner = self._pool, self._owner
        back, acquired, nbytes = {}, [], 0

        def copy(h: torch.Tensor) -> torch.Tensor:
            nonlocal nbytes
            nbytes += h.nbytes
            return h.clone() if dev.type == "cpu" else h.to(dev, non_blocking=True)

        kv = None
        try:
            for i, (h, key) in self._host.items():
                if key is not None and pool is not None:
                    back[i] = pool.acquire(key, owner, lambda h=h: copy(h))
                    acquired.append(key)
                else:
                    back[i] = copy(h)
            if self._kv_layout is not None:
                kv = KVCache(self._kv_layout, dev)
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()   # copies done before the engine's stream reads
        except BaseException:
            for key in acquired:
                pool.release_key(key, owner)
            back = kv = None
            if dev.type == "cuda":
                _empty_cache()
            raise
        if runner.path == "lean":
            runner.model.replace_weights(back)
            runner.model.kv_layers = kv.layers if kv is not None else []
        else:
            for p in self.weight_tensors():
                if id(p) in back:
                    p.data = back[id(p)].data
        self.kv, self._host = kv, {}
        if dev.type == "cuda" and state.graphs and runner.path == "lean":
            from slotserve.cuda_graphs import DecodeGraphs

            runner.graphs = DecodeGraphs.try_capture(runner, self.max_batch, self._stream)
        return nbytes

    def _sync_stream(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

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
            self._host = {}
            self.runner = _ClosedRunner(self.runner)
            if self._stream is not None:
                from slotserve.cuda_graphs import release_stream
                release_stream(self._stream)
        if self.device.type == "cuda":
            _empty_cache()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine(path={self.path!r}, model={self.model_dir!r}, device={self.device})"


class _ClosedRunner:
    """Keeps `path`/`device` readable after close while dropping the model's tensors."""

    def __init__(self, runner):
        self.path, self.device, self.vocab_size = runner.path, runner.device, runner.vocab_size

    def weights(self):
        return []


# ---------------------------------------------------------------------------------- helpers
def _empty_cache() -> None:
    from slotserve.cuda_graphs import empty_cache   # not while another engine captures

    empty_cache()


def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host copy of `t` (pinned when `pin`); on CPU a clone, so parking there takes the GPU's path."""
    if t.device.type == "cpu":
        return t.clone()
    host = torch.empty_like(t, device="cpu", pin_memory=pin)
    host.copy_(t)
    return host


def _resolve(path: Path) -> tuple[Path, dict, dict[str, str] | None]:
    """-> (HF model dir, serving.json dict, {weight file name: sha256} from the manifest or None)."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (expected an HF model dir or a bundle dir)")
    if not (path / "manifest.json").exists():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} has neither config.json (HF model dir) nor manifest.json (bundle)")
        return path, {}, None
    model_dir = path / "model"
    serving = json.loads((path / "serving.json").read_text()) if (path / "serving.json").exists() else {}
    files = json.loads((path / "manifest.json").read_text()).get("files") or {}
    if isinstance(files, list):  # tolerate [{path, sha256}, ...]
        files = {f.get("path"): f for f in files if isinstance(f, dict)}
    sha = {}
    for rel, entry in files.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else entry
        if isinstance(rel, str) and rel.startswith("model/") and rel.endswith(".safetensors") and digest:
            sha[rel[len("model/"):]] = str(digest).removeprefix("sha256:")
    return model_dir, serving, sha or None


def _resolve_dtype(dtype, hf_cfg, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        cfg_dtype = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = _DTYPES.get(cfg_dtype)
        return cfg_dtype if cfg_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}; valid: auto, {', '.join(_DTYPES)} or a torch.dtype")
    return _DTYPES[dtype]


def _eos_ids(model_dir: Path, hf_cfg) -> tuple[int, ...]:
    ids: set[int] = set()

    def add(x):
        if isinstance(x, int):
            ids.add(x)
        elif isinstance(x, (list, tuple)):
            ids.update(int(i) for i in x)

    add(getattr(hf_cfg, "eos_token_id", None))
    gen = model_dir / "generation_config.json"
    if gen.exists():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    return tuple(sorted(ids))


def _max_positions(hf_cfg) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(hf_cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def _kv_tokens(explicit, serving: dict, per_token: int, max_batch: int, max_model_len: int,
               device: torch.device) -> int:
    if explicit:
        return int(explicit)
    if serving.get("kv_cache_tokens"):
        return int(serving["kv_cache_tokens"])
    if serving.get("kv_cache_bytes"):
        return max(1, int(serving["kv_cache_bytes"]) // per_token)
    # Default: every slot at full length, capped by a memory budget (the slot layer's
    # planner normally sets kv_cache_tokens explicitly).
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.3)
    else:
        budget = 512 << 20
    return max(min(max_batch * max_model_len, budget // per_token), min(max_model_len, 1 << 20))
