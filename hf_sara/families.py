"""The few facts about MoE families that their `_can_record_outputs` declaration does not say.

Routers are found generically (see `hf_sara.patching`); what the recorded tensor *means* is not declared anywhere in
transformers, so it is kept here, in one table, keyed by the `model_type` of the sub-model that declares the router:

- how the router turns its logits into the weights it routes with (its *scoring function*), which decides how the
  logits become a distribution over experts;
- for models that declare no router at all (remote code, older classes), which config keys hold the number of experts.

The tests check every family they build against this table by comparing the distribution that `hf_sara` derives with
the top-k weights that the router itself returns.
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

SOFTMAX = "softmax"
SIGMOID = "sigmoid"
PROBABILITIES = "probabilities"

# Families whose router scores each expert independently with a sigmoid (DeepSeek-V3 style, usually with a correction
# bias and group-limited top-k used for *selection* only). Read off the router classes of transformers 5.23.
SIGMOID_SCORING_MODEL_TYPES = frozenset(
    {
        "afmoe",
        "axk1",
        "axk2",
        "bailing_hybrid",
        "beam",
        "deepseek_v3",
        "deepseek_v32",
        "dots1",
        "dots3_note",
        "dots3_note_text",
        "exaone_moe",
        "flint",
        "glm4_moe",
        "glm4_moe_lite",
        "glm4v_moe_text",
        "glm5_next",
        "glm5_next_text",
        "glm_moe_dsa",
        "hy_v3",
        "hy_v4",
        "inkling_audio",
        "inkling_mm_model",
        "inkling_text",
        "inkling_vision",
        "kimi_linear",
        "kolibri1",
        "laguna",
        "lfm2_moe",
        "llama4_text",
        "mimo_v2_flash",
        "minimax_m2",
        "nemotron_h",
        "solar_open",
    }
)

# Families whose softmax scoring the tests check against the router's own top-k weights (tests/test_families.py).
SOFTMAX_SCORING_MODEL_TYPES = frozenset(
    {
        "deepseek_v2",
        "ernie4_5_moe",
        "flex_olmo",
        "gpt_oss",
        "granitemoe",
        "granitemoeshared",
        "hunyuan_v1_moe",
        "jamba",
        "minimax",
        "mixtral",
        "olmoe",
        "phimoe",
        "qwen2_moe",
        "qwen3_moe",
        "qwen3_next",
    }
)

# Families whose recorded router output already is a probability distribution over experts, not logits.
PROBABILITY_OUTPUT_MODEL_TYPES = frozenset({"gemma4_text"})

# Config attributes through which some families choose their scoring function at run time. When one is set, it wins
# over the table above.
SCORING_FUNCTION_CONFIG_KEYS = ("scoring_func", "expert_selection_fn", "score_func", "router_score_function")

# Config attributes that hold the number of routed experts, in the order they are tried. Used only by the fallback for
# models that declare no router.
NUM_EXPERTS_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def scoring_function(config: PretrainedConfig) -> str:
    """
    Returns the name of the function a family's router scores experts with.

    Args:
        config ([`~transformers.PretrainedConfig`]):
            The config of the (sub-)model that owns the router.

    Returns:
        `str`: `"softmax"`, `"sigmoid"`, `"probabilities"` (the router output already is a distribution), or the name
        of another element-wise activation in `transformers.activations.ACT2FN` that the config selects.
    """
    for key in SCORING_FUNCTION_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, str) and value:
            return value.lower()
    model_type = getattr(config, "model_type", None)
    if model_type in PROBABILITY_OUTPUT_MODEL_TYPES:
        return PROBABILITIES
    if model_type in SIGMOID_SCORING_MODEL_TYPES:
        return SIGMOID
    if model_type not in SOFTMAX_SCORING_MODEL_TYPES:
        logger.warning_once(
            f"hf_sara: the scoring function of model_type {model_type!r} is not in hf_sara's table; its router "
            "logits are taken as softmax scores. If this family scores experts with a sigmoid (DeepSeek-V3 style, "
            "with an `e_score_correction_bias`), set `config.scoring_func = 'sigmoid'` (on the config that owns the "
            "router) before `patch_model`, or the routing distributions will be wrong."
        )
    return SOFTMAX


def num_experts(config: PretrainedConfig) -> int | None:
    """
    Returns the number of routed experts that `config` declares, or `None` when it declares none.

    Looks at `config` and, for composite models, at its text config.
    """
    configs = [config]
    if hasattr(config, "get_text_config"):
        text_config = config.get_text_config()
        if text_config is not config:
            configs.append(text_config)
    for candidate in configs:
        for key in NUM_EXPERTS_CONFIG_KEYS:
            value = getattr(candidate, key, None)
            if isinstance(value, int) and value > 1:
                return value
    return None
