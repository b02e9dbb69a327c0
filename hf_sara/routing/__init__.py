"""Routing: find any MoE model's routers, hook them, pool their scores per sequence, and compare distributions.

- [`families`]: the facts about MoE families that transformers does not declare (one table).
- [`discovery`]: which modules are the routers ([`find_routers`]).
- [`patching`]: the hooks that hand router scores to an open capture ([`patch_model`]).
- [`pooling`]: scores to probabilities, token segments and per-sequence pooling.
- [`capture`]: the capture context around one forward ([`capture_routing`], [`routing_distributions`]).
- [`layers`]: which MoE layers to align ([`resolve_layers`]).
- [`loss`]: the symmetric Jensen-Shannon divergence and the SARA alignment loss.
"""
