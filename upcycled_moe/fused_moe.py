"""Fused experts path for UpcycledMoe (an experts implementation for transformers' `@use_experts_implementation`).

Shipped as Hugging Face remote code next to the weights: this file imports only torch (and triton, optional).

    fused_experts_forward(self, hidden_states (T, H), top_k_index (T, k) int64, top_k_weights (T, k)) -> (T, H)

One custom autograd.Function does, for the T*k token-expert slots S:

  forward   sort slots by expert (one stable sort, offsets by searchsorted: no host sync)
            gather x rows in expert order            x_g  = x[tok]                    (S, H)
            gate_up = grouped_mm(x_g, W1^T)                                            (S, 2I) or (S, I)
            h = act(gate) * up   (one fused kernel)                                    (S, I)
            y = grouped_mm(h, W2^T)                                                    (S, H)
            out[t] = sum_j w[t, j] * y[pos(t, j)]   (one fused kernel: un-permute + weighting +
                                                     deterministic fp32 reduction, no atomics)
  backward  g_g = dout[tok]                                                            (S, H)
            dh_raw = grouped_mm(g_g, W2)                                               (S, I)
            one fused kernel: recompute h from gate_up, dw = <dh_raw, h> (routing-weight grad),
            dh = w * dh_raw, d gate_up = act'(...) * dh, and w*h for the W2 gradient (written in place)
            dW2 = g_g^T @ (w*h),  dx_g = d gate_up @ W1,  dW1 = d gate_up^T @ x_g  (grouped_mm; x_g re-gathered)
            dx[t] = sum_j dx_g[pos(t, j)]   (same deterministic un-permute kernel)

Saved for backward: only gate_up (S, 2I) plus int index vectors (h, y, x_g, weighted outputs are not kept).

Slots whose expert index is >= num_experts (sentinels) are skipped: they sort last, past offs[-1], so no GEMM
multiplies them (output 0, routing-weight gradient 0). The model's router sends capacity-dropped slots this way;
a slot that keeps a real expert index and weight 0 is computed and contributes 0.

Mixed precision follows autocast as nn.Linear does: inside an autocast region the GEMMs run in the autocast dtype
(x, W1, W2 cast by differentiable copies, so gradients reach fp32 weights in fp32); the output keeps hidden_states'
dtype, as transformers' experts implementations return it.

Backends: Triton kernels on CUDA (when triton imports), the same math in plain torch elsewhere (CPU, no
triton, unknown activations). GEMMs: torch.nn.functional.grouped_mm / torch._grouped_mm where the dtype,
device and 16-byte alignment allow it, else a per-expert torch.mm loop (one host sync), so odd shapes never
crash.

torch.compile: the model compiles as one graph (fullgraph=True works, backward included). Under compilation the
routing is traced and the experts are custom ops with fake (shape) kernels and registered backwards: with Triton the
whole fused forward/backward above is one op; elsewhere only the grouped GEMMs are ops and the compiler fuses the
elementwise steps around them.
"""

import collections
import hashlib

import torch

try:  # optional: only the CUDA fast path needs it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["fused_experts_forward", "fused_moe", "HAS_TRITON"]

# Tests set this to run the Triton kernels on CPU tensors under TRITON_INTERPRET=1.
FORCE_TRITON = False
# Set to False to force the plain-torch elementwise path even on CUDA (debugging / A-B timing).
USE_TRITON = True

# Which GEMM path ran, in which dtype: (path, dtype) -> calls, path "grouped_mm" or "mm_loop" (the per-expert
# fallback, one host sync). Read by tests and benchmarks: a mock-free check that mixed precision takes the grouped
# kernels. With COUNT_ROWS set, GEMM_ROWS also records the rows each GEMM multiplies (offs[-1]: reading it back is a
# host sync on CUDA, hence off by default).
GEMM_CALLS = collections.Counter()
COUNT_ROWS = False
GEMM_ROWS = []

_ACT_CODES = {"silu": 0, "relu2": 1, "relu": 2, "gelu_tanh": 3}


def _act_name(experts):
    """Name of a known activation (for the fused kernels) or None (generic torch path)."""
    config = getattr(experts, "config", None)
    name = getattr(config, "hidden_act", None) if config is not None else None
    if isinstance(name, str):
        name = name.lower()
        if name in ("silu", "swish"):
            return "silu"
        if name in ("relu2", "relu_squared", "squared_relu"):
            return "relu2"
        if name == "relu":
            return "relu"
        if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"):
            return "gelu_tanh"
    cls = type(getattr(experts, "act_fn", None)).__name__
    return {
        "SiLUActivation": "silu",
        "SiLU": "silu",
        "ReLUSquaredActivation": "relu2",
        "ReLU": "relu",
        "GELUTanh": "gelu_tanh",
        "NewGELUActivation": "gelu_tanh",
        "PytorchGELUTanh": "gelu_tanh",
    }.get(cls)


