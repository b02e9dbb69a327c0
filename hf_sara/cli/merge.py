"""`hf-sara merge`: Merge a (SARA) LoRA adapter into its base model and save a plain model folder for serving:
safetensors, config, tokenizer and a model card with the SARA settings. It loads with AutoModelForCausalLM, without
PEFT. An adapter not made for the base is refused before the base model's weights are loaded."""

from __future__ import annotations

from .common import check_local_reference, command_parser


def merge_command(argv: list[str]) -> int:
    parser = command_parser("merge", __doc__)
    parser.add_argument("--adapter", required=True, help="the LoRA adapter (name or path)")
    parser.add_argument(
        "--model", help="the base model (name or path; default: the one the adapter's adapter_config.json names)"
    )
    parser.add_argument("--output-dir", required=True, help="the merged model's folder (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="merge and save dtype"
    )
    parser.add_argument(
        "--allow-base-name-mismatch",
        action="store_true",
        help="accept a base named otherwise than in the adapter's config (a copy of it); shapes are still checked",
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)

    from ..tools.merge import merge_adapter

    check_local_reference(args.adapter, "adapter")
    check_local_reference(args.model, "model")
    result = merge_adapter(
        args.model,
        args.adapter,
        args.output_dir,
        overwrite=args.overwrite,
        dtype=args.dtype,
        allow_base_name_mismatch=args.allow_base_name_mismatch,
        trust_remote_code=args.trust_remote_code,
    )
    print(
        f"Merged {result.adapter} into {result.base_model}: LoRA of {result.lora_modules} modules and "
        f"{result.lora_parameters} parameters, {result.modules_to_save} modules replaced whole; SARA settings "
        f"{'copied from the adapter card' if result.sara_settings else 'not recorded in the adapter card'}; "
        f"tokenizer from the {result.tokenizer_source}."
    )
    print(f"Saved to {result.output_dir} (AutoModelForCausalLM.from_pretrained({result.output_dir!r}))")
    return 0
