"""One task's typed record, from Run to the worker: validated once at Run, stored as data (the tasks table's
`request` column), read by the worker as it was stored. The Wiro `parameters` a task answers with (every value a
string) are rendered from it, and from the parameters the worker resolved once it had read the image; its callback
URL and owner are the record's too. `record_of` is the one way a stored task is read (migration 0005 gave the tasks
stored before revision 0004 their record).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.params import GenerationParams, ResolvedParams
from server.tool_info import DEFAULT_SLUG, IMAGE_FIELD, IMAGE_URL_FIELD


class ImageSource(BaseModel):
    """Where the start image is: an upload in the store (`upload_id`), or a public URL the worker fetches."""

    model_config = ConfigDict(frozen=True)

    url: str
    upload_id: str | None = None
    attached: bool = False
    """Sent as a file part with the Run request (stored with the task): `inputImage` then shows its URL."""

    @property
    def field(self) -> str:
        """The field the worker's messages about this image name."""
        return IMAGE_FIELD if self.upload_id else IMAGE_URL_FIELD


class RequestLora(BaseModel):
    """A LoRA sent with the Run (PARTICALIZE_REQUEST_LORAS): the worker downloads it (server/lora_cache.py) and
    runs the task with it on top of the tool's LoRAs."""

    model_config = ConfigDict(frozen=True)

    url: str
    strength: float = 1.0
    sha256: str | None = None
    """The file's content hash when the request named it: the download must match it, and a cached file with it
    is used without downloading."""


class TaskRecord(BaseModel):
    """What Run accepted: the validated parameters (the seed fixed), the image, the callback and the caller."""

    model_config = ConfigDict(frozen=True)

    params: GenerationParams
    inputs: dict[str, str]
    """The tool inputs as sent, as text: what `parameters` echoes before the defaults are filled in."""
    image: ImageSource
    callback_url: str = ""
    owner: str | None = None
    resolved: ResolvedParams | None = None
    """The parameters as they will run, resolved at Run when the image came with the request (pipeline.resolve);
    None: the worker resolves them once it has fetched the image. Shown in `parameters` once the worker starts."""
    tool: str = DEFAULT_SLUG
    """The catalogue tool's slug ("owner/project") as Run matched it: the worker runs the task with that tool's
    LoRAs. Records stored before tools existed are the default tool's."""
    trigger: str = ""
    """The tool's trigger word as Run put it before the prompt ("": none was): `params` (what the generator runs)
    holds the prompt with it, `parameters` shows the prompt without it, as it was sent or as the tool's default."""
    loras: tuple[RequestLora, ...] = ()
    """LoRAs sent with the request, in order, on top of the tool's (server/request_loras.py): the worker runs
    exactly these."""

    def wiro_parameters(self, used: GenerationParams | None = None) -> dict[str, str]:
        """The recorded parameters: the inputs as sent, the default (and the chosen seed) of each one left out,
        and, once the worker has resolved them (`used`), the seed and size it used, and in fast mode the distilled
        schedule's values, in cached mode the mode (a server default is not in the inputs)."""
        shown = dict(self.inputs)
        for name, value in self.params.wiro_inputs().items():
            if value is not None and not shown.get(name, "").strip():  # an unset mode: the worker records it
                shown[name] = str(value)
        if self.trigger and not self.inputs.get("prompt", "").strip():  # the tool's default, as the tool has it
            shown["prompt"] = self.params.prompt.removeprefix(f"{self.trigger} ")
        if self.image.attached:
            shown.pop(IMAGE_URL_FIELD, None)
            shown[IMAGE_FIELD] = self.image.url
        if self.loras:
            shown["loras"] = json.dumps([lora.model_dump(exclude_none=True) for lora in self.loras])
        if used is None:
            return shown
        shown.update(seed=str(used.seed), width=str(used.width), height=str(used.height))
        if used.mode == "fast":
            shown.update(mode="fast", steps=str(used.steps), scale=str(used.scale), flowShift=str(used.flow_shift))
        elif used.mode == "cached":
            shown.update(mode="cached")
        return shown


def recorded_of(task: Any) -> dict[str, str]:
    """What the run recorded beyond its parameters (cached mode: computedSteps and skippedSteps)."""
    recorded = (task.resolved or {}).get("recorded") if isinstance(task.resolved, dict) else None
    return {str(k): str(v) for k, v in recorded.items()} if isinstance(recorded, dict) else {}


def record_of(task: Any) -> TaskRecord:
    """The record of a stored task (a tasks row or ORM object), as Run stored it."""
    return TaskRecord.model_validate(task.request)


def used_of(task: Any) -> GenerationParams | None:
    """The parameters the worker resolved and ran with, once it has read the image."""
    return None if task.resolved is None else GenerationParams.model_validate(task.resolved)


def parameters_of(task: Any) -> dict[str, str]:
    """The `parameters` Task/Detail answers for a stored task."""
    return {**record_of(task).wiro_parameters(used_of(task)), **recorded_of(task)}
