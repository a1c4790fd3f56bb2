"""Qwen3 (and Qwen2) on the bitswitch kernels, op for op as transformers computes it.

Per layer: h = x + o_proj(attention(rope(q_norm(q_proj(rms(x)))), rope(k_norm(k_proj(rms(x)))),
v_proj(rms(x)))), out = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h))). Every
projection and the lm_head is a QLinear, so each layer's precision is chosen per call;
attention is bitswitch's block-sparse flash attention over a static, preallocated KV cache
(the cache stores K after the norm and RoPE). Qwen2 (Qwen2.5, QwQ) is the same module with
q/k/v biases and without the q/k norms.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import nn

from .. import _C
from .. import attention as attn
from .. import ops
from .. import torch as bt
from ..torch import FULL, QLinear
from .. import precision as P
from ..precision import SPARSE_DEFAULTS
from .config import Qwen3Config, rope_inv_freq

__all__ = ["KVCache", "QEmbedding", "Qwen3", "Qwen3Config"]

_NAN = float("nan")  # attention's "scale = head_dim ** -0.5"


def _pages_on_device(q: torch.Tensor) -> bool:
    """Whether a sparse decode step selects its pages with select_pages_at where the cache
    lives (DecodePages: CPU and CUDA, nothing read back to the host) rather than with
    KeyBlockSummary + select_pages on the host (MPS, which has no kernel for the op)."""
    return q.device.type != "mps"


def _hook_dicts(model: nn.Module) -> list:
    """The forward (pre-)hook dicts of every module under the model (not its own) and torch's
    global ones: hooks only the layer-by-layer path runs. Registering a hook adds to one of
    these dicts, so `any(dicts)` (a C loop, ~5 us for a 28-layer model) tells whether some
    module has one now."""
    from torch.nn.modules import module as M

    dicts = [M._global_forward_hooks, M._global_forward_pre_hooks]
    for m in list(model.modules())[1:]:
        dicts += [m._forward_hooks, m._forward_pre_hooks]
    return dicts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RMSNorm(x); with delta, the residual add x += delta (in place) comes first."""
        return bt.rms_norm(x, self.weight, self.eps, delta)


# Projections that share their input, fused into one QLinear (see Fused).
FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def fuse_layer(linears: dict, layer: int) -> None:
    """Fuses the weights of one layer's q|k|v and gate|up into one copy each (QLinear.fuse),
    in place in `linears` (checkpoint paths -> QLinear). Loaders call it as soon as a
    layer is read: the freed per-projection tensors are then reused by the next layer's,
    where fusing every layer at the end measured +88 MiB of fragmented heap on the 0.6B
    model. The model's own fusing then finds adjacent views and copies nothing."""
    for block, names in FUSED_GROUPS:
        parts = [linears[f"model.layers.{layer}.{block}.{n}"] for n in names]
        try:
            QLinear.fuse(parts)
        except ValueError:
            pass  # quantized differently (an MLX mixed recipe): they stay separate


