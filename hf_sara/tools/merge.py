"""Merging a SARA LoRA adapter into its base model: a plain transformers model folder for serving."""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, ParamWrapper
from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict, load_peft_weights
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.utils import logging

from ..compat import load_peft_adapter
from ..files.atomic import atomic_directory, check_output_directory
from ..training.model_card import SARA_SETTINGS_HEADING, sara_settings_section
from .loading import load_tokenizer_with_source, parse_dtype

logger = logging.get_logger(__name__)

# A Hub repository in the local cache: .../models--{org}--{name}/snapshots/{commit}
_HUB_CACHE_SNAPSHOT = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\]?$")


@dataclass
class MergeResult:
    """
    What [`merge_adapter`] wrote.

    Args:
        output_dir (`str`):
            The merged model's folder.
        base_model (`str`):
            The base model the adapter was merged into.
        adapter (`str`):
            The adapter.
        lora_modules (`int`):
            Modules that carried LoRA (`target_modules`), now merged into their weights.
        lora_parameters (`int`):
            Parameters that carried LoRA (`target_parameters`: routers, fused 3D experts), now merged.
        modules_to_save (`int`):
            Modules the adapter held whole (`modules_to_save`), now in place of the base's.
        sara_settings (`bool`):
            Whether the adapter's model card had a SARA settings section (copied into the merged model's card).
        tokenizer_source (`str`):
            `"adapter"` or `"base model"`: where the saved tokenizer comes from.
    """

    output_dir: str
    base_model: str
    adapter: str
    lora_modules: int
    lora_parameters: int
    modules_to_save: int
    sara_settings: bool
    tokenizer_source: str


def _hub_name(reference: str) -> str:
    """The Hub repository of a path in the Hugging Face cache (`models--org--name/snapshots/...`), else `reference`."""
    match = _HUB_CACHE_SNAPSHOT.search(reference)
    return match.group("repo").replace("--", "/") if match else reference.rstrip("/\\")


def _same_model(recorded: str, given: str) -> bool:
    """Whether two references name the same model: the same string, the same local folder, or a Hub name and its
    snapshot in the local cache. Anything else (two names, a copy under another path) counts as different."""
    if recorded == given:
        return True
    paths = [os.path.expanduser(reference) for reference in (recorded, given)]
    if all(os.path.exists(path) for path in paths):
        return os.path.samefile(*paths)
    return _hub_name(recorded) == _hub_name(given)


def _is_local(reference: str) -> bool:
    return os.path.exists(os.path.expanduser(reference))


def _base_revision(peft_config: PeftConfig, base_model: str) -> str | None:
    """The base revision the adapter records (`revision` in adapter_config.json), when the base is the one it names."""
    recorded = peft_config.base_model_name_or_path
    return peft_config.revision if recorded and _same_model(recorded, base_model) else None