def _torch_act(name):
    if name == "silu":
        return torch.nn.functional.silu
    if name == "relu2":
        return lambda x: torch.relu(x).square()
    if name == "relu":
        return torch.relu
    if name == "gelu_tanh":
        return lambda x: torch.nn.functional.gelu(x, approximate="tanh")
    raise ValueError(name)


def _torch_act_grad(name):
    """d act / dx in closed form (the Triton kernels' _act_grad)."""
    if name == "silu":
        def silu_grad(x):
            s = torch.sigmoid(x)
            return s * (1.0 + x * (1.0 - s))
        return silu_grad
    if name == "relu2":
        return lambda x: 2.0 * torch.relu(x)
    if name == "relu":
        return lambda x: (x > 0).to(x.dtype)
    if name == "gelu_tanh":
        def gelu_tanh_grad(x):
            c = 0.7978845608028654
            t = torch.tanh(c * (x + 0.044715 * x.pow(3)))
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
        return gelu_tanh_grad
    raise ValueError(name)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _act_apply(x, ACT: tl.constexpr):
        if ACT == 0:  # silu
            return x * tl.sigmoid(x)
        elif ACT == 1:  # relu2
            r = tl.maximum(x, 0.0)
            return r * r
        elif ACT == 2:  # relu
            return tl.maximum(x, 0.0)
        else:  # gelu tanh approximation, tanh(z) = 2 sigmoid(2z) - 1
            z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            return x * tl.sigmoid(2.0 * z)

    @triton.jit
    def _act_grad(x, ACT: tl.constexpr):
        if ACT == 0:
            s = tl.sigmoid(x)
            return s * (1.0 + x * (1.0 - s))
        elif ACT == 1:
            return 2.0 * tl.maximum(x, 0.0)
        elif ACT == 2:
            return tl.where(x > 0.0, 1.0, 0.0)
        else:
            z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            s = tl.sigmoid(2.0 * z)  # 0.5 * (1 + tanh z)
            dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
            return s + x * 2.0 * s * (1.0 - s) * dz

    @triton.jit
    def _act_fwd_kernel(
        GU, OUT, OFFS, n_inter, stride_gu, stride_out,
        E_LAST: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        n_valid = tl.load(OFFS + E_LAST).to(tl.int64)
        mask = (cols < n_inter) & ((tl.zeros((BLOCK,), dtype=tl.int64) + row) < n_valid)
        if GATED:
            g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(GU + row * stride_gu + n_inter + cols, mask=mask, other=0.0).to(tl.float32)
            h = _act_apply(g, ACT) * u
        else:
            u = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
            h = _act_apply(u, ACT)
        tl.store(OUT + row * stride_out + cols, h.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _act_bwd_kernel(
        GU, DH, WS, DGU, DW, PERM, OFFS, n_inter, stride_gu, stride_dh, stride_dgu,
        E_LAST: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr,
    ):
        """Per sorted row: recompute h, dw = <dh_raw, h>, d gate_up = act' * (w * dh_raw); DH <- w * h in place."""
        row = tl.program_id(0).to(tl.int64)
        n_valid = tl.load(OFFS + E_LAST).to(tl.int64)
        valid = (tl.zeros((BLOCK,), dtype=tl.int64) + row) < n_valid
        w = tl.load(WS + row).to(tl.float32)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for b in range(N_BLOCKS):
            cols = b * BLOCK + tl.arange(0, BLOCK)
            m = (cols < n_inter) & valid
            d = tl.load(DH + row * stride_dh + cols, mask=m, other=0.0).to(tl.float32)
            if GATED:
                g = tl.load(GU + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
                u = tl.load(GU + row * stride_gu + n_inter + cols, mask=m, other=0.0).to(tl.float32)
                a = _act_apply(g, ACT)
                h = a * u
                dh = d * w
                dg = dh * u * _act_grad(g, ACT)
                du = dh * a
                tl.store(DGU + row * stride_dgu + cols, dg.to(DGU.dtype.element_ty), mask=m)
                tl.store(DGU + row * stride_dgu + n_inter + cols, du.to(DGU.dtype.element_ty), mask=m)
            else:
                u = tl.load(GU + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
                h = _act_apply(u, ACT)
                du = d * w * _act_grad(u, ACT)
                tl.store(DGU + row * stride_dgu + cols, du.to(DGU.dtype.element_ty), mask=m)
            acc += d * h
            tl.store(DH + row * stride_dh + cols, (h * w).to(DH.dtype.element_ty), mask=m)
        slot = tl.load(PERM + row)  # dw goes straight to the (token, k) slot order
        tl.store(DW + slot, tl.where(row < n_valid, tl.sum(acc, axis=0), 0.0))

    @triton.jit
    def _unpermute_kernel(
        Y, POS, W, OFFS, OUT, n_cols, stride_y, stride_out,
        K: tl.constexpr, E_LAST: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """out[t, :] = sum_j w[t, j] * y[pos[t, j], :], fp32 accumulation, fixed order (deterministic)."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < n_cols
        n_valid = tl.load(OFFS + E_LAST).to(tl.int64)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(K):
            p = tl.load(POS + t * K + j).to(tl.int64)
            ok = (tl.zeros((BLOCK,), dtype=tl.int64) + p) < n_valid
            row = tl.load(Y + p * stride_y + cols, mask=cmask & ok, other=0.0).to(tl.float32)
            if HAS_W:
                wj = tl.load(W + t * K + j).to(tl.float32)
                acc += row * wj
            else:
                acc += row
        tl.store(OUT + t * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


def _use_triton(t, act):
    return HAS_TRITON and USE_TRITON and act is not None and (t.is_cuda or FORCE_TRITON)


def _pow2_block(n, cap):
    b = 16
    while b < n and b < cap:
        b *= 2
    return b


# --------------------------------------------------------------------------------------------------------------
# elementwise steps: Triton or plain torch (same math)
# --------------------------------------------------------------------------------------------------------------
def _act_forward(gu, offs, n_inter, gated, act, act_fn, triton_ok):
    S = gu.shape[0]
    if triton_ok:
        out = torch.empty(S, n_inter, device=gu.device, dtype=gu.dtype)
        if S:
            block = _pow2_block(n_inter, 1024)
            grid = (S, triton.cdiv(n_inter, block))
            _act_fwd_kernel[grid](
                gu, out, offs, n_inter, gu.stride(0), out.stride(0),
                E_LAST=offs.numel() - 1, ACT=_ACT_CODES[act], GATED=gated, BLOCK=block, num_warps=4,
            )
        return out
    fn = _torch_act(act) if act is not None else act_fn
    if gated:
        g, u = gu[:, :n_inter], gu[:, n_inter:]
        return (fn(g.float()) * u.float()).to(gu.dtype)
    return fn(gu.float()).to(gu.dtype)


def _act_backward(gu, dh_raw, w_sorted, perm, offs, n_inter, gated, act, act_fn, triton_ok, overwrite=True):
    """Returns (d gate_up, w*h, dw fp32 in slot order: dw[perm[s]] = <dh_raw[s], h[s]>).

    On the Triton path w*h is written over dh_raw and, with `overwrite`, d gate_up over gu (each element is read
    before the same program overwrites it), so backward allocates no new (S, 2I) buffer."""
    S = gu.shape[0]
    if triton_ok:
        dgu = gu if overwrite else torch.empty_like(gu)
        dw = torch.empty(S, device=gu.device, dtype=torch.float32)
        if S:
            block = _pow2_block(n_inter, 1024)
            _act_bwd_kernel[(S,)](
                gu, dh_raw, w_sorted, dgu, dw, perm, offs, n_inter, gu.stride(0), dh_raw.stride(0), dgu.stride(0),
                E_LAST=offs.numel() - 1, ACT=_ACT_CODES[act], GATED=gated, BLOCK=block,
                N_BLOCKS=triton.cdiv(n_inter, block), num_warps=8 if block >= 1024 else 4,
            )
        return dgu, dh_raw, dw
    valid = (torch.arange(S, device=gu.device) < offs[-1]).unsqueeze(-1)
    w = w_sorted.float().unsqueeze(-1)
    d = torch.where(valid, dh_raw.float(), 0.0)
    x = torch.where(valid, gu.float(), 0.0)
    g, u = (x[:, :n_inter], x[:, n_inter:]) if gated else (x, None)
    if act is not None:  # closed form: also runs inside a custom op, where autograd is off
        a, da = _torch_act(act)(g), _torch_act_grad(act)(g)
    else:
        with torch.enable_grad():
            g = g.detach().requires_grad_(True)
            a = act_fn(g)
            (da,) = torch.autograd.grad(a, g, torch.ones_like(a))
        a = a.detach()
    if gated:
        h = a * u
        dx = torch.cat((d * w * u * da, d * w * a), dim=-1)
    else:
        h = a
        dx = d * w * da
    dw = torch.empty(S, device=gu.device, dtype=torch.float32).scatter_(0, perm, (d * h).sum(-1))
    return dx.to(gu.dtype), (h * w).to(dh_raw.dtype), dw


def _unpermute(y, pos, w, offs, num_tokens, k, out_dtype, triton_ok):
    """out[t] = sum_j w[t, j] * y[pos[t * k + j]] (w None: plain sum); slots at pos >= offs[-1] skipped."""
    H = y.shape[1]
    if triton_ok:
        out = torch.empty(num_tokens, H, device=y.device, dtype=out_dtype)
        if num_tokens:
            block = _pow2_block(H, 1024)
            grid = (num_tokens, triton.cdiv(H, block))
            _unpermute_kernel[grid](
                y, pos, w if w is not None else pos, offs, out, H, y.stride(0), out.stride(0),
                K=k, E_LAST=offs.numel() - 1, HAS_W=w is not None, BLOCK=block, num_warps=4,
            )
        return out
    valid = (pos < offs[-1]).unsqueeze(-1)
    rows = y.index_select(0, pos.clamp(max=max(y.shape[0] - 1, 0))) if y.shape[0] else y.new_zeros(pos.numel(), H)
    rows = torch.where(valid, rows.float(), 0.0)
    if w is not None:
        rows = rows * w.float().unsqueeze(-1)
    return rows.view(num_tokens, k, H).sum(1).to(out_dtype)


# --------------------------------------------------------------------------------------------------------------
# grouped GEMMs with a safe fallback
# --------------------------------------------------------------------------------------------------------------
_GMM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GMM_DTYPE_OK = {}


def _aligned(t):
    if t.data_ptr() % 16:
        return False
    align = 16 // t.element_size()
    # last two dims: one must be unit stride, the other a multiple of 16 bytes
    s0, s1 = t.stride(-2), t.stride(-1)
    if s1 == 1:
        return s0 % align == 0
    if s0 == 1:
        return s1 % align == 0
    return False


def _gmm_dtype_ok(device, dtype):
    key = (device.type, getattr(device, "index", None), dtype)
    if key not in _GMM_DTYPE_OK:
        ok = _GMM is not None
        if ok and device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < (8, 0):
                ok = False
            elif dtype != torch.bfloat16:
                ok = False  # grouped_mm's fast CUDA kernels are bf16; fp16/fp32 go through the mm loop
        if ok and device.type not in ("cuda", "cpu"):
            ok = False
        if ok:
            try:  # probe once: some builds lack a kernel for this dtype/device
                a = torch.zeros(16, 16, device=device, dtype=dtype)
                b = torch.zeros(2, 16, 16, device=device, dtype=dtype)
                offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
                _GMM(a, b, offs=offs)
                _GMM(a.t(), a, offs=offs)
            except Exception:  # noqa: BLE001 - any failure means "use the loop"
                ok = False
        _GMM_DTYPE_OK[key] = ok
    return _GMM_DTYPE_OK[key]


def _record(path, dtype, offs):
    GEMM_CALLS[path, dtype] += 1
    if COUNT_ROWS:
        GEMM_ROWS.append(int(offs[-1]) if offs.numel() else 0)


def _gmm(a, b, offs):
    """a (S, K) rows sorted by group, b (E, K, N) -> (S, N); rows past offs[-1] are unspecified."""
    if _GMM is not None and _gmm_dtype_ok(a.device, a.dtype) and _aligned(a) and _aligned(b):
        _record("grouped_mm", a.dtype, offs)
        return _GMM(a, b, offs=offs)
    _record("mm_loop", a.dtype, offs)
    out = a.new_zeros(a.shape[0], b.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end], b[e], out=out[start:end])
        start = end
    return out


def _gmm_wgrad(a_t, b, offs):
    """a_t (M, S) (a transposed view), b (S, N), groups along S -> (E, M, N); empty groups give zeros."""
    if _GMM is not None and _gmm_dtype_ok(b.device, b.dtype) and _aligned(a_t) and _aligned(b):
        _record("grouped_mm", b.dtype, offs)
        return _GMM(a_t, b, offs=offs)
    _record("mm_loop", b.dtype, offs)
    out = b.new_zeros(offs.numel(), a_t.shape[0], b.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a_t[:, start:end], b[start:end], out=out[e])
        start = end
    return out


# --------------------------------------------------------------------------------------------------------------
# routing metadata
# --------------------------------------------------------------------------------------------------------------
def _route(top_k_index, num_experts):
    """Stable sort of the T*k slots by expert. Returns (perm, tok, pos, offs int32 (E,)).

    perm[s]: flat slot at sorted row s; tok[s] = perm[s] // k; pos[slot]: sorted row of a slot;
    offs[e]: end row of expert e (offs[-1] = number of rows with a real expert; sentinel slots sort last)."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    flat32 = flat.to(torch.int32)
    sorted_ids, perm = torch.sort(flat32, stable=True)
    bounds = torch.arange(1, num_experts + 1, device=flat.device, dtype=torch.int32)
    offs = torch.searchsorted(sorted_ids, bounds, out_int32=True)  # number of slots with id < e + 1
    tok = torch.div(perm, k, rounding_mode="floor")
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return perm, tok, pos, offs


# --------------------------------------------------------------------------------------------------------------
# forward and backward (one implementation, called by the eager autograd.Function and by the custom ops)
# --------------------------------------------------------------------------------------------------------------
def _experts_forward(x, weights, w1, w2, perm, tok, pos, offs, transposed, gated, n_inter, act, act_fn, out_dtype):
    """Returns (out, gate_up, w_sorted): the output and the two tensors backward needs besides the inputs."""
    # w1_t: (E, H, N1) view of the first projection, w2_t: (E, I, H) view of the second (the grouped_mm B).
    w1_t = w1 if transposed else w1.transpose(-2, -1)
    w2_t = w2 if transposed else w2.transpose(-2, -1)
    triton_ok = _use_triton(x, act)
    x_g = x.index_select(0, tok)
    gu = _gmm(x_g, w1_t, offs)
    del x_g
    h = _act_forward(gu, offs, n_inter, gated, act, act_fn, triton_ok)
    y = _gmm(h, w2_t, offs)
    del h
    w_flat = weights.reshape(-1)
    if not w_flat.is_contiguous():
        w_flat = w_flat.contiguous()
    out = _unpermute(y, pos, w_flat, offs, x.shape[0], weights.shape[-1], out_dtype, triton_ok)  # fp32 sum
    w_sorted = w_flat.index_select(0, perm).float()
    return out, gu, w_sorted


def _experts_backward(dout, x, weights, w1, w2, perm, tok, pos, offs, w_sorted, gu, transposed, gated, n_inter,
                      act, act_fn, needs, overwrite=True):
    """Returns (dx, dweights, dW1, dW2), None where `needs` (four bools) says no. With `overwrite` the Triton path
    writes d gate_up over gu (memory)."""
    need_x, need_w, need_w1, need_w2 = needs
    k = weights.shape[-1]
    triton_ok = _use_triton(x, act)
    dout = dout.to(x.dtype)
    if not dout.is_contiguous():
        dout = dout.contiguous()
    w1_t = w1 if transposed else w1.transpose(-2, -1)  # (E, H, N1)
    w2_t = w2 if transposed else w2.transpose(-2, -1)  # (E, I, H)

    g_g = dout.index_select(0, tok)  # (S, H), unscaled
    dh = _gmm(g_g, w2_t.transpose(-2, -1), offs)  # (S, I)
    dgu, hw, dw_slots = _act_backward(gu, dh, w_sorted, perm, offs, n_inter, gated, act, act_fn, triton_ok,
                                      overwrite)
    del dh
    dw2 = None
    if need_w2:  # dW2 (E, H, I) = g_g^T @ (w*h)   [(E, I, H) when stored transposed]
        dw2 = _gmm_wgrad(hw.t(), g_g, offs) if transposed else _gmm_wgrad(g_g.t(), hw, offs)
    del g_g, hw
    dx = None
    if need_x:
        dx_g = _gmm(dgu, w1_t.transpose(-2, -1), offs)  # (S, H)
        dx = _unpermute(dx_g, pos, None, offs, x.shape[0], k, x.dtype, triton_ok)
        del dx_g
    dw1 = None
    if need_w1:  # dW1 (E, N1, H) = dgu^T @ x_g
        x_g = x.index_select(0, tok)
        dw1 = _gmm_wgrad(x_g.t(), dgu, offs) if transposed else _gmm_wgrad(dgu.t(), x_g, offs)
    dweights = None
    if need_w:
        dweights = dw_slots.view(weights.shape).to(weights.dtype)
    return dx, dweights, dw1, dw2


class _FusedExpertsFn(torch.autograd.Function):
    """The eager path: saves gate_up outside the autograd graph so that backward may overwrite it (memory)."""

    @staticmethod
    def forward(ctx, x, weights, w1, w2, perm, tok, pos, offs, transposed, gated, n_inter, act, act_fn, out_dtype):
        out, gu, w_sorted = _experts_forward(x, weights, w1, w2, perm, tok, pos, offs, transposed, gated, n_inter, act,
                                             act_fn, out_dtype)
        ctx.save_for_backward(x, weights, w1, w2, perm, tok, pos, offs, w_sorted)
        ctx.gu = gu  # an intermediate, held only here: backward overwrites it with its gradient (memory)
        ctx.meta = (transposed, gated, n_inter, act, act_fn)
        return out

    @staticmethod
    def backward(ctx, dout):
        gu = getattr(ctx, "gu", None)
        if gu is None:
            raise RuntimeError(
                "upcycled_fused experts: backward through the same forward twice (retain_graph=True) is not "
                "supported (the saved gate/up activations are overwritten by their gradient); use another experts "
                "implementation for double backward"
            )
        del ctx.gu
        grads = _experts_backward(dout, *ctx.saved_tensors, gu, *ctx.meta, ctx.needs_input_grad[:4])
        return (*grads,) + (None,) * 10


# --------------------------------------------------------------------------------------------------------------
# the same computation as custom operators, for torch.compile
# --------------------------------------------------------------------------------------------------------------
# torch.compile cannot trace an autograd.Function that runs Triton kernels, host-synced GEMM loops and in-place
# buffer reuse, and torch.compiler.disable breaks the graph (and fails under fullgraph=True). Custom operators are
# opaque to the compiler instead: it sees their output shapes (register_fake) and their backward
# (register_autograd), the graph stays whole around them, and the kernels inside are the eager ones. Activations
# travel by name (a schema has no callables), so only the known activations take this path. An op may not write
# its inputs unannounced, so here backward gives d gate_up its own buffer instead of overwriting the saved gate_up.
# The op names carry the module's name and a hash of this file: it is also loaded as remote code next to the
# weights, each copy with its own code; a module executed again with the same code finds its ops registered.
def _op_prefix():
    try:
        with open(__file__, "rb") as f:
            tag = hashlib.sha1(f.read()).hexdigest()[:12]
    except (NameError, OSError):
        tag = "nosource"
    return "fused_experts_" + "".join(c if c.isalnum() else "_" for c in __name__) + "_" + tag


_OP_PREFIX = _op_prefix()
_FWD_OP = _BWD_OP = _GMM_OP = None


def _define_ops():
    global _FWD_OP, _BWD_OP, _GMM_OP
    library = getattr(torch, "library", None)
    if library is None or not hasattr(library, "custom_op") or not hasattr(library, "register_autograd"):
        return
    registered = getattr(torch.ops, "upcycled_moe", None)
    if registered is not None and hasattr(registered, _OP_PREFIX + "_fwd"):
        _FWD_OP, _BWD_OP, _GMM_OP = (getattr(registered, _OP_PREFIX + suffix) for suffix in ("_fwd", "_bwd", "_gmm"))
        return
    Tensor = torch.Tensor

    @library.custom_op("upcycled_moe::" + _OP_PREFIX + "_fwd", mutates_args=())
    def fwd_op(x: Tensor, weights: Tensor, w1: Tensor, w2: Tensor, perm: Tensor, tok: Tensor, pos: Tensor,
               offs: Tensor, transposed: bool, gated: bool, n_inter: int, act: str,
               out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        return _experts_forward(x, weights, w1, w2, perm, tok, pos, offs, transposed, gated, n_inter, act, None,
                                out_dtype)

    @fwd_op.register_fake
    def _(x, weights, w1, w2, perm, tok, pos, offs, transposed, gated, n_inter, act, out_dtype):
        slots = perm.shape[0]
        n_out1 = w1.shape[-1] if transposed else w1.shape[-2]
        return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(slots, n_out1),
                x.new_empty(slots, dtype=torch.float32))

    @library.custom_op("upcycled_moe::" + _OP_PREFIX + "_bwd", mutates_args=())
    def bwd_op(dout: Tensor, x: Tensor, weights: Tensor, w1: Tensor, w2: Tensor, perm: Tensor, tok: Tensor,
               pos: Tensor, offs: Tensor, w_sorted: Tensor, gu: Tensor, transposed: bool, gated: bool, n_inter: int,
               act: str, need_x: bool, need_w: bool, need_w1: bool,
               need_w2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        grads = _experts_backward(dout, x, weights, w1, w2, perm, tok, pos, offs, w_sorted, gu, transposed, gated,
                                  n_inter, act, None, (need_x, need_w, need_w1, need_w2), overwrite=False)
        return tuple(g if g is not None else x.new_empty(0) for g in grads)  # an op returns tensors, never None

    @bwd_op.register_fake
    def _(dout, x, weights, w1, w2, perm, tok, pos, offs, w_sorted, gu, transposed, gated, n_inter, act, need_x,
          need_w, need_w1, need_w2):
        return tuple(t.new_empty(t.shape) if need else x.new_empty(0)
                     for t, need in ((x, need_x), (weights, need_w), (w1, need_w1), (w2, need_w2)))

    def setup_context(ctx, inputs, output):
        x, weights, w1, w2, perm, tok, pos, offs, transposed, gated, n_inter, act, _ = inputs
        _, gu, w_sorted = output
        ctx.save_for_backward(x, weights, w1, w2, perm, tok, pos, offs, w_sorted, gu)
        ctx.meta = (transposed, gated, n_inter, act)
        ctx.mark_non_differentiable(gu, w_sorted)

    def backward(ctx, dout, _dgu, _dw_sorted):
        needs = tuple(ctx.needs_input_grad[:4])
        grads = bwd_op(dout, *ctx.saved_tensors, *ctx.meta, *needs)
        return (*(g if need else None for g, need in zip(grads, needs)),) + (None,) * 9

    fwd_op.register_autograd(backward, setup_context=setup_context)

    @library.custom_op("upcycled_moe::" + _OP_PREFIX + "_gmm", mutates_args=())
    def gmm_op(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
        return _gmm(a, b, offs)  # rows past offs[-1] unspecified, as _gmm's

    @gmm_op.register_fake
    def _(a, b, offs):
        return a.new_empty(a.shape[0], b.shape[-1])

    @library.custom_op("upcycled_moe::" + _OP_PREFIX + "_gmm_bwd", mutates_args=())
    def gmm_bwd_op(a: Tensor, b: Tensor, offs: Tensor, dout: Tensor, need_a: bool,
                   need_b: bool) -> tuple[Tensor, Tensor]:
        da = _gmm(dout, b.transpose(-2, -1), offs) if need_a else a.new_empty(0)
        db = _gmm_wgrad(a.t(), dout, offs) if need_b else b.new_empty(0)
        return da, db

    @gmm_bwd_op.register_fake
    def _(a, b, offs, dout, need_a, need_b):
        return (a.new_empty(a.shape) if need_a else a.new_empty(0)), (b.new_empty(b.shape) if need_b else b.new_empty(0))

    def gmm_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def gmm_backward(ctx, dout):
        need_a, need_b = ctx.needs_input_grad[:2]
        a, b, offs = ctx.saved_tensors
        da, db = gmm_bwd_op(a, b, offs, dout.contiguous(), need_a, need_b)
        return (da if need_a else None), (db if need_b else None), None

    gmm_op.register_autograd(gmm_backward, setup_context=gmm_setup_context)
    _FWD_OP, _BWD_OP, _GMM_OP = fwd_op, bwd_op, gmm_op


_define_ops()


def _compiler_disable(fn):
    compiler = getattr(torch, "compiler", None)
    return compiler.disable(fn) if compiler is not None and hasattr(compiler, "disable") else fn


def fused_moe(hidden_states, top_k_index, top_k_weights, w1, w2, gated=True, act="silu", act_fn=None,
              transposed=False):
    """Functional form. w1: (E, 2I, H) gated [gate rows, then up rows] or (E, I, H) plain; w2: (E, H, I).

    transposed=True means w1 (E, H, N1) and w2 (E, I, H). act: "silu" | "relu2" | "relu" | "gelu_tanh" or None
    with act_fn a callable (generic torch path)."""
    if hidden_states.shape[0] == 0:
        return hidden_states.new_zeros(hidden_states.shape)
    dtype = _compute_dtype(hidden_states, w1)
    x, w1, w2 = hidden_states.to(dtype), w1.to(dtype), w2.to(dtype)  # differentiable casts: fp32 master grads
    if not x.is_contiguous():
        x = x.contiguous()
    n_out1 = w1.shape[-1] if transposed else w1.shape[-2]
    n_inter = n_out1 // 2 if gated else n_out1
    core = _fused_core_compiled if _is_compiling() else _fused_core
    with torch.autocast(x.device.type, enabled=False):  # the operands are cast already; grouped_mm ignores autocast
        out = core(x, top_k_index, top_k_weights, w1, w2, bool(transposed), gated, n_inter, act, act_fn,
                   hidden_states.dtype)
    return out


def _compute_dtype(hidden_states, weight):
    """The GEMMs' dtype as nn.Linear would pick it: the autocast dtype inside an autocast region (fp32 weights
    trained under bf16 autocast then take the bf16 grouped kernels, not CUDA's fp32 per-expert fallback), else the
    weights' dtype."""
    device_type = hidden_states.device.type
    if weight.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _is_compiling():
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _fused_core(x, top_k_index, top_k_weights, w1, w2, transposed, gated, n_inter, act, act_fn, out_dtype):
    with torch.no_grad():
        perm, tok, pos, offs = _route(top_k_index, w1.shape[0])
    return _FusedExpertsFn.apply(x, top_k_weights, w1, w2, perm, tok, pos, offs, transposed, gated, n_inter, act,
                                 act_fn, out_dtype)


def _fused_core_compiled(x, top_k_index, top_k_weights, w1, w2, transposed, gated, n_inter, act, act_fn, out_dtype):
    """Under torch.compile, no graph break: the routing is traced; with Triton the experts are one custom op (the
    fused kernels); elsewhere only the grouped GEMMs are ops and the compiler fuses the elementwise steps around
    them (faster on CPU than running them as eager kernels inside one op)."""
    if _GMM_OP is None:  # no torch.library.custom_op in this torch
        return _fused_core_opaque(x, top_k_index, top_k_weights, w1, w2, transposed, gated, n_inter, act, act_fn,
                                  out_dtype)
    with torch.no_grad():
        perm, tok, pos, offs = _route(top_k_index, w1.shape[0])
    if _use_triton(x, act):
        return _FWD_OP(x, top_k_weights, w1, w2, perm, tok, pos, offs, transposed, gated, n_inter, act, out_dtype)[0]
    w1_t = w1 if transposed else w1.transpose(-2, -1)
    w2_t = w2 if transposed else w2.transpose(-2, -1)
    # rows past offs[-1] (sentinel slots) come out of a grouped GEMM unwritten, in either pass: masked on the way
    # in (whose backward zeroes them in d x_g) and on the way out (kept out of the activation)
    valid = (torch.arange(tok.shape[0], device=x.device) < offs[-1]).unsqueeze(-1)
    x_g = torch.where(valid, x.index_select(0, tok), 0.0)
    gu = torch.where(valid, _GMM_OP(x_g, w1_t, offs), 0.0)
    fn = _torch_act(act) if act is not None else act_fn
    h = fn(gu[:, :n_inter].float()) * gu[:, n_inter:].float() if gated else fn(gu.float())
    y = _GMM_OP(h.to(gu.dtype), w2_t, offs)
    rows = torch.where((pos < offs[-1]).unsqueeze(-1), y.index_select(0, pos).float(), 0.0)
    rows = rows * top_k_weights.reshape(-1, 1).float()
    return rows.view(x.shape[0], top_k_weights.shape[-1], -1).sum(1).to(out_dtype)  # fp32 sum, one rounding


# opaque to torch.compile (a graph break), only where torch has no torch.library.custom_op
_fused_core_opaque = _compiler_disable(_fused_core)


def fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Experts-interface entry point: register with ALL_EXPERTS_FUNCTIONS.register("upcycled_fused", ...)."""
    if getattr(self, "has_bias", False) or getattr(self, "has_post_expert_norm", False):
        raise NotImplementedError("upcycled_fused experts: biases / post-expert norms are not supported")
    if not getattr(self, "is_concatenated", True):
        raise NotImplementedError("upcycled_fused experts: interleaved gate/up layout is not supported")
    gated = getattr(self, "has_gate", True)
    w1 = self.gate_up_proj if gated else self.up_proj
    act = _act_name(self)
    act_fn = None if act is not None else self.act_fn
    return fused_moe(hidden_states, top_k_index, top_k_weights, w1, self.down_proj, gated=gated, act=act,
                     act_fn=act_fn, transposed=getattr(self, "is_transposed", False))
