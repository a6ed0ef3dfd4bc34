"""Hugging Face transformers causal LMs with their KV cache held and compressed by the sidecar.

    import torch, transformers
    from reasonalloc import Client
    from reasonalloc.transformers import ReasonAllocCache, generate, prepare

    model = prepare(transformers.AutoModelForCausalLM.from_pretrained(..., dtype=torch.float32))
    with Client(target) as client, ReasonAllocCache(client, model.config, budget=64,
                                                    scorer="rkv", allocator="reasonalloc",
                                                    mode="full") as cache:
        out = generate(model, input_ids, cache, attention_mask=mask, max_new_tokens=256)
        print(cache.peak_kv_bytes, cache.events)

Each sequence of the batch is one managed sidecar session over host shared memory: its keys and
values live in the session's arena, one region per (layer, KV head), and the sidecar compacts the
kept rows in place at each compression event. Heads keep their own lengths (head-wise budgets
really free rows: there is no full-size cache and no eviction mask), keys are stored after RoPE
with their original positions (never re-rotated), and each step's post-RoPE queries go into the
session's query ring for the scorer. A sequence compresses (Compress at the step before) when any
of its heads' regions is full, exactly as the reference worker does; the events of a batch's
sequences at one step travel in one CompressStream message.

`prepare(model)` checks the model (Llama, Mistral, Qwen2 families; full attention in every layer;
fp32, fp16 or bf16 on the CPU) and switches it to this module's attention function, which reads
each head's live rows from the arena. `generate()` feeds the prompt through the budget (chunks
that never overflow a head's region, compressing between them, as a decoder that feeds one token at
a time would) and then calls `model.generate`; `model.generate(..., past_key_values=cache)` alone
works when the prompt fits in budget + Δ rows.

Needs torch and transformers (the versions this module is tested with: torch 2.10, transformers
5.2); install them with `pip install "reasonalloc[transformers]"`.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

try:
    import torch
    import transformers
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - exercised by the installed-wheel test
    raise ImportError("reasonalloc.transformers needs torch and transformers "
                      "(pip install \"reasonalloc[transformers]\"): " + str(e)) from e

from reasonalloc._common import SidecarError

__all__ = ["ReasonAllocCache", "SidecarPress", "prepare", "prefill", "generate", "check_config",
           "ATTENTION_IMPLEMENTATION", "SUPPORTED_MODEL_TYPES"]

ATTENTION_IMPLEMENTATION = "reasonalloc"
# Decoder-only families whose attention is plain causal self-attention with RoPE applied to the
# keys before the cache (so the cache holds post-RoPE keys at their original positions).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_current = threading.local()  # the cache whose update() ran last on this thread


def check_config(config: Any) -> Tuple[int, int, int, int]:
    """Raises ValueError (naming the field) for a model this adapter cannot serve; returns the
    geometry (layers, query heads, KV heads, head dim)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention",
                                                              False):
        raise ValueError("config.is_encoder_decoder / add_cross_attention: cross-attention "
                         "layers are not supported")
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # per-layer kinds (transformers derives them from the window settings)
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"config.layer_types {sorted(set(layer_types))}: sliding-window "
                             "and other non-full attention layers are not supported")
    else:
        window = getattr(config, "sliding_window", None)
        if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None  # Qwen2 configs carry a window that is off unless use_sliding_window
        if window is not None and window < getattr(config, "max_position_embeddings",
                                                   window + 1):
            raise ValueError(f"config.sliding_window = {window}: sliding-window attention "
                             "layers are not supported")
    layers, hq = int(config.num_hidden_layers), int(config.num_attention_heads)
    hkv = int(getattr(config, "num_key_value_heads", None) or hq)
    d = int(getattr(config, "head_dim", None) or config.hidden_size // hq)
    if hq % hkv:
        raise ValueError(f"config.num_attention_heads {hq} is not a multiple of "
                         f"config.num_key_value_heads {hkv}")
    return layers, hq, hkv, d


def _attention(module: Any, query: "torch.Tensor", key: "torch.Tensor", value: "torch.Tensor",
               attention_mask: Optional["torch.Tensor"], scaling: Optional[float] = None,
               dropout: float = 0.0, **kwargs: Any) -> Tuple["torch.Tensor", None]:
    cache = getattr(_current, "cache", None)
    if cache is None or cache._pending != module.layer_idx:
        raise RuntimeError("attn_implementation \"reasonalloc\" runs only with a "
                           "ReasonAllocCache as past_key_values (and use_cache=True)")
    return cache._attend(module.layer_idx, query, key, value, attention_mask,
                         scaling if scaling is not None else query.shape[-1] ** -0.5), None


def _mask(batch_size: int, cache_position: "torch.Tensor", kv_length: int, kv_offset: int = 0,
          mask_function: Any = None, attention_mask: Optional["torch.Tensor"] = None,
          **kwargs: Any) -> Optional["torch.Tensor"]:
    # The attention function builds its own causal mask per head; it needs only which positions
    # are padding: the 2-D [batch, positions] mask as given to the model.
    return attention_mask


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(ATTENTION_IMPLEMENTATION, _attention)
        AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, _mask)
        _registered = True


