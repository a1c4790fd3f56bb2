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
    rounding error grows with K: ~4e-6 was seen at K = 4224; at K = 1056, 6000 draws had a
    median of 1.0e-6 and a maximum of 2.3e-6)."""
    with bs.ops.use_cpu_variant("scalar"):
        for (m, n, k) in SHAPES:
            qw, x = make_case(rng, m, n, k, 32, "float32", "float32")
            for bits in (4, 8):
                assert rel_err(bs.qmatmul(x, qw, bits), bs.qmatmul_f64(x, qw, bits)) < 3e-6 * max(1.0, k / 1056)


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


# The variants that multiply bf16 x (act_bits 16, M > 8) by the weights dequantized to bf16:
# AMX tiles and AVX512-BF16 vdpbf16ps, one contract (csrc/cpu/bf16_panels.h).
BF16_DENSE = ("avx512bf16", "amx")


def needs(variant):
    if variant_status(variant) != "ok":
        pytest.skip(f"{variant}: {variant_status(variant)}")


@pytest.mark.parametrize("variant", BF16_DENSE)
def test_bf16_dense_threads_and_tails_do_not_change_results(rng, variant):
    """Every output is computed by one block in a fixed order, whatever the task split."""
    needs(variant)
    qw, x = make_case(rng, 77, 230, 640, 64, "bfloat16", "bfloat16")
    with bs.ops.use_cpu_variant(variant):
        ref = bs.qmatmul(x, qw, 8)
        try:
            for threads in (1, 3):
                bs.ops.set_num_threads(threads)
                np.testing.assert_array_equal(bs.qmatmul(x, qw, 8), ref)
        finally:
            bs.ops.set_num_threads(0)
        # A row's result does not depend on the other rows of x.
        np.testing.assert_array_equal(bs.qmatmul(x[:40], qw, 8), ref[:40])


# The bf16 dense paths (act_bits 16, M above the GEMV's 8 rows): M not a multiple of the
# AMX path's 16/32-row blocks or the vdpbf16ps path's 12-row blocks, 513 past a 512-row boundary; N below one 16-output tile (3), between
# tiles (17, 40) and past several (200); K shorter than one 256-input chunk (96, 160: G = 32
# only), ending in a partial chunk (640) and in a partial 128-input dequantization step
# (4224: 132 groups of 32).
BF16_M = (9, 17, 33, 100, 513)
BF16_N = (3, 17, 40, 200)
BF16_K = (96, 160, 640, 4224)


def bf16_weight_product(x, qw, bits):
    """The oracle of the bf16 dense paths: x times the weights as that path sees them, the
    float32 dequantization rounded to bf16, in float64."""
    w = np.asarray(bs.quant.dequantize(qw, bits, dtype="float32")).astype(cast(np.zeros(1), "bfloat16").dtype)
    return np.asarray(x, np.float64) @ w.astype(np.float64).T


def kernel_bf16_weights(qw, bits):
    """The bf16 weights exactly as the bf16 dense paths compute them: the INT8 view's scale and
    bias in float32 operations as format.h writes them, then s*c + b rounded once to
    float32 (one FMA; exact in float64 first) and once to bf16. dequantize rounds s*c and
    the sum separately, which moves ~1 weight in 7000 across a bf16 rounding boundary."""
    f32 = np.float32
    s = np.asarray(qw.scales).astype(f32)
    b = np.asarray(qw.biases).astype(f32)
    c = bs.quant.unpack_codes(np.asarray(qw.plane0)).astype(np.float64)
    if bits == 8:
        inv = f32(1.0 / bs.quant.RESIDUAL_DIVISOR)
        b = (b - (s * f32(bs.quant.RESIDUAL_CENTER)).astype(f32) * inv).astype(f32)
        s = (s * inv).astype(f32)
        c = c * bs.quant.RESIDUAL_DIVISOR + bs.quant.unpack_codes(np.asarray(qw.plane1))
    rep = lambda a: np.repeat(a.astype(np.float64), qw.group_size, axis=1)  # noqa: E731
    return cast((rep(s) * c + rep(b)).astype(f32), "bfloat16").astype(np.float64)


def check_bf16_dense(y, x, qw, bits, what):
    ref = bf16_weight_product(x, qw, bits)
    scale = np.max(np.abs(ref))
    y = np.asarray(y, np.float64)
    # y is the bf16 rounding of a float32 sum: within half a bf16 step (2^-9 relative) of
    # each exact value, so within 2^-8 of the output scale.
    err = np.max(np.abs(y - ref)) / scale
    assert err <= 2.0 ** -8, f"{what}: {err:.2e} of the output scale from the bf16-weight oracle"
    # With the kernel's own weights, nearly all outputs are the exact product rounded to bf16,
    # bit for bit: the rest differ where a float32 sum (in any order) falls on the other side
    # of a rounding boundary (a wrong rounding mode or weight would differ in about half).
    exact = np.asarray(x, np.float64) @ kernel_bf16_weights(qw, bits).T
    differ = int(np.sum(y != cast(exact.astype(np.float32), "bfloat16").astype(np.float64)))
    assert differ <= 2 + 0.02 * y.size, f"{what}: {differ} of {y.size} outputs differ from the rounded product"
    # The quantized weights' own float64 product is within the bfloat16 bound as well.
    err64 = rel_err(y, bs.qmatmul_f64(x, qw, bits))
    assert err64 <= QMATMUL_TOL["bfloat16"], f"{what}: {err64:.2e} from the float64 reference"


@pytest.mark.parametrize("m", BF16_M)
@pytest.mark.parametrize("n", BF16_N)
@pytest.mark.parametrize("variant", BF16_DENSE)
def test_bf16_dense_matches_the_bf16_weight_oracle(rng, variant, m, n):
    """bf16 x on the bf16 dense variants: the product with the bf16-rounded dequantized
    weights, for both views, every group size and every scale dtype, outputs poisoned first."""
    needs(variant)
    sdtypes = ["bfloat16", "float16", "float32"]
    i = 0
    for k in BF16_K:
        for g in (32, 64, 128):
            if k % g or (k < 256 and g != 32):
                continue
            for bits in (4, 8):
                sdtype = sdtypes[i % 3]
                i += 1
                qw, x = make_case(rng, m, n, k, g, sdtype, "bfloat16")
                out = cast(np.full((m, n), np.nan, np.float32), "bfloat16")
                with bs.ops.use_cpu_variant(variant):
                    y = bs.qmatmul(x, qw, bits=bits, out=out)
                assert y is out
                check_bf16_dense(y, x, qw, bits, f"M={m} N={n} K={k} G={g} w{bits} {sdtype} scales")


@pytest.mark.parametrize("variant", BF16_DENSE)
def test_bf16_dense_panels_split_along_k(rng, variant):
    """Wide outputs and long K: the dequantized panel covers only part of K, and the
    float32 results are carried across panels."""
    needs(variant)
    qw, x = make_case(rng, 513, 1024, 4224, 64, "bfloat16", "bfloat16")
    with bs.ops.use_cpu_variant(variant):
        for bits in (4, 8):
            check_bf16_dense(bs.qmatmul(x, qw, bits), x, qw, bits, f"w{bits}")


@pytest.mark.parametrize("variant", BF16_DENSE)
def test_bf16_dense_float_x_keeps_exact_codes(rng, variant):
    """Only bf16 x at act_bits 16 uses dequantized weights: float32 and float16 x (and
    act_bits 8) keep an exact-code path, far more accurate than a bf16 weight (~4e-3): AMX
    bf16 tiles of the codes, avx512's float32 GEMM (~1e-6), and for float16 x on avx512bf16
    the int8 GEMM on the GEMV's 15-bit x."""
    needs(variant)
    qw, x = make_case(rng, 64, 96, 1024, 64, "float32", "float32")
    with bs.ops.use_cpu_variant(variant):
        for xdtype, tol in (("float32", 3e-5), ("float16", 1.5e-3)):
            xc = cast(x, xdtype)
            assert rel_err(bs.qmatmul(xc, qw, 8), bs.qmatmul_f64(xc, qw, 8)) < tol
        assert rel_err(bs.qmatmul(x, qw, 8, act_bits=8), bs.qmatmul_f64(x, qw, 8, act_bits=8)) < 3e-5


