"""Find the routers of any Hugging Face MoE model and hook them, so that a forward can expose per-layer routing."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging
from transformers.utils.output_capturing import OutputRecorder

from .families import num_experts, scoring_function
from .layers import LayerSelection, resolve_layers

logger = logging.get_logger(__name__)

STATE_ATTRIBUTE = "_hf_sara_routing"
# Names of the modules the fallback accepts as routers, for models that declare none.
FALLBACK_ROUTER_NAMES = ("gate", "router")
# Path parts that PEFT inserts around a wrapped module; the hook goes on the outermost wrapper, whose output is the
# one the model uses (base layer plus adapter, or the trainable copy of `modules_to_save`).
_PEFT_WRAPPER_SUFFIX = re.compile(r"(\.base_layer|\.original_module|\.modules_to_save\.[^.]+)$")
_LAYER_NUMBER = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class RouterSite:
    """
    One MoE router of a model, as `hf_sara` hooks it.

    Attributes:
        name (`str`):
            Module path of the hooked module (for PEFT-wrapped routers: the wrapper's path).
        output_index (`int` or `None`):
            Where the router scores sit in the module's output tuple. `None` for fallback routers, whose logits are
            recomputed from their input and weight (`F.linear(input, weight, bias)`), since undeclared routers (e.g.
            remote-code `MoEGate`s) often return only the top-k choice.
        scoring (`str`):
            How the router scores experts (`"softmax"`, `"sigmoid"`, ...), see [`router_probabilities`].
        decoder_layer (`int` or `None`):
            The decoder layer the router belongs to, read from its module path.
        source (`str`):
            `"declared"` when found through the model's `_can_record_outputs`, `"fallback"` otherwise.
    """

    name: str
    output_index: int | None
    scoring: str
    decoder_layer: int | None
    source: str


class RoutingState:
    """
    What `patch_model` attaches to a model: its router sites and the capture in progress, if any.

    The hooks reach it through their own reference, so a `copy.deepcopy` of a patched model (a reference model, say)
    gets hooks that point at the copy's state.
    """

    def __init__(self, sites: list[RouterSite], captured_layers: list[int], num_moe_layers: int):
        self.sites = sites
        self.captured_layers = captured_layers
        self.num_moe_layers = num_moe_layers
        self.active: Any = None

    @property
    def captured_sites(self) -> list[RouterSite]:
        return [self.sites[i] for i in self.captured_layers]


def _as_recorders(declaration: Any) -> list[OutputRecorder]:
    """Normalises a `_can_record_outputs["router_logits"]` entry the way transformers does."""
    if declaration is None:
        return []
    specs = declaration if isinstance(declaration, (list, tuple)) else [declaration]
    recorders = []
    for spec in specs:
        if isinstance(spec, OutputRecorder):
            recorders.append(spec)
        elif isinstance(spec, str):
            recorders.append(OutputRecorder(target_class=None, index=1, class_name=spec))
        else:
            recorders.append(OutputRecorder(target_class=spec, index=1))
    return recorders


def _matches(recorder: OutputRecorder, module: nn.Module, name: str) -> bool:
    # Mirrors transformers.utils.output_capturing.recursively_install_hooks.
    by_class = recorder.target_class is not None and isinstance(module, recorder.target_class)
    by_name = recorder.class_name is not None and name.endswith(recorder.class_name)
    if not (by_class or by_name):
        return False
    if recorder.layer_name is not None:
        return "." + recorder.layer_name.strip(".") + "." in name + "."
    return True


def _declared_routers(model: nn.Module) -> list[tuple[str, int, str]]:
    """`(module path, output index, scoring)` of every router that a (sub-)model declares, in module order."""
    found: list[tuple[str, int, str]] = []

    def visit(module: nn.Module, name: str, recorders: list[OutputRecorder], scoring: str) -> None:
        if isinstance(module, PreTrainedModel):
            # As in transformers, a sub-model's children follow that sub-model's own declaration.
            declarations = getattr(module, "_can_record_outputs", None) or {}
            recorders = _as_recorders(declarations.get("router_logits"))
            scoring = scoring_function(module.config)
        for recorder in recorders:
            if _matches(recorder, module, name):
                found.append((name, recorder.index, scoring))
                break
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name, recorders, scoring)

    visit(model, "", [], "softmax")
    return found


def _config_of(model: nn.Module) -> Any:
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module.config
    return getattr(model, "config", None)


def _is_fallback_router(name: str, module: nn.Module, expected: int) -> bool:
    leaf = _PEFT_WRAPPER_SUFFIX.sub("", name).rsplit(".", 1)[-1]
    weight = module.__dict__.get("_parameters", {}).get("weight")
    return leaf in FALLBACK_ROUTER_NAMES and weight is not None and weight.dim() == 2 and weight.shape[0] == expected


def _fallback_routers(model: nn.Module) -> tuple[list[tuple[str, int | None, str]], int | None]:
    """Modules named like a router whose `[n_experts, hidden]` weight matches the config's number of experts."""
    config = _config_of(model)
    expected = num_experts(config) if config is not None else None
    if expected is None:
        return [], None
    scoring = scoring_function(config.get_text_config() if hasattr(config, "get_text_config") else config)
    found = []
    for name, module in model.named_modules():
        if _is_fallback_router(name, module, expected):
            found.append((name, None, scoring))
    return found, expected


def _hook_target(name: str) -> str:
    while True:
        stripped = _PEFT_WRAPPER_SUFFIX.sub("", name)
        if stripped == name:
            return name
        name = stripped


def find_routers(model: nn.Module) -> list[RouterSite]:
    """
    Finds every MoE router of `model`, in the order the forward runs them.

    Routers are found from the model's own declaration, `_can_record_outputs["router_logits"]` (an `OutputRecorder`
    naming the router class and the index of the router logits in its output), the way transformers installs its own
    recording hooks: each `PreTrainedModel` in the module tree (a causal LM's base model, a VLM's language model, the
    model inside a PEFT wrapper) uses its own declaration. For models that declare none (remote code, older classes),
    the fallback takes modules named `gate` or `router` with a `[n_experts, hidden]` weight, where `n_experts` is the
    config's `num_experts`, `num_local_experts`, `n_routed_experts` or `moe_num_experts`, and recomputes their logits
    from their input. Routers wrapped by PEFT (LoRA
    on the router, `modules_to_save`) are hooked at the wrapper, whose output includes the adapter.

    Args:
        model (`torch.nn.Module`):
            A transformers model, possibly wrapped (PEFT, a VLM).

    Returns:
        `list[RouterSite]`: one per MoE layer, empty when none is found.
    """
    candidates: list[tuple[str, int | None, str]] = list(_declared_routers(model))
    source = "declared"
    if not candidates:
        candidates, _ = _fallback_routers(model)
        source = "fallback"
    sites: list[RouterSite] = []
    seen: set[str] = set()
    for name, index, scoring in candidates:
        target = _hook_target(name)
        if target in seen:
            continue
        seen.add(target)
        layer = _LAYER_NUMBER.search("." + target)
        sites.append(RouterSite(target, index, scoring, int(layer.group(1)) if layer else None, source))
    return sites


def router_weight_names(model: nn.Module) -> list[str]:
    """
    The routers' weight names relative to their decoder layer (e.g. `["mlp.gate.weight"]`), as PEFT's
    `LoraConfig(target_parameters=...)` takes them to put LoRA on the routers.

    Returns:
        `list[str]`: unique names, in order; empty for routers without a direct 2D `weight` parameter.
    """
    names: list[str] = []
    for site in find_routers(model):
        weight = model.get_submodule(site.name)._parameters.get("weight")
        if weight is None or weight.dim() != 2:
            continue
        match = _LAYER_NUMBER.search("." + site.name)
        suffix = ("." + site.name)[match.end() :] if match else site.name.rsplit(".", 1)[-1]
        name = f"{suffix}.weight" if suffix else "weight"
        if name not in names:
            names.append(name)
    return names


def _no_router_error(model: nn.Module) -> ValueError:
    config = _config_of(model)
    expected = num_experts(config) if config is not None else None
    declaring = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, PreTrainedModel) and (getattr(m, "_can_record_outputs", None) or {}).get("router_logits")
        }
    )
    looked_for = (
        f"`_can_record_outputs['router_logits']` on {type(model).__name__} and its sub-models (declared by: "
        f"{', '.join(declaring) or 'none'}), then a module named {' or '.join(map(repr, FALLBACK_ROUTER_NAMES))} "
        f"with a [n_experts, hidden] weight, n_experts being the config's expert count "
        f"({expected if expected else 'the config declares none'})"
    )
    return ValueError(
        f"{type(model).__name__} has no Mixture-of-Experts router that hf_sara can find. It looked for {looked_for}. "
        "SARA needs a sparse MoE model (e.g. Qwen3-MoE, Mixtral, Phi-3.5-MoE, DeepSeek-V3); a dense model has no "
        "routing to align."
    )


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

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        capture = self.state.active
        if capture is None:  # no capture open: inference, generation, or a checkpoint's backward recomputation
            return
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        recompute = capture.recompute_router_logits and isinstance(weight, torch.Tensor) and weight.requires_grad
        if self.site.output_index is None:
            scores = F.linear(args[0], weight, bias)  # saves the input and weight the router saves already
        elif isinstance(output, torch.Tensor):
            scores = output
        else:
            scores = output[self.site.output_index]
        if recompute and self.site.output_index is not None:
            recompute = self._is_linear_router(args[0], weight, bias, scores)
        router_input = (args[0], weight, bias if isinstance(bias, torch.Tensor) else None) if recompute else None
        capture.record(self.layer, scores, self.site, router_input)

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
        raise _no_router_error(model)
    captured = resolve_layers(layers, len(sites))
    existing = get_routing_state(model)
    if existing is not None:
        if existing.sites == sites and existing.captured_layers == captured:
            return model
        unpatch_model(model)

    state = RoutingState(sites, captured, len(sites))
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
