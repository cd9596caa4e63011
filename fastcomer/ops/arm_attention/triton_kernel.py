"""The fused ARM attention in Triton: the kernels, their launchers and the autograd Function.

What a layer call computes:
  1. unrefined attention A = dropout(softmax(S)) [B*H, T, L], float32 (only when the
     ARM covers this layer's own attention: self or both coverage);
  2. Z = proj(mask(relu(conv5x5(coverage) + bias))) [B*H, T, L], float32, plus the
     BatchNorm partial sums in training;
  3. R = BatchNorm(Z) as a per-head affine map (batch statistics in training, running
     ones in eval; the running statistics are updated as nn.BatchNorm1d does), then
     A' = dropout(softmax(S - R)), written, and A'.V; the row logsumexp is saved.
Backward (see `_attention_backward` for the passes): flash-style row passes over query
tiles recompute softmax(S - R) from the logsumexp and dA' = dO.V^T per tile (never
stored), write the refined score gradient dS [B*H, T, L] float32 (-dR, which the ARM
backward reads at neighbouring positions, so it is kept) and dq; BatchNorm's backward is
per-head arithmetic in PyTorch (vectors of length nhead) that turns dS into dZ as an
affine map applied inside `arm_backward_kernel` (d prev_attn, d unrefined attention, bias
and projection gradients; `arm_weight_grad_kernel` the conv weight's, without the
coverage image, the conv output or dZ in memory; it reads Z's ReLU pattern, one int32 of
bits per position, that the forward wrote); with self coverage a second row pass adds the
unrefined softmax's term to dS and dq; a pass over key tiles gives dk = dS^T.q and
dv = A'^T.dO. The ARM needs dc <= 32 (CoMER's is 32).

Layouts (all contiguous): q [B*H, T, D], k and v [B*H, L, D], attention-shaped tensors
(the previous layer's attention, this layer's unrefined attention, the projection
output Z, the refined attention) [B*H, T, L], key padding mask [B, L] as uint8
(1 = padding). L = height*width, row-major.

Kernels, forward:
- `attention_rows_kernel`: one program per (head row, block of target steps). Pass 1
  finds the softmax normaliser of S - R over L tiles (online max and sum), saved as the
  row logsumexp if asked; pass 2 writes the normalised (and dropped-out) attention and,
  if asked, accumulates P.V.
  With HAS_R = False it is the unrefined softmax of S (the first pass of CoMER's
  attention, and layer 0 without ARM).
- `coverage_projection_kernel`: one program per (image, tile of L positions). It walks
  the target steps in order and keeps conv5x5(coverage) of the tile in registers:
  the conv is linear, so conv(sum_{t'<t} X_t') = sum_{t'<t} conv(X_t'), and each step
  adds conv(X_t) as 25 implicit-GEMM products (one per tap, reading the neighbours of
  the tile, i.e. a two-cell halo, straight from the attention tensors). The coverage
  image and the conv output never reach global memory; the kernel writes only
  Z = proj(mask(relu(conv + bias))) [B*H, T, L], in training per-program BatchNorm
  partial sums of Z over unmasked positions, and (for the backward) the ReLU's on/off
  pattern as one int32 of bits per position (dc <= 32).
Kernels, backward (in the order `_attention_backward` runs them):
- `attention_backward_rows_kernel`: per query tile, the refined softmax's dS (written),
  dq and BatchNorm partial sums; dA' and the softmax recomputed per tile.
- `arm_backward_kernel`: the ARM's gradients from dS (dZ applied on the fly).
- `arm_weight_grad_kernel`: the conv weight's gradient, one reduction per tap.
- `unrefined_backward_rows_kernel`: the unrefined softmax's term of dS and dq (self coverage).
- `attention_backward_keys_kernel`: per key tile, dk and dv.
Dropout masks are replayed by `_dropout` from (seed, element index), never stored.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...backends import triton_interpreter
from ...model.arm import CONV_PADDING, CONV_TAPS, KERNEL_SIZE
from ..triton_launch import launch_kernel
from .inputs import ARMWeights

# The conv's geometry as compile-time constants of the kernels.
TAPS = tl.constexpr(CONV_TAPS)
KSIZE = tl.constexpr(KERNEL_SIZE)
PAD = tl.constexpr(CONV_PADDING)


@triton.jit
def _dropout(p, bh, offs_t, offs_l, T, L, seed, rng_offset, p_drop, DROPOUT: tl.constexpr):
    """Inverted dropout with a counter-based RNG: the keep decision of element (bh, t, l)
    depends only on (seed, rng_offset + its flat index), so any kernel can replay it."""
    if DROPOUT:
        flat = (bh * T + offs_t[:, None]) * L + offs_l[None, :] + rng_offset
        keep = tl.rand(seed, flat) >= p_drop
        p = tl.where(keep, p / (1.0 - p_drop), 0.0)
    return p


@triton.jit
def _scores(q, K, Z, Mask, bh, b, offs_t, l0, scale, shift, T, L, D,
            HAS_R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """S - R for one [BLOCK_T, BLOCK_L] tile, -inf at padded or out-of-range keys."""
    offs_l = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    l_ok = offs_l < L
    k = tl.load(K + (bh * L + offs_l[:, None]) * D + offs_d[None, :], mask=l_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if HAS_R:
        t_ok = offs_t < T
        z = tl.load(Z + (bh * T + offs_t[:, None]) * L + offs_l[None, :], mask=t_ok[:, None] & l_ok[None, :], other=0.0)
        s = s - (z * scale + shift)
    padded = tl.load(Mask + b * L + offs_l, mask=l_ok, other=1) != 0
    return tl.where(padded[None, :], float("-inf"), s), offs_l


@triton.jit
def attention_rows_kernel(
    Q, K, V, Z, Scale, Shift, Mask, Out, Attn, Lse,
    T, L, D, H, seed, rng_offset, p_drop,
    HAS_R: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_LSE: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    q = tl.load(Q + (bh * T + offs_t[:, None]) * D + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    scale = 1.0
    shift = 0.0
    if HAS_R:
        # R = BatchNorm(Z) at unmasked keys: an affine map per head (batch or running statistics).
        scale = tl.load(Scale + bh % H)
        shift = tl.load(Shift + bh % H)

    # Pass 1: the softmax normaliser (running max m, running sum l of exp(s - m)).
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_T], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        s, offs_l = _scores(q, K, Z, Mask, bh, b, offs_t, l0, scale, shift, T, L, D, HAS_R, PRECISION, BLOCK_L, BLOCK_D)
        m_new = tl.maximum(m, tl.max(s, 1))
        # A tile whose keys are all padding leaves m at -inf; keep exp() away from -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        denom = denom * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new

    if WRITE_LSE:  # log of the softmax normaliser, for the backward's recompute of the softmax
        tl.store(Lse + bh * T + offs_t, tl.where(m == float("-inf"), 0.0, m) + tl.log(denom), mask=t_ok)

    # Pass 2: normalised attention, written (the next layer's ARM reads it), and P.V.
    inv = 1.0 / denom
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        s, offs_l = _scores(q, K, Z, Mask, bh, b, offs_t, l0, scale, shift, T, L, D, HAS_R, PRECISION, BLOCK_L, BLOCK_D)
        p = tl.exp(s - m[:, None]) * inv[:, None]
        p = _dropout(p, bh, offs_t, offs_l, T, L, seed, rng_offset, p_drop, DROPOUT)
        l_ok = offs_l < L
        tl.store(Attn + (bh * T + offs_t[:, None]) * L + offs_l[None, :], p.to(Attn.dtype.element_ty), mask=t_ok[:, None] & l_ok[None, :])
        if WRITE_OUT:
            v = tl.load(V + (bh * L + offs_l[:, None]) * D + offs_d[None, :], mask=l_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    if WRITE_OUT:
        tl.store(Out + (bh * T + offs_t[:, None]) * D + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _tap_inside(l_ok, row, col, HEIGHT, WIDTH, dy, dx):
    """Positions whose neighbour at (dy, dx) lies inside the image (zero padding elsewhere)."""
    return l_ok & (row >= -dy) & (row < HEIGHT - dy) & (col >= -dx) & (col < WIDTH - dx)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """a.b with float32 accumulation on tensor cores where PRECISION allows: 'ieee' (exact
    float32 products, FMA units), 'tf32', or 'bf16'/'fp16' (operands rounded to that type:
    the ARM's convs and projection for half inputs)."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PRECISION == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _conv_of_step(Prev, Curr, ConvW, pos, from_prev, from_curr, l_ok, row, col, w_idx, w_ok, HEIGHT, WIDTH,
                  PRECISION: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_L: tl.constexpr):
    """conv5x5 (no bias) of one step's attention X_t over a tile: 25 implicit-GEMM taps
    [dc, C] x [C, tile], each reading the tile's neighbours (the two-cell halo)."""
    conv = tl.zeros([BLOCK_DC, BLOCK_L], tl.float32)
    for tap in range(TAPS):
        dy = tap // KSIZE - PAD
        dx = tap - tap // KSIZE * KSIZE - PAD  # tap % KSIZE: the interpreter's constexpr has no __rmod__
        inside = _tap_inside(l_ok, row, col, HEIGHT, WIDTH, dy, dx)
        src = pos + (dy * WIDTH + dx)
        x = tl.load(Prev + src, mask=from_prev[:, None] & inside[None, :], other=0.0).to(tl.float32)
        x += tl.load(Curr + src, mask=from_curr[:, None] & inside[None, :], other=0.0).to(tl.float32)
        w = tl.load(ConvW + w_idx + tap, mask=w_ok, other=0.0)
        conv += _mm(w, x, PRECISION)
    return conv


