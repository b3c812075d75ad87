"""Typed, validated ``--model_args``: each wrapper declares its parameters once.

lmms-eval hands values over as str, int or float (``-2`` arrives as ``-2.0``, ``true`` as
True or "true"): ``Param.parse`` turns them into the declared type and checks the range.
Unknown names and bad values fail at construction, with the list of valid parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

_NONE = {"none", "null", ""}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ModelArgsError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: Sequence[str] | None = None
    optional: bool = False  # None is a valid value (meaning "the method's default for this model")

    def parse(self, raw: Any) -> Any:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE):
            if self.optional or self.default is None:
                return None
            raise ModelArgsError(f"{self.name} needs a value ({self.describe()})")
        try:
            value = self._convert(raw)
        except (TypeError, ValueError):
            raise ModelArgsError(
                f"{self.name}={raw!r} is not a valid {self.type.__name__} ({self.describe()})"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise ModelArgsError(f"{self.name}={value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise ModelArgsError(f"{self.name}={value!r} is out of range ({self.describe()})")
        return value

    def _convert(self, raw):
        if self.type is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in _TRUE or s in ("1.0",):
                return True
            if s in _FALSE or s in ("0.0",):
                return False
            raise ValueError(raw)
        if self.type is int:
            f = float(raw)
            if not f.is_integer():
                raise ValueError(raw)
            return int(f)
        if self.type is float:
            return float(raw)
        return str(raw)

    def describe(self) -> str:
        parts = [self.type.__name__, f"default {self.default}"]
        if self.choices:
            parts.append("one of " + "|".join(map(str, self.choices)))
        if self.low is not None or self.high is not None:
            parts.append(f"range [{'' if self.low is None else self.low}, {'' if self.high is None else self.high}]")
        return ", ".join(parts)


def parse_params(params: Sequence[Param], given: dict, presets: dict | None = None, owner: str = "model") -> dict:
    """Resolve defaults < preset < explicit values; reject unknown names.

    ``given`` may contain ``preset``; returns {name: value} for every declared parameter.
    """
    by_name = {p.name: p for p in params}
    given = dict(given)
    preset_name = given.pop("preset", None)
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise ModelArgsError(
            f"{owner}: unknown model_args {', '.join(unknown)}. Valid: {', '.join(sorted(by_name))}"
            + (f", preset ({'|'.join(presets)})" if presets else "")
        )
    values = {p.name: p.default for p in params}
    if preset_name is not None:
        if not presets or str(preset_name) not in presets:
            raise ModelArgsError(
                f"{owner}: unknown preset {preset_name!r}; valid: {', '.join(presets or []) or 'none'}"
            )
        values.update(presets[str(preset_name)])
    for name, raw in given.items():
        values[name] = by_name[name].parse(raw)
    return values


def help_table(params: Sequence[Param]) -> str:
    rows = [f"  {p.name:<18} {p.describe():<40} {p.help}" for p in params]
    return "\n".join(rows)