def check_adapter_fits_base(
    base_model: str | None,
    adapter: str,
    allow_base_name_mismatch: bool = False,
    trust_remote_code: bool = False,
) -> tuple[str, PeftConfig, PretrainedConfig]:
    """
    Checks, without loading any weight, that `adapter` is a LoRA adapter made for `base_model`, and refuses it
    otherwise (PEFT itself loads an adapter made for a deeper model into a shallower one without a word).

    An adapter is for this base when:

    1. the base is the one its `adapter_config.json` names (`base_model_name_or_path`): the same name, the same local
       folder, or a Hub name and its snapshot in the local cache. A copy under another name is refused unless
       `allow_base_name_mismatch`; an adapter that names no base skips this check;
    2. the base's class is the one the adapter was made on (`auto_mapping.base_model_class`, when recorded);
    3. applying the adapter's config to the base (built on the meta device, no memory) gives exactly the adapter's
       tensors, with the same shapes: every targeted module and parameter (`target_modules`, `target_parameters`,
       `modules_to_save`) exists in the base with the shape the adapter's weights were trained for, and the adapter
       has weights for every one of them.

    Args:
        base_model (`str` or `None`):
            The base model (Hub name or local folder); `None` takes the one the adapter's config names.
        adapter (`str`):
            The PEFT adapter (Hub name or local folder).
        allow_base_name_mismatch (`bool`, *optional*, defaults to `False`):
            Accept a base whose name differs from the adapter's record (a local copy of it); checks 2 and 3 still run.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Passed to transformers for models with remote code.

    Returns:
        `tuple[str, PeftConfig, PretrainedConfig]`: the base model's name, the adapter's config, the base's config.

    Raises:
        `ValueError`: naming what does not match and the fix.
    """
    peft_config = PeftConfig.from_pretrained(adapter)
    if peft_config.peft_type != "LORA":
        raise ValueError(
            f"{adapter} is a {peft_config.peft_type} adapter; hf_sara merges LoRA adapters (peft_type LORA). Use "
            "PEFT's own `merge_and_unload()` for other kinds."
        )
    recorded = peft_config.base_model_name_or_path
    if base_model is None:
        if not recorded:
            raise ValueError(
                f"The adapter {adapter} does not record its base model (no base_model_name_or_path in its "
                "adapter_config.json): pass the base model it was trained on."
            )
        base_model = recorded
    elif recorded and not _same_model(recorded, base_model) and not allow_base_name_mismatch:
        raise ValueError(
            f"The adapter {adapter} was trained on {recorded!r} (base_model_name_or_path in its adapter_config.json), "
            f"not on {base_model!r}. Merge it into the model it was trained on; if {base_model!r} is a copy of that "
            "model under another name, pass `allow_base_name_mismatch=True` (`--allow-base-name-mismatch`): the "
            "modules and shapes are checked either way."
        )
    revision = _base_revision(peft_config, base_model)
    base_config = AutoConfig.from_pretrained(base_model, revision=revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config, trust_remote_code=trust_remote_code)
    made_on = (peft_config.auto_mapping or {}).get("base_model_class")
    if made_on and made_on != type(skeleton).__name__:
        raise ValueError(
            f"The adapter {adapter} was made for a {made_on} (auto_mapping in its adapter_config.json), but "
            f"{base_model} is a {type(skeleton).__name__}. Merge it into the model it was trained on."
        )
    applied = copy.deepcopy(peft_config)
    applied.base_model_name_or_path = None  # get_peft_model records the skeleton's name (and warns when it differs)
    try:
        # On the meta device the adapter's modules get the shapes this base gives them, without allocating memory.
        expected = get_peft_model_state_dict(get_peft_model(skeleton, applied))
    except ValueError as error:  # PEFT: "Target modules ... not found in the base model", ...
        raise ValueError(
            f"The adapter {adapter} does not fit {base_model}: {' '.join(str(error).split())} Merge it into the "
            "model it was trained on."
        ) from None
    stored = load_peft_weights(
        adapter, device="cpu", key_mapping=getattr(skeleton, "_checkpoint_conversion_mapping", None) or None
    )
    problems = [f"the base has no {key!r}" for key in sorted(set(stored) - set(expected))]
    problems += [f"the adapter has no weights for {key!r}" for key in sorted(set(expected) - set(stored))]
    problems += [
        f"{key!r} is {list(stored[key].shape)} in the adapter but {list(expected[key].shape)} for this base"
        for key in sorted(set(stored) & set(expected))
        if stored[key].shape != expected[key].shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(
            f"The adapter {adapter} was not made for {base_model} ({len(problems)} mismatch(es): {shown}). It was "
            f"trained on a model of another architecture or size{f' ({recorded})' if recorded else ''}: merge it "
            "into that model."
        )
    return base_model, peft_config, base_config


def _adapter_card(adapter: str) -> str | None:
    """The text of the adapter's model card (README.md), or `None` when it has none."""
    if _is_local(adapter):
        path = os.path.join(adapter, "README.md")
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = hf_hub_download(adapter, "README.md")
        except (OSError, EntryNotFoundError):
            return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _markdown_list(values) -> str:
    if not values:
        return "none"
    if isinstance(values, str):
        return f"`{values}`"
    return ", ".join(f"`{value}`" for value in sorted(values))


def _model_card(
    result: MergeResult,
    peft_config: PeftConfig,
    base_config: PretrainedConfig,
    merged_config: PretrainedConfig,
    revision: str | None,
    dtype: torch.dtype,
    sara_settings: str | None,
) -> str:
    import peft
    import transformers
    import yaml

    from .. import __version__

    metadata = {"library_name": "transformers", "tags": ["hf_sara", "sara", "moe", "lora", "merged"]}
    if not _is_local(result.base_model):
        metadata["base_model"] = _hub_name(result.base_model)
    output_router_logits = getattr(merged_config.get_text_config(), "output_router_logits", None)
    rows = [
        ("base model", f"`{result.base_model}`" + (f" (revision `{revision}`)" if revision else "")),
        ("adapter", f"`{result.adapter}`"),
        ("method", f"PEFT {peft.__version__} `merge_and_unload(safe_merge=True)`"),
        ("LoRA", f"r={peft_config.r}, lora_alpha={peft_config.lora_alpha}, use_rslora={peft_config.use_rslora}"),
        ("target_modules", _markdown_list(peft_config.target_modules)),
        ("target_parameters", _markdown_list(peft_config.target_parameters)),
        ("modules_to_save", _markdown_list(peft_config.modules_to_save)),
        (
            "merged",
            f"LoRA of {result.lora_modules} modules and {result.lora_parameters} parameters; "
            f"{result.modules_to_save} modules replaced whole",
        ),
        ("weights dtype", str(dtype).replace("torch.", "")),
        ("output_router_logits", f"{output_router_logits} (as in the base model's config)"),
        ("tokenizer", f"the {result.tokenizer_source}'s"),
        ("versions", f"hf_sara {__version__}, transformers {transformers.__version__}, torch {torch.__version__}"),
    ]
    if getattr(base_config, "tie_word_embeddings", False) and not getattr(merged_config, "tie_word_embeddings", True):
        rows.append(("tie_word_embeddings", "False: the adapter trained one of the base's tied embeddings"))
    name = os.path.basename(os.path.normpath(result.output_dir))
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"`{result.base_model}` with the SARA LoRA adapter `{result.adapter}` merged into its weights by "
        "`hf-sara merge`: a plain transformers model, for serving without PEFT.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "## Merge",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in rows],
        "",
        SARA_SETTINGS_HEADING,
        "",
    ]
    if sara_settings is None:
        lines.append(
            'Not recorded: the adapter\'s model card (README.md) has no "SARA settings" section, which `SARATrainer` '
            "writes when it saves an adapter, so the settings it was trained with are unknown here."
        )
    else:
        lines += ["As recorded in the adapter's model card:", "", sara_settings]
    return "\n".join(lines) + "\n"


