"""The Metal kernels (metal/*.metal) on the CPU: compiled as C++ under msl_emulation.h and
run through the launch plans of bitswitch.metal, the code path the MLX and torch MPS front
ends take, against the float64 references. Every kernel, view, group size, activation and
scale dtype, head dim, mask kind and the decode splits; outputs are poisoned (NaN) first.

What this cannot check is MSL itself (its language rules, the real compiler, the GPU's
simdgroup-matrix layout and timing): tests/metal/test_metal_device.py runs the same cases
on a Mac.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bitswitch as bs
from bitswitch import attention as A
from bitswitch import metal as M
from conftest import cast, rel_err
from test_attention import SHAPES, decode_case, make_mask, make_qkv

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to compile the MSL emulation"),
    # The emulation is built for Linux (ELF fiber switch, /proc, glibc's sanitizer runtimes);
    # on a Mac the same kernels run on the real GPU (test_metal_device.py).
    pytest.mark.skipif(sys.platform != "linux", reason="the MSL emulation runs on Linux"),
]

import emulator  # noqa: E402  (tests/metal/emulator.py)

DTYPES = ("float32", "bfloat16", "float16")
# Against float64 on the same rounded inputs, relative to the largest output: float32
# accumulation (the sums run in a different order than on the CPU), and for 16-bit
# activations the rounding of y itself.
QTOL = {"float32": 2e-5, "bfloat16": 8e-3, "float16": 1.5e-3}
ATOL = {"float32": 2e-5, "bfloat16": 8e-3, "float16": 1.5e-3}


def _instances():
    """The instances these tests launch: every qmatmul kernel with scales of x's dtype and
    float32 (plus bfloat16 scales under float16 x), every attention kernel."""
    out = []
    for kernel, t in M.instances():
        if kernel in ("qmv", "qmm") and not (t["S"] in (t["T"], "float32") or (t["T"], t["S"]) == ("float16", "bfloat16")):
            continue
        out.append((kernel, t))
    return out


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = emulator.build(_instances(), tmp_path_factory.mktemp("metal_emu"))
    return emulator.Emulator(lib)


# -- the sources ----------------------------------------------------------------------------
def _defines():
    src = M.library_source()
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^#define (BS_\w+) ([^/\n]+)", src, re.M)}


def test_launch_geometry_matches_the_sources():
    d = _defines()
    assert int(d["BS_QMV_SIMDGROUPS"]) * 32 == M.QMV_THREADS
    assert int(d["BS_QMV_SIMDGROUPS"]) * int(d["BS_QMV_ROWS"]) == M.QMV_TG_ROWS
    assert (int(d["BS_QMM_THREADS"]), int(d["BS_QMM_BM"]), int(d["BS_QMM_BN"])) == (M.QMM_THREADS, M.QMM_BM, M.QMM_BN)
    assert (int(d["BS_ATT_THREADS"]), int(d["BS_ATT_BQ"])) == (M.ATT_THREADS, M.ATT_BQ)
    assert (int(d["BS_DEC_THREADS"]), int(d["BS_DEC_MAXR"])) == (M.DEC_THREADS, M.DEC_MAXR)
    assert int(d["BS_IP_COUNT"]) == M.IP_COUNT


def test_threadgroup_memory_fits_apple_gpus():
    """32 KiB of threadgroup memory is the limit on every Apple GPU Metal 3 supports."""
    d = _defines()

    def value(expr, template):
        while re.search(r"\bBS_\w+", expr):  # defines may use defines
            expr = re.sub(r"\bBS_\w+", lambda m: f"({d[m.group(0)]})", expr)
        for name, v in template.items():
            expr = re.sub(rf"\b{name}\b", str(v), expr)
        return eval(expr, {})

    for kernel, t in M.instances():
        k = M.KERNELS[kernel]
        total = sum(4 * value(size, t) for _, size in k.shared)
        assert total <= 32 * 1024, (kernel, t, total)


def test_source_filter_keeps_lines_and_rewrites_threadgroup():
    src = ("threadgroup float t[64];\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n"
           "void f(threadgroup float* p, const threadgroup half* q);\n    threadgroup float a[BS_X * D];")
    out = emulator.filter_msl(src)
    assert out.count("\n") == src.count("\n")
    lines = out.split("\n")
    assert lines[0].strip() == "static float t[64];"
    assert "threadgroup_barrier(mem_flags::mem_threadgroup)" in lines[1]
    assert "threadgroup" not in lines[2] and "float* p" in lines[2] and "const  half* q" in lines[2]
    assert lines[3].strip() == "static float a[BS_X * D];"


def test_entry_points_and_mlx_bodies_name_every_argument():
    for kernel, t in M.instances():
        src = M.entry_source(kernel, t)
        k = M.KERNELS[kernel]
        assert src.startswith(f"kernel void {M.instance_name(kernel, t)}(")
        for i, a in enumerate(k.args):
            assert f"{a.name} [[buffer({i})]]" in src
        body = M.mlx_body(kernel)
        for a in k.args:
            assert re.search(rf"\b{a.name}\b", body), (kernel, a.name)


# -- qmatmul --------------------------------------------------------------------------------
def _qmatmul_case(rng, emu, m, n, k, bits, gs, dtype, sdtype):
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    qw = bs.quantize(w, group_size=gs, bits=8 if bits == 8 else 4, scales_dtype=sdtype)
    x = cast(rng.standard_normal((m, k)).astype(np.float32), dtype)
    plan = M.plan_qmatmul(m, n, k, bits, gs, dtype, sdtype)
    (y,) = emu.run(plan, {"x": x, "p0": qw.plane0, "p1": qw.plane1 if bits == 8 else qw.plane0,
                          "scales": qw.scales, "biases": qw.biases})
    ref = np.asarray(x, np.float64) @ bs.dequantize_f64(qw, bits).T
    what = f"{plan.launches[0].name} M={m} N={n} K={k}"
    y = np.asarray(y, np.float64)
    assert not np.isnan(y).any(), what
    err = rel_err(y, ref)
    assert err <= QTOL[dtype], f"{what}: {err:.2e}"
    return plan.launches[0].kernel


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qmatmul_gemv_and_gemm(rng, emu, bits, gs, dtype):
    """Both kernels, awkward N (not a multiple of the 8-row or 32-column tiles), K of one
    group up to past a lane's 1024-input step, M on both sides of the GEMV / GEMM switch."""
    kinds = set()
    for m, n, k in [(1, 13, gs), (3, 40, 1024 + gs), (8, 8, 2 * gs), (9, 33, 4 * gs), (40, 72, gs), (33, 31, 3 * gs)]:
        kinds.add(_qmatmul_case(rng, emu, m, n, k, bits, gs, dtype, dtype))
    assert kinds == {"qmv", "qmm"}


