"""Fast versions of cord.py's reference functions, each tested against it: memory-bounded exact KL and log-probs
(the same values and gradients, without an fp32 (B, T, V) tensor) and rollouts at the speed of the GPU.

At V = 152k a full-vocabulary log-softmax in fp32 costs hundreds of MB per sequence (the paper's
pitfalls), so `cord.train_step` uses these by default (`--chunk_size`). Each autograd function
saves only its inputs and recomputes the softmaxes chunk by chunk in backward. Rows: R positions
(B * T flattened), V vocabulary, C hidden size.

    D = chunked_kl(student_logits, teacher_logits, chunk=32)                     # (B, T) from (B, T, V) logits
    D, logp = fused_kl_and_logprobs(h_s, h_t, lm_head.weight, y, mask, 64)      # (B, T) from hidden states

`rollout.sample`'s decode loop is a Python loop of small kernels over a growing cache, ~20x slower than
reading the weights once per token allows; `static_sample` (`--compile_rollout`) runs the same
sampler over a pre-allocated KV cache with each decode step replayed as one CUDA graph:

    y, mask = static_sample(decoder, lm_head, x, x_mask, n, [0.0, 1.5], T, eos_ids, suppress_ids, pad_id)
    y, mask = static_sample(..., buckets=4)  # attention reads ~the filled cache: one graph per width (cache_buckets)

Standalone: imports torch only (never cord); the sampler drives any transformers decoder passed in.
"""
import functools
import inspect

import torch
import torch.nn.functional as F


class _ChunkedKL(torch.autograd.Function):
    """Exact KL over the vocabulary per row of (R, V) logits, `chunk` rows at a time in fp32.

    Gradient flows to `s` only (t is the teacher):
      reverse KL(p_s || p_t): dD/ds = p_s * (log p_s - log p_t - D)
      forward KL(p_t || p_s): dD/ds = p_s - p_t
    """

    @staticmethod
    def forward(ctx, s, t, chunk, reverse):
        fp = torch.promote_types(s.dtype, torch.float32)  # fp32 math (fp64 stays fp64)
        D = torch.empty(s.shape[0], dtype=fp, device=s.device)  # (R,)
        for i in range(0, s.shape[0], chunk):
            ls, lt = F.log_softmax(s[i:i + chunk].to(fp), -1), F.log_softmax(t[i:i + chunk].to(fp), -1)  # (chunk, V)
            D[i:i + chunk] = (ls.exp() * (ls - lt)).sum(-1) if reverse else (lt.exp() * (lt - ls)).sum(-1)
        ctx.save_for_backward(s, t, D)
        ctx.chunk, ctx.reverse = chunk, reverse
        return D

    @staticmethod
    def backward(ctx, gD):
        s, t, D = ctx.saved_tensors
        gs = torch.empty_like(s)
        for i in range(0, s.shape[0], ctx.chunk):
            ls = F.log_softmax(s[i:i + ctx.chunk].to(D.dtype), -1)  # (chunk, V)
            lt = F.log_softmax(t[i:i + ctx.chunk].to(D.dtype), -1)  # (chunk, V)
            g = ls.exp() * (ls - lt - D[i:i + ctx.chunk, None]) if ctx.reverse else ls.exp() - lt.exp()
            gs[i:i + ctx.chunk] = g * gD[i:i + ctx.chunk, None]
        return gs, None, None, None


def chunked_kl(student_logits, teacher_logits, chunk: int, reverse: bool = True):  # (..., V) -> (...)
    """KL(p_s || p_t) (reverse=True, Eq. 2) or KL(p_t || p_s) per position of (..., V) logits; no gradient to the
    teacher."""
    V = student_logits.shape[-1]
    D = _ChunkedKL.apply(student_logits.reshape(-1, V), teacher_logits.detach().reshape(-1, V), chunk, reverse)  # (R,)
    return D.view(student_logits.shape[:-1])