def prepare(model: Any) -> Any:
    """Checks `model` (check_config; dtype float32, float16 or bfloat16; on the CPU) and switches
    it to this module's attention function, which needs a ReasonAllocCache; returns the model."""
    check_config(model.config)
    if model.dtype not in _DTYPES:
        raise TypeError(f"unsupported dtype {model.dtype}: ReasonAllocCache holds float32, "
                        "float16 or bfloat16 keys and values")
    if model.device.type != "cpu":
        raise ValueError(f"model.device {model.device}: ReasonAllocCache holds host "
                         "shared-memory sessions; run the model on the CPU")
    _register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTENTION_IMPLEMENTATION
    return model


class _Layer(CacheLayerMixin):
    """Placeholder for transformers' per-layer bookkeeping: the rows live in the sidecar."""

    def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
        self.is_initialized = True

    def update(self, key_states: Any, value_states: Any,
               cache_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[Any, Any]:
        return key_states, value_states

    def get_mask_sizes(self, cache_position: Any) -> Tuple[int, int]:
        return int(cache_position.shape[0]), 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_cache_shape(self) -> int:
        return -1


class ReasonAllocCache(Cache):
    """A transformers Cache whose keys and values live in sidecar sessions (one per sequence).

    client: a reasonalloc.Client. config: the model's config (see check_config). budget: tokens
    kept per KV head (the mean over heads); scorer, allocator, mode, buffer (Δ), window (α),
    sinks, recent, lambda_, profile and any other keyword of Client.session configure the policy
    (plain strings: scorer="rkv", allocator="reasonalloc", mode="head", gqa_reduce="mean").
    model_name: the name the sidecar looks layer profiles up by (default: the config's
    name_or_path, its last component lower-cased). Sessions open on the first forward pass (or
    prefill()); the batch size is fixed from then on. close() (or the context manager) closes them.

    After a run: peak_kv_bytes[b] (bytes of the K and V rows sequence b held at its peak),
    arena_bytes() (the shared memory each session reserves: budget + Δ rows per head on average,
    fixed at open; head-wise budgets move rows between heads inside it), kv_bytes(),
    events (compression events), stream_batches (CompressStream messages, each carrying the
    events of several sequences at one step), compress_seconds (wall time inside Compress and
    CompressStream),
    layer_budgets(b), and `sessions` (the reasonalloc Sessions, NumPy views over the arenas)."""

    is_compileable = False

    def __init__(self, client: Any, config: Any, *, budget: int, scorer: str = "rkv",
                 allocator: str = "reasonalloc", mode: Optional[str] = None, buffer: int = 64,
                 window: int = 8, model_name: Optional[str] = None, max_context: int = 0,
                 **session_options: Any) -> None:
        self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim = check_config(config)
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        super().__init__(layers=[_Layer() for _ in range(self.num_layers)])
        self.client = client
        name = model_name or str(getattr(config, "name_or_path", "") or "model")
        self.model_name = name.rstrip("/").split("/")[-1].lower()
        self.max_context = int(max_context or getattr(config, "max_position_embeddings", 0) or
                               131072)
        self.options: Dict[str, Any] = dict(budget=budget, scorer=scorer, allocator=allocator,
                                            buffer=buffer, window=window, **session_options)
        if mode is not None:
            self.options["mode"] = mode
        self.sessions: List[Any] = []
        self.steps: List[int] = []          # tokens each sequence has fed (its next position)
        self.peak_kv_bytes: List[int] = []
        self.events = 0
        self.compress_seconds = 0.0
        self._seen = 0                      # positions fed, padding included (transformers' view)
        self._pending = -1                  # the layer whose update() ran last
        self._attended = -1                 # the layer whose attention ran last
        self.stream_batches = 0             # CompressStream messages (events of several sequences)
        self._failed: Optional[str] = None  # why an earlier pass stopped half-way
        self.finished: List[bool] = []      # sequences that ended (finish()): fed no more
        self._real: List[np.ndarray] = []   # per sequence: indices of this pass's real tokens
        self._dtype: Optional["torch.dtype"] = None
        self._np_dtype: Any = None
        self._causal: Dict[Tuple[int, int], "torch.Tensor"] = {}
        self._stream: Any = None

    # transformers' Cache interface.

    def update(self, key_states: "torch.Tensor", value_states: "torch.Tensor", layer_idx: int,
               cache_kwargs: Optional[Dict[str, Any]] = None
               ) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """Hands this pass's new keys and values (post-RoPE) to the attention function, which
        writes them into the sessions' arenas and attends over each head's live rows."""
        if self._failed is not None:
            raise RuntimeError("ReasonAllocCache: a pass failed earlier and left the cache "
                               f"incomplete ({self._failed}); close it and start a new one")
        if self._attended != self._pending:
            self._failed = (f"layer {self._pending}'s attention did not run through the "
                            "cache: the model must run with attn_implementation "
                            "\"reasonalloc\" (reasonalloc.transformers.prepare(model))")
            raise RuntimeError(f"ReasonAllocCache: {self._failed}")
        if layer_idx != (self._pending + 1) % self.num_layers:
            self._failed = (f"a pass stopped after layer {self._pending} (layer {layer_idx} came "
                            "next)")
            raise RuntimeError(f"ReasonAllocCache: {self._failed}; close it and start a new one")
        if layer_idx == 0:
            self._seen += int(key_states.shape[-2])
        self._pending = layer_idx
        _current.cache = self
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._failed is not None:
            raise RuntimeError("ReasonAllocCache: a pass failed earlier and left the cache "
                               f"incomplete ({self._failed}); close it and start a new one")
        return self._seen

    def get_mask_sizes(self, cache_position: "torch.Tensor", layer_idx: int) -> Tuple[int, int]:
        return self._seen + int(cache_position.shape[0]), 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def is_sliding(self) -> List[bool]:
        return [False] * self.num_layers

    @property
    def is_initialized(self) -> bool:
        return bool(self.sessions)

    @property
    def max_batch_size(self) -> int:
        return len(self.sessions)

    @property
    def max_cache_len(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("ReasonAllocCache cannot be reset: close it and make a new one")

    def reorder_cache(self, beam_idx: Any) -> None:
        raise NotImplementedError("ReasonAllocCache does not support beam search (num_beams > 1)")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("ReasonAllocCache cannot be cropped (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("ReasonAllocCache: the batch size is fixed (one session per "
                                  "sequence); num_return_sequences > 1 is not supported")

    def batch_select_indices(self, indices: Any) -> None:
        raise NotImplementedError("ReasonAllocCache: the batch size is fixed")

    # Sessions.

    def open(self, batch: int, dtype: "torch.dtype") -> None:
        """Opens one session per sequence (done by the first forward pass when not called)."""
        if self.sessions:
            if batch != len(self.sessions):
                raise ValueError(f"ReasonAllocCache holds {len(self.sessions)} sequences; this "
                                 f"pass has {batch}")
            return
        if dtype not in _DTYPES:
            raise TypeError(f"unsupported dtype {dtype}: ReasonAllocCache holds float32, float16 "
                            "or bfloat16 keys and values")
        self._dtype = dtype
        self._np_dtype = {torch.float32: np.float32, torch.float16: np.float16,
                          torch.bfloat16: np.uint16}[dtype]
        model = dict(name=self.model_name, num_layers=self.num_layers,
                     num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads,
                     head_dim=self.head_dim, dtype=_DTYPES[dtype], max_context=self.max_context)
        try:
            for _ in range(batch):
                self.sessions.append(self.client.session(model, memory="host_shm", managed=True,
                                                         **self.options))
        except BaseException:
            self.close()
            raise
        self.steps = [0] * batch
        self.peak_kv_bytes = [0] * batch
        self.finished = [False] * batch

    def close(self) -> None:
        """Closes the sessions (their arenas are unmapped and the server frees them)."""
        if self._stream is not None:
            try:
                self._stream.close()
            except SidecarError:
                pass
            self._stream = None
        for s in self.sessions:
            try:
                s.close()
            except SidecarError:
                pass
        self.sessions = []

    def __enter__(self) -> "ReasonAllocCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def finish(self, b: int) -> None:
        """Sequence b has ended: later passes do not feed it (transformers keeps padding a
        finished sequence of a batch; the sidecar should neither store nor compress that)."""
        self.finished[b] = True

    def arena_bytes(self) -> List[int]:
        """Shared memory each sequence's session reserves (its K/V arena of budget + Δ rows per
        head, the query ring and the bookkeeping), fixed when the session opens."""
        return [sum(d.byte_length for d in s.info.arenas) for s in self.sessions]

    def kv_bytes(self) -> List[int]:
        """Bytes of K and V rows each sequence holds now."""
        return [self._bytes(s) for s in self.sessions]

    def layer_budgets(self, b: int = 0) -> List[float]:
        """Per-layer mean budget of sequence b after its last event."""
        s, hkv = self.sessions[b], self.num_kv_heads
        return [float(np.mean(s.budgets[layer * hkv:(layer + 1) * hkv]))
                for layer in range(self.num_layers)]

    def room(self, b: int) -> int:
        """Tokens sequence b can take before its next event (0: compress_full() first)."""
        s = self.sessions[b]
        heads = self.num_layers * self.num_kv_heads
        return int(np.min(s.capacity[:heads] - s.len[:heads]))

    def _bytes(self, s: Any) -> int:
        heads = self.num_layers * self.num_kv_heads
        return int(np.sum(s.len[:heads])) * self.head_dim * 2 * np.dtype(self._np_dtype).itemsize

    # The forward pass.

    def _begin(self, real: "torch.Tensor", dtype: "torch.dtype") -> None:
        batch = int(real.shape[0])
        self.open(batch, dtype)
        if dtype != self._dtype:
            raise TypeError(f"this pass's dtype {dtype} differs from the cache's {self._dtype}")
        self._real = [np.flatnonzero(real[b].cpu().numpy()) if not self.finished[b]
                      else np.zeros(0, dtype=np.int64) for b in range(batch)]
        self.compress_full([b for b in range(batch) if len(self._real[b])])
        heads = self.num_layers * self.num_kv_heads
        for b in range(batch):
            n = len(self._real[b])
            s = self.sessions[b]
            free = int(np.min(s.capacity[:heads] - s.len[:heads]))
            if n > free:
                raise ValueError(
                    f"sequence {b}: {n} new tokens do not fit in its {free} free rows (budget + "
                    "Δ per head): feed a long prompt with reasonalloc.transformers.generate() or "
                    "prefill(), which compress between chunks")
            if self.steps[b] + n > self.max_context:
                raise ValueError(f"sequence {b}: position {self.steps[b] + n} passes the "
                                 f"model's context of {self.max_context}")

    def compress_full(self, batch_ids: Optional[Sequence[int]] = None) -> None:
        """An event for every sequence (of batch_ids) with a full head, at the step before its
        next token, as feeding that token would; one CompressStream message for several."""
        heads = self.num_layers * self.num_kv_heads
        ids = range(len(self.sessions)) if batch_ids is None else batch_ids
        full = [b for b in ids if not self.finished[b] and
                np.any(self.sessions[b].len[:heads] >= self.sessions[b].capacity[:heads])]
        if full:
            self._compress(full)

    def _compress(self, batch_ids: Sequence[int]) -> None:
        t0 = time.perf_counter()
        try:
            if len(batch_ids) == 1:
                b = batch_ids[0]
                results: List[Any] = [self.client.compress(self.sessions[b], self.steps[b] - 1,
                                                           omit_keep_mask=True)]
            else:
                if self._stream is None:
                    self._stream = self.client.compress_stream(self.sessions,
                                                               omit_keep_mask=True)
                results = self._stream.send([(self.sessions[b], self.steps[b] - 1)
                                             for b in batch_ids])
                self.stream_batches += 1
        finally:
            self.compress_seconds += time.perf_counter() - t0
        for b, r in zip(batch_ids, results):
            if isinstance(r, SidecarError):
                raise SidecarError(r.code, f"Compress of sequence {b} at step "
                                           f"{self.steps[b] - 1}: {r.message}")
            self.events += 1

    def _to_numpy(self, t: "torch.Tensor") -> np.ndarray:
        t = t.detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).cpu().numpy().view(np.uint16)
        return t.cpu().numpy()

    def _to_torch(self, a: np.ndarray) -> "torch.Tensor":
        t = torch.from_numpy(a)
        return t.view(torch.bfloat16) if self._dtype == torch.bfloat16 else t

    def _attend(self, layer: int, query: "torch.Tensor", key: "torch.Tensor",
                value: "torch.Tensor", attention_mask: Optional["torch.Tensor"],
                scaling: float) -> "torch.Tensor":
        try:
            return self._attend_layer(layer, query, key, value, attention_mask, scaling)
        except BaseException as e:
            self._failed = f"{type(e).__name__}: {e}"
            raise

    def _attend_layer(self, layer: int, query: "torch.Tensor", key: "torch.Tensor",
                      value: "torch.Tensor", attention_mask: Optional["torch.Tensor"],
                      scaling: float) -> "torch.Tensor":
        batch, hq, t, d = query.shape
        if query.device.type != "cpu":
            raise ValueError(f"ReasonAllocCache holds host shared-memory sessions: the model must "
                             f"run on the CPU, not {query.device}")
        if attention_mask is None:
            real = torch.ones(batch, t, dtype=torch.bool)
        elif attention_mask.dim() == 2:
            real = attention_mask[:, -t:].to(torch.bool)
        else:
            raise ValueError("attention_mask: ReasonAllocCache takes a 2-D [batch, positions] "
                             f"padding mask, got shape {tuple(attention_mask.shape)}")
        if layer == 0:
            self._begin(real, query.dtype)
        hkv, g = self.num_kv_heads, hq // self.num_kv_heads
        window = self.sessions[0].window
        out = torch.zeros(batch, t, hq, d, dtype=query.dtype)
        keys, values = self._to_numpy(key), self._to_numpy(value)
        for b in range(batch):
            idx = self._real[b]
            n = len(idx)
            if n == 0:
                continue
            s = self.sessions[b]
            first = layer * hkv
            rows = s.offset[first:first + hkv] + s.len[first:first + hkv]
            for h in range(hkv):
                s.k[rows[h]:rows[h] + n] = keys[b, h, idx]
                s.v[rows[h]:rows[h] + n] = values[b, h, idx]
            s.len[first:first + hkv] += n
            q = query[b][:, idx]  # [Hq, n, d]
            tail = range(max(0, n - window), n)
            qn = self._to_numpy(q)
            for j in tail:
                s.queries[layer, :, (self.steps[b] + j) % window] = qn[:, j]
            for h in range(hkv):
                k = self._to_torch(s.keys(layer, h))
                v = self._to_torch(s.values(layer, h))
                length = k.shape[0]
                scores = torch.matmul(q[h * g:(h + 1) * g], k.transpose(0, 1)) * scaling
                if n > 1:
                    allowed = self._causal_mask(n, length)
                    scores = scores.masked_fill(~allowed, float("-inf"))
                p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
                out[b, idx, h * g:(h + 1) * g] = torch.matmul(p, v).transpose(0, 1)
        self._attended = layer
        if layer == self.num_layers - 1:
            for b in range(batch):
                self.steps[b] += len(self._real[b])
                if self.sessions:
                    self.peak_kv_bytes[b] = max(self.peak_kv_bytes[b],
                                                self._bytes(self.sessions[b]))
        return out

    def _causal_mask(self, n: int, length: int) -> "torch.Tensor":
        # New row j (of n) sits at length - n + j; query i sees rows up to length - n + i.
        key = (n, length)
        m = self._causal.get(key)
        if m is None:
            m = torch.ones(n, length, dtype=torch.bool).tril(diagonal=length - n)
            if len(self._causal) > 64:
                self._causal.clear()
            self._causal[key] = m
        return m


def _positions(attention_mask: "torch.Tensor") -> "torch.Tensor":
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def prefill(model: Any, cache: ReasonAllocCache, input_ids: "torch.Tensor",
            attention_mask: Optional["torch.Tensor"] = None) -> None:
    """Feeds `input_ids` [batch, positions] (left-padded where attention_mask is 0) into `cache`
    in chunks that never overflow a head's region; a sequence whose region is full compresses
    before its next token, as when decoding one token at a time."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, positions], got {tuple(input_ids.shape)}")
    batch, total = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    if cache.get_seq_length() != 0:
        raise ValueError("prefill: the cache already holds tokens")
    cache.open(batch, model.dtype)
    positions = _positions(attention_mask)
    real = attention_mask.bool()
    start = 0
    with torch.no_grad():
        while start < total:
            # Sequences with a full head and tokens still to feed compress first (the event a
            # one-token-at-a-time prefill would have before its next token).
            cache.compress_full([b for b in range(batch) if bool(real[b, start:].any())])
            room = [cache.room(b) for b in range(batch)]
            end = start + 1
            while end < total and all(int(real[b, start:end + 1].sum()) <= room[b]
                                      for b in range(batch)):
                end += 1
            model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                  position_ids=positions[:, start:end], past_key_values=cache, use_cache=True,
                  cache_position=torch.arange(start, end), logits_to_keep=1)
            start = end


class _FinishOnEos(transformers.StoppingCriteria):
    """Marks a sequence finished in the cache once it has produced an end-of-sequence token;
    stops nothing itself (transformers' own criteria do)."""

    def __init__(self, cache: ReasonAllocCache, eos: Sequence[int]) -> None:
        self.cache, self.eos = cache, set(int(e) for e in eos)

    def __call__(self, input_ids: "torch.Tensor", scores: Any, **kwargs: Any) -> "torch.Tensor":
        for b, token in enumerate(input_ids[:, -1].tolist()):
            if token in self.eos and b < len(self.cache.finished):
                self.cache.finish(b)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _with_eos_watch(model: Any, cache: ReasonAllocCache, kwargs: Dict[str, Any]) -> None:
    eos = kwargs.get("eos_token_id", getattr(model.generation_config, "eos_token_id", None))
    if eos is None:
        return
    criteria = transformers.StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
    criteria.append(_FinishOnEos(cache, [eos] if isinstance(eos, int) else list(eos)))
    kwargs["stopping_criteria"] = criteria


def generate(model: Any, input_ids: "torch.Tensor", cache: ReasonAllocCache,
             attention_mask: Optional["torch.Tensor"] = None, **generate_kwargs: Any) -> Any:
    """prefill() of all but the prompt's last token, then model.generate(...) from the cache.
    A sequence that has produced its end-of-sequence token is fed no more (model.generate alone
    keeps feeding padding for it)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prefill(model, cache, input_ids[:, :-1], attention_mask[:, :-1])
    _with_eos_watch(model, cache, generate_kwargs)
    return model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache,
                          **generate_kwargs)


class SidecarPress:
    """A kvpress-style entry point: the sidecar's policies where a kvpress press would go.

        press = SidecarPress(client, budget=256, buffer=64, scorer="snapkv",
                             allocator="reasonalloc", mode="layer")
        with press(model):
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=512)
        print(press.last)   # peak KV bytes, events, time in Compress of that call

    Inside the `with`, the model runs this module's attention and each model.generate call gets
    its own ReasonAllocCache (the prompt fed through the budget, the sessions closed at the end);
    on leaving, the model's attention implementation and generate are restored. The keyword
    arguments are ReasonAllocCache's. Unlike kvpress's DecodingPress (one length per layer,
    compressed in place in transformers' cache), budgets may differ per head and the rows live in
    the sidecar's arenas."""

    def __init__(self, client: Any, *, budget: int, **cache_options: Any) -> None:
        self.client = client
        self.options = dict(budget=budget, **cache_options)
        self.last: Dict[str, Any] = {}

    @contextlib.contextmanager
    def __call__(self, model: Any) -> Iterator[Any]:
        previous = model.config._attn_implementation
        original = model.generate
        prepare(model)

        def generate_through_sidecar(inputs: Optional["torch.Tensor"] = None, *args: Any,
                                     **kwargs: Any) -> Any:
            if "past_key_values" in kwargs:
                raise ValueError("SidecarPress: past_key_values is the press's own cache; call "
                                 "model.generate without it")
            input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
            if input_ids is None:
                raise ValueError("SidecarPress: model.generate needs input_ids (inputs_embeds "
                                 "are not supported)")
            mask = kwargs.pop("attention_mask", None)
            if mask is None:
                mask = torch.ones_like(input_ids)
            with ReasonAllocCache(self.client, model.config, **self.options) as cache:
                t0 = time.perf_counter()
                prefill(model, cache, input_ids[:, :-1], mask[:, :-1])
                _with_eos_watch(model, cache, kwargs)
                out = original(input_ids, *args, attention_mask=mask, past_key_values=cache,
                               **kwargs)
                self.last = dict(seconds=time.perf_counter() - t0,
                                 peak_kv_bytes=list(cache.peak_kv_bytes),
                                 arena_bytes=cache.arena_bytes(), events=cache.events,
                                 compress_seconds=cache.compress_seconds)
            return out

        model.generate = generate_through_sidecar
        try:
            yield model
        finally:
            del model.generate  # the class's method again
            model.set_attn_implementation(previous)
