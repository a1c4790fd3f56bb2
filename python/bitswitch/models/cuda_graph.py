"""Qwen3 decode captured in CUDA graphs: one launch per token instead of ~15 per layer.

    from bitswitch.models.cuda_graph import GraphDecoder
    dec = GraphDecoder(model)          # model on a CUDA device, cache allocated (model.reset)
    logits = dec.step(next_ids)        # [B, 1] -> [B, 1, vocab]; advances the cache

Set ``model.graph_decoder = GraphDecoder(model)`` and bitswitch.models.generate / stream /
ChatSession use it for every decode step (``bitswitch generate --device cuda`` does).

A step is Qwen3.forward_at: the position comes from a device tensor, attention covers the
whole cache with causality hiding the rows past the position, and block-sparse layers pick
their pages on the device (bitswitch.torch.select_pages_at over per-block key summaries the
step itself keeps current), so one capture serves every position, dense or sparse. A graph
bakes in which planes each projection reads and how many pages each sparse layer keeps, so
there is one graph per precision setting, captured the first time that setting decodes
(set_precision between tokens still takes effect at the next step). Every step computes
what model(ids) computes, to float summation order (whole-cache attention splits its keys
differently, and a page whose bound ties another's within rounding may be swapped).
"""

from __future__ import annotations

import torch

from .qwen3 import Qwen3


class GraphDecoder:
    def __init__(self, model: Qwen3, batch: int = 1):
        device = model.inv_freq.device
        self._check_device(device)
        if model.cache is None or model.cache.k.shape[1] != batch or model.cache.k.device != device:
            model.reset(batch)
        self.model = model
        self.batch = batch
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((batch,), dtype=torch.int32, device=device)
        self.graphs: dict = {}  # what a capture bakes in -> (replay, logits it writes)
        self.cache = model.cache  # the cache (and RoPE tables) the graphs were captured on
        self.linears = list(model.linears().values())
        self.pool = None  # one memory pool shared by every graph of this decoder
        self.captures = 0

    def _check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"GraphDecoder: the model must be on a CUDA device (model.to('cuda')), it is on {device}")

    def _capture_step(self, step):
        """Captures step() (which returns the logits tensor) in a CUDA graph: (replay, logits)."""
        stream = torch.cuda.Stream(device=self.ids.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Warm-up outside the capture: lazily built tables (RoPE), workspace sizes and the
            # kernels' first-launch set-up must not happen inside it. It writes the cache row at
            # the current position (and folds its key into sparse layers' summaries), which the
            # real step repeats with the same values.
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, logits

    def _key(self) -> tuple:
        """What a capture bakes in: the view (planes) each projection reads and the pages each
        sparse layer keeps."""
        return (tuple((lin.bits, lin.act_bits) for lin in self.linears),
                tuple(layer.self_attn.decode_pages_kept() if layer.self_attn.sparse is not None else 0
                      for layer in self.model.layers))

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, vocab] of the next token ids [B, 1] (or [B]); the cache advances by one.
        The returned tensor is overwritten by the next step: copy it to keep it."""
        m = self.model
        if ids.numel() != self.batch or ids.dim() > 2:
            raise ValueError(f"GraphDecoder.step: ids must be [{self.batch}, 1] or [{self.batch}] (this decoder was "
                             f"made for batch {self.batch}), got shape {tuple(ids.shape)}")
        ids = ids.reshape(self.batch, 1)
        if m.cache.length + 1 > m.cache.capacity:
            raise ValueError(f"GraphDecoder: the cache is full ({m.cache.capacity} positions); call "
                             f"model.reset(capacity=...)")
        if m.cache is not self.cache:  # reset() reallocated it: the graphs point at the old one
            self.graphs.clear()
            self.cache = m.cache
            if m.cache.k.shape[1] != self.batch:
                raise ValueError(f"GraphDecoder: the model's cache now holds batch {m.cache.k.shape[1]}, this "
                                 f"decoder was made for batch {self.batch}")
        m._forward_begin()
        try:
            key = self._key()
            entry = self.graphs.get(key)
            self.ids.copy_(ids, non_blocking=True)
            self.positions.fill_(m.cache.length)
            m.prepare_decode()  # sparse layers' summaries current (rebuilt outside the graph)
            if entry is None:
                entry = self.graphs[key] = self._capture_step(lambda: m.forward_at(self.ids, self.positions))
                self.captures += 1
            entry[0]()
            m.cache.length += 1
            m.mark_decoded()
            return entry[1]
        finally:
            m._forward_end()