# The int8 GEMMs (M above the GEMV's 8 rows; act_bits 8, avx2 the INT4 view only, and at
# act_bits 16 float16 x on avx512bf16, bfloat16 and float16 x on avxvnni): int8 x on the
# weights' codes, exact integer sums per group, the affine map folded in float32.


def assert_within_one_ulp(y, ref):
    """Elementwise within one ulp of ref's dtype plus 2e-6 of the output scale: float32 sums
    that agree to float32 rounding can round to neighbouring float16 values (and near zero,
    where a float16 ulp is tiny, differ by a few)."""
    ref64 = np.asarray(ref).astype(np.float64)
    bound = np.spacing(np.abs(np.asarray(ref))).astype(np.float64) + 2e-6 * np.max(np.abs(ref64))
    excess = np.abs(np.asarray(y, np.float64) - ref64) / bound
    assert np.all(excess <= 1.01), np.max(excess)
INT8_GEMM = ("avx2", "avxvnni", "avx512", "avx512bf16")  # avx2: the INT4 view at act_bits 8


def hi_lo_dtypes(variant):
    """x dtypes whose act_bits 16 GEMM is the int8 GEMM on both halves of the 15-bit x."""
    return {"avx512bf16": ("float16",), "avxvnni": ("bfloat16", "float16")}.get(variant, ())