def _count_adapted(model: PeftModel) -> tuple[int, int, int]:
    modules = parameters = whole = 0
    for module in model.modules():
        if isinstance(module, ParamWrapper):
            parameters += 1  # one per parameter, nested when a module has several
        elif isinstance(module, LoraLayer):
            modules += 1
        elif isinstance(module, ModulesToSaveWrapper):
            whole += 1
    return modules, parameters, whole


def _check_output_location(output_dir: str, references: dict[str, str]) -> None:
    output = os.path.realpath(output_dir)
    for what, reference in references.items():
        if _is_local(reference):
            path = os.path.realpath(os.path.expanduser(reference))
            if path == output or path.startswith(output.rstrip(os.sep) + os.sep):
                raise ValueError(
                    f"The output folder {output_dir} is (or holds) the {what} {reference}: writing there would "
                    "replace it. Choose another output folder."
                )


def merge_adapter(
    base_model: str | None,
    adapter: str,
    output_dir: str,
    overwrite: bool = False,
    dtype: str | torch.dtype = "auto",
    allow_base_name_mismatch: bool = False,
    trust_remote_code: bool = False,
) -> MergeResult:
    """
    Merges a (SARA) LoRA adapter into its base model and saves a plain transformers model folder for serving: the
    safetensors weights, the config (with `output_router_logits` as the base model had it), the generation config,
    the tokenizer, and a model card (README.md) with the merge and the adapter's SARA settings. It loads with
    `AutoModelForCausalLM.from_pretrained(output_dir)`, without PEFT.

    The merge is PEFT's: `PeftModel.from_pretrained` then `merge_and_unload(safe_merge=True)`, which folds LoRA on
    modules (`target_modules`), LoRA on parameters (`target_parameters`: router weights, fused 3D expert weights such
    as `experts.gate_up_proj`) and the trained copies of `modules_to_save` into the base. Before any weight is loaded,
    [`check_adapter_fits_base`] refuses an adapter that was not made for this base. The folder is written next to
    `output_dir` and renamed into place once complete, so a failure leaves no half-written output.

    Args:
        base_model (`str` or `None`):
            The base model (Hub name or local folder); `None` takes the one the adapter's config names.
        adapter (`str`):
            The LoRA adapter (Hub name or local folder), e.g. what `SARATrainer.save_model()` wrote.
        output_dir (`str`):
            The folder to write; it must not exist or be empty, unless `overwrite`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a non-empty `output_dir` (deleted once the new folder is complete).
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"auto"`):
            Dtype to load the base in and merge and save with: `"auto"` (the base checkpoint's), `"float32"`,
            `"bfloat16"` or `"float16"`.
        allow_base_name_mismatch (`bool`, *optional*, defaults to `False`):
            Accept a base whose name differs from the one the adapter's config records (a copy of it under another
            name or path); its modules and shapes are checked either way.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Passed to transformers for models with remote code.

    Returns:
        [`MergeResult`]: what was merged and where it was saved.

    Raises:
        `ValueError`: an adapter not made for this base, a non-LoRA adapter, no tokenizer, an output folder that is
            the base or the adapter.
        `FileExistsError`: a non-empty `output_dir` without `overwrite`.
    """
    dtype = parse_dtype(dtype)
    check_output_directory(output_dir, overwrite)
    base_model, peft_config, base_config = check_adapter_fits_base(
        base_model, adapter, allow_base_name_mismatch, trust_remote_code
    )
    _check_output_location(output_dir, {"base model": base_model, "adapter": adapter})
    revision = _base_revision(peft_config, base_model)
    tokenizer, tokenizer_source = load_tokenizer_with_source(
        base_model, adapter, model_revision=revision, trust_remote_code=trust_remote_code
    )
    sara_settings = sara_settings_section(_adapter_card(adapter))

    model = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code
    )
    adapted = load_peft_adapter(model, adapter)
    lora_modules, lora_parameters, modules_to_save = _count_adapted(adapted)
    merged = adapted.merge_and_unload(safe_merge=True)  # the config stays the base's (`output_router_logits` too)

    result = MergeResult(
        output_dir=output_dir,
        base_model=base_model,
        adapter=adapter,
        lora_modules=lora_modules,
        lora_parameters=lora_parameters,
        modules_to_save=modules_to_save,
        sara_settings=sara_settings is not None,
        tokenizer_source=tokenizer_source,
    )
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        card = _model_card(
            result, peft_config, base_config, merged.config, revision, next(merged.parameters()).dtype, sara_settings
        )
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)
    logger.info(f"hf_sara: merged {adapter} into {base_model}, saved to {output_dir}: {json.dumps(vars(result))}")
    return result
