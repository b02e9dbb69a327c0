"""Capture the pooled routing of one forward: the context that the hooks of `patch_model` record into."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..distributed import has_sharded_parameters
from .deferred import DeferredAlignment
from .discovery import RouterSite
from .loss import alignment_divergences
from .patching import RouterInput, get_routing_state
from .pooling import TokenSegments, pool_routing, pool_routing_from_router_input, token_segments

# How a capture makes the routing differentiable, see `capture_routing`.
GRADIENT_MODES = ("graph", "deferred", "none")

_REENTRANT_CHECKPOINT_ERROR = (
    "A router ran under torch.no_grad() inside a forward that was opened with gradients enabled: this is gradient "
    "checkpointing with `use_reentrant=True`, which runs each layer's first forward without autograd, so a loss built "
    "from `capture.distributions()` would train nothing. Open the capture with `gradient='deferred'` and add "
    "`capture.alignment_term(...)` to the loss (what SARATrainer does: it trains under every checkpointing mode), or "
    "use non-reentrant checkpointing: `activation_checkpointing_kwargs={'use_reentrant': False}` "
    "(`gradient_checkpointing_kwargs` before transformers 5), or `model.activation_checkpointing_enable("
    "{'use_reentrant': False})`."
)


_NO_GRAD_INSIDE_ERROR = (
    "A router ran under torch.no_grad() inside a routing capture opened with gradients enabled: `generate()` or a "
    "`torch.no_grad()` block inside `capture_routing`. A capture records one forward: open it inside the no_grad "
    "block (or use `routing_distributions`), and for generation capture the prompt's forward, not `generate()`."
)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _RoutingComplete(Exception):
    """Raised by the router hook of a capture's last layer to end a forward early; the capture swallows it."""


