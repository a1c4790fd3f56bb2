"""Block-sparse attention on every CPU variant against float64 dense attention with the block
mask expanded to a dense mask (bitswitch.attention.attention_reference), the mask builders,
runtime selection, decode page selection, and bad input."""

import contextlib

import numpy as np
import pytest

import bitswitch as bs
from bitswitch import attention as A
from conftest import cast, rel_err

# Bounds against the float64 reference on the same (rounded) inputs, relative to the largest
# output magnitude. float32: float32 accumulation and a 2^x polynomial (~1e-6 seen).
# bfloat16 / float16: the output is rounded to that type (2^-9 / 2^-12 relative).
ATTN_TOL = {"float32": 2e-5, "bfloat16": 8e-3, "float16": 1.5e-3}

# (B, Hq, Hkv, Lq, Lk, D, q_offset, block_q, block_k): GQA 1, 2 and 8; Lq != Lk with the
# queries at the end of the keys (chunked prefill); lengths not multiples of the blocks;
# decode (Lq = 1, every GQA row on the dot-product path); tiles of 32 to 128.
SHAPES = [
    (1, 2, 2, 100, 100, 64, 0, 64, 64),
    (2, 4, 2, 70, 133, 128, 63, 32, 64),
    (1, 8, 1, 37, 200, 64, 163, 64, 32),
    (1, 16, 2, 130, 130, 128, 0, 128, 128),
    (1, 4, 2, 1, 300, 128, 299, 64, 64),
    (2, 16, 8, 3, 97, 64, 94, 32, 32),
]
MASKS = ["none", "dense", "causal", "streaming", "random", "selected"]


def make_qkv(rng, b, hq, hkv, lq, lk, d, dtype="float32"):
    q = cast(rng.standard_normal((b, hq, lq, d)).astype(np.float32), dtype)
    k = cast(rng.standard_normal((b, hkv, lk, d)).astype(np.float32), dtype)
    v = cast(rng.standard_normal((b, hkv, lk, d)).astype(np.float32), dtype)
    return q, k, v


def make_mask(kind, rng, q, k, q_offset, block_q, block_k):
    b, hkv, lq, lk = q.shape[0], k.shape[1], q.shape[2], k.shape[2]
    if kind == "none":
        return None
    if kind == "dense":
        return A.dense_mask(b, hkv, lq, lk, block_q, block_k)
    if kind == "causal":
        return A.causal_mask(b, hkv, lq, lk, block_q, block_k, q_offset)
    if kind == "streaming":
        return A.streaming_mask(b, hkv, lq, lk, sinks=1, window=1, block_q=block_q, block_k=block_k,
                                q_offset=q_offset)
    if kind == "random":
        nqb, nkb = -(-lq // block_q), -(-lk // block_k)
        return A.BlockMask.from_block_table(rng.random((b, hkv, nqb, nkb)) < 0.4, block_q, block_k, lq, lk)
    return A.select_blocks(q, k, tau=0.5, block_q=block_q, block_k=block_k, q_offset=q_offset)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_every_variant_matches_float64(rng, variant, shape, causal):
    b, hq, hkv, lq, lk, d, qo, bq, bk = shape
    for kind in MASKS:
        dtype = str(rng.choice(["float32", "bfloat16", "float16"]))
        q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, d, dtype)
        mask = make_mask(kind, rng, q, k, qo, bq, bk)
        out = cast(np.full(q.shape, np.nan, np.float32), dtype)  # poisoned
        y, lse = bs.ops.attention(q, k, v, mask=mask, causal=causal, q_offset=qo, out=out, return_lse=True)
        assert y is out
        ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, q_offset=qo)
        assert not np.isnan(np.asarray(y, np.float32)).any()
        err = rel_err(y, ref)
        assert err <= ATTN_TOL[dtype], f"{variant} {kind} {dtype}: {err:.2e}"
        # lse: -inf exactly where a row sees nothing, else close (natural log units).
        assert np.array_equal(np.isinf(lse), np.isinf(ref_lse)), kind
        fin = np.isfinite(ref_lse)
        assert np.max(np.abs(lse[fin] - ref_lse[fin]), initial=0.0) <= 1e-4