class _ChunkedLogProb(torch.autograd.Function):
    """log softmax(s)[y] per row of (R, V), chunked; backward recomputes: d/ds = onehot(y) - p."""

    @staticmethod
    def forward(ctx, s, y, chunk):
        out = torch.empty(s.shape[0], dtype=torch.promote_types(s.dtype, torch.float32), device=s.device)  # (R,)
        for i in range(0, s.shape[0], chunk):
            out[i:i + chunk] = F.log_softmax(s[i:i + chunk].to(out.dtype), -1).gather(-1, y[i:i + chunk, None])[:, 0]
        ctx.save_for_backward(s, y)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        s, y = ctx.saved_tensors
        gs = torch.empty_like(s)
        for i in range(0, s.shape[0], ctx.chunk):
            p = torch.softmax(s[i:i + ctx.chunk].to(g.dtype), -1)  # (chunk, V)
            onehot_minus_p = (-p).scatter_add_(-1, y[i:i + ctx.chunk, None], torch.ones_like(p[:, :1]))  # (chunk, V)
            gs[i:i + ctx.chunk] = onehot_minus_p * g[i:i + ctx.chunk, None]
        return gs, None, None


def chunked_logprobs(logits, y, chunk: int):  # (..., V), (...) -> (...)
    """log softmax(logits)[y] per position of (..., V) logits and (...) tokens, at temperature 1."""
    return _ChunkedLogProb.apply(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), chunk).view(y.shape)


def kl(student_logits, teacher_logits, mask, chunk_size=None, reverse=True):  # (R, T, V) x2, (R, T) -> (R, T)
    """Eq. 2 (reverse=False: the forward KL) as training computes it: chunk_size positions at a time, or in one
    piece (None); the same values and gradients as cord.token_reverse_kl / token_forward_kl (tests/test_chunked.py)."""
    if chunk_size is not None:
        return chunked_kl(student_logits, teacher_logits, chunk_size, reverse) * mask  # (R, T)
    ls, lt = F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.detach().float(), -1)  # (R, T, V)
    return ((ls.exp() * (ls - lt)) if reverse else (lt.exp() * (lt - ls))).sum(-1) * mask  # (R, T)


def logprobs(logits, y, chunk_size=None):  # (R, T, V), (R, T) -> (R, T)
    """log pi(y_t) as training computes it: chunked, or in one piece (None), as cord.token_logprobs."""
    if chunk_size is not None:
        return chunked_logprobs(logits, y, chunk_size)  # (R, T)
    return torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1)  # (R, T)


def head_terms(head, h, y, mask, h_t=None, W_t=None, chunk_size=None, temperature=1.0):
    """D (R, T) of Eq. 2 against the teacher's hidden states h_t (None without them) and log pi(y_t) (R, T) from
    head(h) / temperature, for student hidden states h (R, T, C) and the lm_head `head`. With chunk_size (cord.py's
    default) and a head without bias the (R, T, V) logits never exist (the fused head below)."""
    if chunk_size is not None and head.bias is None:  # logits / tau = (h / tau) W^T, exactly
        D, logp = fused_kl_and_logprobs(h / temperature, h_t, head.weight, y, mask, chunk_size, W_t)
        return (D if h_t is not None else None), logp
    s = head(h) / temperature  # (R, T, V)
    D = kl(s, h_t @ W_t.T, mask, chunk_size) if h_t is not None else None  # (R, T) Eq. 2
    return D, logprobs(s, y, chunk_size)  # (R, T)


class _FusedHead(torch.autograd.Function):
    """Eq. 2 and log pi(y_t) straight from final hidden states: logits = h W^T exist one chunk at a time.

    Inputs h_s (R, C) student hidden, h_t (R, C) teacher hidden or None, W (V, C) student head, W_t
    teacher head, y (R,) tokens. Returns D (R,) = KL(p_s || p_t) (0 without a teacher) and logp (R,)
    = log p_s(y). Backward recomputes each chunk's logits and accumulates dL/dh_s and dL/dW; the
    teacher gets none.
    """

    @staticmethod
    def forward(ctx, h_s, h_t, W, W_t, y, chunk):
        D = torch.zeros(h_s.shape[0], dtype=torch.float32, device=h_s.device)  # (R,)
        logp = torch.zeros_like(D)
        for i in range(0, h_s.shape[0], chunk):
            ls = F.log_softmax((h_s[i:i + chunk] @ W.T).float(), -1)  # (chunk, V)
            logp[i:i + chunk] = ls.gather(-1, y[i:i + chunk, None])[:, 0]
            if h_t is not None:
                lt = F.log_softmax((h_t[i:i + chunk] @ W_t.T).float(), -1)  # (chunk, V)
                D[i:i + chunk] = (ls.exp() * (ls - lt)).sum(-1)
        ctx.save_for_backward(h_s, h_t, W, W_t, y, D)
        ctx.chunk = chunk
        return D, logp

    @staticmethod
    def backward(ctx, gD, glogp):
        h_s, h_t, W, W_t, y, D = ctx.saved_tensors
        gh = torch.empty_like(h_s)
        gW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if ctx.needs_input_grad[2] else None
        for i in range(0, h_s.shape[0], ctx.chunk):  # in-place ops: a few (chunk, V) buffers at a time
            sl = slice(i, i + ctx.chunk)
            ls = F.log_softmax((h_s[sl] @ W.T).float(), -1)  # (chunk, V)
            p = ls.exp()
            g = (p * -glogp[sl, None]).scatter_add_(-1, y[sl, None], glogp[sl, None])  # d logp / ds = onehot - p
            if h_t is not None:
                lt = F.log_softmax((h_t[sl] @ W_t.T).float(), -1)
                g += ls.sub_(lt).sub_(D[sl, None]).mul_(p).mul_(gD[sl, None])  # d D / ds = p (ls - lt - D)
            g = g.to(W.dtype)
            gh[sl] = g @ W  # (chunk, C)
            if gW is not None:
                gW.addmm_(g.T.float(), h_s[sl].float())  # no (V, C) temporary
        return gh, None, None if gW is None else gW.to(W.dtype), None, None, None