class RoutingCapture:
    """
    The pooled routing distributions recorded during one forward of a patched model.

    Each hook pools its router's output as the forward runs, so only `[num_sequences, n_experts]` per layer is kept,
    not the `[tokens, n_experts]` logits of every layer. Open it with [`capture_routing`].
    """

    def __init__(
        self,
        segments: TokenSegments,
        num_layers: int,
        sites: list[RouterSite],
        keep_scores: bool = False,
        recompute_router_logits: bool = False,
        checkpointing: bool = True,
        gradient: str = "graph",
        stop_after: int | None = None,
        end_forward: bool = False,
    ):
        self.checkpointing = checkpointing
        self.stop_after = stop_after  # the last captured layer `distributions()` holds
        self.end_forward = end_forward and stop_after is not None  # whether the forward ends there
        self.stopped_early = False
        self.segments = segments
        self.sites = sites
        self.pooled: list[torch.Tensor | None] = [None] * num_layers
        self.raw_scores: list[torch.Tensor | None] | None = [None] * num_layers if keep_scores else None
        self.grad_enabled = torch.is_grad_enabled()
        self.gradient = gradient if self.grad_enabled else "none"
        self.recompute_router_logits = recompute_router_logits and self.gradient == "graph"
        self.deferred = DeferredAlignment(segments, sites) if self.gradient == "deferred" else None

    def record(
        self,
        layer: int,
        scores: torch.Tensor,
        site: RouterSite,
        router_input: RouterInput | None = None,
        output: Any = None,
    ) -> Any:
        """
        Pools one router's scores; returns the router output the model goes on with (`None`: unchanged), or ends the
        forward when `layer` is the capture's `stop_after`. With
        `router_input` (the `(input, weight, bias)` of a linear router whose scores are `F.linear(input, weight,
        bias)`), the backward recomputes the scores instead of keeping per-token probabilities, see
        [`pool_routing_from_router_input`].
        """
        if self.pooled[layer] is not None:
            raise RuntimeError(
                f"The router {site.name!r} ran twice while one routing capture was open. Open one capture per forward "
                "(call backward and generate outside `capture_routing`)."
            )
        if self.raw_scores is not None:
            self.raw_scores[layer] = scores.detach().reshape(-1, scores.shape[-1])
        if self.end_forward and layer == self.stop_after:
            self._pool_without_gradient(layer, scores, site)
            self.stopped_early = True
            raise _RoutingComplete
        if self.deferred is not None:
            replaced = self.deferred.record(layer, scores, output)
            self.pooled[layer] = self.deferred.pooled[layer]
            return replaced
        if self.segments.token_index.device != scores.device:
            self.segments = self.segments.to(scores.device)
        if self.gradient == "none":
            self._pool_without_gradient(layer, scores, site)
            return None
        if not torch.is_grad_enabled():
            raise RuntimeError(_REENTRANT_CHECKPOINT_ERROR if self.checkpointing else _NO_GRAD_INSIDE_ERROR)
        # The pooling ops save what their backward needs themselves, outside any saved-tensor hooks: a non-reentrant
        # gradient checkpoint must not try to recompute them (its recomputation records nothing, see patch_model).
        with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            if router_input is not None:
                self.pooled[layer] = pool_routing_from_router_input(scores, *router_input, site.scoring, self.segments)
            else:
                self.pooled[layer] = pool_routing(scores, site.scoring, self.segments)
        return None

    def _pool_without_gradient(self, layer: int, scores: torch.Tensor, site: RouterSite) -> None:
        if self.segments.token_index.device != scores.device:
            self.segments = self.segments.to(scores.device)
        with torch.no_grad():
            self.pooled[layer] = pool_routing(scores.detach(), site.scoring, self.segments)

    def scores(self) -> list[torch.Tensor]:
        """
        Returns each captured router's raw output, `[batch * seq_len, n_experts]` per layer, as the model recorded it
        (logits for most families). Only available when the capture was opened with `keep_scores=True`, which keeps
        every layer's per-token tensor alive (what `output_router_logits=True` costs): for analysis, not training.
        """
        if self.raw_scores is None:
            raise RuntimeError("Open the capture with `keep_scores=True` to keep the routers' per-token outputs.")
        self.distributions()  # raises if a router did not run
        return list(self.raw_scores)  # type: ignore[arg-type]

    def distributions(self) -> torch.Tensor:
        """
        Returns the recorded distributions.

        Returns:
            `torch.Tensor` of shape `[num_sequences, n_captured_layers, n_experts]`, fp32, rows summing to 1 (with
            `stop_after`, the layers up to it: `[num_sequences, stop_after + 1, n_experts]`).

        Raises:
            `RuntimeError`: when a router did not run during the forward (for instance a hub kernel with
            `use_kernels=True` replaced the whole MoE block), so the routing would silently cover fewer layers.
        """
        pooled_layers = self.pooled if self.stop_after is None else self.pooled[: self.stop_after + 1]
        missing = [i for i, pooled in enumerate(pooled_layers) if pooled is None]
        if missing:
            names = ", ".join(repr(self.sites[i].name) for i in missing[:3])
            raise RuntimeError(
                f"{len(missing)} of {len(pooled_layers)} hooked routers did not run during the forward (e.g. "
                f"{names}). Either no forward ran inside the capture, or something replaced the routers after "
                "patch_model (a hub kernel loaded with `use_kernels=True`, or a PEFT wrapper added afterwards). Load "
                "the model without `use_kernels`, and call patch_model after wrapping the model."
            )
        widths = {pooled.shape[-1] for pooled in pooled_layers}
        if len(widths) > 1:
            raise RuntimeError(
                f"The hooked routers score different numbers of experts ({sorted(widths)}); pass `layers=` to "
                "patch_model to capture layers of one width."
            )
        return torch.stack(pooled_layers, dim=1)  # type: ignore[arg-type]

    def alignment_term(
        self,
        anchor_distributions: torch.Tensor,
        has_anchor: torch.Tensor,
        row_weights: torch.Tensor,
        layers: list[int],
        ordering: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The SARA alignment term of this forward, `sum over aligned layers l and sequences b of row_weights[b] *
        JS(routing[b, l] || anchors[b, l])`, differentiable in the capture's mode.

        ```python
        with capture_routing(model, input_ids.shape, attention_mask, gradient="deferred") as capture:
            sft_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        weights = has_anchor.float() / has_anchor.sum().clamp(min=1) / len(layers)  # the mean over rows and layers
        term, divergences = capture.alignment_term(anchors, has_anchor, weights, layers, ordering=sft_loss)
        (sft_loss + 1.5 * term).backward()
        ```

        With `gradient="graph"` the term is built from the pooled routing's own graph. With `gradient="deferred"` its
        value comes from the forward and its gradient reaches each router in the backward, where the router's scores
        exist (see [`hf_sara.routing.deferred`]): the same gradients under no, non-reentrant and reentrant
        checkpointing. Anchors are targets: no gradient flows into them.

        Args:
            anchor_distributions (`torch.Tensor` of shape `[sequences, captured layers, experts]`):
                The anchors' routing; rows without an anchor may hold anything.
            has_anchor (`torch.Tensor` of shape `[sequences]`):
                Which rows have an anchor.
            row_weights (`torch.Tensor` of shape `[sequences]`):
                Each row's weight (0 for rows without an anchor): how the term is reduced.
            layers (`list[int]`):
                The aligned captured layers (resolved, see [`resolve_layers`]).
            ordering (`torch.Tensor`, *optional*):
                With `gradient="deferred"`, required: the loss the term is added to, built on this forward (e.g. the
                SFT loss). The term's backward must run before the model's, and consuming it guarantees it.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: the term (a scalar), and the per-sequence, per-layer divergences
            `[sequences, len(layers)]`, detached, for logging.
        """
        distributions = self.distributions()
        divergences = alignment_divergences(distributions, anchor_distributions, has_anchor.float(), layers)
        value = (divergences * row_weights[:, None]).sum()
        if self.deferred is None:
            return value, divergences.detach()
        if ordering is None or ordering.grad_fn is None:
            raise ValueError(
                "A deferred alignment term needs `ordering`: the loss it is added to, built on this forward (its "
                "backward must reach the term before the model)."
            )
        term = self.deferred.bind(anchor_distributions, has_anchor, row_weights, layers, value, ordering)
        return term, divergences


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Runs a block with `model` in eval mode, and puts back the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def activation_checkpointing(model: nn.Module) -> bool:
    """
    Whether `model` recomputes activations in backward: a layer with transformers' `gradient_checkpointing` flag on
    (what `is_activation_checkpointing` reads, also inside a PEFT model), or FSDP's `CheckpointWrapper`.
    """
    if not model.training:
        return False
    return any(
        getattr(module, "gradient_checkpointing", False) is True or type(module).__name__ == "CheckpointWrapper"
        for module in model.modules()
    )


@contextmanager
def capture_routing(
    model: nn.Module,
    input_shape: tuple[int, int] | torch.Size,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    keep_scores: bool = False,
    sequence_ids: torch.Tensor | None = None,
    recompute_router_logits: bool | None = None,
    gradient: str = "graph",
    stop_after: int | None = None,
) -> Iterator[RoutingCapture]:
    """
    Opens a routing capture around one forward of a patched model.

    ```python
    with capture_routing(model, input_ids.shape, attention_mask) as capture:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
    distributions = capture.distributions()  # [batch, n_moe_layers, n_experts]
    ```

    Call the backward after the block: hooks that fire while gradient checkpointing recomputes a layer then record
    nothing.

    Args:
        model (`torch.nn.Module`):
            A model patched with [`patch_model`].
        input_shape (`tuple[int, int]`):
            `(batch, seq_len)` of the forward's input ids.
        attention_mask (`torch.Tensor`, *optional*):
            `[batch, seq_len]` padding mask; padding is not pooled.
        position_ids (`torch.Tensor`, *optional*):
            For padding-free / packed batches, where sequences restart; one distribution per sequence is returned.
        token_mask (`torch.Tensor`, *optional*):
            `[batch, seq_len]` mask restricting which real tokens are pooled.
        keep_scores (`bool`, *optional*, defaults to `False`):
            Also keep each router's per-token output, see [`RoutingCapture.scores`].
        sequence_ids (`torch.LongTensor`, *optional*):
            `[batch, seq_len]` explicit sequence membership (-1 for padding), see [`token_segments`]; the id of each
            returned distribution's sequence is then `capture.segments.sequence_of_segment`.
        recompute_router_logits (`bool`, *optional*):
            For linear routers whose weight is trained: keep nothing per token for the pooling's backward and
            recompute the router logits from the router's input there (which the router itself keeps), so the memory
            the capture adds does not grow with the tokens. Defaults to `True` unless activation checkpointing is
            on (a checkpoint frees the router's input, which the recomputation would then keep alive) or an engine
            shards the weights (DeepSpeed ZeRO-3, FSDP: the router weight is gathered only for the router's own
            backward).
        gradient (`str`, *optional*, defaults to `"graph"`):
            How the routing is differentiable when gradients are enabled. `"graph"`: `capture.distributions()` is part
            of the autograd graph, for any loss built from it (refused under reentrant gradient checkpointing, which
            runs the forward without autograd). `"deferred"`: the routing is pooled without autograd and the gradient
            of [`~RoutingCapture.alignment_term`] is added in the backward, where each router's scores exist: it works
            under every checkpointing mode and keeps nothing per token between forward and backward when
            checkpointing is on. `"none"`: no gradient (cheapest; what a no-grad forward gets anyway).
        stop_after (`int`, *optional*):
            A captured layer after whose router the forward may end: the rest of the model (later layers, the final
            norm, the LM head) is not run, and `distributions()` holds the layers up to it. Only a forward without
            gradient ends early, and only when no engine shards the weights (FSDP and DeepSpeed ZeRO-3 gather and
            release parameters around every module, and their bookkeeping expects the whole forward): elsewhere the
            forward runs to its end and `distributions()` is cut the same way. The forward must be the last statement
            of the `with` block (the block ends where the forward does).

    Yields:
        [`RoutingCapture`]: whose `distributions()` is ready once the forward has run.
    """
    state = get_routing_state(model)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} is not patched: call `model = hf_sara.patch_model(model)` before capturing "
            "its routing."
        )
    if state.active is not None:
        raise RuntimeError("A routing capture is already open on this model; captures cannot be nested.")
    if gradient not in GRADIENT_MODES:
        raise ValueError(f"`gradient` must be one of {GRADIENT_MODES}, got {gradient!r}.")
    device = next((t.device for t in (attention_mask, sequence_ids, position_ids) if t is not None), None)
    segments = token_segments(input_shape, attention_mask, position_ids, token_mask, device, sequence_ids)
    checkpointing = activation_checkpointing(model)
    if recompute_router_logits is None:
        # Sharded weights (ZeRO-3, FSDP) are gathered only for their module's own backward, which may run after the
        # pooling's backward that the recomputation would need them in.
        recompute_router_logits = not checkpointing and not has_sharded_parameters(model)
    if stop_after is not None and not 0 <= stop_after < len(state.captured_layers):
        raise ValueError(f"`stop_after` must be a captured layer, 0..{len(state.captured_layers) - 1}: {stop_after}.")
    capture = RoutingCapture(
        segments,
        len(state.captured_layers),
        state.captured_sites,
        keep_scores,
        recompute_router_logits,
        checkpointing,
        gradient,
        stop_after,
        end_forward=not torch.is_grad_enabled() and not has_sharded_parameters(model),
    )
    if capture.deferred is not None:
        # Reached by the router hooks when the backward recomputes a layer (no capture is open then).
        state.pending = [ref for ref in state.pending if ref() is not None] + [weakref.ref(capture.deferred)]
    state.active = capture
    try:
        yield capture
    except _RoutingComplete:
        pass  # the forward ended after the last layer the capture needs
    finally:
        state.active = None


def routing_distributions(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    stop_after: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """
    Per-sequence, per-layer routing distributions of a patched model.

    For each sequence and each captured MoE layer: the mean, over the sequence's real tokens, of the router's full
    probability distribution over experts (see [`router_probabilities`] for how each family's scores become one).
    Gradients flow through it when gradients are enabled.

    Args:
        model (`torch.nn.Module`):
            A model patched with [`patch_model`].
        input_ids (`torch.LongTensor` of shape `[batch, seq_len]`):
            Input token ids.
        attention_mask (`torch.Tensor` of shape `[batch, seq_len]`, *optional*):
            Padding mask; padding is excluded from the mean.
        position_ids (`torch.LongTensor` of shape `[batch, seq_len]`, *optional*):
            Passed to the model. In padding-free / packed batches (several sequences per row, positions restarting at
            0), one distribution is returned per packed sequence, in order.
        token_mask (`torch.Tensor` of shape `[batch, seq_len]`, *optional*):
            Restricts which real tokens are pooled (e.g. only the prompt). Not passed to the model.
        stop_after (`int`, *optional*):
            The last captured layer needed: without gradient (and unsharded weights) the forward ends after its
            router, see [`capture_routing`].
        **kwargs:
            Passed to the model's forward (`use_cache` defaults to `False`).

    Returns:
        `torch.Tensor` of shape `[num_sequences, n_moe_layers, n_experts]` (`stop_after + 1` layers with
        `stop_after`), fp32, rows summing to 1.
    """
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    # No KV cache: it is useless here, and transformers only recognises packed sequences from `position_ids` when no
    # cache is passed, so with one a packed row would silently attend across its sequences.
    kwargs.setdefault("use_cache", False)
    with capture_routing(
        model, input_ids.shape, attention_mask, position_ids, token_mask, stop_after=stop_after
    ) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return capture.distributions()
