"""The tool's inputs as the parameter model declares them, resolved for one server's limits.

GenerationParams' fields carry each input's Wiro id, type, default, hard range, label and help (see its
docstring); `tool_inputs` reads them once, with this server's `Limits` and fast mode filled in, for every place that
describes the inputs: Tool/Detail (server.tool_info, which the playground's form is built from), the OpenAPI
document (built from Tool/Detail's items) and the flags of `particalize generate` and `batch`.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from pipeline.fast import NORMAL, FastMode
from pipeline.params import CACHED_MODE_HELP, FAST_MODE_HELP, GenerationParams, Limits

Kind = Literal["textarea", "number", "float", "select"]
FLOAT_STEP = 0.1


@dataclass(frozen=True)
class ToolInput:
    name: str
    """The GenerationParams field (snake_case; the CLI's flag is it with dashes)."""
    id: str
    """The hosted tool's name for it (numFrames, flowShift, ...)."""
    kind: Kind
    label: str
    help: str
    default: str
    """As Wiro shows a default: text ("" for none)."""
    low: int | float | None = None
    high: int | float | None = None
    step: int | float | None = None
    max_length: int | None = None
    note: str | None = None
    choices: tuple[str, ...] = ()
    advanced: bool = False
    """Not an input of the hosted tool: Wiro clients may leave it out (the CLI sets it as a server default)."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


INPUT_IDS: tuple[str, ...] = tuple(field.alias or name for name, field in GenerationParams.model_fields.items())
"""Every tool input's Wiro id, in the model's order."""


def _extra(name: str) -> dict[str, Any]:
    extra = GenerationParams.model_fields[name].json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


ADVANCED_IDS: tuple[str, ...] = tuple(
    field.alias or name for name, field in GenerationParams.model_fields.items() if _extra(name).get("advanced")
)


def _kind(annotation: Any) -> tuple[Kind, tuple[str, ...]]:
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is Literal:
        return "select", tuple(str(choice) for choice in get_args(annotation))
    if annotation is int:
        return "number", ()
    if annotation is float:
        return "float", ()
    return "textarea", ()


def _bound(metadata: list[Any], *names: str) -> Any:
    for item in metadata:
        for name in names:
            value = getattr(item, name, None)
            if value is not None:
                return value
    return None


def _plain(value: Any) -> Any:
    """A whole float as an int (Tool/Detail shows a float input's range as 0 to 30, not 0.0 to 30.0)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _context(limits: Limits, fast: FastMode, default_mode: str) -> dict[str, Any]:
    forwards = fast.steps if fast.scale <= 1 else 2 * fast.steps
    context = {**dataclasses.asdict(limits), "fast_steps": fast.steps, "fast_scale": fast.scale,
               "fast_flow_shift": fast.flow_shift, "fast_forwards": forwards, "default_mode": default_mode}
    context["fast_help"] = FAST_MODE_HELP.format(**context) if limits.fast_mode else ""
    context["cached_help"] = CACHED_MODE_HELP if limits.cached_mode else ""
    return context


def _resolved(value: Any, context: dict[str, Any]) -> Any:
    """A value, or the `Limits` attribute (or fast-mode value) a text names."""
    return context[value] if isinstance(value, str) else value


def _tool_input(name: str, field: FieldInfo, context: dict[str, Any]) -> ToolInput:
    extra = _extra(name)
    kind, choices = _kind(field.annotation)
    numeric = kind in ("number", "float")
    if "default" in extra:
        default = extra["default"].format(**context)
    else:
        default = "" if field.default is None else str(field.default)
    return ToolInput(
        name=name,
        id=field.alias or name,
        kind=kind,
        label=field.title or name,
        help=(field.description or "").format(**context),
        default=default,
        low=_plain(extra.get("min", _bound(field.metadata, "ge", "gt"))) if numeric else None,
        high=_plain(_resolved(extra["max"], context) if "max" in extra else _bound(field.metadata, "le"))
        if numeric else None,
        step=_resolved(extra.get("step", 1 if kind == "number" else FLOAT_STEP), context) if numeric else None,
        max_length=_bound(field.metadata, "max_length") if kind == "textarea" else None,
        note=extra["note"].format(**context) if "note" in extra else None,
        choices=tuple(c for c in choices if _offered(extra.get("choice_needs", {}).get(c), context)),
        advanced=bool(extra.get("advanced")),
    )


def _offered(needs: str | list[str] | None, context: dict[str, Any]) -> bool:
    """No `needs`: always; a `Limits` flag: when set; a list of flags: when any is set."""
    if needs is None:
        return True
    return any(context.get(flag) for flag in ([needs] if isinstance(needs, str) else needs))


def tool_inputs(limits: Limits | None = None, fast: FastMode | None = None,
                default_mode: str = NORMAL) -> list[ToolInput]:
    """Every input this server offers (an advanced one only when the `Limits` flag it needs is set), in order."""
    context = _context(limits or Limits(), fast or FastMode(), default_mode)
    return [_tool_input(name, field, context) for name, field in GenerationParams.model_fields.items()
            if _offered(_extra(name).get("needs"), context)]