def fused_kl_and_logprobs(student_hidden, teacher_hidden, weight, y, mask, chunk_size=64, teacher_weight=None):
    """D (B, T) of Eq. 2 and log pi(y_t) (B, T) from hidden states (B, T, C) and the lm_head weight (V, C).

    Same values and gradients as cord.token_reverse_kl / cord.token_logprobs on logits = hidden @ weight.T,
    without ever holding the (B, T, V) logits. teacher_hidden=None returns D = 0 (GRPO-only rows).
    """
    B, T, C = student_hidden.shape
    h_t = None if teacher_hidden is None else teacher_hidden.detach().reshape(B * T, C)  # (R, C)
    W_t = (weight if teacher_weight is None else teacher_weight).detach()
    h_s = student_hidden.reshape(B * T, C)  # (R, C)
    D, logp = _FusedHead.apply(h_s, h_t, weight, W_t, y.reshape(B * T), chunk_size)  # (R,), (R,)
    return D.view(B, T) * mask, logp.view(B, T)


# ----------------------------------------------------------------------------------------------
# Rollouts: rollout.sample's loop over a pre-allocated KV cache, one CUDA graph per decode step.
# N = B * n rows, S prompt length, L >= S + T cache columns, H_kv key/value heads, D head size.


class StaticKV:
    """A pre-allocated KV cache: (N, H_kv, L, D) keys and values per layer, filled from the prefill's cache.

    Duck-typed for the transformers decoders: handed its masks as a dict (no mask building) and its
    position ids, a decoder only calls `update`. Every layer writes the current token at column `t`,
    a (1,) tensor advanced on the device, so a captured graph replays at the right column, and attention
    reads the first `width` columns (a Python int, fixed per captured graph: see cache_buckets).
    """

    def __init__(self, prefill_layers, n: int, L: int):  # [(keys, values) (B, H_kv, S, D)] per layer
        S = prefill_layers[0][0].shape[2]
        self.layers = []
        for k, v in prefill_layers:
            K, V = (x.new_zeros(x.shape[0] * n, x.shape[1], L, x.shape[3]) for x in (k, v))  # (N, H_kv, L, D)
            K[:, :, :S], V[:, :, :S] = k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)
            self.layers.append((K, V))
        self.t = torch.full((1,), S, dtype=torch.long, device=K.device)  # the next column to write
        self.width = L  # columns attention reads: > t

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # (N, H_kv, 1, D) -> (N, H_kv, w, D)
        K, V = self.layers[layer_idx]
        K.index_copy_(2, self.t, key_states), V.index_copy_(2, self.t, value_states)
        return K[:, :, :self.width], V[:, :, :self.width]  # views: the unread columns are never touched


