"""The "SARA settings" section of a model card: written by [`SARATrainer`] into an adapter's card, read back by
`hf-sara merge` into the merged model's."""

from __future__ import annotations

from collections.abc import Iterable

SARA_SETTINGS_HEADING = "## SARA settings"
_INTRODUCTION = (
    "Trained with hf_sara's Semantically Anchored Routing Alignment: the SFT loss plus a Jensen-Shannon loss between "
    "each example's expert routing and that of its high-resource anchor."
)


def render_sara_settings(rows: Iterable[tuple[str, object]]) -> str:
    """
    The "SARA settings" section, to append to a model card: the heading, one sentence on the method, and a table of
    `rows` (setting, value). It starts with a blank line, so it stands apart from the card it is appended to.
    """
    lines = ["", "", SARA_SETTINGS_HEADING, "", _INTRODUCTION, "", "| setting | value |", "|---|---|"]
    lines += [f"| {setting} | {value} |" for setting, value in rows]
    return "\n".join([*lines, ""])


def sara_settings_section(card: str | None) -> str | None:
    """
    The body of the "SARA settings" section that [`render_sara_settings`] wrote into a model card (the table of
    `sara_weight`, `sara_layers`, ...), verbatim, or `None` when the card has none.
    """
    if card is None:
        return None
    lines = card.splitlines()
    starts = [index for index, line in enumerate(lines) if line.strip() == SARA_SETTINGS_HEADING]
    if not starts:
        return None
    body = []
    for line in lines[starts[-1] + 1 :]:
        if line.startswith("## ") or line.startswith("# "):
            break
        body.append(line)
    return "\n".join(body).strip() or None