@pytest.mark.parametrize("variant", INT8_GEMM)
def test_int8_gemm_panels_split_along_k(rng, variant):
    """x past 2 MB and N = 1024: panels of 256-512 outputs cover only part of K = 4224 at
    any thread count up to 8, so the float32 sums are carried across panels; float-grade
    (the hi / lo x dtypes at act_bits 16: the GEMV's rows, within an ulp)."""
    needs(variant)
    qw, x = make_case(rng, 520, 1024, 4224, 64, "float32", "float32")
    with bs.ops.use_cpu_variant(variant):
        for bits in (4, 8):
            err = rel_err(bs.qmatmul(x, qw, bits, act_bits=8), bs.qmatmul_f64(x, qw, bits, act_bits=8))
            assert err < 3e-5, (bits, err)
            for xdtype in hi_lo_dtypes(variant):
                xh = cast(x, xdtype)
                assert_within_one_ulp(bs.qmatmul(xh, qw, bits)[:8], bs.qmatmul(xh[:8], qw, bits))


@pytest.mark.parametrize("variant", INT8_GEMM)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int8_gemm_matches_the_gemv(rng, variant, group_size):
    """Same quantized x, exact integer sums per group: the GEMM's rows (M > 8) agree with the
    GEMV's (8 rows at a time) to float32 rounding: at act_bits 8 on every variant, and for
    the hi / lo x dtypes at act_bits 16 (within a ulp of x's dtype)."""
    needs(variant)
    qw, x = make_case(rng, 37, 200, 1280, group_size, "bfloat16", "float32")
    with bs.ops.use_cpu_variant(variant):
        for bits in (4, 8):
            gemm = bs.qmatmul(x, qw, bits, act_bits=8)
            gemv = np.concatenate([bs.qmatmul(x[i:i + 8], qw, bits, act_bits=8) for i in range(0, 37, 8)])
            assert rel_err(gemm, gemv.astype(np.float64)) < 2e-6, bits
            for xdtype in hi_lo_dtypes(variant):
                xh = cast(x, xdtype)
                gemv = np.concatenate([bs.qmatmul(xh[i:i + 8], qw, bits) for i in range(0, 37, 8)])
                assert_within_one_ulp(bs.qmatmul(xh, qw, bits), gemv)


def test_avxvnni_float32_x_keeps_the_fma_gemm(rng):
    """On avxvnni only float32 x at act_bits 16 stays off the int8 GEMM: the float32 FMA GEMM
    on exact weights (~1e-6 of float64), where the GEMV's 15-bit x costs ~3e-5."""
    needs("avxvnni")
    qw, x = make_case(rng, 40, 96, 2048, 64, "float32", "float32")
    with bs.ops.use_cpu_variant("avxvnni"):
        for bits in (4, 8):
            assert rel_err(bs.qmatmul(x, qw, bits), bs.qmatmul_f64(x, qw, bits)) < 4e-6, bits


@pytest.mark.parametrize("variant", INT8_GEMM)
def test_int8_gemm_threads_and_tails_do_not_change_results(rng, variant):
    """Every output is computed by one block in a fixed order, whatever the task split and
    however many rows share its register block."""
    needs(variant)
    cases = [("bfloat16", 8), ("float32", 8)] + [(xdtype, 16) for xdtype in hi_lo_dtypes(variant)]
    for xdtype, act_bits in cases:
        qw, x = make_case(rng, 77, 230, 640, 64, "float16", xdtype)
        with bs.ops.use_cpu_variant(variant):
            ref = bs.qmatmul(x, qw, 8, act_bits=act_bits)
            try:
                for threads in (1, 3):
                    bs.ops.set_num_threads(threads)
                    np.testing.assert_array_equal(bs.qmatmul(x, qw, 8, act_bits=act_bits), ref)
            finally:
                bs.ops.set_num_threads(0)
            np.testing.assert_array_equal(bs.qmatmul(x[:40], qw, 8, act_bits=act_bits), ref[:40])
            np.testing.assert_array_equal(bs.qmatmul(x[9:20], qw, 8, act_bits=act_bits), ref[9:20])


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
    """Per-group 15-bit activations keep a group with a 1000x outlier accurate elsewhere. The
    weights of the outlier's group are zero, so the result is the other groups' alone: per
    group it is float-grade (~1e-4 at most over 300 seeds), while one 15-bit scale per row
    of x would cost ~1e-2 here."""
    w = (rng.standard_normal((64, 512)) * rng.uniform(0.02, 2)).astype(np.float32)
    w[:, :64] = 0.0
    qw = bs.quantize(w, group_size=64, bits=8)
    x = (rng.standard_normal((4, 512)) / np.sqrt(512)).astype(np.float32)
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
