"""The `sara_*` keys of an Axolotl YAML: [`SARAInputArgs`], validated by the checks of [`SARAArguments`]."""

from __future__ import annotations

import dataclasses
import typing

from pydantic import BaseModel, Field, create_model, model_validator

from ...training.arguments import SARAArguments


class _SARAInputChecks(BaseModel):
    """Runs [`SARAArguments.check_sara_arguments`] on the `sara_*` keys set in the YAML, so that a bad value is refused
    when Axolotl validates the config, with the message (and the key it names) the library gives."""

    @model_validator(mode="after")
    def _check_sara_arguments(self):
        given = {name: getattr(self, name) for name in SARA_KEYS if getattr(self, name) is not None}
        # `SARAArguments.__post_init__` runs the checks (a ValueError, which pydantic reports as a validation error).
        SARAArguments(**given)
        return self


SARA_KEYS = tuple(field.name for field in dataclasses.fields(SARAArguments))
_HINTS = typing.get_type_hints(SARAArguments)

SARAInputArgs = create_model(
    "SARAInputArgs",
    __base__=_SARAInputChecks,
    __doc__=(
        "The SARA settings as top-level keys of an Axolotl YAML, one per field of [`SARAArguments`] (same names, same "
        "meaning); a key left out takes the library's default."
    ),
    __module__=__name__,
    **{
        field.name: (
            _HINTS[field.name] | None,
            Field(default=None, description=field.metadata.get("help")),
        )
        for field in dataclasses.fields(SARAArguments)
    },
)


def sara_training_args(cfg: typing.Mapping[str, typing.Any]) -> dict[str, typing.Any]:
    """The SARA settings the YAML sets (`cfg`: Axolotl's validated config), as keyword arguments of the training
    arguments."""
    return {name: cfg[name] for name in SARA_KEYS if cfg.get(name) is not None}
