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


_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# How `hf-sara merge` names the adapter in a merged model's card (see `_model_card`).
_MERGED_ADAPTER_ROW = re.compile(r"^\| adapter \| `(?P<adapter>[^`]+)` \|$", re.MULTILINE)
_MERGED_BY = "merged into its weights by `hf-sara merge`"


def _read_adapter_config(adapter: str) -> PeftConfig:
    """The adapter's `PeftConfig`; a local folder must hold a readable adapter_config.json and the weights."""
    if _is_local(adapter):
        folder = os.path.expanduser(adapter)
        config_path = os.path.join(folder, "adapter_config.json")
        if not os.path.isfile(config_path):
            raise ValueError(
                f"{adapter} has no adapter_config.json: it is not a PEFT adapter folder. Pass the folder the adapter "
                "was saved to (`save_model()` / `save_pretrained()` writes adapter_config.json and "
                "adapter_model.safetensors)."
            )
        try:
            with open(config_path, encoding="utf-8") as handle:
                json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{config_path} is not valid JSON ({error}): the adapter's config is damaged or cut short; save the "
                "adapter again."
            ) from None
        if not any(os.path.isfile(os.path.join(folder, name)) for name in _ADAPTER_WEIGHTS):
            raise ValueError(
                f"The adapter folder {adapter} has no adapter_model.safetensors (its weights): save the adapter "
                "again, or pass the folder that holds them."
            )
    return PeftConfig.from_pretrained(adapter)


def _load_adapter_weights(adapter: str, key_mapping) -> dict[str, torch.Tensor]:
    """The adapter's tensors; a damaged or cut weights file is refused, naming it."""
    from safetensors import SafetensorError

    try:
        return load_peft_weights(adapter, device="cpu", key_mapping=key_mapping)
    except (SafetensorError, EOFError, RuntimeError, OSError) as error:
        if not _is_local(adapter):
            raise
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ValueError(
            f"The adapter's weights in {adapter} cannot be read ({reason}): the file is damaged or cut short; save "
            "the adapter again."
        ) from None


def _recorded_base(adapter: str, recorded: str) -> str:
    """
    The base an adapter's config records, as a reference valid here. A relative path is relative to the folder the
    adapter was trained from, not necessarily this one: it is taken only when it names the same folder from here and
    from one of the adapter folder's parents (where a training's `output_dir` usually lies); a recorded folder that
    is not there any more is refused, instead of being looked up as a Hub name.
    """
    expanded = os.path.expanduser(recorded)
    fix = "pass the base model it was trained on with --model (`base_model`)."
    if os.path.isabs(expanded):
        if not os.path.exists(expanded):
            raise ValueError(
                f"The adapter {adapter} records its base model as the folder {recorded} (base_model_name_or_path in "
                f"its adapter_config.json), which does not exist any more: {fix}"
            )
        return recorded
    here = os.path.abspath(expanded) if os.path.exists(expanded) else None
    beside = []
    if _is_local(adapter):
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(adapter)))
        while True:
            candidate = os.path.join(folder, expanded)
            if os.path.exists(candidate):
                beside.append(candidate)
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
    if here is None and not beside:
        looks_local = recorded.startswith((".", "~")) or recorded.count("/") + recorded.count(os.sep) > 1
        if looks_local:
            raise ValueError(
                f"The adapter {adapter} records its base model as the relative path {recorded} "
                "(base_model_name_or_path in its adapter_config.json), which exists neither from here nor next to the "
                f"adapter: {fix}"
            )
        return recorded  # a Hub name
    if here is not None and any(os.path.samefile(here, candidate) for candidate in beside):
        return recorded
    found = f"from here it is {here}" if here is not None else "it does not exist from here"
    if beside:
        found += f", from the adapter's folders it is {beside[0]}"
    raise ValueError(
        f"The adapter {adapter} records its base model as the relative path {recorded} (base_model_name_or_path in "
        f"its adapter_config.json), relative to where it was trained: {found}, so which base it means is not certain; "
        f"{fix}"
    )


def _merged_adapter(base_model: str) -> str | None:
    """The adapter a model folder written by `hf-sara merge` holds already (from its model card), else `None`."""
    card = _adapter_card(base_model)
    if card is None or _MERGED_BY not in card:
        return None
    match = _MERGED_ADAPTER_ROW.search(card)
    return match.group("adapter") if match else None


def _base_revision(peft_config: PeftConfig, base_model: str) -> str | None:
    """The base revision the adapter records (`revision` in adapter_config.json), when the base is the one it names."""
    recorded = peft_config.base_model_name_or_path
    return peft_config.revision if recorded and _same_model(recorded, base_model) else None


