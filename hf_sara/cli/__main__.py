"""`python -m hf_sara.cli`: the `hf-sara` command (what `accelerate launch -m hf_sara.cli` runs)."""

from . import main

raise SystemExit(main())
