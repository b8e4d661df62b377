"""Log-likelihood of continuations, batched: lm-evaluation-harness' request semantics in upcycle's own code.

A pair is tokenised as the harness does (a trailing space of the context moves to the continuation; the
continuation's tokens are those of context + continuation past the context's), the input is cut from the left to
the model's window, and the sum of the continuation tokens' log-probabilities is taken with a greedy check.
Requests run longest first, left-padded with explicit positions, so only the last positions' logits are computed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from upcycle.downstream.items import Request

ProgressFn = Callable[[int], None]  # called with how many requests were just scored


@dataclass(frozen=True)
class Scored:
    logprob: float  # natural log
    greedy: bool  # every continuation token is the model's most likely next token
    tokens: int


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]  # context + continuation, the last token dropped, cut to the window
    continuation: list[int]


def encode(tokenizer, request: Request, window: int) -> Encoded:
    context, continuation = request.context, request.continuation
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if context:  # the tokenizer's own special tokens (a BOS where it adds one), as the harness encodes a pair
        context_ids = tokenizer(context)["input_ids"]
        continuation_ids = tokenizer(context + continuation)["input_ids"][len(context_ids) :]
    else:  # nothing to condition on: the harness starts from the beginning-of-text token, once
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if continuation_ids and continuation_ids[0] == prefix:
            context_ids, continuation_ids = continuation_ids[:1], continuation_ids[1:]
        else:
            context_ids = [prefix]
    whole = (context_ids + continuation_ids)[-(window + 1) :]
    return Encoded(whole[:-1], continuation_ids[-window:])


UNBOUNDED = 10**12  # tokenizers without a length limit report about 1e30


def window_of(model: nn.Module, tokenizer) -> int:
    """The model's context length as the harness finds it: the config's, else the tokenizer's, else 2048."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, name, None)
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < UNBOUNDED else 2048


def _keeps_last_logits(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()  # not inference_mode: FSDP2 would keep inference tensors as buffers for training
def score(
    model: nn.Module,
    tokenizer,
    requests: Sequence[Request],
    batch_size: int,
    progress: ProgressFn | None = None,
    device: torch.device | None = None,
) -> list[Scored]:
    """One :class:`Scored` per request, in the order given; inputs go to ``device`` (default: the first weight's)."""
    window = window_of(model, tokenizer)
    encoded = [encode(tokenizer, request, window) for request in requests]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))
    device = device if device is not None else next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep_last = _keeps_last_logits(model)
    results: list[Scored | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = [encoded[i] for i in order[start : start + batch_size]]
        length = max(len(e.input_ids) for e in batch)
        keep = max(len(e.continuation) for e in batch)
        ids_BT = torch.full((len(batch), length), pad, dtype=torch.long)
        mask_BT = torch.zeros((len(batch), length), dtype=torch.long)
        for row, e in enumerate(batch):
            ids_BT[row, length - len(e.input_ids) :] = torch.tensor(e.input_ids)
            mask_BT[row, length - len(e.input_ids) :] = 1
        positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": keep} if keep_last else {}
        logits = model(
            input_ids=ids_BT.to(device),
            attention_mask=mask_BT.to(device),
            position_ids=positions_BT.to(device),
            use_cache=False,
            **extra,
        ).logits[:, -keep:]
        logprobs_BKV = torch.log_softmax(logits.float(), dim=-1)
        for row, e in enumerate(batch):
            n = len(e.continuation)
            rows_NV = logprobs_BKV[row, keep - n :]
            target_N = torch.tensor(e.continuation, device=rows_NV.device)
            picked = rows_NV.gather(-1, target_N[:, None]).squeeze(-1)
            greedy = bool((rows_NV.argmax(-1) == target_N).all())
            results[order[start + row]] = Scored(float(picked.sum()), greedy, n)
        if progress is not None:
            progress(len(batch))
    return results  # type: ignore[return-value]
