"""A small run of every CUDA kernel, for compute-sanitizer (tests/test_cuda.py runs it as
`compute-sanitizer --tool memcheck --error-exitcode 3 python tests/cuda/sanitizer_run.py`):
the GEMVs (FFMA and tensor-core, with bfloat16 scales and with float32 ones) with and
without split-K, the tensor-core GEMM with ragged edges, the dequantize kernel (the large-M
path, whole and in slices), prefill attention
with a block mask and strided KV-cache views, decode with forced splits, a garbage mask,
decode page selection (positions in and out of range), prefill split-KV, the fused layer ops."""

import numpy as np
import torch

import bitswitch as bs
from bitswitch import _C
from bitswitch import attention as A
from bitswitch import torch as bt

dev = "cuda"
rng = np.random.default_rng(0)
for m, n, k, g in ((1, 300, 640, 32), (5, 64, 4096, 128), (12, 70, 320, 32), (40, 100, 192, 64)):
    qw = bs.quantize(rng.standard_normal((n, k)).astype(np.float32), group_size=g, bits=8).to("torch")
    sdtype = torch.float32 if m == 12 else torch.bfloat16
    planes = [t.to(dev) for t in (qw.plane0, qw.plane1, qw.scales.to(sdtype), qw.biases.to(sdtype))]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(m, k, dtype=dtype, device=dev)
        for bits in (4, 8):
            torch.ops.bitswitch.qmatmul(x, *planes, g, bits)
            # no workspace: the path without split-K
            _C.qmatmul(x, planes[0], planes[1] if bits == 8 else None, planes[2], planes[3], g, bits,
                       torch.empty(m, n, dtype=dtype, device=dev), 16,
                       stream=torch.cuda.current_stream().cuda_stream)

saved = bt._DEQUANT_MIN_M, bt._DEQUANT_SLICE_BYTES
bt._DEQUANT_MIN_M = 8
for slice_bytes in (16 * 2 * 640, 1 << 30):
    bt._DEQUANT_SLICE_BYTES = slice_bytes
    qw = bs.quantize(rng.standard_normal((100, 640)).astype(np.float32), group_size=64, bits=8).to("torch")
    planes = [t.to(dev) for t in (qw.plane0, qw.plane1, qw.scales.bfloat16(), qw.biases.bfloat16())]
    for bits in (4, 8):
        torch.ops.bitswitch.qmatmul(torch.randn(9, 640, dtype=torch.bfloat16, device=dev), *planes, 64, bits)
bt._DEQUANT_MIN_M, bt._DEQUANT_SLICE_BYTES = saved

for dtype in (torch.float32, torch.bfloat16, torch.float16):
    cache = torch.randn(2, 2, 2, 300, 128, dtype=dtype, device=dev)
    kc, vc = cache[0, :, :, :257], cache[1, :, :, :257]
    q = torch.randn(2, 8, 70, 128, dtype=dtype, device=dev)
    mask = A.BlockMask.from_block_table(rng.random((2, 2, 3, 5)) < 0.5, 32, 64, 70, 257)
    bt.attention(q, kc, vc, mask, causal=True, q_offset=187)
    bt.attention(q[:, :, :1], kc, vc, None, causal=True, q_offset=256)
    for splits in (1, 3, 13):
        _C._set_attention_kv_splits(splits)
        bt.attention(q[:, :, :2], kc, vc, None, causal=True, q_offset=255)
    _C._set_attention_kv_splits(0)
ip = torch.tensor([0, 5, 0, 1], dtype=torch.int32, device=dev).reshape(1, 2, 2)
ix = torch.tensor([7, -3, 1, 99999, 0, 1, 0, 0, 0, 0], dtype=torch.int32, device=dev).reshape(1, 2, 5)
q = torch.randn(1, 2, 64, 64, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, 2, 128, 64, device=dev, dtype=torch.bfloat16)
torch.ops.bitswitch.attention(q, k, k, ip, ix, 64, 64, True, None, 64)
for dtype in (torch.float32, torch.bfloat16, torch.float16):  # decode page selection, clamped positions
    k = torch.randn(2, 2, 1000, 128, dtype=dtype, device=dev)
    pages = bt.DecodePages(k, block_k=32)
    pages.rebuild(k, 999)
    for pos in (0, 500, 999, 5000, -4):
        pages.select(torch.randn(2, 8, 1, 128, dtype=dtype, device=dev), k,
                     torch.full((2,), pos, dtype=torch.int32, device=dev), 7)
for dtype in (torch.float32, torch.bfloat16, torch.float16):  # prefill split-KV: a short chunk, a long cache
    kc = torch.randn(1, 2, 3000, 128, dtype=dtype, device=dev)
    bt.attention(torch.randn(1, 8, 40, 128, dtype=dtype, device=dev), kc, kc, None, causal=True, q_offset=2960)
for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the fused layer ops, positions in and out of range
    x = torch.randn(3, 1000, dtype=dtype, device=dev)
    bt.rms_norm(x, torch.randn(1000, dtype=dtype, device=dev), 1e-6, torch.randn_like(x))
    bt.silu_mul(torch.randn(5, 2 * 300, dtype=dtype, device=dev))
    kc, vc = (torch.zeros(2, 2, 16, 64, dtype=dtype, device=dev) for _ in range(2))
    cos, sin = (torch.randn(16, 64, dtype=dtype, device=dev) for _ in range(2))
    for pos in (0, 15, 99, -3):
        bt.rope_qkv_at(torch.randn(2, 1, 8 * 64, dtype=dtype, device=dev), 4, torch.ones(64, dtype=dtype, device=dev),
                       torch.ones(64, dtype=dtype, device=dev), 1e-6, cos, sin,
                       torch.full((2,), pos, dtype=torch.int32, device=dev), kc, vc)
torch.cuda.synchronize()
print("sanitizer run done")
