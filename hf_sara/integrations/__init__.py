"""
hf_sara inside other training frameworks: each subpackage adapts [`SARAMixin`] and the SARA settings to one framework's
own extension points (its plugins, dataset strategies, trainer and arguments classes). The method itself stays in
`hf_sara.training`; nothing in the library imports these subpackages, and each imports its framework.

- `hf_sara.integrations.axolotl`: `plugins: [hf_sara.integrations.axolotl.SARAPlugin]` in an Axolotl YAML.
"""
