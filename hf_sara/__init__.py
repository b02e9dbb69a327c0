"""hf_sara: Semantically Anchored Routing Alignment (SARA) for fine-tuning Mixture-of-Experts LLMs."""

__version__ = "0.1.0.dev0"

from .capture import RoutingCapture, capture_routing, routing_distributions
from .layers import DEFAULT_LAYERS, PUBLISHED_BAND, resolve_layers
from .loss import js_divergence, sara_alignment_loss
from .patching import RouterSite, find_routers, is_patched, patch_model, unpatch_model
from .routing import router_probabilities

__all__ = [
    "DEFAULT_LAYERS",
    "PUBLISHED_BAND",
    "RouterSite",
    "RoutingCapture",
    "capture_routing",
    "find_routers",
    "is_patched",
    "js_divergence",
    "patch_model",
    "resolve_layers",
    "router_probabilities",
    "routing_distributions",
    "sara_alignment_loss",
    "unpatch_model",
]