def test_variants_agree_with_scalar(rng):
    """The fast variants against the scalar reference on one awkward shape, float32."""
    from conftest import available_variants
    q, k, v = make_qkv(rng, 1, 6, 3, 77, 150, 128)
    mask = make_mask("random", rng, q, k, 73, 32, 64)
    with bs.ops.use_cpu_variant("scalar"):
        ref = bs.ops.attention(q, k, v, mask=mask, q_offset=73)
    for var in available_variants():
        with bs.ops.use_cpu_variant(var):
            y = bs.ops.attention(q, k, v, mask=mask, q_offset=73)
        assert np.max(np.abs(y - ref)) <= 1e-5, var


# Prefill shapes for the tile kernels (amx: 32-key units, 32-row groups, chunks of 256 keys,
# query blocks merged without a mask): Lq from 9 to 300, Lk not a multiple of any block,
# GQA groups 1, 2 and 4, both head dims, every block size, chunked prefill offsets.
# (GQA group, Lq, Lk, D, q_offset, block_q, block_k)
TILE_SHAPES = [
    (1, 9, 9, 64, 0, 32, 32),
    (2, 17, 300, 128, 283, 32, 64),
    (4, 33, 77, 64, 44, 64, 128),
    (1, 100, 371, 128, 271, 128, 32),
    (2, 129, 129, 64, 0, 64, 64),
    (4, 300, 300, 128, 0, 128, 128),
    (1, 255, 600, 128, 345, 32, 128),
]


@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefill_tile_shapes(rng, variant, shape):
    """Every mask kind and dtype on awkward prefill shapes, into a poisoned out= view of a
    larger buffer, with lse; the float64 oracle decides."""
    group, lq, lk, d, qo, bq, bk = shape
    hkv = 2
    for i, kind in enumerate(["none", "causal", "random", "streaming"]):
        dtype = ["bfloat16", "float16", "float32", "bfloat16"][i]
        q, k, v = make_qkv(rng, 1, group * hkv, hkv, lq, lk, d, dtype)
        mask = make_mask(kind, rng, q, k, qo, bq, bk)
        big = cast(np.full((1, group * hkv, lq + 5, d), np.nan, np.float32), dtype)
        out = big[:, :, 3:3 + lq]  # strided: row stride d, head stride (lq + 5) d
        for causal in (True, False):
            y, lse = bs.ops.attention(q, k, v, mask=mask, causal=causal, q_offset=qo, out=out, return_lse=True)
            ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, q_offset=qo)
            what = f"{variant} {kind} {dtype} causal {causal}"
            assert not np.isnan(np.asarray(y, np.float32)).any(), what
            assert rel_err(y, ref) <= ATTN_TOL[dtype], f"{what}: {rel_err(y, ref):.2e}"
            assert np.array_equal(np.isinf(lse), np.isinf(ref_lse)), what
            fin = np.isfinite(ref_lse)
            assert np.max(np.abs(lse[fin] - ref_lse[fin]), initial=0.0) <= 1e-4, what
        assert np.isnan(np.asarray(big[:, :, :3], np.float32)).all(), "wrote outside out"


def test_running_max_moves(rng, variant):
    """Scores that grow along the keys by more than the tile kernel's excess bound (16 in
    log2 units) several times within one 256-key chunk: the running max moves and the O,
    l and probabilities already accumulated are rescaled."""
    lq, lk, d = 40, 600, 64
    u = rng.standard_normal(d).astype(np.float32)
    q = cast(u + 0.1 * rng.standard_normal((1, 4, lq, d)).astype(np.float32), "bfloat16")
    grow = np.linspace(0.2, 6.0, lk, dtype=np.float32)[:, None]  # q . k_j ~ 64 grow_j
    k = cast(grow * u + rng.standard_normal((1, 2, lk, d)).astype(np.float32), "bfloat16")
    v = cast(rng.standard_normal((1, 2, lk, d)).astype(np.float32), "bfloat16")
    y, lse = bs.ops.attention(q, k, v, causal=False, scale=0.5, return_lse=True)
    ref, ref_lse = A.attention_reference(q, k, v, None, causal=False, scale=0.5)
    assert rel_err(y, ref) <= ATTN_TOL["bfloat16"]
    assert np.max(np.abs(lse - ref_lse)) <= 1e-4 * max(1.0, np.max(np.abs(ref_lse)))