@pytest.mark.parametrize("kind", ["qmv", "qmm"])
@pytest.mark.parametrize("dtype,sdtype", [("float16", "float32"), ("bfloat16", "float32"), ("float32", "float32"),
                                          ("float16", "bfloat16")])
def test_qmatmul_scale_dtypes(rng, emu, kind, dtype, sdtype):
    m = 2 if kind == "qmv" else 20
    for bits in (4, 8):
        assert _qmatmul_case(rng, emu, m, 24, 256, bits, 64, dtype, sdtype) == kind


def test_qmatmul_matches_the_cpu_kernels(rng, emu):
    """The same call on the CPU's scalar reference: two independent implementations of the
    format agree to float32 accumulation order."""
    w = (rng.standard_normal((48, 512)) * 0.05).astype(np.float32)
    qw = bs.quantize(w, group_size=64, bits=8)
    for m in (1, 17):
        x = rng.standard_normal((m, 512)).astype(np.float32)
        for bits in (4, 8):
            (y,) = emu.run(M.plan_qmatmul(m, 48, 512, bits, 64, "float32", "float32"),
                           {"x": x, "p0": qw.plane0, "p1": qw.plane1, "scales": qw.scales, "biases": qw.biases})
            with bs.ops.use_cpu_variant("scalar"):
                ref = bs.qmatmul(x, qw, bits)
            assert rel_err(y, ref.astype(np.float64)) <= 1e-4


