"""Timing helpers shared by the PyTorch side of the GPU check (`torch_ref.py`, and
`torch_again.py`, which times cuBLAS and SDPA once more after egret's steps)."""
import json

import torch

DEV = "cuda"
# The goal benches' sizes: matmul N^3, causal attention over [1, HEADS, T, HEAD] (its
# FlashAttention flops: 4·H·T²/2·D).
N = 4096
HEADS, T, HEAD = 16, 4096, 128
ATTN_FLOPS = HEADS * T * T / 2 * HEAD * 4


def emit(**kw):
    print(json.dumps(kw), flush=True)


def bench(fn, reps=20):
    """Median seconds of `reps` runs of `fn`, timed with CUDA events after 3 warm-ups."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def matmul(dtype, tf32=False, label=""):
    """torch.matmul N^3 of `dtype` (TF32 allowed or not), emitted."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(N, N, device=DEV, dtype=dtype)
    b = torch.randn(N, N, device=DEV, dtype=dtype)
    s = bench(lambda: a @ b)
    emit(check="torch", what=f"matmul {str(dtype)[6:]}{' tf32' if tf32 else ''} 4096^3{label}",
         seconds=s, tflops=2 * N**3 / s / 1e12)
    torch.backends.cuda.matmul.allow_tf32 = False


def sdpa(dtype, label=""):
    """SDPA causal attention over the goal's sizes (flash for bf16), emitted."""
    q, k, v = (torch.randn(1, HEADS, T, HEAD, device=DEV, dtype=dtype) for _ in range(3))
    f = torch.nn.functional.scaled_dot_product_attention
    s = bench(lambda: f(q, k, v, is_causal=True))
    emit(check="torch", what=f"sdpa causal h16 t4096 d128 {str(dtype)[6:]}{label}", seconds=s,
         tflops=ATTN_FLOPS / s / 1e12)
