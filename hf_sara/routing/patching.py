"""Hook the routers of a MoE model, so that a forward can expose per-layer routing to an open capture."""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .discovery import RouterSite, find_routers, no_router_error
from .layers import LayerSelection, resolve_layers

logger = logging.get_logger(__name__)

STATE_ATTRIBUTE = "_hf_sara_routing"
# What a linear router's scores are computed from, `F.linear(input, weight, bias)`: kept for their recomputation.
RouterInput = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class RoutingRecorder(Protocol):
    """What the router hooks hand their scores to: an open [`~hf_sara.routing.capture.RoutingCapture`]."""

    recompute_router_logits: bool

    def record(
        self, layer: int, scores: torch.Tensor, site: RouterSite, router_input: RouterInput | None, output: Any
    ) -> Any: ...


class RecomputationRecorder(Protocol):
    """
    What the router hooks hand the scores of a layer that the backward recomputes to: a forward's
    [`~hf_sara.routing.deferred.DeferredAlignment`], while its backward may run.
    """

    def recomputed(self, layer: int, scores: torch.Tensor, output: Any, node: Any) -> Any: ...


class RoutingState:
    """
    What `patch_model` attaches to a model: its router sites and the capture in progress, if any.

    The hooks reach it through their own reference, so a `copy.deepcopy` of a patched model (a reference model, say)
    gets hooks that point at the copy's state.
    """

    def __init__(self, sites: list[RouterSite], captured_layers: list[int]):
        self.sites = sites
        self.captured_layers = captured_layers
        self.active: RoutingRecorder | None = None
        # Forwards whose alignment gradient is added in their backward (weak: they end with their graph).
        self.pending: list[weakref.ref[RecomputationRecorder]] = []

    def recomputed(self, layer: int, scores: torch.Tensor, output: Any) -> Any:
        """
        A router of captured layer `layer` ran with no capture open. Inside a backward that is a checkpointed layer's
        recomputation: the first pending forward that claims it returns the output to go on with. Else `None`.
        """
        if not self.pending or torch._C._current_graph_task_id() == -1:
            return None
        node = torch._C._current_autograd_node()
        for reference in reversed(self.pending):
            recorder = reference()
            if recorder is not None:
                replaced = recorder.recomputed(layer, scores, output, node)
                if replaced is not None:
                    return replaced
        return None

    @property
    def captured_sites(self) -> list[RouterSite]:
        return [self.sites[i] for i in self.captured_layers]


def get_routing_state(model: nn.Module) -> RoutingState | None:
    """Returns the routing state `patch_model` attached to `model` or to a module inside it (e.g. under PEFT)."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is not None:
        return state
    for module in model.modules():
        state = module.__dict__.get(STATE_ATTRIBUTE)
        if state is not None:
            return state
    return None


class RouterHook:
    """The forward hook on one router: hands the router's scores to the open capture, if there is one."""

    def __init__(self, state: RoutingState, layer: int, site: RouterSite):
        self.state = state
        self.layer = layer
        self.site = site
        self.linear_router: bool | None = None  # whether the scores are `F.linear(input, weight, bias)`, checked once

    def _scores(self, module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
        if self.site.output_index is None:
            # Saves the input and weight the router saves already.
            return F.linear(args[0], getattr(module, "weight", None), getattr(module, "bias", None))
        return output if isinstance(output, torch.Tensor) else output[self.site.output_index]

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        capture = self.state.active
        if capture is None:
            # Inference, generation, a forward nobody captures, or a checkpointed layer recomputed in the backward.
            if not self.state.pending:
                return None
            return self.state.recomputed(self.layer, self._scores(module, args, output), output)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        recompute = capture.recompute_router_logits and isinstance(weight, torch.Tensor) and weight.requires_grad
        scores = self._scores(module, args, output)
        if recompute and self.site.output_index is not None:
            recompute = self._is_linear_router(args[0], weight, bias, scores)
        router_input = (args[0], weight, bias if isinstance(bias, torch.Tensor) else None) if recompute else None
        return capture.record(self.layer, scores, self.site, router_input, output)

    def _is_linear_router(self, router_input: Any, weight: torch.Tensor, bias: Any, scores: torch.Tensor) -> bool:
        """Whether the router's scores are exactly `F.linear` of its input (checked on the first capture)."""
        if self.linear_router is None:
            self.linear_router = False
            plain = isinstance(router_input, torch.Tensor) and weight.dim() == 2
            if plain and (bias is None or isinstance(bias, torch.Tensor)):
                with torch.no_grad():
                    try:
                        recomputed = F.linear(router_input, weight, bias)
                    except RuntimeError:
                        return False
                    self.linear_router = recomputed.shape[-1] == scores.shape[-1] and torch.equal(
                        recomputed.reshape(-1, recomputed.shape[-1]), scores.reshape(-1, scores.shape[-1])
                    )
        return self.linear_router


def patch_model(model: nn.Module, layers: LayerSelection = "all") -> nn.Module:
    """
    Makes any Hugging Face MoE model expose its per-layer routing, and returns it.

    Registers a forward hook on each router found by [`find_routers`]. The hooks do nothing unless a capture is open
    (see [`capture_routing`] and [`routing_distributions`]), so the model's outputs are bit-identical to before,
    generation is untouched, and nothing is recorded when gradient checkpointing re-runs a layer during backward. The
    model's `forward`, its decoder layers and its `config.output_router_logits` are left as they are.

    Patching is idempotent: patching a patched model with the same layers changes nothing. [`unpatch_model`] removes
    everything.

    Args:
        model (`torch.nn.Module`):
            A transformers MoE model: a `PreTrainedModel`, a PEFT-wrapped one, or a composite model whose language
            model is MoE.
        layers (`str`, `int`, `Sequence[int]` or `tuple[float, float]`, *optional*, defaults to `"all"`):
            Which MoE layers to capture, in any form [`resolve_layers`] accepts. Indices count MoE layers.

    Returns:
        `torch.nn.Module`: the same model, patched.

    Raises:
        `ValueError`: when the model has no MoE router, or its routers disagree on the number of experts.
    """
    sites = find_routers(model)
    if not sites:
        raise no_router_error(model)
    captured = resolve_layers(layers, len(sites))
    existing = get_routing_state(model)
    if existing is not None:
        if existing.sites == sites and existing.captured_layers == captured:
            return model
        unpatch_model(model)

    state = RoutingState(sites, captured)
    for layer, site in enumerate(state.captured_sites):
        model.get_submodule(site.name).register_forward_hook(RouterHook(state, layer, site))
    setattr(model, STATE_ATTRIBUTE, state)
    logger.info(
        f"hf_sara: hooked {len(captured)} of {len(sites)} MoE routers of {type(model).__name__} "
        f"({sites[0].source}, scoring {sites[0].scoring})."
    )
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """
    Removes what [`patch_model`] added: every hook (also on copies PEFT made of a patched router) and the state.

    Args:
        model (`torch.nn.Module`):
            A model, patched or not.

    Returns:
        `torch.nn.Module`: the same model, as it was before patching.
    """
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, RouterHook):
                del module._forward_hooks[key]
        if STATE_ATTRIBUTE in module.__dict__:
            delattr(module, STATE_ATTRIBUTE)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether [`patch_model`] has patched `model` (or a module inside it)."""
    return get_routing_state(model) is not None
