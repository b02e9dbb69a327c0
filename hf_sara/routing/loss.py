"""The SARA alignment loss: symmetric Jensen-Shannon divergence between routing distributions (pure functions)."""

from __future__ import annotations

import torch

from .layers import LayerSelection, resolve_layers


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """
    Symmetric Jensen-Shannon divergence over the last dimension, in nats.

    `JS(P || Q) = 1/2 KL(P || M) + 1/2 KL(Q || M)` with `M = (P + Q) / 2`. Computed in fp32 whatever the input dtype.
    `eps` is added inside the logarithms only, so the result is finite (and has a finite gradient) when the inputs hold
    zeros, it is exactly 0 when `p` equals `q`, and it stays within `[0, ln 2]`.

    Args:
        p (`torch.Tensor`):
            Probability distributions over the last dimension.
        q (`torch.Tensor`):
            Probability distributions over the last dimension, broadcastable with `p`.
        eps (`float`, *optional*, defaults to `1e-8`):
            Smoothing inside the logarithms.

    Returns:
        `torch.Tensor`: the divergences, of the broadcast shape of `p` and `q` without the last dimension, in fp32.
    """
    p = p.float()
    q = q.float()
    log_m = torch.log(0.5 * (p + q) + eps)
    kl_p = (p * (torch.log(p + eps) - log_m)).sum(dim=-1)
    kl_q = (q * (torch.log(q + eps) - log_m)).sum(dim=-1)
    return 0.5 * (kl_p + kl_q)


_DISTRIBUTIONS_FIX = (
    "Pass pooled probabilities, such as `routing_distributions(model, anchor_ids)`, not router logits or counts."
)


def check_distributions(
    distributions: torch.Tensor,
    what: str,
    fix: str = _DISTRIBUTIONS_FIX,
    row_names: list | None = None,
    tolerance: float = 1e-2,
) -> None:
    """
    Raises a `ValueError` naming `what`, the first bad rows (along dimension 0, by `row_names` when given) and `fix`
    unless every distribution along the last dimension is one: finite, non-negative, summing to 1 within `tolerance`.
    """
    if distributions.numel() == 0:
        return
    values = distributions.detach().float()
    finite = torch.isfinite(values).flatten(1).all(dim=1)
    negative = (values < -1e-6).flatten(1).any(dim=1)
    off_sum = ((values.sum(dim=-1) - 1).abs() > tolerance).flatten(1).any(dim=1)
    bad = ~finite | negative | off_sum
    if not bad.any():
        return
    first = int(bad.nonzero()[0])
    problem = (
        "non-finite entries"
        if not finite[first]
        else f"a negative entry ({values[first].min().item():.3g})"
        if negative[first]
        else f"distributions that sum to {values[first].sum(dim=-1).flatten()[0].item():.4g}, not 1"
    )
    rows = bad.nonzero().flatten().tolist()
    names = [row_names[row] for row in rows] if row_names is not None else rows
    raise ValueError(
        f"{what} must hold routing distributions over the experts (each non-negative and summing to 1), but row(s) "
        f"{names[:10]}{' ...' if len(names) > 10 else ''} do not: row {names[0]} has {problem}. {fix}"
    )


def alignment_divergences(
    distributions: torch.Tensor, anchor_distributions: torch.Tensor, weights: torch.Tensor, layers: list[int]
) -> torch.Tensor:
    """
    The terms of the SARA loss: the Jensen-Shannon divergence between each example's routing and its anchor's, per
    aligned layer, `[batch, len(layers)]` in fp32 (0 where `weights` is 0). [`sara_alignment_loss`] checks its
    inputs and takes their masked mean; [`SARATrainer`] also logs them.

    Args:
        distributions, anchor_distributions (`torch.Tensor` of shape `[batch, n_moe_layers, n_experts]`):
            The examples' and the anchors' routing; no gradient flows into the anchors.
        weights (`torch.Tensor` of shape `[batch]`):
            1.0 for the examples that have an anchor, 0.0 for the others (whose anchor rows may hold anything).
        layers (`list[int]`):
            The aligned MoE layers, resolved.
    """
    index = torch.tensor(layers, device=distributions.device)
    examples = distributions.index_select(1, index)
    # Rows without an anchor may hold zeros or garbage: replace them by the example itself, so their divergence is a
    # finite 0 that the mask removes without NaN leaking into the gradient.
    anchors = torch.where(
        weights.bool()[:, None, None],
        anchor_distributions.detach().index_select(1, index).float(),
        examples.detach().float(),
    )
    return js_divergence(examples, anchors)


