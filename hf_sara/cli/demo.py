"""`hf-sara demo`: The main job on the embedded default, offline: a tiny Qwen3-MoE learns five languages, then LoRA
fine-tuning on the low-resource pairs with plain SFT and with SARA from the same start; prints the routing divergence
per language, writes figures, saves the SARA adapter and its model card."""

from __future__ import annotations

import math

from .common import CommandError, command_parser


def demo_command(argv: list[str]) -> int:
    parser = command_parser("demo", __doc__)
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything is written")
    parser.add_argument("--base-steps", type=int, default=300, help="steps of the multilingual base training")
    parser.add_argument("--steps", type=int, default=150, help="steps of each LoRA fine-tuning")
    parser.add_argument("--sara-weight", type=float, default=1.5)
    parser.add_argument("--sara-layers", default=None, help="aligned layers (default: the published band)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from ..routing.layers import DEFAULT_LAYERS, resolve_layers
    from ..tools.demo import format_demo_summary, run_demo

    # Checked before the base training, which takes most of the run.
    if args.steps < 1 or args.base_steps < 1:
        raise CommandError("--steps and --base-steps must be at least 1")
    if not (math.isfinite(args.sara_weight) and args.sara_weight >= 0):
        raise CommandError(f"--sara-weight must be a finite number >= 0, got {args.sara_weight}")
    resolve_layers(args.sara_layers or DEFAULT_LAYERS, 4)  # the demo's model has 4 MoE layers

    result = run_demo(
        args.output_dir,
        base_steps=args.base_steps,
        steps=args.steps,
        sara_weight=args.sara_weight,
        sara_layers=args.sara_layers or DEFAULT_LAYERS,
        seed=args.seed,
    )
    print()
    print(format_demo_summary(result))
    return 0