@triton.jit
def _arm_tile(Mask, b, tile, T, L, WIDTH, H, DC, CIN, N_CROSS,
              BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_H: tl.constexpr):
    """Indices and masks of one (image b, tile of L) program of the ARM kernels."""
    # int64 indices: no overflow for large tensors (and no overflow checks in the interpreter)
    offs_l = tile * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    l_ok = offs_l < L
    row = offs_l // WIDTH
    col = offs_l % WIDTH
    keep = l_ok & (tl.load(Mask + b * L + offs_l, mask=l_ok, other=1) == 0)
    # Input channel c: the previous layer's attention for c < N_CROSS, else this layer's.
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    from_prev = offs_c < N_CROSS
    from_curr = (offs_c >= N_CROSS) & (offs_c < CIN)
    head = tl.where(from_prev, offs_c, offs_c - N_CROSS)
    channel_pos = (b * H + head)[:, None] * T * L + offs_l[None, :]  # [BLOCK_C, BLOCK_L] at step 0
    offs_dc = tl.arange(0, BLOCK_DC).to(tl.int64)
    dc_ok = offs_dc < DC
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    h_ok = offs_h < H
    w_idx = (offs_dc[:, None] * CIN + offs_c[None, :]) * TAPS
    w_ok = dc_ok[:, None] & (offs_c < CIN)[None, :]
    return offs_l, l_ok, row, col, keep, offs_c, from_prev, from_curr, channel_pos, offs_dc, dc_ok, offs_h, h_ok, w_idx, w_ok