def masked_layer_mean(divergences: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over weighted rows of `[batch, layers]` divergences, per layer, and its mean over layers."""
    per_layer = (divergences * weights[:, None]).sum(dim=0) / weights.sum().clamp_min(1.0)
    return per_layer.mean(), per_layer


def sara_alignment_loss(
    distributions: torch.Tensor,
    anchor_distributions: torch.Tensor,
    has_anchor: torch.Tensor | None = None,
    layers: LayerSelection = None,
    check_anchors: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The SARA loss: mean Jensen-Shannon divergence between each example's routing and its anchor's, over the aligned
    layers and the examples that have an anchor.

    Args:
        distributions (`torch.Tensor` of shape `[batch, n_moe_layers, n_experts]`):
            The examples' pooled routing distributions (see [`routing_distributions`]). Gradient flows into them.
        anchor_distributions (`torch.Tensor` of shape `[batch, n_moe_layers, n_experts]`):
            The anchors' pooled routing distributions. They are a target: they are detached, no gradient flows into
            them. Rows of examples without an anchor may hold anything finite (zeros, say); they are masked out.
        has_anchor (`torch.Tensor` of shape `[batch]`, *optional*):
            Boolean mask of the examples that have an anchor. Defaults to all of them. Examples without one add
            nothing to the loss and do not count in its mean.
        layers (`str`, `int`, `Sequence[int]`, `tuple[float, float]` or `None`, *optional*):
            The aligned layers, as indices along dimension 1 of `distributions` (MoE layers, not decoder layers); see
            [`resolve_layers`] for the accepted forms. Defaults to the published band, layers 7..34 of 48 expressed as
            fractions of depth.
        check_anchors (`bool`, *optional*, defaults to `True`):
            Whether to check that every anchored row of `anchor_distributions` is a distribution (finite,
            non-negative, summing to 1 within 1e-2): anything else gives a NaN or meaningless loss. It synchronises
            with the device once; [`SARATrainer`] checks its anchors where it reads them instead.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the scalar loss (fp32), and the per-layer mean divergences of shape
        `[n_selected_layers]` for logging. A batch with no anchored example gives a loss of exactly 0 whose gradient is
        0.
    """
    if distributions.dim() != 3:
        raise ValueError(
            f"`distributions` must have shape [batch, n_moe_layers, n_experts], got {tuple(distributions.shape)}."
        )
    if anchor_distributions.shape != distributions.shape:
        raise ValueError(
            f"`anchor_distributions` has shape {tuple(anchor_distributions.shape)} but `distributions` has "
            f"{tuple(distributions.shape)}: anchors must come from the same model, with one row per example."
        )
    batch_size, num_layers, _ = distributions.shape
    if has_anchor is None:
        weights = distributions.new_ones(batch_size, dtype=torch.float32)
    else:
        has_anchor = torch.as_tensor(has_anchor)
        if has_anchor.shape != (batch_size,):
            raise ValueError(f"`has_anchor` must have shape [{batch_size}], got {tuple(has_anchor.shape)}.")
        weights = has_anchor.to(device=distributions.device, dtype=torch.float32)
    selected = resolve_layers(layers, num_layers)
    if check_anchors:
        anchored = weights.bool()
        check_distributions(
            anchor_distributions.detach()[:, selected][anchored],
            "`anchor_distributions`",
            row_names=torch.arange(batch_size)[anchored.cpu()].tolist(),
        )
    return masked_layer_mean(alignment_divergences(distributions, anchor_distributions, weights, selected), weights)
