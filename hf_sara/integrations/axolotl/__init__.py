"""
SARA in Axolotl: `plugins: [hf_sara.integrations.axolotl.SARAPlugin]` and `sara_*` keys in an Axolotl YAML.

```yaml
base_model: Qwen/Qwen3-30B-A3B
plugins:
  - hf_sara.integrations.axolotl.SARAPlugin
sara_weight: 1.5
sara_layers: "7-34"
datasets:
  - path: pairs.jsonl          # messages, anchor_messages, language
    type: chat_template
```

The plugin adapts; the method is [`SARAMixin`]'s:

- `register`: every `type: chat_template` dataset is tokenized by
  [`~hf_sara.integrations.axolotl.chat_template.PairedPromptTokenizingStrategy`], so each row's `anchor_messages` are
  tokenized with the same template and options as its `messages` (Axolotl keeps no column a strategy does not return);
- `get_input_args`: the `sara_*` keys ([`SARAInputArgs`]), refused at config validation by the library's own checks;
- `get_training_args_mixin`, `get_training_args`: Axolotl's training arguments take on [`SARAArguments`];
- `get_trainer_cls`: [`AxolotlSARATrainer`], Axolotl's trainer with [`SARAMixin`] (offline anchors computed once at
  the start of training, split over the ranks; `sara/*` metrics in Axolotl's logs; the SARA settings in the model
  card).
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin

from .args import SARAInputArgs, sara_training_args

__all__ = ["SARAInputArgs", "SARAPlugin"]

PAIRED_TYPE = "hf_sara.integrations.axolotl.chat_template"
DATASET_KEYS = ("datasets", "test_datasets")


class SARAPlugin(BasePlugin):
    """Axolotl plugin that trains with SARA: see the module's documentation."""

    def register(self, cfg: dict):
        """
        Routes the YAML's `type: chat_template` datasets (`datasets`, `test_datasets`) through the paired strategy
        (`cfg` is the raw YAML, before validation).

        Raises:
            `ValueError`: for a dataset of another type, whose anchors could not be tokenized like its examples.
        """
        for key in DATASET_KEYS:
            for dataset in cfg.get(key) or []:
                kind = dataset.get("type")
                if kind == "chat_template":
                    dataset["type"] = PAIRED_TYPE
                elif kind != PAIRED_TYPE:
                    raise ValueError(
                        f"SARAPlugin pairs conversational datasets: `{key}` entry {dataset.get('path')!r} has "
                        f"`type: {kind}`. Give it `type: chat_template` with `messages` and `anchor_messages` columns "
                        "(the anchor is then tokenized with the same chat template), or train it without the plugin."
                    )

    def get_input_args(self) -> str:
        return "hf_sara.integrations.axolotl.args.SARAInputArgs"

    def get_training_args_mixin(self) -> str:
        return "hf_sara.training.arguments.SARAArguments"

    def get_training_args(self, cfg) -> dict[str, Any]:
        return sara_training_args(cfg)

    def get_trainer_cls(self, cfg):
        from .trainer import AxolotlSARATrainer

        return AxolotlSARATrainer
