"""Multi-adapter LoRA: each row of a batch adds the delta of its own adapter (or none).

    y[t, off:off+W] += scaling[a_t] * (x[t] @ A[a_t]^T) @ B[a_t]^T     for rows with a_t >= 0

Weights are stacked per projection: A [n_slots, R, H_in], B [n_slots, W, R] (an adapter of
rank r < R is zero-padded to R, which leaves the product exact), scaling [n_slots] fp32
(alpha / r, or alpha / sqrt(r) for rsLoRA, computed by the caller), row_adapter [T] int32
or int64 with -1 for rows of the plain base model. The engine's fused projections (qkv,
gate_up) are served by `col_offset`: the delta lands in y[:, col_offset : col_offset + W].

Two kernels, as in Punica / S-LoRA ("shrink" then "expand"):
- shrink: x [T, H_in] -> s [S, T, R] fp32 partial sums over S slices of H_in (split-K, so a
  decode batch of one row still spreads A over many programs); expand adds the S slices.
  Partials instead of atomics: deterministic, and no zero-fill launch.
- expand: y[t, off + n] += scaling[a_t] * sum_S(s[:, t]) @ B[a_t, n]^T, in place.
One fused kernel would have to redo the whole H_in reduction in every output-column
program (x and A re-read W / BLOCK_N times); s is tiny (S * T * R fp32), so two launches
cost one small round trip. It also lets several slices of a fused projection share one
shrink: concatenate their A along the rank, shrink once, expand each slice with its rank
columns (`s[..., i*R:(i+1)*R]`, a strided view is fine) and its `col_offset`.

Rows -> programs: a tile of BLOCK_T rows per program (16 for decode, up to 64 for prefill),
one pass per *distinct* adapter in the tile, ascending, each found on the device as a min
over the tile's indices. A pass loads that adapter's weight tile once and runs `tl.dot` on
the tile's rows masked to it (shrink loads only that adapter's rows of x; expand loads s
once per rank chunk and zeroes the other rows), so each row of x and s is fetched once.
Decode batches mixing adapters (BGMV) thus read each distinct adapter's weights once per
tile; prefill batches, where a request's rows are contiguous (SGMV's segments), take one
pass per tile, two where a segment boundary falls inside it; unsorted batches stay correct,
at up to min(BLOCK_T, n_slots) passes per tile. No sort, no segment metadata, no host
sync, and the grid depends only on T, H_in, W, R and the SM count (never on the indices'
values), so CUDA graphs capture both launches. Not one row per program: that re-reads an
adapter's weights for every row (T times in a prefill) and cannot use the tensor cores.
An index outside [-1, n_slots) is treated as -1 by both sides (never read out of bounds;
refusing it would need a host sync).

Precision: fp32 accumulation throughout, scaling applied after B (PEFT's order), and one
rounding to y's dtype at the end: y_new = fl(y + scaling * ((x @ A^T) @ B^T)). PEFT rounds
x @ A^T, the B product and the scaled delta to the model dtype before the add (four
roundings); in fp32 both agree to summation order. Dots: the shrink's 16-bit operands go
to the tensor cores as they are (exact products, fp32 sums); fp32 operands use IEEE fp32.
The expand's fp32 s times B uses IEEE fp32 for fp32 outputs and 3xTF32 for 16-bit ones (B
is exact in TF32 and s is split into two TF32 halves: about fp32 accuracy, tensor cores).
Triton's CPU interpreter has no bf16 dot, so there bf16 shrink operands are cast to fp32;
it also converts fp32 -> bf16 by truncation where the GPU rounds to nearest (see the test).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dispatch


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, idx_ptr, s_ptr, T, H, R, N_SLOTS, K_PER_SPLIT,
                        x_st, a_s0, a_s1, idx_st, s_s0, s_s1,
                        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        F32: tl.constexpr):
    # grid (cdiv(T, BLOCK_T), S, cdiv(R, BLOCK_R)): rows x one H_in slice x rank block.
    # s[split, t, r] = sum_{k in slice} x[t, k] * A[a_t, r, k]   (0 for rows without adapter)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    tmask = rows < T
    rmask = r < R
    idx = tl.load(idx_ptr + rows * idx_st, mask=tmask, other=-1).to(tl.int64)
    idx = tl.where((idx >= 0) & (idx < N_SLOTS), idx, -1)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, H)
    acc = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    a = tl.min(tl.where(idx >= 0, idx, N_SLOTS), axis=0)                # smallest adapter in the tile
    while a < N_SLOTS:
        sel = idx == a                                                  # [BLOCK_T] rows of adapter a
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < k_hi
            xt = tl.load(x_ptr + rows[:, None] * x_st + k[None, :], mask=sel[:, None] & kmask[None, :], other=0.0)
            at = tl.load(a_ptr + a * a_s0 + r[:, None] * a_s1 + k[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
            if F32:                                                     # fp32 model, or bf16 in the interpreter
                acc += tl.dot(xt.to(tl.float32), tl.trans(at.to(tl.float32)), input_precision="ieee")
            else:                                                       # 16-bit: exact products, fp32 sums
                acc += tl.dot(xt, tl.trans(at))
        a = tl.min(tl.where(idx > a, idx, N_SLOTS), axis=0)             # next adapter in the tile
    tl.store(s_ptr + split * s_s0 + rows[:, None] * s_s1 + r[None, :], acc, mask=tmask[:, None] & rmask[None, :])


@triton.jit
def _lora_expand_kernel(s_ptr, b_ptr, idx_ptr, scale_ptr, y_ptr, T, W, R, N_SLOTS, S,
                        s_s0, s_s1, s_s2, b_s0, b_s1, idx_st, y_st,
                        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        PRECISION: tl.constexpr):
    # grid (cdiv(T, BLOCK_T), cdiv(W, BLOCK_N)); y_ptr already points at column col_offset.
    # y[t, n] = fl(y[t, n] + scaling[a_t] * sum_r (sum_S s[:, t, r]) * B[a_t, n, r])
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask = rows < T
    nmask = n < W
    idx = tl.load(idx_ptr + rows * idx_st, mask=tmask, other=-1).to(tl.int64)
    idx = tl.where((idx >= 0) & (idx < N_SLOTS), idx, -1)
    has = idx >= 0
    ymask = has[:, None] & nmask[None, :]                               # rows without adapter: untouched
    scale = tl.load(scale_ptr + idx, mask=has, other=0.0)
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    first = tl.min(tl.where(has, idx, N_SLOTS), axis=0)                # smallest adapter in the tile
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < R
        st = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
        for sp in range(0, S):                                          # shrink's split-K partials
            st += tl.load(s_ptr + sp * s_s0 + rows[:, None] * s_s1 + r[None, :] * s_s2,
                          mask=has[:, None] & rmask[None, :], other=0.0)
        a = first
        while a < N_SLOTS:
            bt = tl.load(b_ptr + a * b_s0 + n[:, None] * b_s1 + r[None, :], mask=nmask[:, None] & rmask[None, :],
                         other=0.0)
            acc += tl.dot(tl.where((idx == a)[:, None], st, 0.0), tl.trans(bt.to(tl.float32)),
                          input_precision=PRECISION)
            a = tl.min(tl.where(idx > a, idx, N_SLOTS), axis=0)         # next adapter in the tile
    y_ptrs = y_ptr + rows[:, None] * y_st + n[None, :]
    y = tl.load(y_ptrs, mask=ymask, other=0.0)                          # after the dots: fewer live registers
    out = y.to(tl.float32) + acc * scale[:, None]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=ymask)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _interpreted() -> bool:
    # Triton's interpreter wraps @triton.jit functions in InterpretedFunction, not JITFunction.
    from triton.runtime.jit import JITFunction
    return not isinstance(_lora_shrink_kernel, JITFunction)


def _check_index(row_adapter: torch.Tensor, t: int, device: torch.device, op: str) -> None:
    if row_adapter.shape != (t,) or row_adapter.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: row_adapter must be [{t}] int32 or int64 (-1 = no adapter), "
                         f"got {tuple(row_adapter.shape)} {row_adapter.dtype}")
    if row_adapter.device != device:
        raise ValueError(f"{op}: row_adapter is on {row_adapter.device}, the activations on {device}")


def _rank_block(r: int) -> int:
    return min(64, max(16, triton.next_power_of_2(r)))                 # tl.dot needs >= 16


def _row_block(t: int) -> int:
    return 16 if t <= 16 else 32 if t <= 128 else 64


def lora_num_splits(t: int, h_in: int, r: int, device: torch.device | str) -> int:
    """Split-K count of the shrink: ~2 waves of programs over the SMs, >= 256 columns of H_in each."""
    programs = triton.cdiv(t, _row_block(t)) * triton.cdiv(r, _rank_block(r))
    return max(1, min(triton.cdiv(2 * dispatch.sm_count(device), programs), triton.cdiv(h_in, 256), 32))


def lora_shrink_triton(x: torch.Tensor, a_stack: torch.Tensor, row_adapter: torch.Tensor,
                       num_splits: int | None = None) -> torch.Tensor:
    """x[T, H_in] -> s[S, T, R] fp32 with sum over S = x[t] @ A[a_t]^T (rows with a_t = -1: 0).

    S (the split-K count) comes from `lora_num_splits` unless `num_splits` is given.
    """
    if x.ndim != 2 or x.stride(-1) != 1 or x.dtype not in _FLOATS:
        raise ValueError(f"lora: x must be [T, H_in] fp32/fp16/bf16 with unit stride on H_in, "
                         f"got {tuple(x.shape)} {x.dtype} strides {x.stride()}")
    t, h = x.shape
    if a_stack.ndim != 3 or a_stack.shape[2] != h or a_stack.stride(-1) != 1 or a_stack.dtype != x.dtype:
        raise ValueError(f"lora: a_stack must be [n_slots, R, {h}] {x.dtype} with unit stride on H_in, "
                         f"got {tuple(a_stack.shape)} {a_stack.dtype}")
    if a_stack.device != x.device:
        raise ValueError(f"lora: a_stack is on {a_stack.device}, x on {x.device}")
    n_slots, r, _ = a_stack.shape
    if n_slots < 1 or r < 1:
        raise ValueError(f"lora: a_stack needs >= 1 slot and rank >= 1, got {tuple(a_stack.shape)}")
    _check_index(row_adapter, t, x.device, "lora")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"lora: num_splits must be >= 1, got {num_splits}")
    splits = num_splits or (lora_num_splits(t, h, r, x.device) if t else 1)
    s = torch.empty((splits, t, r), dtype=torch.float32, device=x.device)
    if t == 0:
        return s
    f32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _interpreted())
    block_t, block_r = _row_block(t), _rank_block(r)
    block_k = 64 if f32 else 128
    per_split = triton.cdiv(triton.cdiv(h, splits), block_k) * block_k
    _lora_shrink_kernel[(triton.cdiv(t, block_t), splits, triton.cdiv(r, block_r))](
        x, a_stack, row_adapter, s, t, h, r, n_slots, per_split,
        x.stride(0), a_stack.stride(0), a_stack.stride(1), row_adapter.stride(0), s.stride(0), s.stride(1),
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=block_k, F32=f32, num_warps=4)
    return s


def lora_expand_triton(y: torch.Tensor, s: torch.Tensor, b_stack: torch.Tensor, scaling: torch.Tensor,
                       row_adapter: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
    """y[:, col_offset:col_offset+W] += scaling[a_t] * sum_S(s)[t] @ B[a_t]^T in place; returns y.

    s: [S, T, R] fp32 from `lora_shrink_triton` (or [T, R]); any strides, so the rank
    columns of one slice of a shared shrink may be passed as a view. b_stack [n_slots, W, R].
    """
    if y.ndim != 2 or y.stride(-1) != 1 or y.dtype not in _FLOATS:
        raise ValueError(f"lora: y must be [T, H_out] fp32/fp16/bf16 with unit stride on H_out, "
                         f"got {tuple(y.shape)} {y.dtype} strides {y.stride()}")
    t = y.shape[0]
    if s.ndim == 2:
        s = s.unsqueeze(0)
    if s.ndim != 3 or s.shape[1] != t or s.dtype != torch.float32 or s.device != y.device:
        raise ValueError(f"lora: s must be [S, {t}, R] or [{t}, R] fp32 on {y.device}, "
                         f"got {tuple(s.shape)} {s.dtype} on {s.device}")
    _, _, r = s.shape
    if b_stack.ndim != 3 or b_stack.shape[2] != r or b_stack.stride(-1) != 1 or b_stack.dtype != y.dtype:
        raise ValueError(f"lora: b_stack must be [n_slots, W, {r}] {y.dtype} with unit stride on R, "
                         f"got {tuple(b_stack.shape)} {b_stack.dtype}")
    if b_stack.device != y.device:
        raise ValueError(f"lora: b_stack is on {b_stack.device}, y on {y.device}")
    n_slots, w, _ = b_stack.shape
    if not 0 <= col_offset <= y.shape[1] - w:
        raise ValueError(f"lora: columns [{col_offset}, {col_offset + w}) do not fit y's {y.shape[1]} columns")
    if scaling.shape != (n_slots,) or scaling.dtype != torch.float32 or scaling.device != y.device:
        raise ValueError(f"lora: scaling must be [{n_slots}] fp32 on {y.device}, "
                         f"got {tuple(scaling.shape)} {scaling.dtype} on {scaling.device}")
    _check_index(row_adapter, t, y.device, "lora")
    if t == 0 or w == 0:
        return y
    scaling = scaling.contiguous()
    block_t = _row_block(t)
    block_n = 32 if t <= 16 else 64                                     # decode: more programs over B
    prec = "ieee" if y.dtype == torch.float32 else "tf32x3"
    out = y[:, col_offset:]
    _lora_expand_kernel[(triton.cdiv(t, block_t), triton.cdiv(w, block_n))](
        s, b_stack, row_adapter, scaling, out, t, w, r, n_slots, s.shape[0],
        s.stride(0), s.stride(1), s.stride(2), b_stack.stride(0), b_stack.stride(1), row_adapter.stride(0),
        y.stride(0), BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=min(32, _rank_block(r)), PRECISION=prec,
        num_warps=8 if block_t * block_n >= 2048 and y.element_size() == 2 else 4)  # tf32x3 tiles spill at 4 warps (Triton 3.7)
    return y


def lora_triton(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                scaling: torch.Tensor, row_adapter: torch.Tensor, col_offset: int = 0,
                num_splits: int | None = None) -> torch.Tensor:
    """Triton `lora_ref`: shrink then expand, two launches, no host sync; y updated in place and returned."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.device != y.device:
        raise ValueError(f"lora: x [T, H_in] and y [T, H_out] must share T and device, "
                         f"got {tuple(x.shape)} on {x.device}, {tuple(y.shape)} on {y.device}")
    if b_stack.ndim != 3 or a_stack.ndim != 3 or b_stack.shape[0] != a_stack.shape[0] \
            or b_stack.shape[2] != a_stack.shape[1]:
        raise ValueError(f"lora: a_stack [n_slots, R, H_in] and b_stack [n_slots, W, R] must agree on n_slots "
                         f"and R, got {tuple(a_stack.shape)}, {tuple(b_stack.shape)}")
    s = lora_shrink_triton(x, a_stack, row_adapter, num_splits)
    return lora_expand_triton(y, s, b_stack, scaling, row_adapter, col_offset)