def check_adapter_fits_base(
    base_model: str | None,
    adapter: str,
    allow_base_name_mismatch: bool = False,
    trust_remote_code: bool = False,
    lora_only: bool = True,
) -> tuple[str, PeftConfig, PretrainedConfig]:
    """
    Checks, without loading any weight, that `adapter` is a LoRA adapter made for `base_model`, and refuses it
    otherwise (PEFT itself loads an adapter made for a deeper model into a shallower one without a word). The one
    check of every command that takes a base and an adapter: `hf-sara merge`, `eval` and `analyze`.

    An adapter is for this base when:

    1. the base is the one its `adapter_config.json` names (`base_model_name_or_path`): the same name, the same local
       folder, or a Hub name and its snapshot in the local cache. A copy under another name is refused unless
       `allow_base_name_mismatch`; an adapter that names no base skips this check;
    2. the base's class is the one the adapter was made on (`auto_mapping.base_model_class`, when recorded);
    3. applying the adapter's config to the base (built on the meta device, no memory) gives exactly the adapter's
       tensors, with the same shapes: every targeted module and parameter (`target_modules`, `target_parameters`,
       `modules_to_save`) exists in the base with the shape the adapter's weights were trained for, and the adapter
       has weights for every one of them;
    4. the base does not hold this adapter already (a folder `hf-sara merge` wrote with it, told by its model card).

    A relative base path in the adapter's config is relative to where it was trained: without `base_model` it is taken
    only when it names the same folder from here and from a parent of the adapter's folder. A local adapter folder
    without weights, with a damaged config or weights, is refused naming the file.

    Args:
        base_model (`str` or `None`):
            The base model (Hub name or local folder); `None` takes the one the adapter's config names.
        adapter (`str`):
            The PEFT adapter (Hub name or local folder).
        allow_base_name_mismatch (`bool`, *optional*, defaults to `False`):
            Accept a base whose name differs from the adapter's record (a local copy of it); checks 2 and 3 still run.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Passed to transformers for models with remote code.
        lora_only (`bool`, *optional*, defaults to `True`):
            Refuse adapters of other PEFT kinds (merging handles LoRA only; evaluating and analysing take any).

    Returns:
        `tuple[str, PeftConfig, PretrainedConfig]`: the base model's name, the adapter's config, the base's config.

    Raises:
        `ValueError`: naming what does not match and the fix.
    """
    peft_config = _read_adapter_config(adapter)
    if lora_only and peft_config.peft_type != "LORA":
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
        base_model = _recorded_base(adapter, recorded)
    elif recorded and not _same_model(recorded, base_model) and not allow_base_name_mismatch:
        raise ValueError(
            f"The adapter {adapter} was trained on {recorded!r} (base_model_name_or_path in its adapter_config.json), "
            f"not on {base_model!r}. Use it with the model it was trained on; if {base_model!r} is a copy of that "
            "model under another name, pass `allow_base_name_mismatch=True` (`--allow-base-name-mismatch`): the "
            "modules and shapes are checked either way."
        )
    merged_already = _merged_adapter(base_model)
    if merged_already is not None and (merged_already == adapter or _same_model(merged_already, adapter)):
        raise ValueError(
            f"{base_model} already holds the adapter {adapter}: its model card says `hf-sara merge` merged it, so "
            f"applying it again would add its LoRA update twice. Use {base_model} as it is, or the adapter with the "
            f"base it was trained on{f' ({recorded})' if recorded else ''}."
        )
    revision = _base_revision(peft_config, base_model)
    base_config = AutoConfig.from_pretrained(base_model, revision=revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config, trust_remote_code=trust_remote_code)
    made_on = (peft_config.auto_mapping or {}).get("base_model_class")
    if made_on and made_on != type(skeleton).__name__:
        raise ValueError(
            f"The adapter {adapter} was made for a {made_on} (auto_mapping in its adapter_config.json), but "
            f"{base_model} is a {type(skeleton).__name__}. Use it with the model it was trained on."
        )
    applied = copy.deepcopy(peft_config)
    applied.base_model_name_or_path = None  # get_peft_model records the skeleton's name (and warns when it differs)
    try:
        # On the meta device the adapter's modules get the shapes this base gives them, without allocating memory.
        expected = get_peft_model_state_dict(get_peft_model(skeleton, applied))
    except ValueError as error:  # PEFT: "Target modules ... not found in the base model", ...
        raise ValueError(
            f"The adapter {adapter} does not fit {base_model}: {' '.join(str(error).split())} Use it with the "
            "model it was trained on."
        ) from None
    stored = _load_adapter_weights(adapter, getattr(skeleton, "_checkpoint_conversion_mapping", None) or None)
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
            f"trained on a model of another architecture or size{f' ({recorded})' if recorded else ''}: use it "
            "with that model."
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


def _untie_adapted_embeddings(adapted: PeftModel) -> bool:
    """
    Unties the base's input and output embeddings when they share one weight and LoRA adapts one of them: the adapted
    model applies the update to that one side only, but merging it into the shared weight would change both (and the
    merged config would still tie them). The other side keeps the base's weight. Returns whether they were untied.
    """
    model = adapted.get_base_model()
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    if embeddings[1] is None or not any(isinstance(module, LoraLayer) for module in embeddings):
        return False
    input_layer, output_layer = (getattr(module, "base_layer", module) for module in embeddings)
    if input_layer.weight is not output_layer.weight:
        return False
    output_layer.weight = torch.nn.Parameter(
        output_layer.weight.detach().clone(), requires_grad=output_layer.weight.requires_grad
    )
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


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
    _untie_adapted_embeddings(adapted)
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
    from safetensors import SafetensorError

    try:
        with atomic_directory(output_dir, overwrite=overwrite) as staging:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            card = _model_card(
                result,
                peft_config,
                base_config,
                merged.config,
                revision,
                next(merged.parameters()).dtype,
                sara_settings,
            )
            with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(card)
    except (OSError, SafetensorError) as error:  # a full disk: safetensors reports it as its own error
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        kept = "the folder is as it was" if os.path.exists(output_dir) else "nothing was left there"
        raise OSError(
            f"Could not write the merged model to {output_dir} ({reason}); {kept}. Free space there (or choose "
            "another --output-dir) and run again."
        ) from None
    logger.info(f"hf_sara: merged {adapter} into {base_model}, saved to {output_dir}: {json.dumps(vars(result))}")
    return result