def test_rows_without_keys_are_zero(variant, rng):
    """Query blocks with no key block, and causal rows before every selected key: zeros and
    lse -inf, never NaN."""
    q, k, v = make_qkv(rng, 1, 4, 2, 96, 256, 64)
    table = np.zeros((1, 2, 3, 4), bool)
    table[:, :, 0, 3] = True   # only a block after every row of query block 0 (causal)
    table[:, 1, 2, :2] = True  # query block 1: nothing; block 2 of kv head 1: two blocks
    mask = A.BlockMask.from_block_table(table, 32, 64, 96, 256)
    y, lse = bs.ops.attention(q, k, v, mask=mask, causal=True, q_offset=0, return_lse=True)
    assert not np.isnan(y).any()
    assert np.all(y[:, :, :64] == 0) and np.all(np.isneginf(lse[:, :, :64]))
    assert np.all(y[:, :2, 64:] == 0) and np.all(np.isneginf(lse[:, :2, 64:]))
    ref, _ = A.attention_reference(q, k, v, mask, causal=True)
    assert rel_err(y, ref) <= ATTN_TOL["float32"]
    assert np.any(y[:, 2:, 64:] != 0)


# -- decode: tasks of at most 8 rows (Lq times the GQA group) -----------------------------------
DECODE_ROWS = [(g, lq) for g in (1, 2, 4) for lq in range(1, 9) if g * lq <= 8]


@contextlib.contextmanager
def kv_splits(n):
    """Forces n key-block ranges per decode task (the split-KV path and its merge)."""
    bs._C._set_attention_kv_splits(n)
    try:
        yield
    finally:
        bs._C._set_attention_kv_splits(0)


