"""qmatmul on every CPU variant against float64 dequantize-then-matmul."""

import numpy as np
import pytest

import bitswitch as bs
from conftest import QMATMUL_TOL, cast, rel_err, variant_status

# (M, N, K): M across the GEMV (M <= 8) and GEMM paths; N not a multiple of the 4-row
# blocks or 16/32-column panels; K not a multiple of the 128-element steps or 256 blocks.
# For the AMX GEMM: M = 9 just past the GEMV, M not a multiple of its 16/32-row tiles and
# 513 past its 512-row tasks; K = 96, 160 (G = 32 only) shorter than one 256-input chunk,
# 640 and 4224 ending in a partial chunk (4224: 132 groups of 32, bias tiles with a tail);
# N = 3 and 17, less than one 16- or 32-output tile.
SHAPES = [(1, 64, 128), (2, 37, 224), (3, 100, 320), (8, 67, 384), (9, 40, 96), (33, 45, 1056),
          (100, 72, 160), (128, 130, 512), (17, 33, 4224), (513, 200, 640), (20, 3, 64), (300, 17, 32)]


def make_case(rng, m, n, k, group_size, sdtype, xdtype):
    w = (rng.standard_normal((n, k)) * rng.uniform(0.02, 2)).astype(np.float32)
    qw = bs.quantize(w, group_size=group_size, bits=8, scales_dtype=sdtype)
    x = cast((rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32), xdtype)
    return qw, x


CASES = [(m, n, k, g) for (m, n, k) in SHAPES for g in (32, 64, 128) if k % g == 0]


