"""A family's config from ``--preset``, ``--config FILE`` and ``--set KEY=VALUE``,
checked before any work, with errors that name the flag that caused them.

``--set`` takes JSON (``epochs=5``, ``decoder_channels=[64,32]``,
``freeze_encoder=false``) and, where the value is not JSON, the bare word as
a string (``backbone=resnet50``). A key the family does not have, or a value
of the wrong kind, stops the trainer with one sentence, never a traceback.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from model_export.families import Family


class ConfigError(ValueError):
    """A setting the family cannot take; the message names the flag."""


def parse_set(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value): JSON where it parses, else the string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set epochs=5")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw  # a bare word: --set backbone=resnet50


def _kind(default: Any) -> str | None:
    """What a value must be, judged from the default's type (None: anything)."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "a whole number"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a word"
    if isinstance(default, list | tuple):
        return "a JSON list"
    return None


def _fits(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list | tuple):
        return isinstance(value, list | tuple)
    return True


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config {path}: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings")
    return raw


def build_config(
    family: Family,
    preset: str | None = None,
    config_file: Path | None = None,
    sets: Sequence[str] = (),
) -> Any:
    """The family's config object; ConfigError names the flag of any bad setting."""
    defaults = family.config_from_dict({}).to_dict()
    merged: dict[str, Any] = {}
    where: dict[str, str] = {}
    if preset is not None:
        if preset not in family.presets:
            raise ConfigError(
                f"--preset {preset}: {family.name} has {sorted(family.presets) or 'no presets'}"
            )
        merged.update(family.presets[preset])
        where.update({k: f"--preset {preset}" for k in family.presets[preset]})
    if config_file is not None:
        raw = _read_config_file(config_file)
        merged.update(raw)
        where.update({k: f"--config {config_file}" for k in raw})
    for item in sets:
        key, value = parse_set(item)
        merged[key] = value
        where[key] = f"--set {item}"
    for key, value in merged.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{where[key]}: {family.name} has no setting {key!r}{hint}; "
                f"its settings: {', '.join(sorted(defaults))}"
            )
        default = defaults[key]
        if not _fits(default, value):
            raise ConfigError(
                f"{where[key]}: {key} takes {_kind(default)} (default {json.dumps(default)}), "
                f"not {json.dumps(value)}"
            )
    try:
        config = family.config_from_dict(merged)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            lines.append(f"{where.get(key, key)}: {key}: {err['msg']}")
        raise ConfigError("; ".join(lines)) from None
    except (TypeError, ValueError) as exc:
        flags = ", ".join(dict.fromkeys(where.values())) or "the defaults"
        raise ConfigError(f"{flags}: {exc}") from None
    _check_backbone(config, where)
    return config


def _check_backbone(config: Any, where: dict[str, str]) -> None:
    """A ResNet-50 encoder needs its weights file (nothing is downloaded)."""
    if getattr(config, "backbone", None) != "resnet50":
        return
    weights = getattr(config, "backbone_weights", None)
    flag = where.get("backbone", "backbone=resnet50")
    if weights is None:
        raise ConfigError(
            f"{flag}: the ResNet-50 encoder needs its ImageNet weights: add "
            "--set backbone_weights=PATH (torchvision's resnet50 state-dict file; "
            "nothing is downloaded)"
        )
    if not Path(weights).is_file():
        raise ConfigError(f"{where.get('backbone_weights', flag)}: no such file {weights}")