class Fused:
    """Projections that share their input (q|k|v, gate|up) computed by one QLinear over one
    copy of their weights (QLinear.fuse), whenever they all read the same view; the parts
    stay the modules that precision policies address."""

    def __init__(self, parts: list):
        self.parts = parts
        try:
            self.qlinear = QLinear.fuse(parts)
        except ValueError:  # e.g. an MLX checkpoint quantizing them differently: separate calls
            self.qlinear = None

    def apply(self, fn) -> None:
        """nn.Module._apply for the fused copy, which no module registers: fn (a .to(), .half(),
        ...) converts the fused weight once and the parts become row views of it again, so
        the owner's own _apply then finds them converted (one copy on the new device, not a
        fused copy left behind plus one per part)."""
        if self.qlinear is not None:
            self.qlinear._apply(fn)
            self.qlinear.view_parts(self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        first, fused = self.parts[0], self.qlinear
        bits, act = first.bits, first.act_bits
        if fused is not None and all(p.bits == bits and p.act_bits == act for p in self.parts[1:]):
            if fused.bits != bits:
                fused.bits = bits
            if fused.act_bits != act:
                fused.act_bits = act
            return fused.forward(x)  # QLinear.forward: no hooks to run (nn.Module.__call__ costs ~1 us)
        return torch.cat([p(x) for p in self.parts], -1)


def _unpack_codes(words: torch.Tensor) -> torch.Tensor:
    """uint32 [..., K/8] -> int codes [..., K] (element k in bits 4 (k mod 8) of word k/8)."""
    w = words.view(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.device)
    return ((w.unsqueeze(-1) >> shifts) & 15).flatten(-2)


class QEmbedding(nn.Module):
    """Token embedding over the nibble planes of a [vocab, hidden] weight: the looked-up rows
    are dequantized in the chosen view (or read from the kept float table). With tied
    embeddings the lm_head QLinear shares these very tensors."""

    def __init__(self, lin: QLinear, dtype: torch.dtype):
        super().__init__()
        self.lin = lin  # the planes (and float table) live in one QLinear
        self.dtype = dtype
        self.bits = lin.bits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lin = self.lin
        if self.bits == FULL:
            return lin.weight_full[ids].to(self.dtype)
        g = lin.group_size
        s = lin.scales[ids].float().repeat_interleave(g, dim=-1)
        b = lin.biases[ids].float().repeat_interleave(g, dim=-1)
        w = s * _unpack_codes(lin.plane0[ids]).float() + b
        if self.bits == 8:
            w = w + (s / 16) * (_unpack_codes(lin.plane1[ids]).float() - 7.5)
        return w.to(self.dtype)


class KVCache:
    """Static cache: K (after norm and RoPE) and V per layer, [B, Hkv, capacity, D], plus the
    per-block key summaries decode page selection reads, built for a layer when it first
    attends sparsely and kept up to date while it does."""

    def __init__(self, cfg: Qwen3Config, batch: int, capacity: int, dtype: torch.dtype,
                 device: Optional[torch.device] = None):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0
        # Per-layer views [B, Hkv, capacity, D], so a step indexes no layer dimension.
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)
        self.summaries: list = [None] * cfg.num_hidden_layers
        # Per layer, the same summaries as tensors on the cache's device (bitswitch.torch.
        # DecodePages): what decode selects pages from off the CPU and in forward_at.
        self.pages: list = [None] * cfg.num_hidden_layers

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def summary(self, layer: int, length: int) -> "attn.KeyBlockSummary":
        """The key summary of a layer covering positions [0, length): rebuilt from the cached
        keys when the layer has none or it is stale (the layer attended densely meanwhile)."""
        s = self.summaries[layer]
        if s is None or s.length != length:
            k = self.k_layers[layer]
            s = attn.KeyBlockSummary(k.shape[0], k.shape[1], self.capacity, k.shape[3])
            if length:
                s.append(k.narrow(2, 0, length))
            self.summaries[layer] = s
        return s

    def decode_pages(self, layer: int, length: int) -> "bt.DecodePages":
        """The layer's device-side key summaries covering positions [0, length) (or [0, length]:
        the step at `length` ran and runs again, folding the same key): rebuilt from the
        cached keys when the layer has none or they are stale."""
        p = self.pages[layer]
        if p is None:
            p = self.pages[layer] = bt.DecodePages(self.k_layers[layer], attn.KeyBlockSummary.DEFAULT_BLOCK_K)
        if not length <= p.length <= length + 1:
            p.rebuild(self.k_layers[layer], length)
        return p

    def drop_summaries(self) -> None:
        """Forgets every layer's key summaries (the cached keys they describe changed). The
        device-side ones keep their tensors, marked stale: a captured CUDA graph holds their
        addresses, and the next step rebuilds them in place."""
        self.summaries = [None] * len(self.summaries)
        for p in self.pages:
            if p is not None:
                p.invalidate()


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int, projs: dict, dtype: torch.dtype):
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (projs[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.qkv = Fused([getattr(self, n) for n in FUSED_GROUPS[0][1]])
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        # None: dense; a dict for block-sparse attention: {"prefill": plan options, "pages": n}
        self.sparse: Optional[dict] = None

    def _apply(self, fn, recurse=True):
        if recurse:
            self.qkv.apply(fn)
        return super()._apply(fn, recurse)

    def decode_pages_kept(self) -> int:
        """Key blocks a sparse decode step reads: the page budget, at least the first block
        and the newest one (select_pages keeps those two always)."""
        return max(int(self.sparse.get("pages", SPARSE_DEFAULTS["pages"])), 2)

    def forward(self, x: torch.Tensor, rope: tuple, cache: KVCache, ctx: dict) -> torch.Tensor:
        # x: [B, n, hidden]; rope: (cos, signed sin) [positions, D] tables (see Qwen3._rope_tables)
        b, n, _ = x.shape
        pos = cache.length
        kc, vc = cache.k_layers[self.layer], cache.v_layers[self.layer]  # [B, Hkv, capacity, D]
        qn, kn = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
        eps = self.q_norm.eps if self.q_norm is not None else 0.0
        positions = ctx.get("positions")
        if positions is not None:
            # Position in memory (forward_at): the whole cache with causality hiding the rows
            # past the position, so the step's shapes do not depend on it. A sparse layer picks
            # its pages on the device (its summaries cover the cache up to the position).
            q = bt.rope_qkv_at(self.qkv(x), self.hq, qn, kn, eps, rope[0], rope[1], positions, kc, vc)
            mask = None
            if self.sparse is not None:
                mask = cache.pages[self.layer].select(q, kc, positions, self.decode_pages_kept())
            o = bt.attention(q, kc, vc, mask, causal=True, q_offsets=positions).transpose(1, 2)
            return self.o_proj(o.reshape(b, n, self.hq * self.d))
        # q after norm and RoPE [B, Hq, n, D]; k (after norm and RoPE) and v land in the cache
        q = bt.rope_qkv(self.qkv(x), self.hq, qn, kn, eps, rope[0], rope[1], pos, kc, vc)
        end = pos + n
        mask = None
        if self.sparse is not None and n == 1 and _pages_on_device(q):
            # Decode: pages chosen where the cache lives (nothing read back to the host).
            kept = self.decode_pages_kept()
            if pos // attn.KeyBlockSummary.DEFAULT_BLOCK_K + 1 > kept:
                pages = cache.decode_pages(self.layer, pos)
                where = ctx.get("where")  # the position as a tensor, made once per forward
                if where is None:
                    where = ctx["where"] = torch.full((b,), pos, dtype=torch.int32, device=q.device)
                mask = pages.select(q, kc, where, kept)
                pages.covered(pos + 1)
        kc, vc = kc.narrow(2, 0, end), vc.narrow(2, 0, end)
        if self.sparse is not None and mask is None and (n > 1 or not _pages_on_device(q)):
            if not _pages_on_device(q):  # host-side summaries: only the MPS decode reads them
                cache.summary(self.layer, pos).append(kc.narrow(2, pos, n))
            mask = ctx["plan"](self, q, kc, cache, pos)
        if torch.compiler.is_compiling() or not q.is_cpu:  # traced, or on a GPU (MPS): the op
            o = bt.attention(q, kc, vc, mask, causal=True, q_offset=pos).transpose(1, 2)
        else:
            # Eager: the kernel itself (no dispatcher, no log-sum-exp output), writing its
            # output as [B, n, Hq, D] so that o_proj reads it without a copy.
            o = q.new_empty((b, n, self.hq, self.d))
            if mask is None:
                ip, ix, bq, bk = (None, None) + ops._DENSE_TILE
            elif isinstance(mask, tuple):  # DecodePages.select
                ip, ix, bq, bk = mask
            else:
                ip, ix, bq, bk = mask.indptr, mask.indices, mask.block_q, mask.block_k
            _C.attention(q, kc, vc, ip, ix, bq, bk, True, _NAN, pos, o.transpose(1, 2), None)
        return self.o_proj(o.reshape(b, n, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, projs: dict):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = projs["gate_proj"], projs["up_proj"], projs["down_proj"]
        self.gate_up = Fused([getattr(self, n) for n in FUSED_GROUPS[1][1]])

    def _apply(self, fn, recurse=True):
        if recurse:
            self.gate_up.apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(bt.silu_mul(self.gate_up(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int, projs: dict, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, layer, projs, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(projs)

    def forward(self, h: torch.Tensor, delta: Optional[torch.Tensor], rope: tuple, cache: KVCache,
                ctx: dict) -> torch.Tensor:
        """h: the residual stream [B, n, hidden], updated in place with the previous
        layer's output `delta` and this layer's attention; returns this layer's MLP output
        (the next delta). Each residual add is fused into the norm that follows it."""
        a = self.self_attn(self.input_layernorm(h, delta), rope, cache, ctx)
        return self.mlp(self.post_attention_layernorm(h, a))


class Qwen3(nn.Module):
    """The model. Build it with bitswitch.load (or Qwen3.from_weights); then

        logits = model(ids)            # prefill: appends to the cache, [B, n, vocab]
        logits = model(next_ids)       # decode step(s) continue from the cache
        model.reset()                  # empty the cache

    `linears` maps every projection path (e.g. "model.layers.0.self_attn.q_proj",
    "lm_head") to its QLinear; the embedding reads the planes of "model.embed_tokens".
    """

    def __init__(self, cfg: Qwen3Config, linears: dict, norms: dict, dtype: torch.dtype = torch.float32,
                 biases: Optional[dict] = None):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = QEmbedding(linears["model.embed_tokens"], dtype)
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            projs = {n: linears[p + ("self_attn." if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") + n]
                     for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
            layers.append(DecoderLayer(cfg, i, projs, dtype))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = linears["lm_head"]
        inv_freq, self.attention_scaling = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        with torch.no_grad():
            for name, t in norms.items():
                self.get_parameter(name).copy_(t)
        self.cache: Optional[KVCache] = None
        self._rope: Optional[tuple] = None  # (cos, signed sin) [positions, D], see _rope_tables
        self.prefill_plan: dict = {"method": "select", "tau": SPARSE_DEFAULTS["tau"]}
        # Precision switching (set_precision): a switch asked for during a forward waits in
        # _pending until that forward ends. forward_precision is the assignment the last
        # forward ran under (the last one set_precision applied; None before the first).
        self._projections: Optional[dict] = None
        self._switch_lock = threading.Lock()
        self._pending: Optional[P.Assignment] = None
        self._in_forward = False
        self._applied: Optional[P.Assignment] = None
        self.forward_precision: Optional[P.Assignment] = None
        # A bitswitch.models.cuda_graph.GraphDecoder that generation uses for decode steps
        # (set by the CLI with --device cuda); None: every step is an eager forward.
        self.graph_decoder = None
        # Eager decode steps on the CPU run as one native call (_C.DecodeStep, the same kernels
        # and results as the layer-by-layer path); False: always the Python path.
        self.native_decode = True
        self._native: Optional[tuple] = None  # (key, the objects it names, _C.DecodeStep or None)

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (.to(), .half(), ...): the fused weights follow (Fused.apply); a new
        dtype becomes the model's (activations, KV cache); the cache and RoPE tables are made
        again on the next forward, and the native decode step, which holds the old arrays, is
        rebuilt."""
        out = super()._apply(fn, recurse)
        self._native = None
        self._rope = None
        dtype = self.norm.weight.dtype
        if dtype != self.dtype:
            self.dtype = self.embed_tokens.dtype = dtype
            self.cache = None
        return out

    # -- cache ------------------------------------------------------------------------------
    def reset(self, batch: int = 1, capacity: Optional[int] = None) -> None:
        """Empties the cache; reallocates it only when the batch or capacity changes."""
        cap = capacity or (self.cache.capacity if self.cache else min(self.config.max_position_embeddings, 4096))
        c = self.cache
        device = self.inv_freq.device  # the model's device (it follows .to())
        if c is None or c.k.shape[1] != batch or c.capacity != cap or c.k.device != device:
            self.cache = KVCache(self.config, batch, cap, self.dtype, device)
        else:
            c.length = 0
            c.drop_summaries()

    def truncate(self, length: int) -> None:
        """Keeps the first `length` cached positions and drops the rest (a chat turn that
        shares a prefix with the cache prefills only what follows it). Sparse layers' key
        summaries are rebuilt from the kept keys, so page selection never sees dropped keys."""
        cached = self.cache.length if self.cache is not None else 0
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= cached:
            raise ValueError(f"Qwen3.truncate: length must be an integer in [0, {cached}] (the cached length), "
                             f"got {length!r}")
        if self.cache is None:
            return
        self.cache.length = length
        self.cache.drop_summaries()

    def _rope_tables(self, length: int) -> tuple:
        """cos and signed sin (see torch.rope_reference) [positions, D] for at least `length`
        positions: computed once for the cache's capacity in float32 and rounded to the
        model's dtype, the values transformers computes per call."""
        device = self.inv_freq.device
        if self._rope is None or self._rope[0].shape[0] < length or self._rope[0].device != device:
            t = torch.arange(max(length, self.cache.capacity), dtype=torch.float32, device=device)
            freqs = t[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = (emb.cos() * self.attention_scaling).to(self.dtype)
            sin = (emb.sin() * self.attention_scaling).to(self.dtype)
            sin[:, : emb.shape[1] // 2].neg_()
            self._rope = (cos, sin)
        return self._rope

    def _prefill_options(self, sparse: dict) -> dict:
        """attention.plan options of a sparse layer's prefill: its own "prefill" dict, else a
        runtime selection with its tau or density, else the model's prefill_plan."""
        if "prefill" in sparse:
            return dict(sparse["prefill"])
        for k in ("density", "tau"):
            if k in sparse:
                return {"method": "select", k: sparse[k]}
        return dict(self.prefill_plan)

    def _plan(self):
        """Masks of one forward: built once, reused by every sparse layer (prefill: from the
        first sparse layer's q and k; decode: pages from each layer's own key summaries)."""
        built = {}

        def plan(layer: Attention, q, kc, cache: KVCache, pos: int):
            if q.shape[2] > 1:  # prefill / chunk: one mask per distinct selection setting
                opts = self._prefill_options(layer.sparse)
                key = repr(sorted(opts.items()))
                if key not in built:
                    method = opts.pop("method", "select")
                    built[key] = attn.plan(q, kc, method, q_offset=pos, **opts)
                return built[key]
            kept = layer.decode_pages_kept()
            summary = cache.summaries[layer.layer]
            if -(-summary.length // summary.block_k) <= kept:
                return None  # the budget covers the cache: dense
            return attn.select_pages(q, summary, budget=kept)

        return plan

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, n, vocab] of the new tokens, or of the last `logits_to_keep` of them
        (a prefill that samples only the next token passes 1: no lm_head on the rest)."""
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"Qwen3: logits_to_keep must be an integer >= 0 (0: all), got {logits_to_keep!r}")
        if ids.dim() == 1:
            ids = ids[None]
        b, n = ids.shape
        ids = ids.to(self.inv_freq.device)
        if self.cache is None or self.cache.k.shape[1] != b or self.cache.k.device != ids.device:
            self.reset(b)
        cache = self.cache
        if cache.length + n > cache.capacity:
            raise ValueError(f"Qwen3: {cache.length} cached + {n} new tokens exceed the cache capacity "
                             f"{cache.capacity}; call reset(capacity=...)")
        self._forward_begin()
        try:
            rope = self._rope_tables(cache.length + n)
            if (n == 1 and self.native_decode and ids.is_cpu and _pages_on_device(ids)
                    and not torch.compiler.is_compiling()):
                step = self._native_step()
                if step is not None:
                    return self._native_forward(step, ids)
            ctx = {"plan": self._plan()}
            h = self.embed_tokens(ids)  # the residual stream [B, n, hidden], updated in place
            delta = None
            for layer in self.layers:
                delta = layer(h, delta, rope, cache, ctx)
            cache.length += n
            if 0 < logits_to_keep < n:
                h, delta = (t[:, n - logits_to_keep:].contiguous() for t in (h, delta))
            return self.lm_head(self.norm(h, delta))
        finally:
            self._forward_end()

    def _native_step(self):
        """The _C.DecodeStep of this model's current arrays and settings (built, or rebuilt when
        the precision, the cache or the RoPE tables changed), or None when a decode step must
        take the layer-by-layer path: some projection reads its float weight or has a forward
        of its own, or a module under the model has hooks."""
        if any(self._native[1][-1] if self._native is not None else _hook_dicts(self)):
            return None
        key = (id(self.cache), id(self._rope[0]), QLinear.settings_version, self.embed_tokens.bits)
        if self._native is None or self._native[0] != key:
            # A setting decoded before (a controller going back and forth) reuses its step: a
            # build converts ~30 arrays per layer (~2 ms at 28 layers).
            old = self._native
            steps = old[1][-2] if old is not None and old[1][0] is self.cache and old[1][1] is self._rope else {}
            settings = (self.embed_tokens.bits,) + tuple((q.bits, q.act_bits) for q in self._setting_modules())
            if settings not in steps:
                if len(steps) >= 4:
                    steps.pop(next(iter(steps)))
                steps[settings] = self._build_native_step()
            # The cache and tables are held, so the ids in the key cannot be reused.
            self._native = (key, (self.cache, self._rope, steps, _hook_dicts(self)), steps[settings])
        return self._native[2]

    def _setting_modules(self) -> list:
        """Every QLinear whose bits / act_bits a native decode step bakes in."""
        mods = [self.lm_head]
        for layer in self.layers:
            at, mlp = layer.self_attn, layer.mlp
            mods += at.qkv.parts + [at.o_proj] + mlp.gate_up.parts + [mlp.down_proj]
        return mods

    def _build_native_step(self):
        cfg, layers = self.config, []

        def linear(q: QLinear, bits=None, act_bits=None):
            bits = q.bits if bits is None else bits
            return (q.plane0, q.plane1, q.scales, q.biases, q.group_size, bits,
                    q.act_bits if act_bits is None else act_bits, q.bias)

        def fused(f: Fused):
            """The fused weight when the parts read one view (as Fused.__call__), else the parts."""
            bits, act = f.parts[0].bits, f.parts[0].act_bits
            if f.qlinear is None or any(p.bits != bits or p.act_bits != act for p in f.parts[1:]):
                return [linear(p) for p in f.parts]
            return linear(f.qlinear, bits, act)

        mods = self._setting_modules()
        if FULL in [q.bits for q in mods] + [self.embed_tokens.bits]:
            return None
        if any(type(q).forward is not QLinear.forward for q in mods):
            return None  # a projection with a forward of its own (tensor parallelism's all-reduce)
        lin = self.embed_tokens.lin
        embed = (lin.plane0, lin.plane1, lin.scales, lin.biases, lin.group_size, self.embed_tokens.bits, 16, None)
        for i, layer in enumerate(self.layers):
            at, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = fused(at.qkv), fused(mlp.gate_up)
            qn, kn = (at.q_norm.weight, at.k_norm.weight) if at.q_norm is not None else (None, None)
            layers.append((qkv, linear(at.o_proj), gate_up, linear(mlp.down_proj), layer.input_layernorm.weight,
                           layer.post_attention_layernorm.weight, qn, kn, self.cache.k_layers[i],
                           self.cache.v_layers[i]))
        at = self.layers[0].self_attn  # heads and sizes as the modules hold them (a shard holds fewer)
        dims = (self.cache.k.shape[1], cfg.hidden_size, at.hq, at.hkv, at.d, self.layers[0].mlp.down_proj.in_features,
                self.lm_head.out_features)
        return _C.DecodeStep(dims, self.norm.eps, embed, linear(self.lm_head), self.norm.weight,
                             self._rope[0], self._rope[1], layers)

    def _native_forward(self, step, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, vocab] of a decode step run by `step`: the layers that attend
        sparsely past their page budget select pages from their DecodePages summaries, as
        Attention.forward does."""
        cache = self.cache
        pos, b = cache.length, ids.shape[0]
        pages, used = [], []
        for i, layer in enumerate(self.layers):
            at = layer.self_attn
            if at.sparse is None:
                continue
            kept = at.decode_pages_kept()
            if pos // attn.KeyBlockSummary.DEFAULT_BLOCK_K + 1 > kept:
                p = cache.decode_pages(i, pos)
                pages.append((i, p.kmin, p.kmax, max(1, min(kept, p.nkb)), p.block_k))
                used.append(p)
        logits = torch.empty((b, 1, self.lm_head.out_features), dtype=self.dtype)
        step.run(ids.reshape(-1).tolist(), pos, pages, logits)
        for p in used:
            p.covered(pos + 1)
        cache.length += 1
        return logits

    @torch.no_grad()
    def forward_at(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, vocab] of ids [B, 1] at the cache position held in `positions` (int32
        [B], every row equal to cache.length, on the model's device), with nothing read back
        to the host: attention covers the whole cache with causality hiding the rows past the
        position, and sparse layers select their pages on the device (bitswitch.torch.
        select_pages_at), so this is the step bitswitch.models.cuda_graph captures once and
        replays at every position. It computes what forward(ids) computes, to float
        summation order. The caller advances cache.length (then mark_decoded()) and keeps the
        precision fixed while it runs."""
        self.prepare_decode()
        rope = self._rope_tables(self.cache.capacity)
        ctx = {"positions": positions}
        h = self.embed_tokens(ids)
        delta = None
        for layer in self.layers:
            delta = layer(h, delta, rope, self.cache, ctx)
        return self.lm_head(self.norm(h, delta))

    def sparse_layers(self) -> list:
        """Indices of the layers whose attention is block-sparse now."""
        return [i for i, layer in enumerate(self.layers) if layer.self_attn.sparse is not None]

    def prepare_decode(self) -> None:
        """Brings the device-side key summaries of every sparse layer up to cache.length
        (rebuilding stale ones), as forward_at needs; outside any CUDA graph capture."""
        for i in self.sparse_layers():
            self.cache.decode_pages(i, self.cache.length)

    def mark_decoded(self) -> None:
        """Records that a forward_at step folded the key at cache.length - 1 into every
        sparse layer's summaries (after the caller advanced cache.length)."""
        for i in self.sparse_layers():
            p = self.cache.pages[i]
            if p is not None and p.length == self.cache.length - 1:
                p.covered(self.cache.length)

    def decode_is_dense(self) -> bool:
        """Whether the next decode step attends densely in every layer (no layer selects pages:
        none is sparse, or the cache fits each sparse layer's page budget)."""
        nkb = -(-(self.cache.length + 1) // attn.KeyBlockSummary.DEFAULT_BLOCK_K) if self.cache else 0
        return all(nkb <= self.layers[i].self_attn.decode_pages_kept() for i in self.sparse_layers())

    # -- precision ---------------------------------------------------------------------------
    def linears(self) -> dict:
        return {name: m for name, m in self.named_modules() if isinstance(m, QLinear)}

    def projection_modules(self) -> dict:
        """Every switchable weight by the path a checkpoint names it ("model.layers.0.mlp.up_proj",
        ..., "lm_head", "model.embed_tokens"): the addresses of precision policies."""
        if self._projections is None:
            out = {}
            for path in P.projection_paths(len(self.layers)):
                if path == P.EMBED:
                    out[path] = self.embed_tokens.lin
                elif path == P.LM_HEAD:
                    out[path] = self.lm_head
                else:
                    out[path] = self.get_submodule(path[len("model."):])
            self._projections = out
        return self._projections

    def set_precision(self, policy) -> "P.PrecisionReport":
        """Switches the precision of every layer (see bitswitch.precision for the policy forms:
        a mode, a mapping of module globs / layer indices to settings, a plan file).

        The next forward reads the new views: nothing is reloaded, allocated or re-quantized.
        The policy is checked here, so an unavailable view raises ValueError (naming the
        layers) before anything changes. Called while another thread runs a forward, the
        switch waits for that forward (one token, or one prefill chunk) to finish, so every
        token is computed under one policy; this call does not block. Returns the report of
        the new setting."""
        with self._switch_lock:
            base = self._pending or P.current(self)
        a = P.resolve(self, policy, base=base)
        with self._switch_lock:
            if self._in_forward:
                self._pending = a
            else:
                self._apply_assignment(a)
        return P.report(self, a)

    def precision(self) -> "P.PrecisionReport":
        """The effective setting of every layer and the weight bytes a decode token reads
        (print it for a table)."""
        with self._switch_lock:
            return P.report(self, pending=self._pending is not None)

    def set_bits(self, bits) -> None:
        """Every projection, the lm_head and the embedding read `bits` (4, 8 or "full") from
        the next call on: set_precision({"*": {"bits": bits}}). Raises ValueError, changing
        nothing, if some layer does not hold that view."""
        if isinstance(bits, bool) or bits not in (4, 8, FULL):
            raise ValueError(f"Qwen3.set_bits: bits must be 4, 8 or {FULL!r}, got {bits!r}")
        self.set_precision({"*": {"bits": bits}})

    def set_act_bits(self, act_bits: int) -> None:
        """Every QLinear (the projections, the lm_head and the embedding's) quantizes its input
        per group to `act_bits` from the next call on: 16 (the default: 15-bit, float-grade)
        or 8 (int8, ~0.5% error per layer; prefill runs ~1.3x faster on AVX-512 VNNI CPUs,
        bench/RESULTS.md). Independent of set_precision, which leaves it as it is."""
        bt.check_act_bits(act_bits, "Qwen3.set_act_bits")
        for m in self.linears().values():
            m.act_bits = act_bits

    def weight_bytes(self, bits=None) -> int:
        """Bytes of weights one decode token reads in the current setting (or with every
        weight at `bits`): every projection and the lm_head. An untied embedding table is not
        counted (a token reads one row of it); a tied one is, as the lm_head."""
        if bits is None:
            return P.report(self).bytes_per_token
        return P.report(self, P.resolve(self, {"*": {"bits": bits}})).bytes_per_token

    def _apply_assignment(self, a: "P.Assignment") -> None:  # with _switch_lock held
        P.apply(self, a)
        self._applied = a
        self._pending = None

    def _forward_begin(self) -> None:
        with self._switch_lock:
            if self._pending is not None:
                self._apply_assignment(self._pending)
            self._in_forward = True
            self.forward_precision = self._applied

    def _forward_end(self) -> None:
        with self._switch_lock:
            self._in_forward = False
            if self._pending is not None:
                self._apply_assignment(self._pending)


def build_linear(w: torch.Tensor, bias: Optional[torch.Tensor], group_size: int, keep_float: bool,
                 dtype: torch.dtype, scales_dtype: Optional[str] = None) -> QLinear:
    """A float weight quantized to INT8 nested planes (both views), optionally kept as is."""
    from ..quant import quantize

    qw = quantize(w, group_size=group_size, bits=8, scales_dtype=scales_dtype)
    return QLinear(qw, bias, bits=8, weight=w.to(dtype) if keep_float else None)
