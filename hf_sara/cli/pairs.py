"""`hf-sara pairs`: Build a paired dataset (JSONL) for SARA from a parallel corpus or a translated instruction set."""

from __future__ import annotations

import os

from .common import CommandError, command_parser


def pairs_command(argv: list[str]) -> int:
    parser = command_parser("pairs", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--aligned", nargs=2, metavar=("SOURCE", "ANCHOR"), help="two line-aligned text files")
    source.add_argument(
        "--multilingual",
        metavar="FILE",
        help="a TSV/CSV/JSONL file with one column per language (texts, or prompt/completion objects)",
    )
    parser.add_argument("--language", help="language code of SOURCE (with --aligned)")
    parser.add_argument("--anchor-language", default="en", help="the anchor language (default: en)")
    parser.add_argument("--languages", help="comma-separated languages to keep (with --multilingual; default: all)")
    parser.add_argument("--output", required=True, help="the JSONL file to write")
    args = parser.parse_args(argv)

    from ..tools.pairs import count_anchored, pairs_from_aligned_files, pairs_from_multilingual, write_jsonl

    inputs = args.aligned or [args.multilingual]
    if any(
        os.path.exists(path) and os.path.samefile(path, args.output) for path in inputs if os.path.exists(args.output)
    ):
        raise CommandError(f"--output {args.output} is one of the input files: write the pairs to another file")
    if args.aligned:
        if not args.language:
            raise CommandError("--language is required with --aligned (the language code of SOURCE)")
        rows = pairs_from_aligned_files(*args.aligned, args.language, args.anchor_language)
    else:
        languages = args.languages.split(",") if args.languages else None
        rows = pairs_from_multilingual(args.multilingual, args.anchor_language, languages)
    write_jsonl(rows, args.output)
    print(f"Wrote {len(rows)} pairs ({count_anchored(rows)} with an anchor) to {args.output}")
    return 0
