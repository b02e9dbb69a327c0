"""From router outputs to routing distributions: scoring rules, sequence segments and masked pooling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .families import PROBABILITIES, SIGMOID, SOFTMAX


def router_probabilities(scores: torch.Tensor, scoring: str) -> torch.Tensor:
    """
    Turns what a router outputs into a probability distribution over experts, in fp32.

    The rule follows the family's own routing function (see [`hf_sara.routing.families.scoring_function`]):

    - `"softmax"` routers (Mixtral, Qwen-MoE, OLMoE, ...): the full softmax of the logits over all experts, not the
      renormalised top-k weights.
    - `"sigmoid"` routers (DeepSeek-V3 style, Llama 4): each expert's score is `sigmoid(logit)`, the value the router
      weights a selected expert with; the scores are divided by their sum. A correction bias that some families add
      for *selection* only is not part of the score, as in the families' own weighting.
    - `"probabilities"`: the router output already is a distribution; it is renormalised to guard against rounding.
    - any other name of an element-wise activation in `ACT2FN` (a config's `scoring_func`): the activation's scores,
      divided by their sum.

    Args:
        scores (`torch.Tensor` of shape `[..., n_experts]`):
            The recorded router output.
        scoring (`str`):
            The scoring function's name.

    Returns:
        `torch.Tensor`: fp32 distributions of the same shape, summing to 1 over the last dimension.
    """
    scores = scores.float()
    if scoring == SOFTMAX:
        return torch.softmax(scores, dim=-1)
    if scoring == SIGMOID:
        positive = torch.sigmoid(scores)
    elif scoring == PROBABILITIES:
        positive = scores.clamp_min(0.0)
    elif scoring in ACT2FN:
        positive = ACT2FN[scoring](scores)
    else:
        raise ValueError(
            f"Unknown router scoring function {scoring!r}: expected 'softmax', 'sigmoid', 'probabilities' or the name "
            "of an activation in transformers.activations.ACT2FN."
        )
    return positive / positive.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


POOLING_MODES = ("all", "prompt", "completion")


def pooling_token_mask(labels: torch.Tensor | None, pooling: str) -> torch.Tensor | None:
    """
    Which tokens a pooling mode pools, from a batch's `labels` (-100 where the SFT loss ignores a token).

    Args:
        labels (`torch.Tensor` or `None`):
            The batch's labels.
        pooling (`str`):
            `"all"` (every real token), `"completion"` (tokens in the SFT loss) or `"prompt"` (real tokens out of it).

    Returns:
        `torch.Tensor` or `None`: a boolean mask of the batch's shape, or `None` for `"all"`.
    """
    if pooling == "all":
        return None
    if labels is None:
        raise ValueError(f"`sara_pooling={pooling!r}` needs the batch's labels to tell prompt from completion.")
    return labels != -100 if pooling == "completion" else labels == -100


@dataclass
class TokenSegments:
    """
    Which flattened token belongs to which sequence, for pooling router outputs per sequence.

    Router outputs are flattened batch-major, `[batch * seq_len, n_experts]` (row `b * seq_len + s`).

    Attributes:
        token_index (`torch.LongTensor` of shape `[n_pooled_tokens]`):
            Flattened positions of the tokens that are pooled.
        segment_of_token (`torch.LongTensor` of shape `[n_pooled_tokens]`):
            The sequence each of those tokens belongs to, in `[0, num_segments)`.
        counts (`torch.Tensor` of shape `[num_segments]`):
            Number of pooled tokens per sequence, as fp32.
        num_tokens (`int`):
            `batch * seq_len`, the number of rows every router output must have.
        sequence_of_segment (`torch.LongTensor` of shape `[num_segments]`, *optional*):
            With explicit `sequence_ids`: the id of each segment's sequence.
    """

    token_index: torch.Tensor
    segment_of_token: torch.Tensor
    counts: torch.Tensor
    num_tokens: int
    sequence_of_segment: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        return self.counts.shape[0]

    def to(self, device: torch.device) -> TokenSegments:
        return TokenSegments(
            self.token_index.to(device),
            self.segment_of_token.to(device),
            self.counts.to(device),
            self.num_tokens,
            None if self.sequence_of_segment is None else self.sequence_of_segment.to(device),
        )


def token_segments(
    input_shape: tuple[int, int] | torch.Size,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
    sequence_ids: torch.Tensor | None = None,
) -> TokenSegments:
    """
    Works out the sequences of a batch and the tokens to pool for each.

    Args:
        input_shape (`tuple[int, int]`):
            `(batch, seq_len)` of the batch.
        attention_mask (`torch.Tensor` of shape `[batch, seq_len]`, *optional*):
            1 for real tokens, 0 for padding. Padding is never pooled.
        position_ids (`torch.Tensor` of shape `[batch, seq_len]`, *optional*):
            For padding-free / packed batches: a new sequence starts wherever the position does not increase (a reset
            to 0). Without it, each row is one sequence.
        token_mask (`torch.Tensor` of shape `[batch, seq_len]`, *optional*):
            Restricts pooling further (e.g. to prompt or completion tokens).
        device (`torch.device`, *optional*):
            Where to build the result.
        sequence_ids (`torch.LongTensor` of shape `[batch, seq_len]`, *optional*):
            Explicit sequence membership, as trainers know it: each run of equal ids in a row is one sequence, and -1
            marks tokens that belong to none (padding). Takes precedence over `position_ids`; sequences left with no
            token to pool are dropped, and `sequence_of_segment` gives the id of each one kept.

    Returns:
        [`TokenSegments`]: one segment per row (or per packed sequence), in order.

    Raises:
        `ValueError`: when a row (or packed sequence) has no token left to pool.
    """
    batch_size, seq_len = int(input_shape[0]), int(input_shape[1])
    if seq_len == 0 or batch_size == 0:
        raise ValueError(
            f"The batch has shape {(batch_size, seq_len)}: there is no token to route. Drop empty inputs."
        )
    pooled = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, seq_len):
            raise ValueError(
                f"`attention_mask` must have shape [{batch_size}, {seq_len}] (a 2D padding mask), got "
                f"{tuple(attention_mask.shape)}."
            )
        pooled &= attention_mask.to(device=pooled.device).bool()
    real = pooled.clone()  # tokens that are not padding
    for name, tensor in (("token_mask", token_mask), ("position_ids", position_ids), ("sequence_ids", sequence_ids)):
        if tensor is not None and tensor.shape[-1] != seq_len:
            raise ValueError(
                f"`{name}` has shape {tuple(tensor.shape)} but the batch is {(batch_size, seq_len)}: give one value "
                "per token, laid out like `input_ids`."
            )
    if token_mask is not None:
        pooled &= token_mask.to(device=pooled.device).bool()

    if sequence_ids is not None:
        sequence_ids = sequence_ids.to(pooled.device)
        pooled &= sequence_ids >= 0
        starts = torch.ones_like(pooled)
        starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
        segment_ids = starts.flatten().cumsum(0).view(batch_size, seq_len) - 1
    elif position_ids is None:
        segment_ids = torch.arange(batch_size, device=pooled.device)[:, None].expand(batch_size, seq_len)
    else:
        position_ids = position_ids.to(pooled.device).expand(batch_size, seq_len)
        starts = torch.ones_like(pooled)
        starts[:, 1:] = position_ids[:, 1:] <= position_ids[:, :-1]
        segment_ids = starts.flatten().cumsum(0).view(batch_size, seq_len) - 1

    flat_pooled = pooled.flatten()
    token_index = flat_pooled.nonzero().squeeze(-1)
    segment_of_token = segment_ids.flatten()[token_index]
    num_raw_segments = int(segment_ids.max().item()) + 1 if segment_ids.numel() else 0
    raw_counts = torch.bincount(segment_of_token, minlength=num_raw_segments)
    sequence_of_segment = None
    if position_ids is None and sequence_ids is None:
        empty = (raw_counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"Row(s) {empty} of the batch have no token to pool (all padding, or all masked out by the pooling "
                "choice). Drop empty examples, or pool over all real tokens."
            )
        counts = raw_counts
    else:
        if sequence_ids is None:
            # Packed rows: a row of padding only, or a sequence whose real tokens are all masked out, would silently
            # shorten the result; only segments of pure padding (between packed sequences) may go.
            empty_rows = (~real.any(dim=1)).nonzero().flatten().tolist()
            real_counts = torch.bincount(segment_ids.flatten()[real.flatten()], minlength=num_raw_segments)
            masked_out = ((real_counts > 0) & (raw_counts == 0)).nonzero().flatten().tolist()
            if empty_rows or masked_out:
                where = (
                    f"row(s) {empty_rows} hold only padding"
                    if empty_rows
                    else (f"packed sequence(s) {masked_out} (padding runs counted) keep no token after `token_mask`")
                )
                raise ValueError(
                    f"In this batch, {where}, so fewer distributions than sequences would come back. Drop empty "
                    "rows, or pool over all real tokens."
                )
        # Segments made only of padding (padding-free batches have none, padded ones may) are dropped; the others are
        # renumbered 0..n-1 in order.
        kept = raw_counts > 0
        renumber = kept.long().cumsum(0) - 1
        if sequence_ids is not None:
            first_token = torch.zeros(num_raw_segments, dtype=torch.long, device=pooled.device)
            first_token.scatter_reduce_(0, segment_of_token, token_index, reduce="amin", include_self=False)
            sequence_of_segment = sequence_ids.flatten()[first_token[kept]]
        segment_of_token = renumber[segment_of_token]
        counts = raw_counts[kept]
    return TokenSegments(token_index, segment_of_token, counts.float(), batch_size * seq_len, sequence_of_segment)


def pool_routing(scores: torch.Tensor, scoring: str, segments: TokenSegments) -> torch.Tensor:
    """
    Masked mean, per sequence, of the router's distribution over experts.

    Only the pooled tokens are scored, so padding costs nothing; autograd keeps the fp32 probabilities of those tokens
    (what the softmax backward needs) and an index, never the full-batch logits of every layer.

    Args:
        scores (`torch.Tensor` of shape `[batch * seq_len, n_experts]` or `[batch, seq_len, n_experts]`):
            One router's recorded output for the batch.
        scoring (`str`):
            The router's scoring function, see [`router_probabilities`].
        segments ([`TokenSegments`]):
            The batch's sequences, see [`token_segments`].

    Returns:
        `torch.Tensor` of shape `[num_segments, n_experts]`, fp32: one distribution per sequence.
    """
    scores = scores.reshape(-1, scores.shape[-1])
    if scores.shape[0] != segments.num_tokens:
        raise ValueError(
            f"A router returned {scores.shape[0]} rows for a batch of {segments.num_tokens} tokens. hf_sara expects "
            "router outputs flattened batch-major, [batch * seq_len, n_experts]; this family lays them out "
            "differently and is not supported."
        )
    probabilities = router_probabilities(scores.index_select(0, segments.token_index), scoring)
    sums = probabilities.new_zeros(segments.num_segments, probabilities.shape[-1])
    sums = sums.index_add(0, segments.segment_of_token, probabilities)
    return sums / segments.counts[:, None]


class _PooledRoutingFromRouterInput(torch.autograd.Function):
    """
    `pool_routing` of a linear router's logits whose backward recomputes the logits from the router's input.

    The forward pools the logits the model computed and saves only the router's input, weight and bias, which the
    router's own linear layer already keeps for its backward: the pooling adds nothing per token to what autograd
    keeps. The backward runs `F.linear` once more, backpropagates through the pooled scores, and returns the gradient
    of the logits, which autograd adds to the model's own before the router's linear backward runs (once).
    """

    @staticmethod
    def forward(ctx, logits, router_input, weight, bias, scoring, segments):  # noqa: D102
        ctx.scoring, ctx.segments = scoring, segments
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        ctx.save_for_backward(router_input, weight, *(() if bias is None else (bias,)))
        return pool_routing(logits.detach(), scoring, segments)

    @staticmethod
    def backward(ctx, grad_pooled):  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        router_input, weight, *bias = ctx.saved_tensors
        with torch.no_grad():
            logits = F.linear(router_input, weight, bias[0] if bias else None)
        with torch.enable_grad():
            logits = logits.reshape(-1, logits.shape[-1]).requires_grad_()
            (grad_logits,) = torch.autograd.grad(pool_routing(logits, ctx.scoring, ctx.segments), logits, grad_pooled)
        return grad_logits.reshape(ctx.logits_shape).to(ctx.logits_dtype), None, None, None, None, None


def pool_routing_from_router_input(
    logits: torch.Tensor,
    router_input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scoring: str,
    segments: TokenSegments,
) -> torch.Tensor:
    """
    [`pool_routing`] for a linear router, `logits == F.linear(router_input, weight, bias)`, whose backward recomputes
    the logits instead of keeping per-token probabilities. What autograd keeps for it is then the router's input and
    weight, which the router's linear layer keeps anyway (when its weight is trained): the extra memory no longer
    grows with the tokens. The gradient flows into `logits`, so the router's own linear backward runs once.
    """
    return _PooledRoutingFromRouterInput.apply(logits, router_input, weight, bias, scoring, segments)
