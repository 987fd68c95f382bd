"""The LM head and its cross-entropy over token chunks: a graph op that never holds the full logits.

``linear_cross_entropy(hidden, weight, bias, target, ignore_index, reduction, chunk_rows, seq_slice)`` is

    logits = F.linear(hidden, weight, bias)              # hidden: [..., H]
    if seq_slice: logits = logits[:, start:end]          # Ratel's GPT drops the last position
    F.cross_entropy(logits.reshape(-1, V).float(), target, ignore_index=..., reduction=...)

— the head projection and the loss as transformers' ``ForCausalLMLoss`` and Ratel's GPT compute them.

When the loss's rows are few (a quarter of a chunk: the eager ops then hold no more than a chunked pass) it
runs exactly those ops (and its backward recomputes them under
autograd): the same kernels on the same shapes, so the same bits as the eager model. Beyond one chunk, the
forward computes each chunk's logits in the model's dtype, upcasts them and keeps only their per-row
log-sum-exp (4 bytes a token); the backward computes each chunk's logits again, the softmax from the kept
log-sum-exp, minus one at the target, scaled as the reduction asks, cast to the model's dtype (where
autograd's gradient of ``.float()`` casts it), then the input's and the weight's gradients, the weight's (and
bias') summed over chunks in fp32: equal to the unchunked loss and gradients within rounding.

On CUDA the products take the weight padded with zero rows to a multiple of 64 (``vocab_align``): with a
vocabulary like 50257 every product's logits, and their gradient as the next product's input, are rows of an
odd length, which the tensor cores' wide loads cannot take. The padding's logits are sliced off and their
gradient set to zero, so it changes no result beyond the products' summation order.

Memory: a chunk's logits and their gradient (``chunk_rows`` x vocabulary) instead of the logits, their fp32
copy, the log-softmax autograd keeps and the gradients of all three for every token. Work: the logits are
computed twice (once more in backward), as in Cut Cross-Entropy; the head's backward costs three products
instead of two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MEAN, SUM = 1, 2       # aten.cross_entropy_loss's reduction codes
_REDUCTIONS = {MEAN: "mean", SUM: "sum"}


def chunk_rows_for(vocab: int, chunk_bytes: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about ``chunk_bytes`` (a multiple of 64 rows)."""
    return max(64, chunk_bytes // (4 * max(vocab, 1)) // 64 * 64)


def vocab_align(device: torch.device) -> int:
    """Rows the head's weight is padded to a multiple of in the chunked products. On CUDA a vocabulary like
    GPT-2's 50257 makes every product's logits (and their gradient, a product's input) rows of an odd number
    of elements: not aligned for the tensor cores' wide loads, so cuBLAS takes slower kernels (nanoGPT pads
    50257 to 50304 for this). Elsewhere nothing is padded."""
    return 64 if torch.device(device).type == "cuda" else 1


def _padded(weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
    """The head's weight and bias with ``rows`` zero rows (entries) appended: logits of the padding are 0 and
    sliced off, their gradient is set to 0, so the padding adds nothing to any product's result."""
    if not rows:
        return weight, bias
    return F.pad(weight, (0, 0, 0, rows)), None if bias is None else F.pad(bias, (0, rows))


def _rows(hidden: torch.Tensor, seq_slice) -> torch.Tensor:
    if seq_slice is not None:
        hidden = hidden[:, seq_slice[0]:seq_slice[1]]
    return hidden.reshape(-1, hidden.shape[-1])


def _whole(hidden, weight, bias, target, ignore_index, reduction, seq_slice):
    """The eager model's ops, as it runs them."""
    logits = F.linear(hidden, weight, bias)
    if seq_slice is not None:
        logits = logits[:, seq_slice[0]:seq_slice[1]]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target, ignore_index=ignore_index,
                           reduction=_REDUCTIONS[reduction])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index: int, reduction: int, chunk_rows: int, seq_slice,
                align):
        align = align or vocab_align(weight.device)
        ctx.options = (ignore_index, reduction, chunk_rows, seq_slice, align)
        rows = _rows(hidden, seq_slice)
        if rows.shape[0] <= chunk_rows // 4:     # the eager ops hold about four chunks' worth of logits
            ctx.save_for_backward(hidden, weight, bias, target)
            return _whole(hidden, weight, bias, target, ignore_index, reduction, seq_slice)
        upcast = torch.promote_types(hidden.dtype, torch.float32)
        valid = target != ignore_index
        total = torch.zeros((), dtype=upcast, device=hidden.device)
        lse = torch.empty(rows.shape[0], dtype=upcast, device=hidden.device)
        vocab = weight.shape[0]
        padded_weight, padded_bias = _padded(weight, bias, -vocab % align)
        for start in range(0, rows.shape[0], chunk_rows):
            end = min(start + chunk_rows, rows.shape[0])
            logits = F.linear(rows[start:end], padded_weight, padded_bias)[:, :vocab].to(upcast)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[start:end].clamp(min=0).unsqueeze(1)).squeeze(1)
            del logits
            total = total + torch.where(valid[start:end], chunk_lse - picked, 0.0).sum()
            lse[start:end] = chunk_lse
        count = valid.sum()
        ctx.save_for_backward(hidden, weight, bias, target, lse, count)
        return total / count if reduction == MEAN else total

    @staticmethod
    def backward(ctx, grad_loss):
        ignore_index, reduction, chunk_rows, seq_slice, align = ctx.options
        wanted = ctx.needs_input_grad[:3]
        if len(ctx.saved_tensors) == 4:
            hidden, weight, bias, target = ctx.saved_tensors
            inputs = [t.detach().requires_grad_(w) if t is not None else None
                      for t, w in zip((hidden, weight, bias), wanted)]
            with torch.enable_grad():
                loss = _whole(*inputs, target, ignore_index, reduction, seq_slice)
                asked = [t for t, w in zip(inputs, wanted) if w]
                grads = iter(torch.autograd.grad(loss, asked, grad_loss))
            return (*[next(grads) if w else None for w in wanted], None, None, None, None, None, None)
        hidden, weight, bias, target, lse, count = ctx.saved_tensors
        rows = _rows(hidden, seq_slice)
        scale = grad_loss.to(lse.dtype) / count if reduction == MEAN else grad_loss.to(lse.dtype)
        grad_rows = torch.empty_like(rows) if wanted[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if wanted[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=lse.dtype, device=bias.device) if wanted[2] else None
        vocab = weight.shape[0]
        padded_weight, padded_bias = _padded(weight, bias, -vocab % align)
        for start in range(0, rows.shape[0], chunk_rows):
            end = min(start + chunk_rows, rows.shape[0])
            chunk = rows[start:end]
            logits = F.linear(chunk, padded_weight, padded_bias)
            dtype = logits.dtype
            grad = logits.to(lse.dtype)       # the logits themselves when they are already fp32: not used again
            del logits
            grad.sub_(lse[start:end].unsqueeze(1)).exp_()                       # the softmax
            grad[:, vocab:] = 0.0             # the padding's: no class, no gradient
            chunk_target = target[start:end]
            grad.scatter_add_(1, chunk_target.clamp(min=0).unsqueeze(1),
                              torch.full((end - start, 1), -1.0, dtype=grad.dtype, device=grad.device))
            grad.mul_(torch.where(chunk_target != ignore_index, scale, 0.0).unsqueeze(1))
            grad = grad.to(dtype)
            if wanted[0]:
                grad_rows[start:end] = grad @ padded_weight
            # Summed into fp32 as they are (the sum promotes exactly): no fp32 copy of a vocabulary x hidden
            # product per chunk: 1.6 of the 4.1 GB a chunk moved through memory at 50257 x 4096.
            if wanted[1]:
                grad_weight.add_((grad.t() @ chunk)[:vocab])
            if wanted[2]:
                grad_bias.add_(grad[:, :vocab].sum(0))
        grad_hidden = None
        if wanted[0]:
            if seq_slice is None:
                grad_hidden = grad_rows.view(hidden.shape)
            else:
                grad_hidden = torch.zeros_like(hidden)
                grad_hidden[:, seq_slice[0]:seq_slice[1]] = grad_rows.view(grad_hidden[:, seq_slice[0]:seq_slice[1]].shape)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         target: torch.Tensor, ignore_index: int = -100, reduction: int = MEAN,
                         chunk_rows: int = 1024, seq_slice: tuple[int, int] | None = None,
                         align: int | None = None) -> torch.Tensor:
    """Cross-entropy of the head's logits against ``target``, ``chunk_rows`` rows of logits at a time (see the
    module docstring). ``seq_slice``: (start, end) of the positions along dimension 1 the loss reads.
    ``align``: the multiple the products' vocabulary is padded to (None: ``vocab_align`` of the weight's
    device; estimate_costs names the target's when it measures on meta tensors)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction code {reduction}: only mean (1) and sum (2) are chunked")
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, reduction, chunk_rows, seq_slice,
                                     align)
