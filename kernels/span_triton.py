"""Triton backend of Superlinear attention: tunables table, search, prefill and decode entry points.

    >>> import os, torch
    >>> from secure_run.kernels.params import SpanParams
    >>> p = SpanParams(sw_index=2, num_spans=2, backward_factor=2.0, forward_factor=1.0,
    ...                span_power=0.5, inv_search_power_int=2)
    >>> cfg = config_for(torch.device("cuda"), head_dim=128, dtype=torch.float16)
    >>> (cfg.pair_block_p, cfg.pair_block_n, cfg.decode_chunk)
    (128, 64, 2048)

Tunables come from a deterministic table keyed by device type, head_dim and dtype (no autotune
sweep at run time, so a decode step can be captured in a CUDA graph). Decode (Lq == 1) never
synchronises with the host; prefill splits long chunks into segments to bound scratch memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secure_run.errors import KernelUnavailable
from secure_run.kernels._checks import per_row_positions
from secure_run.kernels._schedule import first_valid_key, span_extent
from secure_run.kernels._triton_common import (
    device_offsets,
    dot_precision,
    interpreting,
    pdl_supported,
    span_consts,
)
from secure_run.kernels._triton_decode import launch_decode
from secure_run.kernels._triton_prefill import launch_prefill_attention
from secure_run.kernels._triton_search import launch_search, launch_search_split
from secure_run.kernels.params import SpanParams
from secure_run.kernels.reference import SpanSearch

MAX_SPANS = 4
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class TritonConfig:
    """Block sizes and launch settings of every kernel for one (device, head_dim, dtype)."""

    search_block_s: int
    search_warps: int
    search_design: str
    search_split_block: int
    search_split_len: int
    search_block_q: int
    search_split_warps: int
    search_split_stages: int
    pair_block_p: int
    pair_block_n: int
    pair_warps: int
    pair_stages: int
    pair_phases: bool
    pair_tma: bool
    merge_block_m: int
    decode_mode: str
    decode_split: int
    decode_chunk: int
    decode_wchunk: int
    decode_block_n: int
    decode_block_nw: int
    decode_warps: int
    decode_stages: int
    decode_lane_max: bool
    decode_union_chunk: int
    decode_union_warps: int
    decode_union_stages: int
    decode_small_warps: int
    decode_pdl: bool
    decode_union_maxnreg: int
    decode_union_tma: bool
    decode_merge_all: bool
    decode_merge_warps: int
    prefill_segment: int


_CPU_INTERPRETER = TritonConfig(
    search_block_s=16, search_warps=4, search_design="single", search_split_block=16, search_split_len=32,
    search_block_q=4, search_split_warps=4, search_split_stages=1, pair_block_p=16, pair_block_n=16, pair_warps=4, pair_stages=1,
    pair_phases=True, pair_tma=True,
    merge_block_m=16, decode_mode="split", decode_split=32, decode_chunk=32, decode_wchunk=16, decode_block_n=16,
    decode_block_nw=16, decode_warps=4, decode_stages=1, decode_lane_max=True, decode_union_chunk=32, decode_union_warps=4, decode_union_stages=1, decode_small_warps=4,
    decode_pdl=False, decode_union_maxnreg=0, decode_union_tma=False, decode_merge_all=False, decode_merge_warps=0,
    prefill_segment=1 << 15,
)


def config_for(device: torch.device, head_dim: int, dtype: torch.dtype, kv_len: int = 0) -> TritonConfig:
    """The tunables for this device type, head_dim, dtype and cache length (a fixed table; today's
    decode choice is the same at every length).

    Decode design (H200, released shapes, ``bench/kernels.py --only sweep``, see bench/RESULTS.md,
    2026-12-03): "shared", each KV head's span rows cut at a global grid of 2048-key pieces, each
    piece read once for up to 16 of the rows that cover it (16-row ``tl.dot`` tiles, 4 warps, 3
    stages), with 1-warp finalize and merge kernels, the four kernels launched as programmatic
    dependents (``decode_pdl``, Hopper; 17:18Z: 111.0 vs 113.8 us at 1M, 212.3 vs 213.8 at 4M, 345.2
    vs 347.6 at 10M). Against the split stream 125.7 at 1M and the pieces per row 243.4 at 4M, 362.6
    at 10M. Slower or no better in the same sweeps: 1024-, 4096- and 8192-key pieces, 2 or 8 warps,
    2 stages, 32-key blocks (also with 6 stages), 128-key blocks with 8 warps, 32 or 128 stripes per
    search split, skipping the keys between a group's spans (145.6 / 225.0 us), the merge fused into
    the shared kernel (129.2 / 324.1 us), the finalize done inside every shared program (225 / 804
    us) or by the last search program of each KV head (the search 5 -> 9 us at 1M, 6 -> 50 at 4M),
    the inner pieces run first (111.2 vs 112.6, 216.3 vs 214.9) and a 100 % shared-memory carveout
    (no change). Slower in the calls of 2026-12-03 18:44-19:22Z (against 110.6-112.0 / 212.0-215.1
    us for the table): small equal blocks of each KV head's span union handed out by the hardware
    (143-204 / 238-454 us), one wave of equal shares of the union cut by a per-KV-head finalize
    (202 / 373-399 us), 4 shared programs per SM under a 128-register cap with 2 stages (117.1 /
    235.8), 1 stage (166.3 / 317.7), 32-key blocks (145.0 / 270.3), 4 stages (134.9 / 218.2), and
    (19:13Z) a piece met by one row streamed in per-lane registers, the split stream's loop
    (119.8-121.7 / 226.0-228.0); (19:22Z) each 64-key step scored as 4 or 2 sub-blocks with their
    own running softmax (181.5 / 290.3, 214.1 / 339.5; 255 registers). No better: 128-key steps
    with 4 warps and 2 stages under the 168-register cap (111.4 / 217.4 vs 111.6 / 214.7, 19:18Z).
    Within the run-to-run spread of the table (110.6-112.0 / 211.6-215.1 over this stop's calls),
    so not taken: whole K / V blocks of the shared stream through TMA descriptors under the
    168-register cap (``decode_union_tma``; 19:33Z: 110.1 / 209.6 / 344.2 vs 110.9 / 212.1 / 345.0
    at 10M; uncapped, 188 registers: 135.1 / 215.5 / 344.3; again at 21:03Z: 111.4 / 212.8 / 349.9 vs
    112.0 / 215.2 / 351.0, ~1 %, not taken into the model's path). Slower or no better at 21:03Z:
    pieces between the powers of two, 1280 / 1536 / 1792 / 2560 / 3072 keys (1M 127.4 / 121.3 /
    110.7 / 115.1 / 123.8 us, 4M 217.5 / 226.4 / 226.2 / 228.4 / 242.9, against 112.0 / 215.2).
    The split stream, the pieces per row and the union design stay selectable and
    tested. The merge kernel (2026-12-04, ``--only merge``, same process) loads every slot's span
    parts as one block before any arithmetic, with 2 warps (``decode_merge_all``,
    ``decode_merge_warps``): 111.6 / 213.0 / 347.9 us at 1M / 4M / 10M against 112.0 / 215.1 / 350.8
    slot by slot with 1 warp (the previous table); 1, 4 and 8 warps: 111.3-113.6 / 213.2-214.7 /
    347.3-350.1; slot by slot with 4 warps: 120.6 / 220.0 / 355.4.

    Prefill (H200, fp16, released shapes, ``bench/kernels.py --only search``, bench/RESULTS.md
    "kernels", 2026-12-02): the single-program search with 2 warps instead of 4 (K3 32K chunk at
    1M: 11.95 -> 8.70 ms; K4 128K: 10.19 -> 6.75 ms, same anchors on every row); the stripe-split
    design (``search_design="split"``) with 2 warps is a little faster alone (8.47 / 6.56 vs 9.21 /
    6.75 ms on 2026-12-03) but not in the whole layer (K3 42.4 vs 43.0 ms and 43.2 vs 43.1 in two
    calls; K4 54.1 vs 53.0 and 57.3 vs 53.8), and slower in every other setting tried. Pair tiles (2026-12-03): each tile runs the key blocks that lie inside every row's range
    without masks, loading K / V there through TMA descriptors, in 128 queries x 64 keys, 8 warps, 3
    stages: pair tiles alone 47.2 -> 33.3 ms (K3), 56.8 -> 46.4 ms (K4), the layer 58.1 -> 43.0 /
    65.1 -> 53.0 ms, against the every-block-masked 128 x 32, 4 warps, 4 stages of the previous
    table (128 x 64 with every block masked: 46.1 / 59.5 ms). fp32 and head_dim > 128 keep 64 x 32
    tiles and pointer loads.
    """
    if device.type != "cuda":
        return _CPU_INTERPRETER
    wide = dtype == torch.float32 or head_dim > 128
    return TritonConfig(
        search_block_s=32 if wide else 64,
        search_warps=4 if wide else 2,
        search_design="single",
        search_split_block=32 if wide else 64,
        search_split_len=0,
        search_block_q=1,
        search_split_warps=4,
        search_split_stages=2,
        pair_block_p=64 if wide else 128,
        pair_block_n=32 if wide else 64,
        pair_warps=8,
        pair_stages=2 if wide else 3,
        pair_phases=True,
        pair_tma=not wide,
        merge_block_m=16,
        decode_mode="shared",
        decode_split=64,
        decode_chunk=2048,
        decode_wchunk=512,
        decode_block_n=64 if head_dim <= 128 else 32,
        decode_block_nw=32 if wide else 64,
        decode_warps=4,
        decode_stages=1,
        decode_lane_max=True,
        decode_union_chunk=2048,
        decode_union_warps=4,
        decode_union_stages=3,
        decode_small_warps=1,
        decode_pdl=True,
        decode_union_maxnreg=0,
        decode_union_tma=False,
        decode_merge_all=True,
        decode_merge_warps=2,
        prefill_segment=1 << 15,
    )


def _check_supported(q2: torch.Tensor, params: SpanParams) -> None:
    D = q2.shape[-1]
    if params.num_spans > MAX_SPANS or D > MAX_HEAD_DIM or q2.dtype == torch.float64:
        raise KernelUnavailable(
            "the Triton kernels do not support these arguments",
            details=(f"got num_spans={params.num_spans}, head_dim={D}, dtype={q2.dtype}",
                     f"expected num_spans <= {MAX_SPANS}, head_dim <= {MAX_HEAD_DIM}, fp16/bf16/fp32"),
            hint="use backend='reference' for these arguments",
            path="params",
            rule="kernels.triton-unsupported",
        )


def _kernel_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask.contiguous().view(torch.uint8)
    if attention_mask.dtype.is_floating_point:
        return (attention_mask != 0).to(torch.uint8)
    return attention_mask.contiguous()


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def span_search_triton(
    q1: torch.Tensor,
    k: torch.Tensor,
    cache_position: torch.Tensor,
    params: SpanParams,
    attention_mask: torch.Tensor | None = None,
) -> SpanSearch:
    """Triton span search for a contiguous chunk of queries (same result as the reference).

    Returns:
        SpanSearch with values fp32 and anchors/qstart/qend int64, each [B, Hq, Lq, k].
    """
    _check_supported(q1, params)
    q1, k = _lastdim_contiguous(q1), _lastdim_contiguous(k)
    cfg = config_for(q1.device, q1.shape[-1], q1.dtype, k.shape[2])
    Lkv = k.shape[2]
    pos = cache_position.to(device=q1.device, dtype=torch.int64).contiguous()
    offs = device_offsets(params, Lkv, q1.device)
    ns = torch.searchsorted(offs, pos + 1, right=True).to(torch.int32)
    mask = _kernel_mask(attention_mask)
    s0 = first_valid_key(attention_mask, q1.shape[0], q1.device) if mask is not None else None
    v, a, qs, qe = _prefill_search(
        q1, k, pos, offs, ns, mask, s0, span_consts(params, q1.device), params, cfg, _upcast(q1),
        dot_precision(q1.dtype),
    )
    return SpanSearch(v, a, qs, qe)


def _prefill_search(
    q1: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    offs: torch.Tensor,
    ns: torch.Tensor,
    mask: torch.Tensor | None,
    s0: torch.Tensor | None,
    consts: torch.Tensor,
    params: SpanParams,
    cfg: TritonConfig,
    upcast: bool,
    precision: str,
) -> tuple[torch.Tensor, ...]:
    """Search of a prefill segment by the table's design: "single" (one program walks all stripes
    of a query; the table's choice) or "split" (``launch_search_split``: stripe splits swept over
    the whole segment, then a merge; measured slower, kept selectable)."""
    W, fwd = params.window_len, params.forward_factor > 0
    if cfg.search_design == "split":
        return launch_search_split(
            q1, k, pos, offs, ns, mask, s0, consts, num_spans=params.num_spans, window=W, forward=fwd,
            block_s=cfg.search_split_block, split_len=cfg.search_split_len, block_q=cfg.search_block_q, upcast=upcast, precision=precision,
            num_warps=cfg.search_split_warps, num_stages=cfg.search_split_stages,
        )
    return launch_search(
        q1, k, pos, offs, ns, mask, s0, consts, num_spans=params.num_spans, window=W, forward=fwd,
        n_splits=1, final=True, split_len=max(1, offs.numel()), block_s=cfg.search_block_s, upcast=upcast,
        precision=precision, num_warps=cfg.search_warps,
    )


def _upcast(x: torch.Tensor) -> bool:
    return interpreting() and x.dtype == torch.bfloat16


def max_span_len(params: SpanParams, kv_len: int) -> int:
    """Upper bound on one span's key count for any query of a cache of ``kv_len`` slots."""
    t = torch.tensor([kv_len])
    mode = params.position_mode
    n = int(span_extent(t, params.backward_factor, params.span_power, mode)[0]) + 1
    if params.forward_factor > 0:
        n += int(span_extent(t, params.forward_factor, params.span_power, mode)[0])
    return n


def superlinear_attention_triton(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_position: torch.Tensor,
    params: SpanParams,
    attention_mask: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton Superlinear attention; arguments as :func:`secure_run.kernels.superlinear_attention`.

    ``cache_position``: [Lq] shared by every batch row, or for decode (Lq == 1) [B, 1], row b at
    its own position: one launch set for the whole batch, each row's search, window and span
    bounds following its position (same result as a call per row). Other shapes are refused
    (:class:`~secure_run.kernels.KernelInputError`, rule ``kernels.cache_position``).

    ``out`` ([B, Hq, Lq, D], q2's dtype) receives the result when given (a static buffer for CUDA
    graphs; tests pass a NaN-poisoned one to prove every element is written).
    """
    _check_supported(q2, params)
    q1, q2 = _lastdim_contiguous(q1), _lastdim_contiguous(q2)
    k, v = _lastdim_contiguous(k), _lastdim_contiguous(v)
    B, Hq, Lq, D = q2.shape
    Lkv = k.shape[2]
    dev = q2.device
    rows = per_row_positions(cache_position, B, Lq)
    cfg = config_for(dev, D, q2.dtype, k.shape[2])
    if out is None:
        out = torch.empty(B, Hq, Lq, D, dtype=q2.dtype, device=dev)
    if Lq == 0:
        return out
    # per-row positions [B, 1] -> [B]; a batch of one row takes the shared-position kernels
    pos = cache_position.to(device=dev, dtype=torch.int64).reshape(-1).contiguous()
    offs = device_offsets(params, Lkv, dev)
    consts = span_consts(params, dev)
    mask = _kernel_mask(attention_mask)
    s0 = first_valid_key(attention_mask, B, dev) if mask is not None else None
    W = params.window_len
    fwd = params.forward_factor > 0
    upcast = _upcast(q2)
    prec = dot_precision(q2.dtype)
    if Lq == 1:
        launch_decode(
            q1, q2, k, v, pos, offs, mask, s0, consts, out, num_spans=params.num_spans, window=W, forward=fwd,
            max_span=max_span_len(params, Lkv), mode=cfg.decode_mode, split_len=cfg.decode_split, block_s=cfg.search_block_s,
            chunk=cfg.decode_union_chunk if cfg.decode_mode == "union" else cfg.decode_chunk, wchunk=cfg.decode_wchunk,
            block_n=cfg.decode_block_n, block_nw=cfg.decode_block_nw, upcast=upcast, precision=prec,
            num_warps=cfg.decode_warps, num_stages=cfg.decode_stages, union_warps=cfg.decode_union_warps,
            union_stages=cfg.decode_union_stages, small_warps=cfg.decode_small_warps, pdl=cfg.decode_pdl and pdl_supported(q2.device), lane_max=cfg.decode_lane_max, pos_rows=rows and B > 1,
            maxnreg=cfg.decode_union_maxnreg, tma=cfg.decode_union_tma, merge_all=cfg.decode_merge_all,
            merge_warps=cfg.decode_merge_warps,
        )
        return out
    ns = torch.searchsorted(offs, pos + 1, right=True).to(torch.int32)
    for a in range(0, Lq, cfg.prefill_segment):
        b = min(Lq, a + cfg.prefill_segment)
        pa = pos[a:b]
        val, anc, qs, qe = _prefill_search(
            q1[:, :, a:b], k, pa, offs, ns[a:b], mask, s0, consts, params, cfg, upcast, prec,
        )
        launch_prefill_attention(
            q2[:, :, a:b], k, v, pa, mask, val, anc, qs, qe, out[:, :, a:b], window=W,
            block_p=cfg.pair_block_p, block_n=cfg.pair_block_n, block_m=cfg.merge_block_m, upcast=upcast,
            precision=prec, num_warps=cfg.pair_warps, num_stages=cfg.pair_stages, phases=cfg.pair_phases,
            tma=cfg.pair_tma,
        )
    return out
