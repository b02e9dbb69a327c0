"""`hf-sara eval`: Accuracy per language through lm-evaluation-harness, for a model or a base model and a PEFT adapter
side by side: harness tasks (e.g. global_mmlu_full_sw, belebele_swh_Latn, mgsm_direct_sw) and local files in the
Global-MMLU (question, option_a..option_d, answer[, subject]) or M3KE (question, A, B, C, D, answer) schema. Without
--tasks and --files it evaluates the small sample files shipped with hf_sara."""

from __future__ import annotations

from . import common


def eval_command(argv: list[str]) -> int:
    parser = common.command_parser("eval", __doc__)
    common.add_model_arguments(parser, "evaluate next to the base model")
    parser.add_argument(
        "--tasks", nargs="+", default=[], metavar="[LANG=]TASK", help="harness tasks or groups, one per language"
    )
    parser.add_argument(
        "--files", nargs="+", default=[], metavar="[LANG=]FILE", help="local .jsonl/.json/.csv files, one per language"
    )
    parser.add_argument("--output-dir", required=True, help="where the tables, chart, task files and cache go")
    parser.add_argument(
        "--num-fewshot", type=common.non_negative_int, default=None, help="few-shot examples (default: the task's own)"
    )
    parser.add_argument(
        "--batch-size", type=common.batch_size, default=8, help="harness batch size, or 'auto' (default: 8)"
    )
    parser.add_argument(
        "--limit", type=common.positive_float, default=None, help="only the first N items (or a fraction < 1) per task"
    )
    parser.add_argument(
        "--max-length", type=common.positive_int, default=None, help="longest input (default: the model's)"
    )
    parser.add_argument("--device", type=common.device, default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="model dtype"
    )
    parser.add_argument("--apply-chat-template", action="store_true", help="format prompts with the chat template")
    parser.add_argument("--no-cache", action="store_true", help="do not keep the harness's response cache")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)

    from ..tools.evaluation.local_files import sample_eval_files
    from ..tools.evaluation.report import accuracy_table
    from ..tools.evaluation.run import EvalSettings, evaluate_and_report
    from ..tools.evaluation.sources import parse_sources
    from ..tools.evaluation.tasks import require_lm_eval
    from ..tools.reporting import markdown_table

    require_lm_eval()
    common.check_model_references(args)
    files = args.files or ([] if args.tasks else [f"{lang}={path}" for lang, path in sample_eval_files().items()])
    settings = EvalSettings(
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        limit=args.limit,
        max_length=args.max_length,
        device=args.device,
        dtype=args.dtype,
        apply_chat_template=args.apply_chat_template,
        use_cache=not args.no_cache,
        trust_remote_code=args.trust_remote_code,
    )
    sources = parse_sources(args.tasks, files)
    scores, paths = evaluate_and_report(
        args.model,
        args.adapter,
        sources,
        args.output_dir,
        settings,
        allow_base_name_mismatch=args.allow_base_name_mismatch,
    )
    print()
    print(markdown_table(accuracy_table(scores)))
    print()
    common.print_paths(paths)
    return 0
