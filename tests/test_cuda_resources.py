"""Registers and spills of the CUDA kernels, read from ptxas (bench/cuda_resources.py) on any
machine with nvcc: a spill is a performance bug no result would show, and a GPU-less CI is
the only place most changes to cuda/ are compiled.

The bfloat16 instance files stand for the float16 ones (the same templates). Kernels that
spilled when this test was written are listed with their spill bytes as an upper bound; any
other kernel must not spill at all, and none may spill more than listed.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("cuda_resources", ROOT / "bench" / "cuda_resources.py")
cuda_resources = importlib.util.module_from_spec(spec)
sys.modules["cuda_resources"] = cuda_resources  # dataclasses look their module up there
spec.loader.exec_module(cuda_resources)

pytestmark = pytest.mark.skipif(cuda_resources.find_nvcc() is None, reason="nvcc not found")

# (kernel, sm) -> spill store + load bytes per thread, from ptxas (CUDA 13.0), at most. The
# GEMM's tiles run at the 128-register cap of 2 blocks per SM; its 128-row tile trades these
# spills (L1-resident, ~10 local loads per k-tile) for the 64-bit division call per k-tile
# it made before.
KNOWN_SPILLS = {
    ("qmm_kernel<bf16, 1, 128>", "80"): 92,
    ("qmm_kernel<bf16, 1, 128>", "90"): 80,
    ("qmm_kernel<bf16, 1, 32>", "80"): 36,
    ("qmm_kernel<bf16, 2, 128>", "80"): 100,
    ("qmm_kernel<bf16, 2, 128>", "90"): 48,
    ("qmm_kernel<bf16, 2, 16>", "80"): 12,
    ("qmm_kernel<bf16, 2, 16>", "90"): 12,
    ("qmm_kernel<bf16, 2, 32>", "80"): 28,
    ("qmv_kernel<bf16, 4, 2>", "80"): 24,
}


@pytest.fixture(scope="module")
def kernels():
    found = cuda_resources.collect(["qmatmul_bf16.cu", "attention_bf16.cu"], ["80", "90"], jobs=2, sass=False)
    names = cuda_resources.demangle(sorted({k.mangled for k in found}))
    return {(cuda_resources.short_name(names[k.mangled]), k.arch): k for k in found}


def test_every_kernel_is_compiled_for_both_architectures(kernels):
    names = {name for name, _ in kernels}
    for prefix in ("qmv_kernel", "qmv_tc_kernel", "qmm_kernel", "qmm_splitk_reduce_kernel",
                   "attention_prefill_kernel", "attention_rows_kernel", "attention_combine_kernel"):
        assert any(n.startswith(prefix + "<") for n in names), prefix
    assert {arch for _, arch in kernels} == {"80", "90"}
    assert all((name, arch) in kernels for name in names for arch in ("80", "90"))


def test_no_kernel_spills_more_than_known(kernels):
    bad = []
    for key, k in sorted(kernels.items()):
        allowed = KNOWN_SPILLS.get(key, 0)
        if k.spills > allowed:
            bad.append(f"{key[0]} sm_{key[1]}: {k.spill_stores}/{k.spill_loads} bytes spilled (allowed {allowed})")
    assert not bad, "\n".join(bad)


def test_tensor_core_gemv_leaves_room_for_two_blocks(kernels):
    """qmv_tc_kernel is launched for 2 blocks of 256 threads per SM: at most 128 registers."""
    tc = [k for (name, _), k in kernels.items() if name.startswith("qmv_tc_kernel<")]
    assert len(tc) == 18  # 8, 16 and 32 rows x (INT4 stored scales, INT4, INT8) x sm_80, sm_90
    assert all(0 < k.registers <= 128 and k.spills == 0 for k in tc)
