"""Tools around training: building pairs, routing analysis, evaluation, reports, and the demo."""