def test_qmatmul_zero_rows_launch_nothing(emu):
    plan = M.plan_qmatmul(0, 16, 64, 4, 64, "float32", "float32")
    assert plan.launches == [] and plan.alloc["y"][0] == (0, 16)


@pytest.mark.parametrize("args,err,msg", [
    ((1, 8, 64, 3, 64, "float32", "float32"), ValueError, "bits must be one of"),
    ((1, 8, 64, 4, 48, "float32", "float32"), ValueError, "group_size must be one of"),
    ((1, 8, 96, 4, 64, "float32", "float32"), ValueError, "multiple of the group size"),
    ((1, 8, 64, 4, 64, "float64", "float32"), TypeError, "x must be one of"),
    ((1, 8, 64, 4, 64, "float32", "int8"), TypeError, "scales must be one of"),
])
def test_qmatmul_plan_rejects_bad_input(args, err, msg):
    with pytest.raises(err, match=msg):
        M.plan_qmatmul(*args)


# -- attention ------------------------------------------------------------------------------
def _strides(a):
    return tuple(s // a.itemsize for s in a.strides[:3])


def _attention(emu, q, k, v, mask, causal, q_offset, splits=None):
    b, hq, lq, d = q.shape
    plan = M.plan_attention(b, hq, k.shape[1], lq, k.shape[2], d, str(q.dtype), _strides(q), _strides(k),
                            _strides(v), mask=mask, causal=causal, q_offset=q_offset, splits=splits)
    out, lse = emu.run(plan, {"q": q, "k": k, "v": v})
    return out, lse, [L.kernel for L in plan.launches]


def _check(out, lse, ref, ref_lse, dtype, what):
    out = np.asarray(out, np.float64)
    assert not np.isnan(out).any(), what
    err = rel_err(out, ref)
    assert err <= ATOL[dtype], f"{what}: {err:.2e}"
    assert np.array_equal(np.isinf(lse), np.isinf(ref_lse)), what
    fin = np.isfinite(ref_lse)
    assert np.max(np.abs(lse[fin] - ref_lse[fin]), initial=0.0) <= 1e-4, what


# The CPU suite's shapes, the 16-head 130-row one cut to 4 heads (the emulator runs every GPU thread).
METAL_SHAPES = [(b, 4 if (hq, hkv) == (16, 2) else hq, hkv, *rest) for b, hq, hkv, *rest in SHAPES]


@pytest.mark.parametrize("shape", METAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "causal", "streaming", "random", "selected"])
def test_attention_matches_float64(rng, emu, shape, mask_kind):
    """The CPU suite's shapes (GQA 1/2/8, lengths off the block grid, chunked prefill,
    decode) and every mask kind, causal and not."""
    b, hq, hkv, lq, lk, d, qo, bq, bk = shape
    q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, d)
    mask = make_mask(mask_kind, rng, q, k, qo, bq, bk)
    for causal in (True, False):
        ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, q_offset=qo)
        out, lse, kernels = _attention(emu, q, k, v, mask, causal, qo)
        _check(out, lse, ref, ref_lse, "float32", f"{shape} {mask_kind} causal={causal} {kernels}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_attention_dtypes_and_strided_cache(rng, emu, dtype, d):
    """16-bit inputs, k and v narrow views of a larger cache, both kernels."""
    b, hq, hkv, cap = 1, 4, 2, 200
    for lq, lk, qo in [(40, 150, 110), (1, 150, 149), (3, 97, 94)]:
        q = cast(rng.standard_normal((b, hq, lq, d)).astype(np.float32), dtype)
        kc = cast(rng.standard_normal((b, hkv, cap, d)).astype(np.float32), dtype)
        vc = cast(rng.standard_normal((b, hkv, cap, d)).astype(np.float32), dtype)
        k, v = kc[:, :, :lk], vc[:, :, :lk]
        ref, ref_lse = A.attention_reference(q, k, v, None, causal=True, q_offset=qo)
        out, lse, kernels = _attention(emu, q, k, v, None, True, qo)
        assert out.dtype == q.dtype
        _check(out, lse, ref, ref_lse, dtype, f"{dtype} d={d} lq={lq} {kernels}")


DECODE_ROWS = [(g, lq) for g in (1, 2, 4) for lq in (1, 2, 3, 8) if g * lq <= 8]


@pytest.mark.parametrize("d", [64, 128])
def test_decode_kernel_and_splits(rng, emu, d):
    """The decode kernel for every GQA group and row count it takes: no mask, a subset of
    blocks, rows that see no key; one split, several, more splits than blocks."""
    b, hkv = 2, 2
    for i, (group, lq) in enumerate(DECODE_ROWS):
        kind = ["none", "subset", "unseen"][i % 3]
        lk, bk = [(301, 32), (333, 64), (97, 128)][i % 3] if kind != "unseen" else (333, 32)
        q, k, v = make_qkv(rng, b, hkv * group, hkv, lq, lk, d)
        mask, qo = decode_case(rng, kind, b, hkv, lq, lk, bk, lk - lq)
        for causal in (True, False):
            ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, q_offset=qo)
            for splits in (None, 1, 3, 13):
                out, lse, kernels = _attention(emu, q, k, v, mask, causal, qo, splits)
                what = f"group {group} lq {lq} {kind} causal {causal} splits {splits}"
                assert kernels == ["attention_decode", "attention_combine"], what
                _check(out, lse, ref, ref_lse, "float32", what)
                if kind == "unseen" and causal:
                    assert np.all(out[:, :, :4] == 0), what