@triton.jit
def coverage_projection_kernel(
    Prev, Curr, Mask, ConvW, ConvB, ProjW, Z, Stats, Relu,
    T, L, WIDTH, HEIGHT, H, DC, CIN, N_CROSS,
    STATS: tl.constexpr, WRITE_RELU: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    (offs_l, l_ok, row, col, keep, offs_c, from_prev, from_curr, channel_pos,
     offs_dc, dc_ok, offs_h, h_ok, w_idx, w_ok) = _arm_tile(
        Mask, b, tile, T, L, WIDTH, H, DC, CIN, N_CROSS, BLOCK_L, BLOCK_C, BLOCK_DC, BLOCK_H)
    z_pos = (b * H + offs_h)[:, None] * T * L + offs_l[None, :]
    z_ok = h_ok[:, None] & l_ok[None, :]
    conv_b = tl.load(ConvB + offs_dc, mask=dc_ok, other=0.0)
    proj_w = tl.load(ProjW + offs_h[:, None] * DC + offs_dc[None, :], mask=h_ok[:, None] & dc_ok[None, :], other=0.0)

    conv = tl.zeros([BLOCK_DC, BLOCK_L], tl.float32)  # conv5x5 (no bias) of the coverage at step t
    sum_z = tl.zeros([BLOCK_H], tl.float32)
    sum_z2 = tl.zeros([BLOCK_H], tl.float32)
    for t in range(T):
        y = tl.maximum(conv + conv_b[:, None], 0.0)
        y = tl.where(keep[None, :], y, 0.0)
        z = _mm(proj_w, y, PRECISION)  # [BLOCK_H, BLOCK_L]
        tl.store(Z + z_pos + t * L, z, mask=z_ok)
        if STATS:
            zk = tl.where(keep[None, :], z, 0.0)
            sum_z += tl.sum(zk, 1)
            sum_z2 += tl.sum(zk * zk, 1)
        if WRITE_RELU:
            on = (conv + conv_b[:, None] > 0) & keep[None, :]
            tl.store(Relu + b * T * L + t * L + offs_l, tl.sum(on.to(tl.int32) << offs_dc[:, None].to(tl.int32), 0), mask=l_ok)
        if t + 1 < T:
            # Step t+1's coverage adds step t's attention.
            conv += _conv_of_step(Prev, Curr, ConvW, channel_pos + t * L, from_prev, from_curr, l_ok, row, col,
                                  w_idx, w_ok, HEIGHT, WIDTH, PRECISION, BLOCK_DC, BLOCK_L)
    if STATS:
        base = (b * tl.num_programs(1) + tile) * 2 * BLOCK_H
        tl.store(Stats + base + offs_h, sum_z)
        tl.store(Stats + base + BLOCK_H + offs_h, sum_z2)


@triton.jit
def _grad_z(DS, Z, idx, ok, coef_a, coef_b, coef_m, coef_c):
    """dZ = a dS + b Z + c (the BatchNorm backward, per head), 0 outside `ok`."""
    ds = tl.load(DS + idx, mask=ok, other=0.0)
    z = tl.load(Z + idx, mask=ok, other=0.0)
    return tl.where(ok, coef_a * ds + coef_b * (z - coef_m) + coef_c, 0.0)


@triton.jit
def _grad_y(DS, Z, Relu, z_rows, b, t, T, L, src, src_ok, h_ok, relu_shift, proj_w_t, coef_a, coef_b, coef_m, coef_c,
            PRECISION: tl.constexpr):
    """dY_t = (proj^T dZ_t) * relu'(t) [BLOCK_DC, BLOCK_L] at positions `src` (0 outside src_ok)."""
    dz = _grad_z(DS, Z, z_rows + t * L + src[None, :], h_ok[:, None] & src_ok[None, :], coef_a, coef_b, coef_m, coef_c)
    bits = tl.load(Relu + b * T * L + t * L + src, mask=src_ok, other=0)
    return tl.where(((bits[None, :] >> relu_shift) & 1) != 0, _mm(proj_w_t, dz, PRECISION), 0.0), dz


@triton.jit
def arm_backward_kernel(
    Prev, Curr, Mask, ConvW, ConvB, ProjW, DS, Z, CoefDZ, Relu, DPrev, DCurr, DConvB, DProjW,
    T, L, WIDTH, HEIGHT, H, DC, CIN, N_CROSS,
    PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward of Z = proj(mask(relu(conv(coverage) + bias))) over one (image, tile of L).

    With dY_t = (proj^T dZ_t) * relu'(t) (relu' includes the mask; its bits were written by
    the forward, so any position's dY_t can be rebuilt from dZ_t), and G_t = sum_{t' > t} dY_t'
    (the coverage at t' contains X_t for every t < t'):
      d X_t        = conv^T(G_t)             running sum, walking t downwards, of conv^T(dY_t)
      d conv.bias   = sum_t sum_l dY_t,   d proj = sum_t dZ_t Y_t^T
    (d conv.weight = sum_t G_t (x) X_t is `arm_weight_grad_kernel`'s: one reduction per tap,
    whose accumulator fits in registers.) Y_t needs the conv of the coverage at t: a first
    walk sums conv(X_t) over all t, the downward walk subtracts conv(X_t) step by step. The
    coverage image and the conv output are never written; per-program partial parameter
    gradients are, and summed by the caller.
    dZ itself is not in memory either: the BatchNorm backward makes it a per-head affine map
    of the refined softmax's score gradient dS (dR = -dS) and of Z, dZ = a dS + b (Z - mean) + c
    (CoefDZ [4, H]: a, b, mean, c; b = c = 0 in eval), applied at each load (masked positions do not matter:
    their ReLU bits and Y are 0).
    """
    b = tl.program_id(0)
    tile = tl.program_id(1)
    (offs_l, l_ok, row, col, keep, offs_c, from_prev, from_curr, channel_pos,
     offs_dc, dc_ok, offs_h, h_ok, w_idx, w_ok) = _arm_tile(
        Mask, b, tile, T, L, WIDTH, H, DC, CIN, N_CROSS, BLOCK_L, BLOCK_C, BLOCK_DC, BLOCK_H)
    z_rows = (b * H + offs_h)[:, None] * T * L  # [BLOCK_H, 1]
    conv_b = tl.load(ConvB + offs_dc, mask=dc_ok, other=0.0)
    proj_w_t = tl.load(ProjW + offs_h[None, :] * DC + offs_dc[:, None], mask=dc_ok[:, None] & h_ok[None, :], other=0.0)
    relu_shift = offs_dc[:, None].to(tl.int32)
    program = b * tl.num_programs(1) + tile
    coef_a = tl.load(CoefDZ + offs_h, mask=h_ok, other=0.0)[:, None]
    coef_b = tl.load(CoefDZ + H + offs_h, mask=h_ok, other=0.0)[:, None]
    coef_m = tl.load(CoefDZ + 2 * H + offs_h, mask=h_ok, other=0.0)[:, None]
    coef_c = tl.load(CoefDZ + 3 * H + offs_h, mask=h_ok, other=0.0)[:, None]

    conv = tl.zeros([BLOCK_DC, BLOCK_L], tl.float32)
    for t in range(T - 1):
        conv += _conv_of_step(Prev, Curr, ConvW, channel_pos + t * L, from_prev, from_curr, l_ok, row, col,
                              w_idx, w_ok, HEIGHT, WIDTH, PRECISION, BLOCK_DC, BLOCK_L)

    d_x = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)  # conv^T(G_t), G_t = sum_{t' > t} dY_t'

    d_bias = tl.zeros([BLOCK_DC], tl.float32)
    d_proj = tl.zeros([BLOCK_H, BLOCK_DC], tl.float32)
    for step in range(T):
        t = T - 1 - step
        pos_t = channel_pos + t * L
        tl.store(DPrev + pos_t, d_x, mask=from_prev[:, None] & l_ok[None, :])
        tl.store(DCurr + pos_t, d_x, mask=from_curr[:, None] & l_ok[None, :])
        # this step: dY_t at the tile and the projection's gradient; then conv^T(dY_t)
        d_y, dz = _grad_y(DS, Z, Relu, z_rows, b, t, T, L, offs_l, l_ok, h_ok, relu_shift, proj_w_t, coef_a, coef_b,
                          coef_m, coef_c, PRECISION)
        y = tl.where(keep[None, :], tl.maximum(conv + conv_b[:, None], 0.0), 0.0)
        d_proj += _mm(dz, tl.trans(y), PRECISION)
        d_bias += tl.sum(d_y, 1)
        for tap in range(TAPS):  # a loop, not unrolled: TAPS copies of these dots' buffers overflow shared memory
            dy = tap // KSIZE - PAD
            dx = tap - tap // KSIZE * KSIZE - PAD  # tap % KSIZE: the interpreter's constexpr has no __rmod__
            # conv^T: position l receives dY_t(l - tap) through weight[:, :, tap]
            src_ok = _tap_inside(l_ok, row, col, HEIGHT, WIDTH, -dy, -dx)
            d_y_n, _ = _grad_y(DS, Z, Relu, z_rows, b, t, T, L, offs_l - (dy * WIDTH + dx), src_ok, h_ok, relu_shift,
                               proj_w_t, coef_a, coef_b, coef_m, coef_c, PRECISION)
            w_t = tl.load(ConvW + w_idx + tap, mask=w_ok, other=0.0)  # [dc, C]
            d_x += _mm(tl.trans(w_t), d_y_n, PRECISION)
        if t > 0:  # the conv of the coverage at t-1: remove step t-1's contribution
            conv -= _conv_of_step(Prev, Curr, ConvW, channel_pos + (t - 1) * L, from_prev, from_curr, l_ok, row, col,
                                  w_idx, w_ok, HEIGHT, WIDTH, PRECISION, BLOCK_DC, BLOCK_L)
    tl.store(DConvB + program * BLOCK_DC + offs_dc, d_bias)
    tl.store(DProjW + (program * BLOCK_H + offs_h[:, None]) * BLOCK_DC + offs_dc[None, :], d_proj)


@triton.jit
def arm_weight_grad_kernel(
    Prev, Curr, Mask, ProjW, DS, Z, CoefDZ, Relu, DConvW,
    T, L, WIDTH, HEIGHT, H, DC, CIN, N_CROSS,
    PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """d conv.weight[:, :, tap] = sum_t G_t X_t(l + tap)^T over one (tap, image, tile of L), with
    G_t = sum_{t' > t} dY_t' rebuilt walking t downwards (dY_t from dS, Z and the ReLU bits, as
    in `arm_backward_kernel`). Its accumulator is one [dc, C] tile: no spills, no partial sums
    through global memory per step. The tap is the fastest grid axis, so the 25 programs of a
    tile run side by side and share their reads in L2. Writes the per-program partial
    DConvW[(image, tile), tap] [BLOCK_DC, BLOCK_C], summed by the caller."""
    tap = tl.program_id(0)
    b = tl.program_id(1)
    tile = tl.program_id(2)
    (offs_l, l_ok, row, col, keep, offs_c, from_prev, from_curr, channel_pos,
     offs_dc, dc_ok, offs_h, h_ok, w_idx, w_ok) = _arm_tile(
        Mask, b, tile, T, L, WIDTH, H, DC, CIN, N_CROSS, BLOCK_L, BLOCK_C, BLOCK_DC, BLOCK_H)
    z_rows = (b * H + offs_h)[:, None] * T * L
    proj_w_t = tl.load(ProjW + offs_h[None, :] * DC + offs_dc[:, None], mask=dc_ok[:, None] & h_ok[None, :], other=0.0)
    relu_shift = offs_dc[:, None].to(tl.int32)
    coef_a = tl.load(CoefDZ + offs_h, mask=h_ok, other=0.0)[:, None]
    coef_b = tl.load(CoefDZ + H + offs_h, mask=h_ok, other=0.0)[:, None]
    coef_m = tl.load(CoefDZ + 2 * H + offs_h, mask=h_ok, other=0.0)[:, None]
    coef_c = tl.load(CoefDZ + 3 * H + offs_h, mask=h_ok, other=0.0)[:, None]
    dy = tap // KSIZE - PAD
    dx = tap % KSIZE - PAD
    shift = dy * WIDTH + dx
    prev_ok = from_prev[:, None] & _tap_inside(l_ok, row, col, HEIGHT, WIDTH, dy, dx)[None, :]
    curr_ok = from_curr[:, None] & _tap_inside(l_ok, row, col, HEIGHT, WIDTH, dy, dx)[None, :]

    g = tl.zeros([BLOCK_DC, BLOCK_L], tl.float32)  # G_t = sum_{t' > t} dY_t'
    d_w = tl.zeros([BLOCK_DC, BLOCK_C], tl.float32)
    for step in range(T - 1):  # G_{T-1} = 0: the last step adds nothing
        t = T - 1 - step
        d_y, _ = _grad_y(DS, Z, Relu, z_rows, b, t, T, L, offs_l, l_ok, h_ok, relu_shift, proj_w_t, coef_a, coef_b,
                         coef_m, coef_c, PRECISION)
        g += d_y
        pos = channel_pos + (t - 1) * L + shift  # X_{t-1} at the tap's neighbours
        x = tl.load(Prev + pos, mask=prev_ok, other=0.0).to(tl.float32)
        x += tl.load(Curr + pos, mask=curr_ok, other=0.0).to(tl.float32)
        d_w += _mm(g, tl.trans(x), PRECISION)
    program = b * tl.num_programs(2) + tile
    tl.store(DConvW + ((program * TAPS + tap) * BLOCK_DC + offs_dc[:, None]) * BLOCK_C + offs_c[None, :], d_w)


@triton.jit
def _refined_tile(q, do, K, V, Z, Mask, DAttn, lse, bh, b, offs_t, offs_d, l0, scale, shift, T, L, D, seed, rng_offset,
                  p_drop, HAS_R: tl.constexpr, HAS_DATTN: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One [BLOCK_T, BLOCK_L] tile of P' = softmax(S - R) (recomputed from lse; 0 at padded
    or out-of-range entries) and of dropout(dA'), dA' = dO.V^T (+ dAttn)."""
    s, offs_l = _scores(q, K, Z, Mask, bh, b, offs_t, l0, scale, shift, T, L, D, HAS_R, PRECISION, BLOCK_L, BLOCK_D)
    l_ok = offs_l < L
    tl_idx = (bh * T + offs_t[:, None]) * L + offs_l[None, :]
    tl_ok = (offs_t < T)[:, None] & l_ok[None, :]
    p = tl.where(tl_ok, tl.exp(s - lse[:, None]), 0.0)
    v = tl.load(V + (bh * L + offs_l[:, None]) * D + offs_d[None, :], mask=l_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if HAS_DATTN:
        dp += tl.load(DAttn + tl_idx, mask=tl_ok, other=0.0).to(tl.float32)
    dp = _dropout(dp, bh, offs_t, offs_l, T, L, seed, rng_offset, p_drop, DROPOUT)
    return p, dp, offs_l, tl_idx, tl_ok


@triton.jit
def _query_tile(Q, Lse, T, D, H, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (batch*head, tile of T) program of the backward row passes: indices, masks, its
    queries and their logsumexp."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    td = (bh * T + offs_t[:, None]) * D + offs_d[None, :]
    td_ok = t_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + td, mask=td_ok, other=0.0)
    lse = tl.load(Lse + bh * T + offs_t, mask=t_ok, other=0.0)
    return bh, b, offs_t, t_ok, offs_d, d_ok, td, td_ok, q, lse


@triton.jit
def attention_backward_rows_kernel(
    Q, K, V, Z, Scale, Shift, Mean, Mask, DOut, DAttn, Lse, DS, DQ, Stats,
    T, L, D, H, seed, rng_offset, p_drop,
    HAS_R: tl.constexpr, HAS_DATTN: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward pass 1, over query tiles: the refined softmax A' = dropout(softmax(S - R)).

    P' = exp(S - R - lse) is recomputed from the forward's logsumexp, dA' = dO.V^T (+ the
    gradient of the returned attention) per tile, never stored. Two sweeps over L: the first
    gives delta = rowsum(P' * dropout(dA')) and rowsum(P') (P' renormalised by it: lse is
    rounded), from the recomputed P', not FlashAttention's
    rowsum(dO * O): with the stored O, rounded and in the input dtype, the rows of dS no longer
    sum to zero to rounding, and the BatchNorm bias gradient is exactly their sum), the second writes
    dS = P' * (dropout(dA') - delta) [B*H, T, L] float32 (the ARM backward needs it at
    neighbouring positions: dR = -dS; pass 2 adds the unrefined term to it in place),
    dq = dS.K (float32), and with HAS_R per-program (sum dS, sum dS*(Z - mean)) for the
    BatchNorm backward (Mean: the per-head mean the forward normalised with).
    """
    bh, b, offs_t, t_ok, offs_d, d_ok, td, td_ok, q, lse = _query_tile(Q, Lse, T, D, H, BLOCK_T, BLOCK_D)
    do = tl.load(DOut + td, mask=td_ok, other=0.0)
    scale = 1.0
    shift = 0.0
    if HAS_R:
        scale = tl.load(Scale + bh % H)
        shift = tl.load(Shift + bh % H)
    delta = tl.zeros([BLOCK_T], tl.float32)
    total = tl.zeros([BLOCK_T], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        p, dp, offs_l, tl_idx, tl_ok = _refined_tile(q, do, K, V, Z, Mask, DAttn, lse, bh, b, offs_t, offs_d, l0, scale,
                                                     shift, T, L, D, seed, rng_offset, p_drop, HAS_R, HAS_DATTN,
                                                     DROPOUT, PRECISION, BLOCK_L, BLOCK_D)
        delta += tl.sum(p * dp, 1)
        total += tl.sum(p, 1)
    # exp(S - R - lse) sums to 1 only to lse's rounding: renormalise, so that rows of dS sum to 0
    renorm = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)  # 0 for rows past T
    delta *= renorm
    dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    sum_ds = tl.zeros([BLOCK_T], tl.float32)
    sum_dsz = tl.zeros([BLOCK_T], tl.float32)
    mean = 0.0
    if HAS_R:
        mean = tl.load(Mean + bh % H)
    for l0 in range(0, L, BLOCK_L):
        p, dp, offs_l, tl_idx, tl_ok = _refined_tile(q, do, K, V, Z, Mask, DAttn, lse, bh, b, offs_t, offs_d, l0, scale,
                                                     shift, T, L, D, seed, rng_offset, p_drop, HAS_R, HAS_DATTN,
                                                     DROPOUT, PRECISION, BLOCK_L, BLOCK_D)
        l_ok = offs_l < L
        ld = (bh * L + offs_l[:, None]) * D + offs_d[None, :]
        ld_ok = l_ok[:, None] & d_ok[None, :]
        ds = p * renorm[:, None] * (dp - delta[:, None])
        tl.store(DS + tl_idx, ds, mask=tl_ok)
        k = tl.load(K + ld, mask=ld_ok, other=0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if HAS_R:
            z = tl.load(Z + tl_idx, mask=tl_ok, other=0.0) - mean
            sum_ds += tl.sum(ds, 1)
            sum_dsz += tl.sum(ds * z, 1)
    tl.store(DQ + td, dq, mask=td_ok)
    if HAS_R:
        base = (bh * tl.num_programs(1) + tl.program_id(1)) * 2
        tl.store(Stats + base, tl.sum(sum_ds, 0))
        tl.store(Stats + base + 1, tl.sum(sum_dsz, 0))


@triton.jit
def unrefined_backward_rows_kernel(
    Q, K, Mask, DA, Lse, DS, DQ,
    T, L, D, H, seed, p_drop,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward pass 2 (self coverage only), over query tiles: the unrefined softmax
    A = dropout(softmax(S)), whose gradient dA the ARM backward wrote. P = exp(S - lse)
    recomputed; a first sweep over L gives delta = rowsum(dropout(dA) * P), the second
    adds dS_A = P * (dropout(dA) - delta) to dS in place and dS_A.K to dq."""
    bh, b, offs_t, t_ok, offs_d, d_ok, td, td_ok, q, lse = _query_tile(Q, Lse, T, D, H, BLOCK_T, BLOCK_D)
    delta = tl.zeros([BLOCK_T], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        s, offs_l = _scores(q, K, K, Mask, bh, b, offs_t, l0, 1.0, 0.0, T, L, D, False, PRECISION, BLOCK_L, BLOCK_D)
        tl_idx = (bh * T + offs_t[:, None]) * L + offs_l[None, :]
        tl_ok = t_ok[:, None] & (offs_l < L)[None, :]
        p = tl.where(tl_ok, tl.exp(s - lse[:, None]), 0.0)
        dp = _dropout(tl.load(DA + tl_idx, mask=tl_ok, other=0.0), bh, offs_t, offs_l, T, L, seed, 0, p_drop, DROPOUT)
        delta += tl.sum(p * dp, 1)
    dq = tl.load(DQ + td, mask=td_ok, other=0.0)
    for l0 in range(0, L, BLOCK_L):
        s, offs_l = _scores(q, K, K, Mask, bh, b, offs_t, l0, 1.0, 0.0, T, L, D, False, PRECISION, BLOCK_L, BLOCK_D)
        l_ok = offs_l < L
        tl_idx = (bh * T + offs_t[:, None]) * L + offs_l[None, :]
        tl_ok = t_ok[:, None] & l_ok[None, :]
        p = tl.where(tl_ok, tl.exp(s - lse[:, None]), 0.0)
        dp = _dropout(tl.load(DA + tl_idx, mask=tl_ok, other=0.0), bh, offs_t, offs_l, T, L, seed, 0, p_drop, DROPOUT)
        ds = p * (dp - delta[:, None])
        tl.store(DS + tl_idx, tl.load(DS + tl_idx, mask=tl_ok, other=0.0) + ds, mask=tl_ok)
        k = tl.load(K + (bh * L + offs_l[:, None]) * D + offs_d[None, :], mask=l_ok[:, None] & d_ok[None, :], other=0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + td, dq, mask=td_ok)


@triton.jit
def attention_backward_keys_kernel(
    Q, DOut, Attn, DS, DK, DV,
    T, L, D,
    PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward pass 3, over key tiles: dk = dS^T.q (dS of both softmaxes, 0 at padded keys)
    and dv = A'^T.dO, with the returned attention A' (dropout already applied) as stored."""
    bh = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    l_ok = offs_l < L
    d_ok = offs_d < D
    dk = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        t_ok = offs_t < T
        td = (bh * T + offs_t[:, None]) * D + offs_d[None, :]
        td_ok = t_ok[:, None] & d_ok[None, :]
        tl_idx = (bh * T + offs_t[:, None]) * L + offs_l[None, :]
        tl_ok = t_ok[:, None] & l_ok[None, :]
        q = tl.load(Q + td, mask=td_ok, other=0.0)
        do = tl.load(DOut + td, mask=td_ok, other=0.0)
        ds = tl.load(DS + tl_idx, mask=tl_ok, other=0.0)
        a = tl.load(Attn + tl_idx, mask=tl_ok, other=0.0)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dv += tl.dot(tl.trans(a.to(do.dtype)), do, input_precision=PRECISION)
    ld = (bh * L + offs_l[:, None]) * D + offs_d[None, :]
    ld_ok = l_ok[:, None] & d_ok[None, :]
    tl.store(DK + ld, dk.to(DK.dtype.element_ty), mask=ld_ok)
    tl.store(DV + ld, dv.to(DV.dtype.element_ty), mask=ld_ok)



# Warps per program of the row passes (a tile of 16 queries against tiles of 64 keys): with 4,
# the float32 backward row pass and the TF32 refined forward spill (see `python -m fastcomer
# kernels`); the key pass keeps Triton's default of 4.
ROW_NUM_WARPS = 8


def attention_blocks(D: int, L: int) -> dict:
    """Tile sizes of the attention row and key passes (also what the static report compiles)."""
    return dict(BLOCK_T=16, BLOCK_L=max(16, min(64, triton.next_power_of_2(L))), BLOCK_D=max(16, triton.next_power_of_2(D)))


def _attention_rows(q, k, v, mask_u8, nhead, z, scale, shift, out, attn, seed, rng_offset, p_drop, precision,
                    lse=None):
    BH, T, D = q.shape
    L = k.shape[1]
    blocks = attention_blocks(D, L)
    grid = (BH, triton.cdiv(T, blocks["BLOCK_T"]))
    has_r = z is not None
    dummy = attn  # never read when the matching constexpr flag is off
    launch_kernel(attention_rows_kernel, grid,
        q, k, v, z if has_r else dummy, scale if has_r else dummy, shift if has_r else dummy, mask_u8,
        out if out is not None else dummy, attn, lse if lse is not None else dummy,
        T, L, D, nhead, seed, rng_offset, p_drop,
        HAS_R=has_r, WRITE_OUT=out is not None, WRITE_LSE=lse is not None,
        DROPOUT=p_drop > 0, PRECISION=precision, num_warps=ROW_NUM_WARPS, **blocks,
    )


# Warps per program of the ARM kernels: their [dc, tile] float32 accumulators and the
# tap loop's operands fit in 255 registers per thread over 8 warps, not over 4 (spills;
# see `python -m fastcomer kernels`).
ARM_NUM_WARPS = 8


def arm_blocks(nhead: int, dc: int, cin: int, L: int) -> dict:
    """Tile sizes of the ARM conv/projection kernels (also what the static report compiles)."""
    # Triton's interpreter pays per operation, not per element: wider tiles, fewer programs.
    widest = 128 if triton_interpreter() else 64
    return dict(BLOCK_L=max(16, min(widest, triton.next_power_of_2(L))), BLOCK_C=max(16, triton.next_power_of_2(cin)),
                BLOCK_DC=max(16, triton.next_power_of_2(dc)), BLOCK_H=max(16, triton.next_power_of_2(nhead)))


def arm_dot_precision(dtype: torch.dtype, precision: str) -> str:
    """The ARM kernels' PRECISION: half inputs run their convs and projection on operands of
    their own type ('bf16', 'fp16'; float32 accumulation), float32 ones in `precision`."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, precision)


def _coverage_projection(prev, curr, mask_u8, nhead, height, width, arm: ARMWeights, stats: bool, relu_bits: bool,
                         precision):
    """Z [B*H, T, L] float32; with stats, per-head (sum, sum of squares) of Z over unmasked
    positions; with relu_bits, the ReLU's on/off pattern [B, T, L] (bit c = conv channel c,
    masked positions off) that the backward needs."""
    b, L = mask_u8.shape
    T = (prev if prev is not None else curr).shape[1]
    dc, cin = arm.conv_weight.shape[:2]
    blocks = arm_blocks(nhead, dc, cin, L)
    tiles = triton.cdiv(L, blocks["BLOCK_L"])
    z = torch.empty(b * nhead, T, L, device=mask_u8.device, dtype=torch.float32)
    partial = torch.empty(b, tiles, 2, blocks["BLOCK_H"], device=z.device, dtype=torch.float32) if stats else z
    relu = torch.empty(b, T, L, device=z.device, dtype=torch.int32) if relu_bits else z
    launch_kernel(coverage_projection_kernel, (b, tiles),
        prev if prev is not None else curr, curr if curr is not None else prev, mask_u8,
        arm.conv_weight.float().contiguous(), arm.conv_bias.float().contiguous(),
        arm.proj_weight.float().reshape(nhead, dc).contiguous(), z, partial, relu,
        T, L, width, height, nhead, dc, cin, nhead if prev is not None else 0,
        STATS=stats, WRITE_RELU=relu_bits, PRECISION=precision, num_warps=ARM_NUM_WARPS, **blocks,
    )
    sums = partial.double().sum((0, 1))[:, :nhead] if stats else None
    return z, sums, (relu if relu_bits else None)


def _unmasked_count(key_padding_mask: Tensor, steps: int) -> Tensor:
    """Positions BatchNorm normalises over, as a device tensor (no host sync)."""
    return (~key_padding_mask).sum() * steps


def _batchnorm_statistics(arm: ARMWeights, sums: Optional[Tensor], count: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, var) per head, float64: of the batch with sums (training; the running statistics
    are then updated exactly as nn.BatchNorm1d updates them), else the running ones. Everything
    stays on the device: no host sync (CUDA graphs, torch.compile)."""
    if sums is None:
        return arm.running_mean.double(), arm.running_var.double()
    torch._assert_async(count >= 2, "BatchNorm in training needs more than one unmasked position")
    count = count.double()
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp_min(0.0)
    with torch.no_grad():
        if arm.num_batches_tracked is not None:
            arm.num_batches_tracked.add_(1)
        momentum = arm.momentum
        if momentum is None:  # cumulative average: 1 / batches seen, on the device
            momentum = 1.0 / arm.num_batches_tracked.double()
        arm.running_mean.mul_(1 - momentum).add_((momentum * mean).to(arm.running_mean.dtype))
        unbiased = var * count / (count - 1)
        arm.running_var.mul_(1 - momentum).add_((momentum * unbiased).to(arm.running_var.dtype))
    return mean, var


class ARMAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, height, width, prev_attn, conv_weight, conv_bias, proj_weight,
                bn_weight, bn_bias, arm, bn_training, p_drop, seed, precision, conv_precision):
        ctx.set_materialize_grads(False)  # an unused returned attention: no dAttn pass in the backward
        nhead = q.shape[0] // key_padding_mask.shape[0]
        BH, T, D = q.shape
        L = k.shape[1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask_u8 = key_padding_mask.to(torch.uint8).contiguous()
        out = torch.empty_like(q)
        attn = torch.empty(BH, T, L, device=q.device, dtype=q.dtype)
        z = relu = mean = var = scale = shift = None
        lse = torch.empty(BH, T, device=q.device, dtype=torch.float32) if any(ctx.needs_input_grad) else None
        if arm is None:
            _attention_rows(q, k, v, mask_u8, nhead, None, None, None, out, attn, seed, 0, p_drop, precision, lse)
        else:
            curr = None
            if arm.coverage.uses_self:
                curr = torch.empty(BH, T, L, device=q.device, dtype=torch.float32)
                _attention_rows(q, k, v, mask_u8, nhead, None, None, None, None, curr, seed, 0, p_drop, precision)
            prev = prev_attn.contiguous() if arm.coverage.uses_cross else None
            z, sums, relu = _coverage_projection(prev, curr, mask_u8, nhead, height, width, arm, bn_training,
                                                 any(ctx.needs_input_grad), arm_dot_precision(q.dtype, conv_precision))
            mean, var = _batchnorm_statistics(arm, sums, _unmasked_count(key_padding_mask, T))
            scale = arm.bn_weight.double() * torch.rsqrt(var + arm.eps)
            shift = (arm.bn_bias.double() - mean * scale).float().contiguous()
            scale = scale.float().contiguous()
            _attention_rows(q, k, v, mask_u8, nhead, z, scale, shift, out, attn, seed, BH * T * L, p_drop, precision,
                            lse)
            prev_attn = prev
        ctx.save_for_backward(q, k, v, key_padding_mask, prev_attn, conv_weight, conv_bias, proj_weight, bn_weight,
                              z, relu, mean, var, scale, shift, attn, lse)
        ctx.config = (height, width, arm, bn_training, p_drop, seed, precision, conv_precision)
        return out, attn

    @staticmethod
    def backward(ctx, grad_out, grad_attn):
        """Flash-style Triton passes over the attention around the ARM backward kernel (see
        `_attention_backward`); only per-head vectors and [B*H, T, D] casts in PyTorch."""
        (q, k, v, key_padding_mask, prev, conv_weight, conv_bias, proj_weight, bn_weight, z, relu, mean, var, scale,
         shift, attn, lse) = ctx.saved_tensors
        height, width, arm, bn_training, p_drop, seed, precision, conv_precision = ctx.config
        grads = _attention_backward(q, k, v, key_padding_mask, height, width, prev, z, relu, mean, var, scale, shift,
                                    attn, lse, grad_out, grad_attn, arm, conv_weight, conv_bias, proj_weight,
                                    bn_weight, bn_training, p_drop, seed, precision, conv_precision)
        grad_q, grad_k, grad_v, grad_prev, grad_conv_w, grad_conv_b, grad_proj, grad_bn_weight, grad_bn_bias = grads
        cast = lambda g, like: None if g is None or like is None else g.to(like.dtype)
        return (grad_q.to(q.dtype), grad_k, grad_v, None, None, None, cast(grad_prev, prev),
                cast(grad_conv_w, conv_weight), cast(grad_conv_b, conv_bias), cast(grad_proj, proj_weight),
                cast(grad_bn_weight, bn_weight), cast(grad_bn_bias, bn_weight), None, None, None, None, None, None)


def _attention_backward(q, k, v, key_padding_mask, height, width, prev, z, relu, mean, var, scale, shift, attn,
                        lse, grad_out, grad_attn, arm, conv_weight, conv_bias, proj_weight, bn_weight, bn_training,
                        p_drop, seed, precision, conv_precision):
    """The backward, in passes (S = q.k^T, P' = softmax(S - R), A' = dropout(P') returned,
    P = softmax(S), A = dropout(P) the unrefined attention the self coverage reads):

    1. `attention_backward_rows_kernel` over query tiles: P' recomputed from the forward's
       logsumexp (and renormalised by its row sum), dA' = dO.V^T + dAttn per tile; a first
       sweep gives delta = rowsum(P' * dropout(dA')), the second writes
       dS' = P' * (dropout(dA') - delta)
       (float32 [B*H, T, L]; dR = -dS' is what the ARM backward needs, at neighbouring
       positions too, so this one attention-sized gradient is materialised), dq = dS'.K and
       per-program sums (sum dS', sum dS'*(Z - mean)) for BatchNorm.
    2. BatchNorm backward on per-head vectors in PyTorch: the weight and bias gradients and
       the per-head affine map dZ = a dS' + b (Z - mean) + c (b, c: through the batch statistics,
       training only).
    3. With self coverage, A and its logsumexp recomputed by the forward's first kernel.
    4. `arm_backward_kernel`: d prev_attn, dA, bias and projection gradients (dZ applied
       on the fly from dS' and Z); `arm_weight_grad_kernel`: the conv weight's, one reduction per tap.
    5. With self coverage, `unrefined_backward_rows_kernel`: dS_A = P * (dropout(dA) - delta_A)
       added to dS' in place and dS_A.K to dq.
    6. `attention_backward_keys_kernel` over key tiles: dk = dS^T.q, dv = A'^T.dO.
    Dropout masks are replayed from the counter-based RNG (never stored).
    """
    b, L = key_padding_mask.shape
    BH, T, D = q.shape
    nhead = BH // b
    device = q.device
    mask_u8 = key_padding_mask.to(torch.uint8).contiguous()
    blocks = attention_blocks(D, L)
    t_tiles = triton.cdiv(T, blocks["BLOCK_T"])
    grad_out = torch.zeros_like(q) if grad_out is None else grad_out.to(q.dtype).contiguous()
    has_dattn = grad_attn is not None
    grad_attn = grad_attn.contiguous() if has_dattn else attn
    has_r = arm is not None
    dummy = lse
    ds = torch.empty(BH, T, L, device=device, dtype=torch.float32)
    dq = torch.empty(BH, T, D, device=device, dtype=torch.float32)
    stats = torch.empty(BH, t_tiles, 2, device=device, dtype=torch.float32) if has_r else dummy
    mean_f = mean.float().contiguous() if has_r else dummy
    launch_kernel(attention_backward_rows_kernel, (BH, t_tiles),
        q, k, v, z if has_r else dummy, scale if has_r else dummy, shift if has_r else dummy, mean_f, mask_u8, grad_out,
        grad_attn, lse, ds, dq, stats,
        T, L, D, nhead, seed, BH * T * L if has_r else 0, p_drop,
        HAS_R=has_r, HAS_DATTN=has_dattn, DROPOUT=p_drop > 0, PRECISION=precision, num_warps=ROW_NUM_WARPS,
        **blocks,
    )
    grad_prev = None
    grads_arm = (None,) * 5
    if has_r:
        # BatchNorm: R = gamma * xhat + beta at unmasked keys, xhat = (Z - mean) * rstd, dR = -dS'.
        sums = stats.double().view(b, nhead, t_tiles, 2).sum((0, 2))
        count = _unmasked_count(key_padding_mask, T).double()
        rstd = torch.rsqrt(var + arm.eps)
        grad_bn_bias = -sums[:, 0]
        grad_bn_weight = -rstd * sums[:, 1]
        gamma_rstd = bn_weight.double() * rstd
        coef_a = -gamma_rstd
        coef_b = torch.zeros_like(coef_a)
        coef_c = torch.zeros_like(coef_a)
        if bn_training:  # dZ = gamma rstd (dR - sum dR / count - xhat sum(dR xhat) / count)
            coef_b = -gamma_rstd * rstd * grad_bn_weight / count
            coef_c = -gamma_rstd * grad_bn_bias / count
        coef_dz = torch.stack([coef_a, coef_b, mean, coef_c]).float().contiguous()
        lse_a = curr = None
        if arm.coverage.uses_self:  # the unrefined attention, as the forward's first kernel wrote it
            curr = torch.empty(BH, T, L, device=device, dtype=torch.float32)
            lse_a = torch.empty(BH, T, device=device, dtype=torch.float32)
            _attention_rows(q, k, v, mask_u8, nhead, None, None, None, None, curr, seed, 0, p_drop, precision, lse_a)
        grad_prev, grad_curr, grad_conv_w, grad_conv_b, grad_proj = _arm_backward(
            prev, curr, mask_u8, height, width, ds, z, coef_dz, relu, arm, conv_weight, conv_bias, proj_weight,
            arm_dot_precision(q.dtype, conv_precision))
        del curr
        grads_arm = (grad_conv_w, grad_conv_b, grad_proj, grad_bn_weight, grad_bn_bias)
        if grad_curr is not None:
            launch_kernel(unrefined_backward_rows_kernel, (BH, t_tiles),
                q, k, mask_u8, grad_curr, lse_a, ds, dq, T, L, D, nhead, seed, p_drop,
                DROPOUT=p_drop > 0, PRECISION=precision, num_warps=ROW_NUM_WARPS, **blocks,
            )
            del grad_curr
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    launch_kernel(attention_backward_keys_kernel, (BH, triton.cdiv(L, blocks["BLOCK_L"])),
        q, grad_out, attn, ds, dk, dv, T, L, D, PRECISION=precision, **blocks,
    )
    return (dq, dk, dv, grad_prev) + tuple(grads_arm)


def _arm_backward(prev, curr, mask_u8, height, width, ds, z, coef_dz, relu, arm, conv_weight, conv_bias,
                  proj_weight, precision):
    """Gradients of Z = proj(mask(relu(conv(coverage) + bias))) through `arm_backward_kernel`
    and `arm_weight_grad_kernel`,
    with dZ = a dS + b (Z - mean) + c per head (coef_dz [4, H]: a, b, mean, c): (d prev_attn, d unrefined attention,
    d conv.weight, d conv.bias, d proj.weight)."""
    b, L = mask_u8.shape
    BH, T, _ = ds.shape
    nhead = BH // b
    dc, cin = conv_weight.shape[:2]
    blocks = arm_blocks(nhead, dc, cin, L)
    tiles = triton.cdiv(L, blocks["BLOCK_L"])
    programs = b * tiles
    device = ds.device
    grad_prev = torch.zeros(BH, T, L, device=device) if prev is not None else None
    grad_curr = torch.zeros(BH, T, L, device=device) if curr is not None else None
    part_w = torch.empty(programs, CONV_TAPS, blocks["BLOCK_DC"], blocks["BLOCK_C"], device=device)
    part_b = torch.empty(programs, blocks["BLOCK_DC"], device=device)
    part_proj = torch.empty(programs, blocks["BLOCK_H"], blocks["BLOCK_DC"], device=device)
    first = prev if prev is not None else curr
    second = curr if curr is not None else first
    proj_w = proj_weight.float().reshape(nhead, dc).contiguous()
    sizes = (T, L, width, height, nhead, dc, cin, nhead if prev is not None else 0)
    launch_kernel(arm_backward_kernel, (b, tiles),
        first, second, mask_u8, conv_weight.float().contiguous(), conv_bias.float().contiguous(), proj_w,
        ds, z, coef_dz, relu, grad_prev if grad_prev is not None else grad_curr,
        grad_curr if grad_curr is not None else grad_prev, part_b, part_proj, *sizes,
        PRECISION=precision, num_warps=ARM_NUM_WARPS, **blocks,
    )
    launch_kernel(arm_weight_grad_kernel, (CONV_TAPS, b, tiles),
        first, second, mask_u8, proj_w, ds, z, coef_dz, relu, part_w, *sizes, PRECISION=precision,
        num_warps=ARM_NUM_WARPS, **blocks,
    )
    grad_conv_w = part_w.sum(0)[:, :dc, :cin].permute(1, 2, 0).reshape(dc, cin, KERNEL_SIZE, KERNEL_SIZE)
    grad_conv_b = part_b.sum(0)[:dc]
    grad_proj = part_proj.sum(0)[:nhead, :dc].reshape(nhead, dc, 1, 1)
    return grad_prev, grad_curr, grad_conv_w, grad_conv_b, grad_proj


def arm_attention(q, k, v, key_padding_mask, height, width, prev_attn, arm, bn_training, dropout_p, seed,
                  precision, conv_precision) -> Tuple[Tensor, Tensor]:
    """The entry `fastcomer.ops.arm_attention.arm_attention` on checked inputs: precision of the
    attention matmuls, conv_precision of the ARM conv and projection ('ieee' or 'tf32')."""
    weights = (None,) * 5 if arm is None else (arm.conv_weight, arm.conv_bias, arm.proj_weight, arm.bn_weight,
                                              arm.bn_bias)
    prev = prev_attn if arm is not None and arm.coverage.uses_cross else None
    return ARMAttentionFunction.apply(q, k, v, key_padding_mask, height, width, prev, *weights, arm, bn_training,
                                      float(dropout_p), seed, precision, conv_precision)
