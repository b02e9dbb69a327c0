"""Find the routers of any Hugging Face MoE model: declared through `_can_record_outputs`, or by name and shape."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.utils.output_capturing import OutputRecorder

from ..compat import router_declaration
from .families import FALLBACK_ROUTER_NAMES, SOFTMAX, num_experts, scoring_function

# Path parts that PEFT inserts around a wrapped module; the hook goes on the outermost wrapper, whose output is the
# one the model uses (base layer plus adapter, or the trainable copy of `modules_to_save`).
PEFT_WRAPPER_SUFFIX = re.compile(r"(\.base_layer|\.original_module|\.modules_to_save\.[^.]+)$")
# Parameter-name parts of what PEFT adds (adapter weights, trainable copies): not the base model's weights.
PEFT_ADDED_PARAMETER_PARTS = ("lora_", "modules_to_save.")
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

    def visit(module: nn.Module, name: str, recorders: list[OutputRecorder], config: Any) -> None:
        if isinstance(module, PreTrainedModel):
            # As in transformers, a sub-model's children follow that sub-model's own declaration.
            recorders = _as_recorders(router_declaration(module))
            config = module.config
        for recorder in recorders:
            if _matches(recorder, module, name):
                # The scoring rule is looked up for a router found only (a dense model has none to warn about).
                found.append((name, recorder.index, SOFTMAX if config is None else scoring_function(config)))
                break
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name, recorders, config)

    visit(model, "", [], None)
    return found


def _config_of(model: nn.Module) -> Any:
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module.config
    return getattr(model, "config", None)


def _is_fallback_router(name: str, module: nn.Module, expected: int) -> bool:
    leaf = PEFT_WRAPPER_SUFFIX.sub("", name).rsplit(".", 1)[-1]
    weight = module.__dict__.get("_parameters", {}).get("weight")
    return leaf in FALLBACK_ROUTER_NAMES and weight is not None and weight.dim() == 2 and weight.shape[0] == expected


def _fallback_routers(model: nn.Module) -> list[tuple[str, int | None, str]]:
    """Modules named like a router whose `[n_experts, hidden]` weight matches the config's number of experts."""
    config = _config_of(model)
    expected = num_experts(config) if config is not None else None
    if expected is None:
        return []
    names = [name for name, module in model.named_modules() if _is_fallback_router(name, module, expected)]
    if not names:
        return []
    scoring = scoring_function(config.get_text_config() if hasattr(config, "get_text_config") else config)
    return [(name, None, scoring) for name in names]


def _hook_target(name: str) -> str:
    while True:
        stripped = PEFT_WRAPPER_SUFFIX.sub("", name)
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
        candidates = _fallback_routers(model)
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


def no_router_error(model: nn.Module) -> ValueError:
    config = _config_of(model)
    expected = num_experts(config) if config is not None else None
    declaring = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, PreTrainedModel) and router_declaration(m) is not None
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