def test_decode_page_selection(rng, emu):
    """Quest-style pages chosen from the key summaries drive the decode kernel."""
    b, hq, hkv, lk, d = 1, 8, 2, 700, 128
    q, k, v = make_qkv(rng, b, hq, hkv, 1, lk, d)
    summary = A.KeyBlockSummary.from_keys(k, block_k=64)
    mask = A.select_pages(q, summary, budget=4, sinks=1)
    ref, ref_lse = A.attention_reference(q, k, v, mask, causal=True, q_offset=lk - 1)
    out, lse, kernels = _attention(emu, q, k, v, mask, True, lk - 1)
    assert kernels[0] == "attention_decode"
    _check(out, lse, ref, ref_lse, "float32", "pages")


def test_rows_without_keys_are_zero(rng, emu):
    b, hq, hkv, lq, lk, d = 1, 2, 1, 40, 64, 64
    q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, d)
    table = np.zeros((1, 1, 2, 2), bool)
    table[0, 0, 0, 1] = True  # query block 0 sees only key block 1: causal rows 0..31 see nothing
    mask = A.BlockMask.from_block_table(table, 32, 32, lq, lk)
    out, lse, _ = _attention(emu, q, k, v, mask, True, 0)
    assert np.all(out[:, :, :32] == 0) and np.all(np.isneginf(lse[:, :, :32]))
    assert np.all(out[:, :, 32:] == 0)  # query block 1 selects nothing at all


def test_attention_plan_rejects_bad_input(rng):
    st = (1, 1, 1)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        M.plan_attention(1, 2, 1, 4, 4, 96, "float32", st, st, st)
    with pytest.raises(ValueError, match="positive multiple of k/v heads"):
        M.plan_attention(1, 3, 2, 4, 4, 64, "float32", st, st, st)
    with pytest.raises(TypeError, match="q must be one of"):
        M.plan_attention(1, 2, 1, 4, 4, 64, "int8", st, st, st)
    q, k, _ = make_qkv(rng, 1, 2, 1, 64, 64, 64)
    mask = A.causal_mask(1, 1, 64, 64, 32, 32)
    with pytest.raises(ValueError, match="mask indices must lie"):
        M.plan_attention(1, 2, 1, 64, 30, 64, "float32", st, st, st, mask=mask)