def decode_case(rng, kind, b, hkv, lq, lk, bk, qo):
    """A one-query-block mask (block_q 64 >= Lq) of `kind` and the q_offset to run it at.
    subset: ~40% of the key blocks, the partial last block always among them for kv head 0.
    unseen: the rows start 4 keys before a block boundary and the mask selects only the blocks
    from that boundary on, so causal rows 0..3 see nothing (zeros) and later rows a few keys;
    kv head 1 (if any) selects no block at all."""
    nkb = -(-lk // bk)
    if kind == "none":
        return None, qo
    table = np.zeros((b, hkv, 1, nkb), bool)
    if kind == "subset":
        table[:] = rng.random(table.shape) < 0.4
        table[:, 0, 0, -1] = True
    else:
        edge = (nkb - 2) * bk
        qo = edge - 4
        table[:, :, 0, nkb - 2:] = True
        table[:, 1:2] = False
    return A.BlockMask.from_block_table(table, 64, bk, lq, lk, qo), qo


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_matches_float64(rng, variant, dtype, d):
    """Every (GQA group, Lq) with at most 8 rows per task, causal and not, no mask / a subset of
    blocks (partial last block) / rows without visible keys, k and v strided views of a
    larger cache, Lk not a multiple of the block, with and without forced split-KV (more
    ranges than blocks included)."""
    b, hkv, cap = 2, 2, 420
    for i, (group, lq) in enumerate(DECODE_ROWS):
        kind = ["none", "subset", "unseen"][(i + i // 3) % 3]
        lk, bk = [(301, 32), (333, 64), (97, 128)][i % 3] if kind != "unseen" else (333, 32)
        q = cast(rng.standard_normal((b, hkv * group, lq, d)).astype(np.float32), dtype)
        kc = cast(rng.standard_normal((b, hkv, cap, d)).astype(np.float32), dtype)
        vc = cast(rng.standard_normal((b, hkv, cap, d)).astype(np.float32), dtype)
        k, v = kc[:, :, :lk], vc[:, :, :lk]  # a narrow of the cache: row stride cap * d
        mask, qo = decode_case(rng, kind, b, hkv, lq, lk, bk, lk - lq)
        for causal in (True, False):
            ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, q_offset=qo)
            for splits in (0, 3, 7):
                out = cast(np.full(q.shape, np.nan, np.float32), dtype)  # poisoned
                with kv_splits(splits):
                    y, lse = bs.ops.attention(q, k, v, mask=mask, causal=causal, q_offset=qo, out=out,
                                              return_lse=True)
                what = f"{variant} group {group} lq {lq} lk {lk} bk {bk} {kind} causal {causal} splits {splits}"
                assert not np.isnan(np.asarray(y, np.float32)).any(), what
                err = rel_err(y, ref)
                assert err <= ATTN_TOL[dtype], f"{what}: {err:.2e}"
                assert np.array_equal(np.isinf(lse), np.isinf(ref_lse)), what
                fin = np.isfinite(ref_lse)
                assert np.max(np.abs(lse[fin] - ref_lse[fin]), initial=0.0) <= 1e-4, what
                if kind == "unseen" and causal:
                    assert np.all(np.asarray(y[:, :, :4], np.float32) == 0), what
                    if lq > 4:
                        assert np.any(np.asarray(y[:, :group, 4:], np.float32) != 0), what


def test_decode_kernel_inside_prefill_call(rng, variant):
    """A last query block of few rows (70 = 64 + 6 rows, GQA group 1) takes the decode kernel
    within a tiled call."""
    q, k, v = make_qkv(rng, 1, 2, 2, 70, 200, 128, "bfloat16")
    out = cast(np.full(q.shape, np.nan, np.float32), "bfloat16")
    mask = make_mask("random", rng, q, k, 130, 64, 32)
    y = bs.ops.attention(q, k, v, mask=mask, q_offset=130, out=out)
    ref, _ = A.attention_reference(q, k, v, mask, causal=True, q_offset=130)
    assert rel_err(y, ref) <= ATTN_TOL["bfloat16"]


def test_decode_splits_by_itself(rng):
    """Few tasks for the threads and a long cache: the automatic split-KV matches one range."""
    q, k, v = make_qkv(rng, 1, 4, 1, 1, 5000, 128, "bfloat16")
    threads = bs.ops.num_threads()
    try:
        bs.ops.set_num_threads(4)
        y = bs.ops.attention(q, k, v, q_offset=4999)
        with kv_splits(1):
            y1 = bs.ops.attention(q, k, v, q_offset=4999)
    finally:
        bs.ops.set_num_threads(threads)
    ref, _ = A.attention_reference(q, k, v, None, q_offset=4999)
    assert rel_err(y, ref) <= ATTN_TOL["bfloat16"] and rel_err(y1, ref) <= ATTN_TOL["bfloat16"]


def test_kv_cache_slices_and_torch(rng):
    """A strided slice of a preallocated cache is read as is; torch tensors work the same."""
    torch = pytest.importorskip("torch")
    cache_k = torch.randn(2, 2, 512, 64)
    cache_v = torch.randn(2, 2, 512, 64)
    length = 300
    q = torch.randn(2, 4, 20, 64).transpose(1, 2).contiguous().transpose(1, 2)  # heads before length in memory
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]
    assert not k.is_contiguous()
    y = bs.ops.attention(q, k, v, q_offset=length - 20)
    assert isinstance(y, torch.Tensor) and y.shape == q.shape
    ref, _ = A.attention_reference(q, k, v, None, causal=True, q_offset=length - 20)
    assert rel_err(y.numpy(), ref) <= ATTN_TOL["float32"]


def test_mlx_arrays(rng):
    mx = pytest.importorskip("mlx.core")
    q, k, v = make_qkv(rng, 1, 4, 2, 50, 80, 64)
    to = lambda a: mx.array(a).astype(mx.bfloat16)  # noqa: E731
    y = bs.ops.attention(to(q), to(k), to(v), q_offset=30)
    assert isinstance(y, mx.array) and y.dtype == mx.bfloat16
    ref, _ = A.attention_reference(np.array(to(q).astype(mx.float32)), np.array(to(k).astype(mx.float32)),
                                   np.array(to(v).astype(mx.float32)), None, q_offset=30)
    assert rel_err(np.array(y.astype(mx.float32)), ref) <= ATTN_TOL["bfloat16"]
    mask = A.select_blocks(to(q), to(k), q_offset=30, block_q=32, block_k=32)
    assert 0.0 < mask.density() <= 1.0


def test_torch_op_opcheck_and_compile(rng):
    torch = pytest.importorskip("torch")
    import bitswitch.torch as bt

    q = torch.randn(1, 4, 70, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 90, 64, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 90, 64, dtype=torch.bfloat16)
    mask = A.streaming_mask(1, 2, 70, 90, sinks=1, window=1, block_q=32, block_k=32, q_offset=20)
    ip, ix = mask.torch_tensors()
    torch.library.opcheck(torch.ops.bitswitch.attention.default, (q, k, v, ip, ix, 32, 32, True, None, 20))
    torch.library.opcheck(torch.ops.bitswitch.attention.default, (q.float(), k.float(), v.float(), None, None,
                                                                  64, 64, False, 0.1, 0))
    out, lse = bt.attention(q, k, v, mask, q_offset=20, return_lse=True)
    ref, ref_lse = A.attention_reference(q, k, v, mask, q_offset=20)
    assert rel_err(out.float().numpy(), ref) <= ATTN_TOL["bfloat16"]
    assert np.max(np.abs(lse.numpy() - ref_lse)) <= 1e-4

    f = torch.compile(lambda q, k, v, ip, ix: torch.ops.bitswitch.attention(q, k, v, ip, ix, 32, 32, True, None,
                                                                          20)[0] * 2, fullgraph=True)
    assert torch.equal(f(q, k, v, ip, ix), out * 2)


# -- mask builders -----------------------------------------------------------------------------
def test_builders_match_their_definition():
    lq, lk, bq, bk, qo = 200, 330, 32, 64, 130
    vis_rows = (np.arange(lq) + qo)
    causal = A.causal_mask(1, 1, lq, lk, bq, bk, qo).to_dense()[0, 0]
    # A block is listed when any row of the query block may see any of its keys.
    for qb in range(-(-lq // bq)):
        last = min((qb + 1) * bq, lq) - 1 + qo
        row = causal[qb * bq]
        assert row[:min(last + 1, lk)].all() and not row[(last // bk + 1) * bk:].any()
    stream = A.streaming_mask(1, 1, lq, lk, sinks=1, window=2, block_q=bq, block_k=bk, q_offset=qo)
    table = stream.to_dense()[0, 0][::bq, ::bk]
    for qb, row in enumerate(table):
        first_blk = (qb * bq + qo) // bk
        last_blk = min((min((qb + 1) * bq, lq) - 1 + qo) // bk, -(-lk // bk) - 1)
        want = {0} | set(range(max(first_blk - 2 + 1, 0), last_blk + 1))
        assert set(np.flatnonzero(row)) == want, qb
    assert A.dense_mask(2, 3, lq, lk, bq, bk).to_dense().all()
    assert 0.0 < stream.density(causal=True, q_offset=qo) < 1.0
    assert A.causal_mask(1, 1, lq, lk, bq, bk, qo).density(causal=True) == 1.0  # its own q_offset
    assert A.select_blocks(*make_qkv(np.random.default_rng(0), 1, 2, 1, lq, lk, 64)[:2], q_offset=qo,
                           block_q=bq, block_k=bk).density() <= 1.0
    del vis_rows


def test_plan_builds_each_method(rng):
    q, k, _ = make_qkv(rng, 1, 4, 2, 256, 256, 64)
    assert A.plan(q, k, "dense") is None
    assert isinstance(A.plan(q, k, "causal"), A.BlockMask)
    assert isinstance(A.plan(q, k, "streaming", sinks=1, window=1), A.BlockMask)
    assert isinstance(A.plan(q, k, "select", tau=0.8), A.BlockMask)
    with pytest.raises(ValueError, match="method must be one of"):
        A.plan(q, k, "topk")


def test_selection_with_a_density_budget(rng):
    """select_blocks(density=d): every query block keeps its ceil(d * visible) best-scoring
    blocks, the sink and diagonal blocks among them (so at least those two)."""
    q, k, _ = make_qkv(rng, 1, 4, 2, 1000, 1000, 64)
    nqb = -(-1000 // 64)
    visible = np.arange(nqb) + 1  # causal, Lq = Lk, square blocks
    forced = np.minimum(visible, 2)
    for d in (0.1, 0.3, 0.7):
        mask = A.select_blocks(q, k, density=d)
        kept = np.diff(mask.indptr, axis=-1)[0]
        assert np.array_equal(kept, np.broadcast_to(np.maximum(np.ceil(d * visible), forced), kept.shape)), d
        table = mask.to_dense()[0, :, ::64, ::64]
        assert table[:, :, 0].all() and table[:, np.arange(nqb), np.arange(nqb)].all()
    with pytest.raises(ValueError, match="density must be in"):
        A.select_blocks(q, k, density=0.0)


def needle_problem(rng, n_blocks=32, block=64, d=128, hq=4, hkv=2, needle_q=30, needle_k=5):
    """Queries and keys with a local structure (block b's rows share a latent vector z_b, so
    each query block attends to its own block) and one needle: key block `needle_k` carries
    the latent of query block `needle_q`."""
    length = n_blocks * block
    z = rng.standard_normal((n_blocks, d)) * 1.6
    q = np.repeat(z, block, axis=0)[None, None] + 0.5 * rng.standard_normal((1, hq, length, d))
    zk = z.copy()
    zk[needle_k] = z[needle_q]
    k = np.repeat(zk, block, axis=0)[None, None] + 0.5 * rng.standard_normal((1, hkv, length, d))
    v = rng.standard_normal((1, hkv, length, d))
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


def test_selection_finds_a_planted_needle(rng):
    q, k, v = needle_problem(rng)
    mask = A.select_blocks(q, k, tau=0.9, block_q=64, block_k=64, sinks=1)
    density = mask.density(causal=True)
    assert density <= 0.25, density
    table = mask.to_dense()[0, :, ::64, ::64]
    assert table[:, 30, 5].all()                       # the needle
    assert table[:, 30, 0].all() and table[:, 30, 30].all()  # sink and diagonal, always
    # The sparse result is the dense one where it matters: the needle's query block.
    y = bs.ops.attention(q, k, v, mask=mask)
    ref, _ = A.attention_reference(q, k, v, None, causal=True)
    rows = slice(30 * 64, 31 * 64)
    assert rel_err(y[:, :, rows], ref[:, :, rows]) <= 1e-2


def test_decode_page_selection_keeps_the_needle(rng):
    nkb, block, d = 80, 64, 128
    length = nkb * block - 17  # a partial last block
    k = rng.standard_normal((1, 2, length, d)).astype(np.float32)
    v = rng.standard_normal((1, 2, length, d)).astype(np.float32)
    q = rng.standard_normal((1, 4, 1, d)).astype(np.float32)
    k[:, :, 37 * block + 11] = 3.0 * q[0, ::2, 0][None]  # one key of block 37 matches the query
    # The summary built incrementally (prefill, then decode steps) equals one built at once.
    summary = A.KeyBlockSummary(1, 2, capacity=nkb * block, head_dim=d, block_k=block)
    summary.append(k[:, :, :1000])
    for i in range(1000, length, 777):
        summary.append(k[:, :, i:i + 777])
    whole = A.KeyBlockSummary.from_keys(k, block_k=block)
    assert np.array_equal(summary.kmin[:, :, :nkb], whole.kmin) and summary.length == length
    mask = A.select_pages(q, summary, budget=8, sinks=1)
    kept = mask.to_dense()[0, :, 0, ::block]
    for h in range(2):
        blocks = set(np.flatnonzero(kept[h]))
        assert {0, 37, nkb - 1} <= blocks and len(blocks) <= 8 + 2
    # The score is an upper bound of q . k over each block's keys.
    qg = q.reshape(1, 2, 2, d)
    bound = qg @ summary.center[:, :, :nkb].transpose(0, 1, 3, 2) + np.abs(qg) @ summary.radius[:, :, :nkb]\
        .transpose(0, 1, 3, 2)
    pad = np.full((1, 2, nkb * block - length, d), 0.0, np.float32)
    dots = np.einsum("bhrd,bhkd->bhrk", qg, np.concatenate([k, pad], axis=2)).reshape(1, 2, 2, nkb, block)
    dots[..., -1, block - 17:] = -np.inf
    assert np.all(dots.max(-1) <= bound + 1e-3)
    y = bs.ops.attention(q, k, v, mask=mask, q_offset=length - 1)
    ref, _ = A.attention_reference(q, k, v, mask, causal=True, q_offset=length - 1)
    assert rel_err(y, ref) <= ATTN_TOL["float32"]


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 64, 64, 64)
    att = bs.ops.attention
    with pytest.raises(ValueError, match="heads .3. must be a multiple of k's heads .2."):
        att(q[:, :3], k, v)
    q96, k96, v96 = make_qkv(rng, 1, 2, 2, 8, 8, 96)
    with pytest.raises(ValueError, match="head_dim must be 64 or 128, got 96"):
        att(q96, k96, v96)
    with pytest.raises(TypeError, match="must have q's dtype"):
        att(q, k.astype(np.float16), v)
    with pytest.raises(ValueError, match="must have k's shape"):
        att(q, k, v[:, :, :32])
    with pytest.raises(ValueError, match="must be 4-D"):
        att(q[0], k, v)
    with pytest.raises(ValueError, match="unit stride on head_dim"):
        att(q[..., ::2].repeat(2, axis=-1)[..., ::2], k, v)
    with pytest.raises(ValueError, match="q_offset"):
        att(q, k, v, q_offset=-1)
    with pytest.raises(ValueError, match="out must have q's shape"):
        att(q, k, v, out=np.empty((1, 4, 64, 128), np.float32))
    with pytest.raises(ValueError, match="overlaps an input"):
        att(q, k, v, out=q)
    good = A.causal_mask(1, 2, 64, 64, 32, 32)

    def bad(indptr=None, indices=None, bq=32, bk=32):
        ip = good.indptr.copy() if indptr is None else np.asarray(indptr, np.int32)
        ix = good.indices.copy() if indices is None else np.asarray(indices, np.int32)
        return A.BlockMask(ip, ix, bq, bk, 64, 64)

    ip = good.indptr.copy()
    ip[0, 0, 1], ip[0, 0, 2] = 3, 1
    with pytest.raises(ValueError, match="mask.indptr must be non-decreasing"):
        att(q, k, v, mask=bad(indptr=ip))
    ip = good.indptr.copy()
    ip[0, 1, 2] = 99
    with pytest.raises(ValueError, match="points past the end of indices"):
        att(q, k, v, mask=bad(indptr=ip))
    ip = good.indptr.copy()
    ip[0, 0, 0] = 1
    with pytest.raises(ValueError, match="rows must start at 0"):
        att(q, k, v, mask=bad(indptr=ip))
    ix = good.indices.copy()
    ix[0, 0, 0] = 2
    with pytest.raises(ValueError, match="holds key block 2, outside 0..1"):
        att(q, k, v, mask=bad(indices=ix))
    ix[0, 0, 0] = -1
    with pytest.raises(ValueError, match="holds key block -1"):
        att(q, k, v, mask=bad(indices=ix))
    ix = good.indices.copy()
    ix[0, 0, 1:3] = [1, 0]
    with pytest.raises(ValueError, match="strictly increasing"):
        att(q, k, v, mask=bad(indices=ix))
    with pytest.raises(ValueError, match="must have 3 entries per row"):
        att(q, k, v, mask=bad(indptr=good.indptr[:, :, :2]))
    with pytest.raises(ValueError, match=r"mask.indptr must have shape \(1, 2, n\)"):
        att(q, k, v, mask=A.causal_mask(1, 1, 64, 64, 32, 32))
    with pytest.raises(ValueError, match="block_q must be one of"):
        A.causal_mask(1, 2, 64, 64, 48, 32)
    with pytest.raises(TypeError, match="mask.indptr must be int32"):
        bs._C.attention(q, k, v, good.indptr.astype(np.int64), good.indices, 32, 32, True, float("nan"), 0,
                        np.empty_like(q), None)
    with pytest.raises(ValueError, match="block_k must be 32, 64 or 128"):
        bs._C.attention(q, k, v, None, None, 32, 48, True, float("nan"), 0, np.empty_like(q), None)
    with pytest.raises(TypeError, match="k is a torch"):
        torch = pytest.importorskip("torch")
        att(q, torch.from_numpy(k), v)


def test_q_offsets_per_batch_row(rng):
    """q_offsets (positions in memory, one per batch row) equals one call per row with that
    row's q_offset, masks included; bad offsets are refused."""
    import torch

    from bitswitch import torch as bt

    b, hq, hkv, lq, lk, d = 3, 4, 2, 5, 200, 64
    q, k, v = (torch.from_numpy(a) for a in make_qkv(rng, b, hq, hkv, lq, lk, d))
    offs = torch.tensor([0, 77, 195], dtype=torch.int32)
    for mask in (None, A.BlockMask.from_block_table(rng.random((b, hkv, 1, 4)) < 0.6, 64, 64, lq, lk)):
        out = bt.attention(q, k, v, mask, causal=True, q_offsets=offs)
        for i in range(b):
            sub = None if mask is None else A.BlockMask(mask.indptr[i:i + 1], mask.indices[i:i + 1], 64, 64, lq, lk)
            ref = bt.attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], sub, causal=True, q_offset=int(offs[i]))
            assert torch.equal(out[i:i + 1], ref)
    with pytest.raises(ValueError, match="q_offsets must be a contiguous int32 array of shape"):
        bt.attention(q, k, v, None, q_offsets=offs[:2])
    with pytest.raises(ValueError, match="q_offsets must be >= 0"):
        bt.attention(q, k, v, None, q_offsets=torch.tensor([0, -1, 3], dtype=torch.int32))
