"""The facts about MoE families that their `_can_record_outputs` declaration does not say, in one table.

Routers are found generically (see `hf_sara.routing.discovery`); what the recorded tensor *means* is not declared
anywhere in transformers, so it is kept here, keyed by the `model_type` of the sub-model that declares the router
([`FAMILIES`]): how the router turns its logits into the weights it routes with (its *scoring function*), which
decides how the logits become a distribution over experts, and which families the tests verify. Beside it: the
config keys that choose a scoring function at run time, and, for models that declare no router at all (remote code,
older classes), the config keys that hold the number of experts and the names a router module goes by.

Everything that needs a family fact reads it from here: the router discovery, the pooling, the TRL work-arounds, the
tests (`tests/test_families.py` checks every `tested` family against its entry by comparing the distribution that
`hf_sara` derives with the top-k weights the router itself returns) and the README's tables
(`utils/families_table.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

SOFTMAX = "softmax"
SIGMOID = "sigmoid"
PROBABILITIES = "probabilities"


@dataclass(frozen=True)
class FamilyFacts:
    """
    What hf_sara knows about one MoE family (one `model_type`) that transformers does not declare.

    Attributes:
        scoring (`str`):
            How the router turns its output into the weights it routes with: `"softmax"`, `"sigmoid"` or
            `"probabilities"` (the output already is a distribution).
        tested (`bool`):
            Whether `tests/test_families.py` builds a tiny model of the family and checks capture, scoring rule,
            gradients and patching on it (the README's table of verified families lists exactly these).
        weights_follow_scoring (`bool`):
            Whether the router's own top-k weights are ratios of its scores, which is how the tests check `scoring`
            (false for PhiMoE, whose sparsemixer weights its experts otherwise).
    """

    scoring: str
    tested: bool = False
    weights_follow_scoring: bool = True


# Every family hf_sara knows, by `model_type` of the (sub-)model that declares the router. Sigmoid scoring (DeepSeek-V3
# style, usually with a correction bias and group-limited top-k used for *selection* only) read off the router classes
# of transformers 5.23; a family that is not here is taken as softmax, with a warning.
FAMILIES: dict[str, FamilyFacts] = {
    **dict.fromkeys(
        (
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
            "qwen2_moe",
            "qwen3_moe",
            "qwen3_next",
        ),
        FamilyFacts(SOFTMAX, tested=True),
    ),
    **dict.fromkeys(
        (
            "afmoe",
            "axk1",
            "axk2",
            "bailing_hybrid",
            "beam",
            "deepseek_v32",
            "dots3_note",
            "dots3_note_text",
            "exaone_moe",
            "flint",
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
            "mimo_v2_flash",
            "minimax_m2",
            "nemotron_h",
            "solar_open",
        ),
        FamilyFacts(SIGMOID),
    ),
    **dict.fromkeys(
        (
            "deepseek_v3",
            "dots1",
            "glm4_moe",
            "lfm2_moe",
            "llama4_text",
        ),
        FamilyFacts(SIGMOID, tested=True),
    ),
    "gemma4_text": FamilyFacts(PROBABILITIES),
    "phimoe": FamilyFacts(SOFTMAX, tested=True, weights_follow_scoring=False),
}

# Config attributes through which some families choose their scoring function at run time. When one is set, it wins
# over the table above.
SCORING_FUNCTION_CONFIG_KEYS = ("scoring_func", "expert_selection_fn", "score_func", "router_score_function")

# Config attributes that hold the number of routed experts, in the order they are tried. Used only by the fallback for
# models that declare no router.
NUM_EXPERTS_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

# Names of the modules the fallback accepts as routers, for models that declare none.
FALLBACK_ROUTER_NAMES = ("gate", "router")


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
    if model_type in FAMILIES:
        return FAMILIES[model_type].scoring
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
