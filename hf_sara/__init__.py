"""hf_sara: Semantically Anchored Routing Alignment (SARA) for fine-tuning Mixture-of-Experts LLMs.

The public API below is loaded lazily, as TRL's is: `import hf_sara` imports no trainer (neither TRL nor PEFT), and
each name imports its module the first time it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# Every public name (`__all__`), by the module that defines it.
_MODULE_OF: dict[str, str] = {
    "DEFAULT_LAYERS": "routing.layers",
    "PUBLISHED_BAND": "routing.layers",
    "resolve_layers": "routing.layers",
    "RouterSite": "routing.discovery",
    "find_routers": "routing.discovery",
    "router_weight_names": "routing.discovery",
    "is_patched": "routing.patching",
    "patch_model": "routing.patching",
    "unpatch_model": "routing.patching",
    "RoutingCapture": "routing.capture",
    "capture_routing": "routing.capture",
    "routing_distributions": "routing.capture",
    "router_probabilities": "routing.pooling",
    "js_divergence": "routing.loss",
    "sara_alignment_loss": "routing.loss",
    "SARAArguments": "training.arguments",
    "SARATrainingArguments": "training.arguments",
    "SARAConfig": "training.config",
    "SARAMixin": "training.mixin",
    "SARATrainer": "training.trainer",
    "OfflineAnchors": "training.anchors",
    "RoutingDivergenceCallback": "tools.monitor",
    "MergeResult": "tools.merge",
    "check_adapter_fits_base": "tools.merge",
    "merge_adapter": "tools.merge",
}

__all__ = [
    "DEFAULT_LAYERS",
    "MergeResult",
    "OfflineAnchors",
    "PUBLISHED_BAND",
    "RouterSite",
    "RoutingCapture",
    "RoutingDivergenceCallback",
    "SARAArguments",
    "SARAConfig",
    "SARAMixin",
    "SARATrainer",
    "SARATrainingArguments",
    "capture_routing",
    "check_adapter_fits_base",
    "find_routers",
    "is_patched",
    "js_divergence",
    "merge_adapter",
    "patch_model",
    "resolve_layers",
    "router_probabilities",
    "router_weight_names",
    "routing_distributions",
    "sara_alignment_loss",
    "unpatch_model",
]

if TYPE_CHECKING:
    from .routing.capture import RoutingCapture, capture_routing, routing_distributions
    from .routing.discovery import RouterSite, find_routers, router_weight_names
    from .routing.layers import DEFAULT_LAYERS, PUBLISHED_BAND, resolve_layers
    from .routing.loss import js_divergence, sara_alignment_loss
    from .routing.patching import is_patched, patch_model, unpatch_model
    from .routing.pooling import router_probabilities
    from .tools.merge import MergeResult, check_adapter_fits_base, merge_adapter
    from .tools.monitor import RoutingDivergenceCallback
    from .training.anchors import OfflineAnchors
    from .training.arguments import SARAArguments, SARATrainingArguments
    from .training.config import SARAConfig
    from .training.mixin import SARAMixin
    from .training.trainer import SARATrainer


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
