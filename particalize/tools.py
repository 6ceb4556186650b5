"""The tool catalogue: further Wan2.1 LoRA tools served by the same warm workers, each at its own Run route.

Read from a TOML file (PARTICALIZE_TOOLS_FILE / --tools) with one `[[tools]]` table per tool; every table is
checked here, strictly (an unknown key is a typo, not something to ignore), so that a bad file stops the start in
one line naming the tool and what to fix. Without a file the catalogue is codexq/Particalize alone, with the
settings' LoRA stack, as before tools existed; with one, codexq/Particalize is still served (and the default)
unless the file describes it itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from particalize.settings import Settings
from pipeline.errors import InvalidParameter, WeightsMissing
from pipeline.params import GenerationParams, parse_params
from server.tool_info import CATEGORIES, PARTICALIZE, Catalogue, Tool
from weights.locate import lora_source_file
from weights.lora_sources import LoraSource, parse_lora_source

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (the backport, same API)
    import tomli as tomllib

SLUG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"


class CatalogueError(ValueError):
    """A tools file that cannot be served; the message is one line naming the file, the tool and the fix."""


class ToolDefaults(BaseModel):
    """A tool's own defaults for the hosted tool's inputs (Wiro ids), checked as a request's values are."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    negativePrompt: str | None = None  # noqa: N815 (the Wiro input id)
    fps: int | None = None
    numFrames: int | None = None  # noqa: N815
    steps: int | None = None
    scale: float | None = None
    flowShift: float | None = None  # noqa: N815

    def inputs(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.model_dump(exclude_none=True).items()}


class ToolEntry(BaseModel):
    """One `[[tools]]` table."""

    model_config = ConfigDict(extra="forbid")

    slug: str = Field(pattern=SLUG_PATTERN)
    loras: list[str] = []
    """`SOURCE[:STRENGTH]` entries, as PARTICALIZE_LORAS takes them (a path or hf://owner/repo/file)."""
    title: str = ""
    description: str = ""
    readme: str = ""
    categories: list[str] = list(CATEGORIES)
    tags: list[str] = []
    trigger: str = ""
    defaults: ToolDefaults = ToolDefaults()
    inspire: list[dict[str, str]] = []
    request_loras: bool = False
    """Runs on this tool may add LoRAs of their own (`loras`), when the server allows them at all."""


class ToolsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tools: list[ToolEntry] = Field(min_length=1)


@dataclass(frozen=True)
class ToolSet:
    """The catalogue the API describes, and each tool's LoRA stack (sources in order) that the workers run."""

    catalogue: Catalogue
    loras: dict[str, tuple[LoraSource, ...]]
    """By slug, each a tool's whole stack."""
    default_from_settings: bool = True
    """The default tool's LoRAs are the settings' stack (PARTICALIZE_LORA_PATH, PARTICALIZE_LORAS), not its entry
    in `loras` (empty then)."""
    path: Path | None = None
    """The tools file it was read from (None: no file)."""


def _tool_name(raw: Any, index: int) -> str:
    tools = raw.get("tools") if isinstance(raw, dict) else None
    if isinstance(tools, list) and index < len(tools) and isinstance(tools[index], dict):
        slug = tools[index].get("slug")
        if isinstance(slug, str) and slug:
            return f"tool {slug!r}"
    return f"tool #{index + 1}"


def _validation_line(path: Path, raw: Any, exc: ValidationError) -> str:
    """The first problem, as `FILE: tool 'a/b': KEY: what is wrong`."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    where = "the file"
    if len(loc) >= 2 and loc[0] == "tools" and isinstance(loc[1], int):
        where = _tool_name(raw, loc[1])
        loc = loc[2:]
    key = ".".join(str(part) for part in loc) or "tools"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = f"unknown key (known: {', '.join(_known_keys(loc))})"
    elif error["type"] == "string_pattern_mismatch":
        message = "must be 'owner/project' (letters, digits, '_', '.', '-')"
    return f"{path}: {where}: {key}: {message}"


def _known_keys(loc: list[Any]) -> list[str]:
    model: type[BaseModel] = ToolDefaults if loc[:1] == ["defaults"] else ToolEntry
    return list(model.model_fields)


def _lora_stack(entry: ToolEntry, weights_dir: Path, path: Path, check_files: bool) -> tuple[LoraSource, ...]:
    stack = []
    for index, text in enumerate(entry.loras):
        try:
            source = parse_lora_source(text)
        except ValueError as exc:
            raise CatalogueError(f"{path}: tool {entry.slug!r}: loras[{index}]: {exc}") from None
        try:
            if check_files:
                lora_source_file(source, weights_dir, f"loras[{index}]")
        except WeightsMissing as exc:
            raise CatalogueError(f"{path}: tool {entry.slug!r}: {exc}") from None
        stack.append(source)
    return tuple(stack)


def _tool(entry: ToolEntry, path: Path, settings: Settings) -> Tool:
    defaults = entry.defaults.inputs()
    try:
        parse_params(defaults)
    except InvalidParameter as exc:
        raise CatalogueError(f"{path}: tool {entry.slug!r}: defaults: {exc}") from None
    owner, _, project = entry.slug.partition("/")
    return Tool(owner=owner, project=project, title=entry.title or project, description=entry.description,
                readme=entry.readme or entry.description, categories=tuple(entry.categories), tags=tuple(entry.tags),
                trigger=entry.trigger.strip(), defaults=defaults, inspire=tuple(entry.inspire),
                request_loras=entry.request_loras)


def read_tools_file(path: Path, settings: Settings, *, check_files: bool = True) -> ToolSet:
    """The catalogue `path` describes; CatalogueError (one line) for anything that cannot be served.
    `check_files=False`: LoRA files not on disk yet are not refused (`weights fetch` fetches them)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read the tools file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogueError(f"{path}: not valid TOML: {exc}") from None
    try:
        parsed = ToolsFile.model_validate(raw)
    except ValidationError as exc:
        raise CatalogueError(_validation_line(path, raw, exc)) from None
    tools: list[Tool] = []
    loras: dict[str, tuple[LoraSource, ...]] = {}
    for entry in parsed.tools:
        if any(tool.is_named(*entry.slug.split("/")) for tool in tools):
            raise CatalogueError(f"{path}: tool {entry.slug!r}: the slug is listed twice; give each tool its own slug")
        tool = _tool(entry, path, settings)
        if not entry.loras and not tool.is_named(PARTICALIZE.owner, PARTICALIZE.project):
            raise CatalogueError(f"{path}: tool {entry.slug!r}: loras: a tool needs at least one LoRA "
                                 "(loras = [\"/models/effect.safetensors:1.0\"])")
        tools.append(tool)
        loras[tool.slug] = _lora_stack(entry, settings.weights_dir, path, check_files)
    own_default = next((tool for tool in tools if tool.is_named(PARTICALIZE.owner, PARTICALIZE.project)), None)
    if own_default is None:
        tools.insert(0, PARTICALIZE)
        loras[PARTICALIZE.slug] = ()
    else:
        tools.remove(own_default)
        tools.insert(0, own_default)
    return ToolSet(Catalogue(tuple(tools)), loras, default_from_settings=own_default is None, path=path)