def cache_buckets(S: int, T: int, n: int) -> list:
    """The cache widths the T decode steps attend over, n buckets of about T / n steps each, every width a multiple
    of 16 (aligned rows for the attention kernels' mask); the last is L = S + T rounded up to 16.

    Decode step i writes column S + i and reads columns 0 .. S + i, so it runs at the narrowest width > S + i
    (width_for_step). n = 1: every step reads all L columns. On CUDA one graph is captured per width.
    >>> cache_buckets(S=30, T=100, n=4)  # steps 0-33 read 64 columns, 34-49 read 80, 50-81 read 112, 82-99 read 144
    [64, 80, 112, 144]
    """
    return sorted({-(-(S + -(-T * k // n)) // 16) * 16 for k in range(1, n + 1)})


def width_for_step(widths: list, S: int, i: int) -> int:  # the narrowest bucket holding column S + i
    return next(w for w in widths if w > S + i)


def sample_tokens(logits, tau):  # (N, V), (N, 1) -> (N,)
    """y ~ softmax(logits / tau) per row, argmax where tau = 0: torch.multinomial(p, 1)'s own method
    (argmax p / q, q ~ Exp(1)), hence the same draw for the same RNG state, without its host-side checks."""
    probs = torch.softmax(logits / tau.clamp(min=1e-5), -1)  # (N, V)
    q = torch.empty_like(probs).exponential_(1)  # (N, V)
    return torch.where(tau[:, 0] > 0, (probs / q).argmax(-1), logits.argmax(-1))


class _Decode:
    """The state of one static_sample call, allocated once; step() only writes into it (graph-capturable)."""

    def __init__(self, decoder, head, h, kv: StaticKV, mask, pos, tau, eos, bias, pad: int, T: int):
        self.decoder, self.head, self.h, self.kv, self.mask, self.pos = decoder, head, h, kv, mask, pos
        self.tau, self.eos, self.bias, self.pad, self.S = tau, eos, bias, pad, int(kv.t)
        params = inspect.signature(decoder.forward).parameters
        self.kw = {"cache" if "cache" in params else "past_key_values": kv}  # transformers 5 renamed it
        if "cache_position" in params:  # transformers 4: where the token goes (our cache knows it already)
            self.kw["cache_position"] = kv.t
        N = h.shape[0]
        self.done = torch.zeros(N, dtype=torch.bool, device=h.device)  # (N,)
        self.ys = torch.full((N, T), pad, dtype=torch.long, device=h.device)  # (N, T)
        self.alive = torch.zeros(N, T, dtype=torch.bool, device=h.device)  # (N, T)

    def step(self, width: int):  # sample token i = t - S of every row from h, run the decoder on it -> the next h
        y = sample_tokens(self.head(self.h).float() + self.bias, self.tau).masked_fill(self.done, self.pad)  # (N,)
        i = self.kv.t - self.S  # (1,)
        self.ys.index_copy_(1, i, y[:, None]), self.alive.index_copy_(1, i, ~self.done[:, None])
        self.done |= (y[:, None] == self.eos).any(-1)
        self.mask.index_fill_(-1, self.kv.t, 0.0)  # column t (token y) becomes visible
        self.pos += 1
        self.kv.width = width  # columns 0 .. width - 1 (> t): the filled ones and at most a bucket more
        out = self.decoder(input_ids=y[:, None], attention_mask={"full_attention": self.mask[..., :width]},
                           position_ids=self.pos, use_cache=True, **self.kw)
        self.h.copy_(out.last_hidden_state[:, -1])
        self.kv.t += 1


def _capture(step, pool=None):  # -> replay of step() as one CUDA graph (step has run on this device before)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g, pool=pool):
            step()
    except RuntimeError as e:  # an op in the model's forward that syncs with the host cannot be captured
        hint = "--compile_rollout off runs eager"
        raise RuntimeError(f"capturing the decode step as a CUDA graph failed ({hint}): {e}") from e
    return g.replay


class _Graphed:
    """One decode step at one cache width: its first `warmup` calls run for real on a side stream (allocator and
    cuBLAS warm up outside the capture), the next one captures it as a CUDA graph and replays it, later calls
    replay. The graphs of one call share a memory pool (they replay one after another, in capture order)."""

    def __init__(self, step, warmup: int, pool):
        self.step, self.warmup, self.pool, self.replay = step, warmup, pool, None

    def __call__(self):
        if self.replay is None and self.warmup == 0:
            self.replay = _capture(self.step, self.pool)
        if self.replay is not None:
            return self.replay()
        self.warmup -= 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)


@torch.no_grad()
def static_supported(decoder) -> bool:
    """Whether static_sample can run this decoder: full attention in every layer, sdpa or eager kernels (no
    flash-attention)."""
    cfg = decoder.config
    return set(getattr(cfg, "layer_types", None) or ["full_attention"]) == {"full_attention"} and \
        getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def static_sample(decoder, head, prompt_embeds, prompt_mask, n: int, temperature, max_new_tokens: int,
                  eos_ids, suppress_ids, pad_id: int, graph=None, check_every: int = 16, warmup: int = 2,
                  buckets: int = 1):
    """rollout.sample's rollouts (same arguments, semantics and return), static KV cache, no host sync per token.

    The prefill is rollout.sample's; its keys/values are copied n times into a StaticKV of S + T columns (or more).
    Each decode step (sample from h, record, one decoder forward) only writes into pre-allocated
    tensors, so on CUDA (graph=None: when the prompt is there and the decoder is not FSDP-sharded) it is
    captured as a CUDA graph, after `warmup` real steps, and replayed; with `buckets` > 1 one graph per cache width
    (cache_buckets: the steps of bucket k attend over S + ~k T / buckets columns, not all L; each graph after the
    first is captured after one real step at its width). What differs from the eager sampler:
    - attention runs over the bucket's columns, the unwritten ones masked (exact zeros): equal up to float
      rounding, not bit for bit;
    - `done.all()` is read every `check_every` tokens, not every token: up to check_every - 1 extra
      steps whose tokens are all padding; the output is trimmed to the eager length;
    - tokens are drawn as torch.multinomial draws them (same tokens for the same RNG state), but the
      extra steps draw too, so the RNG state after the call differs; in a CUDA graph the draws come
      from the graph's own Philox offsets (same distribution, not the same numbers as eager);
    - decoders with sliding-window layers or flash-attention are refused (run eager).
    """
    if not static_supported(decoder):
        raise ValueError("static_sample needs full attention with sdpa/eager kernels: "
                         "use --compile_rollout off (or auto)")
    B, S, _ = prompt_embeds.shape
    pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S): rollout.positions
    out = decoder(inputs_embeds=prompt_embeds, attention_mask=prompt_mask, position_ids=pos, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    L = -(-(S + max_new_tokens) // 16) * 16  # columns, rounded up to 16: aligned rows for the attention kernels' mask
    kv = StaticKV([(layer.keys, layer.values) for layer in cache.layers], n, L)
    h = out.last_hidden_state[:, -1].repeat_interleave(n, 0)  # (N, C)
    del out, cache
    dev, dtype = h.device, prompt_embeds.dtype
    mask = torch.full((B * n, 1, 1, L), torch.finfo(dtype).min, dtype=dtype, device=dev)  # (N, 1, 1, L)
    mask[:, 0, 0, :S].masked_fill_(prompt_mask.repeat_interleave(n, 0).bool(), 0.0)  # additive: 0 = attend
    taus = torch.tensor([temperature] * n if isinstance(temperature, (int, float)) else temperature, device=dev)
    bias = torch.zeros(head.weight.shape[0], device=dev)  # (V,)
    bias[torch.tensor(suppress_ids, dtype=torch.long, device=dev)] = float("-inf")
    s = _Decode(decoder, head, h, kv, mask, pos[:, -1:].repeat_interleave(n, 0), taus.repeat(B)[:, None].float(),
                torch.tensor(eos_ids, device=dev), bias, pad_id, max_new_tokens)
    if graph is None:  # FSDP's gather hooks around each layer are not captured: sharded decoders run uncaptured
        graph = dev.type == "cuda" and not any(type(m).__name__.startswith("FSDP") for m in decoder.modules())
    widths, runs = cache_buckets(S, max_new_tokens, buckets), {}  # width -> one decode step at that width
    pool = torch.cuda.graph_pool_handle() if graph else None
    for i in range(max_new_tokens):
        w = width_for_step(widths, S, i)
        if w not in runs:  # the first step at this width: capture a graph if the bucket has steps enough to replay it
            step, real = functools.partial(s.step, w), warmup if not runs else min(warmup, 1)
            runs[w] = _Graphed(step, real, pool) if graph and min(max_new_tokens, w - S) - i > real else step
        runs[w]()
        if (i + 1) % check_every == 0 and s.done.all():  # the only host sync in the loop
            break
    T = int(s.alive.any(0).sum())  # eager stops after the step where every row is done
    return s.ys[:, :T], s.alive[:, :T]
