"""`hf-sara analyze`: Routing divergence between each language's examples and their anchors, per MoE layer, for a model
or a base/adapter pair: a markdown and CSV table and PNG figures."""

from __future__ import annotations

from . import common


def analyze_command(argv: list[str]) -> int:
    parser = common.command_parser("analyze", __doc__)
    common.add_model_arguments(parser, "compare with the base model")
    parser.add_argument(
        "--data", help="paired dataset: .jsonl/.json/.parquet file or Hub name (default: the embedded demo pairs)"
    )
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--output-dir", required=True, help="where the table and figures are written")
    parser.add_argument(
        "--layers", default=None, help="aligned layers for the summary table (default: published band)"
    )
    parser.add_argument("--batch-size", type=common.positive_int, default=16)
    parser.add_argument("--max-length", type=common.positive_int, default=512)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from ..routing.discovery import find_routers
    from ..routing.layers import resolve_layers
    from ..routing.patching import patch_model
    from ..testing import load_demo_pairs
    from ..tools.analysis import compare_routing, divergence_table, write_report
    from ..tools.loading import load_tokenizer
    from ..tools.reporting import markdown_table, write_into

    common.check_model_references(args)
    common.check_adapter(args)  # an adapter made for another base: refused before anything loads
    dataset = load_demo_pairs() if args.data is None else common.load_split(args.data, args.split)
    tokenizer = load_tokenizer(args.model, args.adapter)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = patch_model(
        AutoModelForCausalLM.from_pretrained(args.model).to(common.default_device())
    )  # refuses dense models
    aligned = resolve_layers(args.layers, len(find_routers(model)))  # checked before the analysis
    reports = compare_routing(model, tokenizer, dataset, args.adapter, args.batch_size, args.max_length)
    paths = write_into(args.output_dir, lambda staging: write_report(reports, staging, aligned))
    print(f"Mean routing divergence to the anchors over MoE layers {aligned}:\n")
    print(markdown_table(divergence_table(reports, aligned)))
    print()
    common.print_paths(paths)
    return 0