@pytest.mark.parametrize("m,n,k,group_size", CASES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_bits", [16, 8])
def test_every_variant_matches_float64(rng, variant, m, n, k, group_size, bits, act_bits):
    """act_bits 8 is compared with the float64 product of the int8-quantized x
    (quantize_activations): the kernels reproduce its codes exactly, so the same bounds hold."""
    for xdtype in ("float32", "bfloat16", "float16"):
        sdtype = rng.choice(["float32", "bfloat16", "float16"])
        qw, x = make_case(rng, m, n, k, group_size, sdtype, xdtype)
        out = cast(np.full((m, n), np.nan, np.float32), xdtype)  # poisoned
        y = bs.qmatmul(x, qw, bits=bits, out=out, act_bits=act_bits)
        assert y is out
        ref = bs.qmatmul_f64(x, qw, bits, act_bits=act_bits)
        err = rel_err(y, ref)
        assert err <= QMATMUL_TOL[xdtype], f"{variant} {xdtype} x, {sdtype} scales: {err:.2e}"


def test_int8_activations_cost_little_accuracy(rng, variant):
    """act_bits 8 differs from float-grade by the int8 rounding of x: ~0.5% of the output
    scale, an order of magnitude below the INT4 view's own quantization error."""
    w = rng.standard_normal((256, 1024)).astype(np.float32)
    qw = bs.quantize(w, 64, 8)
    x = rng.standard_normal((3, 1024)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    for bits in (4, 8):
        y16, y8 = bs.qmatmul(x, qw, bits), bs.qmatmul(x, qw, bits, act_bits=8)
        d = rel_err(y8, y16.astype(np.float64))
        assert 1e-4 < d < 2e-2
        if bits == 4:
            assert rel_err(y8, exact) < 1.2 * rel_err(y16, exact)


def test_scalar_reference_is_float_grade(rng):
    """The oracle itself: plain float32 accumulation, ~1e-6 of float64 (a sequential sum's
    rounding error grows with K: ~4e-6 was seen at K = 4224)."""
    with bs.ops.use_cpu_variant("scalar"):
        for (m, n, k) in SHAPES:
            qw, x = make_case(rng, m, n, k, 32, "float32", "float32")
            for bits in (4, 8):
                assert rel_err(bs.qmatmul(x, qw, bits), bs.qmatmul_f64(x, qw, bits)) < 2e-6 * max(1.0, k / 1056)


@pytest.mark.parametrize("m", [5, 70])
def test_variants_agree_with_the_scalar_reference(rng, variant, m):
    qw, x = make_case(rng, m, 300, 2048, 64, "bfloat16", "float32")
    for bits in (4, 8):
        for act_bits, tol in ((16, 2e-4), (8, 2e-5)):
            with bs.ops.use_cpu_variant("scalar"):
                ref = bs.qmatmul(x, qw, bits, act_bits=act_bits)
            assert rel_err(bs.qmatmul(x, qw, bits, act_bits=act_bits), ref.astype(np.float64)) < tol


def test_amx_gemm_is_float_grade(rng):
    """The AMX GEMM's own error with float32 x: hi + lo bf16 halves of x and of the bias
    sums, exact code products, float32 accumulation: ~1e-5 of the output scale, the
    float-grade bound of the integer GEMV (3e-5), far below QMATMUL_TOL."""
    if variant_status("amx") != "ok":
        pytest.skip(f"amx: {variant_status('amx')}")
    for g in (32, 64, 128):
        qw, x = make_case(rng, 96, 160, 1024, g, "float32", "float32")
        with bs.ops.use_cpu_variant("amx"):
            for bits in (4, 8):
                for act_bits in (16, 8):
                    err = rel_err(bs.qmatmul(x, qw, bits, act_bits=act_bits), bs.qmatmul_f64(x, qw, bits, act_bits))
                    assert err < 3e-5, (g, bits, act_bits, err)


def test_amx_threads_and_tails_do_not_change_results(rng):
    """Every output is computed by one block in a fixed order, whatever the task split."""
    if variant_status("amx") != "ok":
        pytest.skip(f"amx: {variant_status('amx')}")
    qw, x = make_case(rng, 77, 230, 640, 64, "bfloat16", "bfloat16")
    with bs.ops.use_cpu_variant("amx"):
        ref = bs.qmatmul(x, qw, 8)
        try:
            for threads in (1, 3):
                bs.ops.set_num_threads(threads)
                np.testing.assert_array_equal(bs.qmatmul(x, qw, 8), ref)
        finally:
            bs.ops.set_num_threads(0)
        # A row's result does not depend on the other rows of x.
        np.testing.assert_array_equal(bs.qmatmul(x[:40], qw, 8), ref[:40])


def test_leading_dimensions_and_1d(rng):
    qw, x = make_case(rng, 6, 40, 256, 64, "float32", "float32")
    x3 = x.reshape(2, 3, 256)
    y = bs.qmatmul(x3, qw)
    assert y.shape == (2, 3, 40)
    np.testing.assert_array_equal(y.reshape(6, 40), bs.qmatmul(x, qw))
    y1 = bs.qmatmul(x[0], qw)
    assert y1.shape == (40,)
    assert rel_err(y1, bs.qmatmul_f64(x[0], qw)) < 3e-4


def test_outliers_in_activations(rng):
    """Per-group 15-bit activations keep a group with a 1000x outlier accurate elsewhere."""
    qw, x = make_case(rng, 4, 64, 512, 64, "float32", "float32")
    x[:, 7] *= 1000.0
    for bits in (4, 8):
        assert rel_err(bs.qmatmul(x, qw, bits), bs.qmatmul_f64(x, qw, bits)) < 3e-4


def test_large_k_and_n(rng):
    qw, x = make_case(rng, 2, 1000, 4096, 128, "bfloat16", "bfloat16")
    ref = bs.qmatmul_f64(x, qw, 4)
    assert rel_err(bs.qmatmul(x, qw, 4), ref) < QMATMUL_TOL["bfloat16"]


def test_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    qw, x = make_case(rng, 3, 50, 256, 32, "bfloat16", "float32")
    qt = qw.torch()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        xt = torch.from_numpy(x).to(dt)
        y = bs.qmatmul(xt, qt, 8)
        assert isinstance(y, torch.Tensor) and y.dtype == dt and y.shape == (3, 50)
        tol = {torch.float32: 3e-4, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}[dt]
        assert rel_err(y.float().numpy(), bs.qmatmul_f64(xt.float().numpy(), qw, 8)) < tol