# -- the emulator's own checks on the kernels ---------------------------------------------
def test_kernels_in_threads_mode(rng, tmp_path_factory):
    """One OS thread per GPU thread (real concurrency between barriers) on a few cases of
    each kernel: the results match the fiber mode's."""
    inst = [("qmv", {"T": "float32", "S": "float32", "BITS": 8, "GS": 32}),
            ("qmm", {"T": "float16", "S": "float32", "BITS": 4, "GS": 64}),
            ("attention", {"T": "float32", "D": 64}), ("attention_decode", {"T": "float32", "D": 64}),
            ("attention_combine", {"T": "float32", "D": 64})]
    emu_t = emulator.Emulator(emulator.build(inst, tmp_path_factory.mktemp("metal_emu_threads")), threads_mode=True)
    _qmatmul_case(rng, emu_t, 2, 20, 512, 8, 32, "float32", "float32")
    _qmatmul_case(rng, emu_t, 33, 20, 128, 4, 64, "float16", "float32")
    q, k, v = make_qkv(rng, 1, 2, 1, 20, 50, 64)
    ref, ref_lse = A.attention_reference(q, k, v, None, causal=True, q_offset=30)
    out, lse, _ = _attention(emu_t, q, k, v, None, True, 30)
    _check(out, lse, ref, ref_lse, "float32", "threads forward")
    ref, ref_lse = A.attention_reference(q[:, :, :2], k, v, None, causal=True, q_offset=48)
    out, lse, kernels = _attention(emu_t, q[:, :, :2].copy(), k, v, None, True, 48, splits=2)
    assert kernels[0] == "attention_decode"
    _check(out, lse, ref, ref_lse, "float32", "threads decode")


def _sanitized_run(tmp_path_factory, sanitizer: str, runtime: str, threads: bool) -> str:
    """sanitized_cases.py in a subprocess, the sanitizer runtime preloaded (the Python
    interpreter itself is not instrumented)."""
    import sanitized_cases

    lib = emulator.build(sanitized_cases.INSTANCES, tmp_path_factory.mktemp(f"metal_emu_{runtime}"), sanitize=sanitizer)
    rt = subprocess.run([shutil.which("g++"), f"-print-file-name={runtime}.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(rt):
        pytest.skip(f"{runtime}.so is not installed")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, LD_PRELOAD=rt, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", TSAN_OPTIONS="halt_on_error=1",
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(here / "sanitized_cases.py"), str(lib)] + (["--threads"] if threads else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if "unexpected memory mapping" in r.stderr:
        pytest.skip(f"{runtime} cannot run on this kernel's memory layout")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "OK" in r.stdout, out[-6000:]
    for report in ("AddressSanitizer", "runtime error:", "ThreadSanitizer"):
        assert report not in out, out[-6000:]
    return r.stdout


def test_kernels_under_asan_and_ubsan(tmp_path_factory):
    """Every kernel's buffer accesses, including the edges of the last tile and strided
    views ending at their buffer's end, under AddressSanitizer + UBSan (fibers mode)."""
    out = _sanitized_run(tmp_path_factory, "address,undefined", "libasan", threads=False)
    assert all(f"bs_{k}" in out for k, _ in [("qmv", 0), ("qmm", 0), ("attention", 0), ("attention_decode", 0)])


def test_kernels_have_no_missing_barrier_under_tsan(tmp_path_factory):
    """Threads mode (an OS thread per GPU thread) under ThreadSanitizer: a missing barrier
    between a threadgroup-memory write and another thread's read would be a data race."""
    _sanitized_run(tmp_path_factory, "thread", "libtsan", threads=True)
