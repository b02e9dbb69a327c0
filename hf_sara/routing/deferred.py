"""The alignment term's gradient added in the backward, where each router's scores exist: gradient checkpointing in
every mode, reentrant included.

With gradient checkpointing a layer's activations are gone after the forward and recomputed in the backward; with
`use_reentrant=True` the forward even runs without autograd, so a loss built from what the forward's hooks saw would
train nothing. The alignment term is a sum over layers of terms that each depend only on that layer's router scores,
which makes another route possible:

1. In the forward, each router's scores are pooled without autograd: the term's value, for the loss and the logs, costs
   `[sequences, layers, experts]` and no activation.
2. The term joins the loss through [`_AlignmentTerm`], whose backward receives the coefficient that the loss's own
   backward hands it (gradient accumulation, DeepSpeed's or AMP's loss scale, the weight: whatever the trainer
   applied). It consumes the SFT loss without using it, so autograd runs it before any node of the model.
3. Wherever a router's scores are part of the graph that the backward runs (the forward itself when autograd is on,
   else the layer's recomputation), the router's outputs pass through [`_AlignmentGradient`], which saves the scores
   and, in the backward, adds `coefficient x d(term_l)/d(scores_l)` to the gradient flowing into them: it reaches the
   router's weights (and LoRA on them) and, through the layer's input, every earlier layer, as without checkpointing.
   Under non-reentrant checkpointing the saved scores are dropped after the forward and recomputed with the layer;
   the recomputation replays the node, so that it saves what the forward saved.

It is never a silent no-op: a router reached in the backward before the coefficient is known, a layer whose router was
never reached (not recomputed, or its outputs unused), and a second backward of the same term raise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Variable

from .discovery import RouterSite
from .loss import js_divergence
from .pooling import TokenSegments, pool_routing


def _float_tensors(output: Any) -> list[tuple[int | None, torch.Tensor]]:
    """The floating-point tensors of a router's output, with their position in it (`None` for a bare tensor)."""
    if isinstance(output, torch.Tensor):
        return [(None, output)] if output.is_floating_point() else []
    if isinstance(output, tuple):
        return [(i, x) for i, x in enumerate(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return []


def _with_carriers(output: Any, carriers: list[tuple[int | None, torch.Tensor]], replaced: tuple) -> Any:
    if isinstance(output, torch.Tensor):
        return replaced[0]
    values = list(output)
    for (position, _), value in zip(carriers, replaced, strict=True):
        values[position] = value
    return tuple(values) if type(output) is tuple else type(output)(*values)


class _AlignmentGradient(torch.autograd.Function):
    """
    Identity on a router's floating-point outputs (the "carriers", which the layer goes on to use); its backward adds
    the alignment term's gradient to the router's scores, which it saved.
    """

    @staticmethod
    def forward(ctx, record, layer, scores, *carriers):  # noqa: D102
        ctx.record, ctx.layer = record, layer
        ctx.save_for_backward(scores)
        return tuple(carrier.clone() for carrier in carriers)

    @staticmethod
    def backward(ctx, *grad_carriers):  # noqa: D102
        (scores,) = ctx.saved_tensors
        return (None, None, ctx.record.scores_gradient(ctx.layer, scores), *grad_carriers)


class _AlignmentTerm(torch.autograd.Function):
    """The alignment term's value in the loss: its backward records the coefficient the loss hands it."""

    @staticmethod
    def forward(ctx, record, value, ordering):  # noqa: D102
        ctx.record = record
        return value.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        ctx.record.receive_coefficient(grad)
        return None, None, None


def _custom_function_nodes(root: Any) -> dict[int, Any]:
    """
    The custom autograd functions (`torch.autograd.Function`: reentrant checkpoints among them) of the graph under
    `root`, by `id`. Their Python objects live as long as the graph, so the ids stay theirs; they are kept here.
    """
    found: dict[int, Any] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found[id(node)] = node
        stack.extend(parent for parent, _ in node.next_functions)
    return found


class DeferredAlignment:
    """
    One forward's routing, pooled without autograd, and the alignment term whose gradient it adds in the backward.

    Created by [`capture_routing`] with `gradient="deferred"`; the term is bound by
    [`~RoutingCapture.alignment_term`]. A forward whose term is never bound (an anchors' forward with an SFT loss of
    its own) adds nothing; its routers still pass through the identity node, so that a non-reentrant recomputation
    saves what the forward saved.

    Args:
        segments ([`TokenSegments`]):
            The forward's sequences.
        sites (`list[RouterSite]`):
            The captured routers, by captured-layer index.
    """

    def __init__(self, segments: TokenSegments, sites: list[RouterSite]):
        self.segments = segments
        self.sites = sites
        self.pooled: list[torch.Tensor | None] = [None] * len(sites)
        # How each layer's router ran in the forward: "graph" (with autograd: the node is in the forward's graph) or
        # "recompute" (without: reentrant checkpointing, the node joins the recomputation's graph).
        self.phase: dict[int, str] = {}
        self.bound = False
        self.positions: dict[int, int] = {}  # aligned captured layer -> its column in `targets`
        self.targets: torch.Tensor | None = None  # [sequences, aligned layers, experts]
        self.row_weights: torch.Tensor | None = None  # [sequences]
        self.coefficient: torch.Tensor | None = None
        self.applied: set[int] = set()
        self.checkpoint_nodes: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------------------------------
    # Forward and recomputation (the router hooks)
    # ------------------------------------------------------------------------------------------------------------

    def record(self, layer: int, scores: torch.Tensor, output: Any) -> Any:
        """In the forward: pools `scores` without autograd and, when autograd records, routes `output` through the
        gradient node. Returns the output the model goes on with (`None`: unchanged)."""
        site = self.sites[layer]
        if self.segments.token_index.device != scores.device:
            self.segments = self.segments.to(scores.device)
        with torch.no_grad():
            self.pooled[layer] = pool_routing(scores.detach(), site.scoring, self.segments)
        if not torch.is_grad_enabled():
            self.phase[layer] = "recompute"
            return None
        self.phase[layer] = "graph"
        return self._through_gradient_node(layer, scores, output)

    def recomputed(self, layer: int, scores: torch.Tensor, output: Any, node: Any) -> Any:
        """
        In the backward, when checkpointing recomputes a layer of this forward (`node`: the autograd node running):
        under non-reentrant checkpointing the gradient node is replayed (its copy is discarded; the forward's own node
        gets the recomputed scores), under reentrant checkpointing it joins the recomputation's graph, which is the one
        that is backpropagated. Returns `None` when the recomputation is not this forward's.
        """
        phase = self.phase.get(layer)
        if phase == "graph" or (phase == "recompute" and id(node) in self.checkpoint_nodes):
            return self._through_gradient_node(layer, scores, output)
        return None

    def _through_gradient_node(self, layer: int, scores: torch.Tensor, output: Any) -> Any:
        carriers = _float_tensors(output)
        if not carriers:
            raise RuntimeError(
                f"The router {self.sites[layer].name!r} returns no floating-point tensor that the layer goes on with, "
                "so the alignment gradient has nothing to reach it through. Train without gradient checkpointing "
                "(the alignment loss then flows through the pooled routing directly)."
            )
        replaced = _AlignmentGradient.apply(self, layer, scores, *(tensor for _, tensor in carriers))
        return _with_carriers(output, carriers, replaced)

    # ------------------------------------------------------------------------------------------------------------
    # The term
    # ------------------------------------------------------------------------------------------------------------

    def bind(
        self,
        anchor_distributions: torch.Tensor,
        has_anchor: torch.Tensor,
        row_weights: torch.Tensor,
        layers: list[int],
        value: torch.Tensor,
        ordering: torch.Tensor,
    ) -> torch.Tensor:
        """
        Binds the term `sum over layers l and sequences b of row_weights[b] * JS(routing[b, l], anchors[b, l])` and
        returns its `value` (computed from the forward's pooled routing) as a tensor whose backward records the
        coefficient.

        Args:
            anchor_distributions (`torch.Tensor` of shape `[sequences, captured layers, experts]`):
                The targets (detached; rows without an anchor may hold anything).
            has_anchor (`torch.Tensor` of shape `[sequences]`):
                Which rows have an anchor.
            row_weights (`torch.Tensor` of shape `[sequences]`):
                Each row's weight in the term (0 for rows without an anchor).
            layers (`list[int]`):
                The aligned captured layers.
            value (`torch.Tensor`):
                The term's value.
            ordering (`torch.Tensor`):
                A tensor the loss is built from and that every router's scores lead to (the SFT loss): consumed, so
                that the coefficient is known before the backward reaches any router.
        """
        if self.bound:
            raise RuntimeError("The alignment term of this forward is bound already: bind it once per forward.")
        examples = torch.stack([self.pooled[layer] for layer in layers], dim=1)
        anchors = anchor_distributions.detach()[:, layers].float()
        # Rows without an anchor are aligned to themselves: a finite 0 that their weight of 0 removes.
        self.targets = torch.where(has_anchor.bool()[:, None, None], anchors, examples)
        self.row_weights = row_weights.detach().float()
        self.positions = {layer: position for position, layer in enumerate(layers)}
        self.bound = True
        if any(self.phase.get(layer) == "recompute" for layer in layers):
            self.checkpoint_nodes = _custom_function_nodes(ordering.grad_fn)
        return _AlignmentTerm.apply(self, value.detach(), ordering)

    def receive_coefficient(self, coefficient: torch.Tensor) -> None:
        if self.coefficient is not None:
            raise RuntimeError(
                "The SARA alignment term was backpropagated a second time (`backward(retain_graph=True)` called "
                "twice?): its gradient reaches the routers once per forward. Compute the loss again for each backward."
            )
        self.coefficient = coefficient.detach()
        Variable._execution_engine.queue_callback(self._check_every_layer_reached)

    def scores_gradient(self, layer: int, scores: torch.Tensor) -> torch.Tensor | None:
        """`coefficient x d(term_layer)/d(scores)`, in the scores' dtype (`None` where the term does not use them)."""
        if not self.bound:
            return None  # a forward without a term
        if self.coefficient is None:
            raise RuntimeError(
                f"The backward reached the router {self.sites[layer].name!r} before the SARA alignment term had its "
                "coefficient: the term is not in the loss that is backpropagated, or it was computed from another "
                "loss than the one built on this forward. Add `capture.alignment_term(...)` to the loss you call "
                "backward on."
            )
        if layer in self.applied:
            raise RuntimeError(
                f"The router {self.sites[layer].name!r} was reached twice in one backward of the SARA term."
            )
        self.applied.add(layer)
        position = self.positions.get(layer)
        if position is None:
            return None
        with torch.enable_grad():
            leaf = scores.detach().requires_grad_()
            pooled = pool_routing(leaf, self.sites[layer].scoring, self.segments)
            term = (js_divergence(pooled, self.targets[:, position]) * self.row_weights).sum()
            (gradient,) = torch.autograd.grad(term, leaf)
        return (gradient * self.coefficient).to(scores.dtype)

    def _check_every_layer_reached(self) -> None:
        missing = [layer for layer in self.positions if layer not in self.applied]
        if missing:
            names = ", ".join(repr(self.sites[layer].name) for layer in missing[:3])
            raise RuntimeError(
                f"The backward never reached {len(missing)} aligned router(s) (e.g. {names}), so the SARA alignment "
                "loss did not train them: their checkpointed layers were not recomputed (no input of the layer "
                "requires grad: call `model.enable_input_require_grads()` with PEFT), or the layer does not use the "
                "router's outputs, or a checkpoint implementation hid the recomputation. Train without gradient "
                "checkpointing, or with `use_reentrant=False`, to rule these out."
            )