def lora_ref(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
             scaling: torch.Tensor, row_adapter: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
    """y[T, H_out] += per-row LoRA delta, in place on y[:, col_offset:col_offset+W]; returns y.

    x[T, H_in]; a_stack[n_slots, R, H_in]; b_stack[n_slots, W, R]; scaling[n_slots] fp32;
    row_adapter[T] int32/int64, -1 (or any index outside [0, n_slots)) leaves the row untouched,
    bit for bit. For a row with adapter a:
        y[t, cols] = fl( y[t, cols] + scaling[a] * ((x[t] @ A[a]^T) @ B[a]^T) )
    with every product and sum in fp32 and one rounding (fl) to y's dtype; PEFT's
    `base(x) + lora_B(lora_A(dropout(x))) * scaling` (dropout is the identity at inference)
    in the same order, without PEFT's intermediate roundings to the model dtype.

    One pass per slot (n_slots is a Python int, so the loop is static: no host sync, no
    data-dependent shapes, torch.compile takes it whole), at n_slots times the FLOPs; each
    slot's delta is kept only on its own rows, so garbage (even NaN) in a slot no row uses
    never reaches y, as in the kernels, which read only the slots their rows name.
    """
    w = b_stack.shape[1]
    idx = row_adapter.long()
    xf = x.float()
    cols = y[:, col_offset:col_offset + w]
    delta = torch.zeros(cols.shape, dtype=torch.float32, device=y.device)
    for slot in range(a_stack.shape[0]):
        d = (xf @ a_stack[slot].float().T) @ b_stack[slot].float().T                  # [T, W], fp32
        delta = torch.where((idx == slot)[:, None], d * scaling[slot].float(), delta)
    use = (idx >= 0) & (idx < a_stack.shape[0])
    cols.copy_(torch.where(use[:, None], (cols.float() + delta).to(y.dtype), cols))
    return y
