"""Capture the pooled routing of one forward: the context that the hooks of `patch_model` record into."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..distributed import has_sharded_parameters
from .discovery import RouterSite
from .patching import RouterInput, get_routing_state
from .pooling import TokenSegments, pool_routing, pool_routing_from_router_input, token_segments

_REENTRANT_CHECKPOINT_ERROR = (
    "A router ran under torch.no_grad() inside a forward that was opened with gradients enabled: this is gradient "
    "checkpointing with `use_reentrant=True`, which runs each layer's first forward without autograd, so the SARA "
    "loss would train nothing. Use non-reentrant checkpointing: `activation_checkpointing_kwargs={'use_reentrant': "
    "False}` (`gradient_checkpointing_kwargs` before transformers 5) in your TrainingArguments/SFTConfig, or "
    "`model.activation_checkpointing_enable({'use_reentrant': False})`. TRL forces reentrant mode for PEFT with "
    "DeepSpeed ZeRO-3: there, use ZeRO-2 or FSDP, or turn checkpointing off."
)


_NO_GRAD_INSIDE_ERROR = (
    "A router ran under torch.no_grad() inside a routing capture opened with gradients enabled: `generate()` or a "
    "`torch.no_grad()` block inside `capture_routing`. A capture records one forward: open it inside the no_grad "
    "block (or use `routing_distributions`), and for generation capture the prompt's forward, not `generate()`."
)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


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
    ):
        self.checkpointing = checkpointing
        self.segments = segments
        self.sites = sites
        self.pooled: list[torch.Tensor | None] = [None] * num_layers
        self.raw_scores: list[torch.Tensor | None] | None = [None] * num_layers if keep_scores else None
        self.grad_enabled = torch.is_grad_enabled()
        self.recompute_router_logits = recompute_router_logits and self.grad_enabled

    def record(self, layer: int, scores: torch.Tensor, site: RouterSite, router_input: RouterInput | None = None):
        """
        Pools one router's scores. With `router_input` (the `(input, weight, bias)` of a linear router whose scores
        are `F.linear(input, weight, bias)`), the backward recomputes the scores instead of keeping per-token
        probabilities, see [`pool_routing_from_router_input`].
        """
        if self.grad_enabled and not torch.is_grad_enabled():
            raise RuntimeError(_REENTRANT_CHECKPOINT_ERROR if self.checkpointing else _NO_GRAD_INSIDE_ERROR)
        if self.pooled[layer] is not None:
            raise RuntimeError(
                f"The router {site.name!r} ran twice while one routing capture was open. Open one capture per forward "
                "(call backward and generate outside `capture_routing`)."
            )
        if self.segments.token_index.device != scores.device:
            self.segments = self.segments.to(scores.device)
        # The pooling ops save what their backward needs themselves, outside any saved-tensor hooks: a non-reentrant
        # gradient checkpoint must not try to recompute them (its recomputation records nothing, see patch_model).
        with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            if router_input is not None:
                self.pooled[layer] = pool_routing_from_router_input(scores, *router_input, site.scoring, self.segments)
            else:
                self.pooled[layer] = pool_routing(scores, site.scoring, self.segments)
        if self.raw_scores is not None:
            self.raw_scores[layer] = scores.detach().reshape(-1, scores.shape[-1])

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
            `torch.Tensor` of shape `[num_sequences, n_captured_layers, n_experts]`, fp32, rows summing to 1.

        Raises:
            `RuntimeError`: when a router did not run during the forward (for instance a hub kernel with
            `use_kernels=True` replaced the whole MoE block), so the routing would silently cover fewer layers.
        """
        missing = [i for i, pooled in enumerate(self.pooled) if pooled is None]
        if missing:
            names = ", ".join(repr(self.sites[i].name) for i in missing[:3])
            raise RuntimeError(
                f"{len(missing)} of {len(self.pooled)} hooked routers did not run during the forward (e.g. {names}). "
                "Either no forward ran inside the capture, or something replaced the routers after patch_model (a "
                "hub kernel loaded with `use_kernels=True`, or a PEFT wrapper added afterwards). Load the model "
                "without `use_kernels`, and call patch_model after wrapping the model."
            )
        widths = {pooled.shape[-1] for pooled in self.pooled}
        if len(widths) > 1:
            raise RuntimeError(
                f"The hooked routers score different numbers of experts ({sorted(widths)}); pass `layers=` to "
                "patch_model to capture layers of one width."
            )
        return torch.stack(self.pooled, dim=1)  # type: ignore[arg-type]


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
    device = next((t.device for t in (attention_mask, sequence_ids, position_ids) if t is not None), None)
    segments = token_segments(input_shape, attention_mask, position_ids, token_mask, device, sequence_ids)
    checkpointing = activation_checkpointing(model)
    if recompute_router_logits is None:
        # Sharded weights (ZeRO-3, FSDP) are gathered only for their module's own backward, which may run after the
        # pooling's backward that the recomputation would need them in.
        recompute_router_logits = not checkpointing and not has_sharded_parameters(model)
    capture = RoutingCapture(
        segments, len(state.captured_layers), state.captured_sites, keep_scores, recompute_router_logits, checkpointing
    )
    state.active = capture
    try:
        yield capture
    finally:
        state.active = None


def routing_distributions(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
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
        **kwargs:
            Passed to the model's forward (`use_cache` defaults to `False`).

    Returns:
        `torch.Tensor` of shape `[num_sequences, n_moe_layers, n_experts]`, fp32, rows summing to 1.
    """
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    # No KV cache: it is useless here, and transformers only recognises packed sequences from `position_ids` when no
    # cache is passed, so with one a packed row would silently attend across its sequences.
    kwargs.setdefault("use_cache", False)
    with capture_routing(model, input_ids.shape, attention_mask, position_ids, token_mask) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return capture.distributions()
