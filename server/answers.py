"""Every Wiro answer as a pydantic model, from which FastAPI writes each route's responses in /openapi.json.

The routes build these answers as dicts and send them as they are (`server.routes.common.answer`): what a Wiro
client reads does not go through a model, so its bytes, key order included, stay the published ones. Each model
names its fields in that order, and tests/test_answers.py checks that every answer validates against its model and
dumps back to the same JSON, so the document cannot drift from the answers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Digits = Annotated[str, Field(pattern=r"^[0-9]+$")]
"""A number as Wiro sends most of them: decimal digits in a string."""


class Answer(BaseModel):
    """A key the model does not name is dropped on validation, so a dump that equals the answer shows the model
    names every key (the document itself stays open to keys added later)."""

    model_config = ConfigDict(frozen=True)


class Error(Answer):
    code: int
    message: str


NoErrors = Annotated[list[Error], Field(max_length=0)]


class ErrorAnswer(Answer):
    """An application error (HTTP 200) or an authentication failure (401). Code 0: invalid request; 1: no such
    task or tool; 96: queue full or rate limit."""

    result: Literal[False]
    errors: Annotated[list[Error], Field(min_length=1)]


class Output(Answer):
    """One output file of a task."""

    id: str
    name: str
    contenttype: str
    parentid: str
    uuid: str
    size: Digits
    addedtime: Digits
    modifiedtime: Digits
    accesskey: str
    foldercount: Digits
    filecount: Digits
    ispublic: int
    expiretime: str | None
    url: str


class Task(Answer):
    """A task as Wiro answers it: every number a string, "0" for a time not reached."""

    id: Digits
    uuid: str
    name: str
    socketaccesstoken: str
    parameters: dict[str, str]
    debugoutput: str
    debugerror: str
    starttime: Digits
    endtime: Digits
    elapsedseconds: str
    status: str
    cps: str
    totalcost: str
    guestid: str | None
    projectid: str
    modelid: str
    description: str
    basemodelid: str
    runtype: str
    modelfolderid: str
    modelfileid: str
    callbackurl: str
    marketplaceid: str | None
    createtime: Digits
    canceltime: Digits
    assigntime: Digits
    accepttime: Digits
    preprocessstarttime: Digits
    preprocessendtime: Digits
    postprocessstarttime: Digits
    postprocessendtime: Digits
    pexit: str
    categories: str
    outputs: list[Output]
    size: Digits
    modeldescription: str
    modelslugowner: str
    modelslugproject: str


class RunAnswer(Answer):
    errors: NoErrors
    taskid: Digits
    socketaccesstoken: Annotated[str, Field(min_length=30, max_length=30)]
    result: Literal[True]


class TaskListTotalAnswer(Answer):
    """Task/Detail (one task) and Task/List (a page of them)."""

    total: Digits
    errors: NoErrors
    tasklist: list[Task]
    result: Literal[True]


class TaskListAnswer(Answer):
    """Task/Kill and Task/Cancel: the task as it is now."""

    errors: NoErrors
    tasklist: list[Task]
    result: Literal[True]


class ToolDetailAnswer(Answer):
    result: Literal[True]
    errors: NoErrors
    tool: list[dict[str, Any]]


class ToolListAnswer(Answer):
    result: Literal[True]
    errors: NoErrors
    total: Digits
    tool: list[dict[str, Any]]


class ExploreCategory(Answer):
    id: str
    title: str
    url: str
    total: int
    tools: list[dict[str, Any]]


class ExploreAnswer(Answer):
    result: Literal[True]
    errors: NoErrors
    explore: list[ExploreCategory]


class UploadedFile(Answer):
    id: str
    name: str
    contenttype: str
    size: Digits
    parentid: str
    addedtime: Digits
    accesskey: str
    url: str


class UploadAnswer(Answer):
    result: Literal[True]
    errors: NoErrors
    files: list[UploadedFile] = Field(alias="list")


class EmptyAnswer(Answer):
    """Task/InputOutputDelete: done."""

    result: Literal[True]
    errors: NoErrors
