"""
Dataset `type: hf_sara.integrations.axolotl.chat_template`: Axolotl's `chat_template` strategy on both sides of each
pair, so the anchor is tokenized with the same template, options and masking as its example.

[`SARAPlugin`] routes every `type: chat_template` dataset here; naming it in the YAML does the same.
"""

from __future__ import annotations

from typing import Any

from axolotl.prompt_strategies import load as load_strategy
from axolotl.prompt_tokenizers import PromptTokenizingStrategy

from ...training.paired_data import DEFAULT_ANCHOR_PREFIX, LANGUAGE_COLUMN

TOKENIZED = ("input_ids", "labels", "attention_mask")


class PairedPromptTokenizingStrategy(PromptTokenizingStrategy):
    """
    Tokenizes a paired row: the example by Axolotl's own strategy, then its anchor by the same strategy, on the row
    whose columns are replaced by their `anchor_` counterparts (`anchor_messages` for `messages`, and so on). It adds
    the tokenized pairs [`SARAMixin`] reads: `anchor_input_ids`, `anchor_labels`, `anchor_attention_mask` (empty for a
    row without an anchor) and the row's `language` (None where it has none).

    Args:
        inner ([`~axolotl.prompt_tokenizers.PromptTokenizingStrategy`]):
            The dataset's own strategy (Axolotl's `chat_template`, with the dataset's options).
        anchor_field (`str`):
            The column whose anchor counterpart marks a row as anchored (`messages`, or the dataset's
            `field_messages`).
        anchor_prefix (`str`, *optional*, defaults to `"anchor_"`):
            The prefix of the anchor's columns (the YAML's top-level `anchor_prefix`).
    """

    def __init__(self, inner: PromptTokenizingStrategy, anchor_field: str, anchor_prefix: str = DEFAULT_ANCHOR_PREFIX):
        # The inner strategy holds the tokenizer, template and options: everything else is read from it.
        self.inner = inner
        self.anchor_field = anchor_field
        self.anchor_prefix = anchor_prefix

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): no recursion through `self.inner`
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def supports_batched(self) -> bool:
        return False  # one pair at a time: two calls of the inner strategy per row

    def tokenize_prompt(self, prompt: dict[str, Any]) -> dict[str, Any]:
        prefix = self.anchor_prefix
        example = {key: value for key, value in prompt.items() if not key.startswith(prefix)}
        language = example.pop(LANGUAGE_COLUMN, None)
        tokenized = dict(self.inner.tokenize_prompt(example))
        if prompt.get(prefix + self.anchor_field):
            substituted = {key[len(prefix) :]: value for key, value in prompt.items() if key.startswith(prefix)}
            anchor = {**example, **substituted}
            tokenized_anchor = self.inner.tokenize_prompt(anchor)
            for name in TOKENIZED:
                tokenized[prefix + name] = list(tokenized_anchor[name])
        else:
            for name in TOKENIZED:
                tokenized[prefix + name] = []
        tokenized[LANGUAGE_COLUMN] = language
        return tokenized


def load(tokenizer, cfg, ds_cfg: dict[str, Any] | None = None, processor=None) -> PairedPromptTokenizingStrategy:
    """The strategy Axolotl loads for `type: hf_sara.integrations.axolotl.chat_template`: its own `chat_template`
    strategy with the dataset's options, paired."""
    inner = load_strategy("chat_template", tokenizer, cfg, ds_cfg, processor=processor)
    field = getattr(getattr(inner, "prompter", None), "field_messages", None) or (ds_cfg or {}).get(
        "field_messages", "messages"
    )
    return PairedPromptTokenizingStrategy(inner, field, cfg.get("anchor_prefix") or DEFAULT_ANCHOR_PREFIX)