def tool_set(settings: Settings, *, check_files: bool = True) -> ToolSet:
    """The settings' catalogue: the tools file's, or codexq/Particalize alone with the settings' LoRA stack."""
    if settings.tools_file is None:
        return ToolSet(Catalogue(), {PARTICALIZE.slug: ()})
    return read_tools_file(settings.tools_file, settings, check_files=check_files)


@dataclass(frozen=True)
class LoraCheck:
    """One catalogue LoRA checked against the base: `problem` None when it is on disk, readable and fits."""

    slug: str
    index: int
    """Its place in the tool's `loras`."""
    file: str
    """Its path on disk (or, when it is not there, its source as written)."""
    problem: str | None
    missing: bool = False


def check_loras(tools: ToolSet, settings: Settings) -> list[LoraCheck]:
    """Every catalogue tool's LoRA (the settings' stack is not the catalogue's: the default tool's LoRAs are listed
    only when the file describes it) checked from its safetensors header against the base's shapes
    (pipeline.lora.fit): what loading it would refuse, found before anything is loaded."""
    if not any(tools.loras.values()):
        return []
    from pipeline.loader import transformer_config
    from pipeline.lora.fit import base_parts, misfit
    from pipeline.presets import get_preset

    parts = base_parts(transformer_config(get_preset(settings.model, max_area=settings.model_max_area),
                                          settings.weights_dir))
    checks = []
    for slug, stack in tools.loras.items():
        for index, source in enumerate(stack):
            try:
                path = lora_source_file(source, settings.weights_dir, f"{slug}'s loras[{index}]")
            except WeightsMissing as exc:
                checks.append(LoraCheck(slug, index, source.text, str(exc), missing=True))
                continue
            checks.append(LoraCheck(slug, index, str(path), misfit(path, parts, strict=settings.lora_strict)))
    return checks


def check_fit(tools: ToolSet, settings: Settings) -> None:
    """CatalogueError (one line) naming the first catalogue tool whose LoRA would be refused at load (`check_loras`):
    `serve` stops at start on it instead of its workers failing to load."""
    for check in check_loras(tools, settings):
        if check.missing:
            raise CatalogueError(f"{tools.path}: tool {check.slug!r}: {check.problem}")
        if check.problem is not None:
            raise CatalogueError(f"{tools.path}: tool {check.slug!r}: loras[{check.index}] {check.file} "
                                 f"does not fit {settings.model}: {check.problem}. Use a LoRA made for Wan2.1 I2V "
                                 "14B, or remove it from the tool")


def for_tool(settings: Settings, slug: str) -> tuple[Settings, Tool]:
    """The settings of a one-tool process (`generate`, `batch --tool`): the tool's LoRAs as the whole stack, no
    catalogue to load; and the tool (its defaults and trigger apply to the inputs)."""
    tools = tool_set(settings)
    tool = tools.catalogue.find_slug(slug)
    if tool is None:
        served = ", ".join(t.slug for t in tools.catalogue.tools)
        raise CatalogueError(f"--tool {slug}: no such tool (the catalogue has {served}; set --tools FILE)")
    alone = settings.model_copy(update={"tools_file": None})
    if tool is tools.catalogue.default and tools.default_from_settings:
        return alone, tool
    entries = ",".join(f"{source.text}:{source.strength:g}" for source in tools.loras[tool.slug])
    alone = alone.model_copy(update={"lora_path": None, "lora_repo": None, "loras": None})
    return (alone.with_overrides(loras=entries) if entries else alone), tool


def defaults_by_name(tool: Tool) -> dict[str, str]:
    """The tool's defaults under the parameter model's field names (as the CLI's flags give values)."""
    names = {field.alias or name: name for name, field in GenerationParams.model_fields.items()}
    return {names[key]: value for key, value in tool.defaults.items()}
