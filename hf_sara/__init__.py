"""hf_sara: Semantically Anchored Routing Alignment (SARA) for fine-tuning Mixture-of-Experts LLMs."""

__version__ = "0.1.0.dev0"

from .routing.capture import RoutingCapture, capture_routing, routing_distributions
from .routing.discovery import RouterSite, find_routers, router_weight_names
from .routing.layers import DEFAULT_LAYERS, PUBLISHED_BAND, resolve_layers
from .routing.loss import js_divergence, sara_alignment_loss
from .routing.patching import is_patched, patch_model, unpatch_model
from .routing.pooling import router_probabilities
from .tools.merge import MergeResult, check_adapter_fits_base, merge_adapter
from .tools.monitor import RoutingDivergenceCallback
from .training.anchors import (
    OfflineAnchors,
    compute_anchor_distributions,
    load_anchor_distributions,
    save_anchor_distributions,
)
from .training.config import SARAConfig
from .training.trainer import SARATrainer

__all__ = [
    "DEFAULT_LAYERS",
    "MergeResult",
    "OfflineAnchors",
    "PUBLISHED_BAND",
    "RouterSite",
    "RoutingDivergenceCallback",
    "RoutingCapture",
    "SARAConfig",
    "SARATrainer",
    "capture_routing",
    "check_adapter_fits_base",
    "compute_anchor_distributions",
    "find_routers",
    "is_patched",
    "js_divergence",
    "load_anchor_distributions",
    "merge_adapter",
    "patch_model",
    "resolve_layers",
    "router_probabilities",
    "router_weight_names",
    "routing_distributions",
    "save_anchor_distributions",
    "sara_alignment_loss",
    "unpatch_model",
]
