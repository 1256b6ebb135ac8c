"""Memory-bounded exact KL and log-probs for cord.py: the same values and gradients as its plain reference functions (tested against them), without an fp32 (B, T, V) tensor.

At V = 152k a full-vocabulary log-softmax in fp32 costs hundreds of MB per sequence (the paper's
pitfalls), so `cord.train_step` uses these by default (`--chunk_size`). Each autograd function
saves only its inputs and recomputes the softmaxes chunk by chunk in backward. Rows: R positions
(B * T flattened), V vocabulary, C hidden size.

    D = chunked_kl(student_logits, teacher_logits, chunk=32)                     # (B, T) from (B, T, V) logits
    D, logp = fused_kl_and_logprobs(h_s, h_t, lm_head.weight, y, mask, 64)      # (B, T) from hidden states

Standalone: imports torch only (never cord).
"""
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
            ls, lt = F.log_softmax(s[i:i + ctx.chunk].to(D.dtype), -1), F.log_softmax(t[i:i + ctx.chunk].to(D.dtype), -1)
            g = ls.exp() * (ls - lt - D[i:i + ctx.chunk, None]) if ctx.reverse else ls.exp() - lt.exp()
            gs[i:i + ctx.chunk] = g * gD[i:i + ctx.chunk, None]
        return gs, None, None, None


def chunked_kl(student_logits, teacher_logits, chunk: int, reverse: bool = True):  # (..., V) -> (...)
    """KL(p_s || p_t) (reverse=True, Eq. 2) or KL(p_t || p_s) per position of (..., V) logits; no gradient to the teacher."""
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
            gs[i:i + ctx.chunk] = (-p).scatter_add_(-1, y[i:i + ctx.chunk, None], torch.ones_like(p[:, :1])) * g[i:i + ctx.chunk, None]
        return gs, None, None


def chunked_logprobs(logits, y, chunk: int):  # (..., V), (...) -> (...)
    """log softmax(logits)[y] per position of (..., V) logits and (...) tokens, at temperature 1."""
    return _ChunkedLogProb.apply(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), chunk).view(y.shape)


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
    D, logp = _FusedHead.apply(student_hidden.reshape(B * T, C), h_t, weight, W_t, y.reshape(B * T), chunk_size)  # (R,), (R,)
    return D.view(B, T) * mask, logp.view(B, T)
