"""Typed, bounded requests: the local API's bodies and the one update request.

Every field is typed (strict: ``"5"`` is not an int) and bounded (numbers, string lengths, list
lengths), so no input reaches the runtime that it could choke on: a value out of range is a 400
naming the field, never a 500. OpenAI parameters the agent does not implement (``tools``,
``logit_bias``, penalties, ...) are refused with 400 ``unsupported_parameter`` when set to anything
but their neutral value (:meth:`_Req.unsupported`); fields no OpenAI API defines are ignored. :class:`UpdateRequest` is closed: unknown fields
are refused, and it is the one shape an update request has on every path (HTTP, MQTT, CLI).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import ConfigError
from edgellm.ids import ID_RULE, valid_id

MAX_TEXT = 1 << 20  # characters of one prompt or message (the body cap is lower anyway)
MAX_ITEMS = 256  # messages, prompt list items, content parts
MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1

Name = Annotated[str, Field(max_length=256)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Stop = Annotated[str, Field(min_length=1, max_length=256)]
Stops = Annotated[list[Stop], Field(max_length=4)]
Texts = Annotated[list[Text], Field(max_length=MAX_ITEMS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


JsonObject = dict[str, Any]

#: OpenAI parameters edgellm does not implement -> their neutral values (anything else is refused)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
}


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Name | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=100_000)
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)  # -1: no seed (what some OpenAI clients send)
    stop: Stop | Stops | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_INT)
    user: str | None = Field(None, max_length=256)
    response_format: JsonObject | None = None
    tools: Annotated[list[Any], Field(max_length=MAX_ITEMS)] | None = None
    tool_choice: str | JsonObject | None = None
    functions: Annotated[list[Any], Field(max_length=MAX_ITEMS)] | None = None
    function_call: str | JsonObject | None = None
    parallel_tool_calls: bool | None = None
    logit_bias: JsonObject | None = None
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = Field(None, max_length=MAX_TEXT)
    prediction: JsonObject | None = None
    audio: JsonObject | None = None
    modalities: Annotated[list[Name], Field(max_length=8)] | None = None

    def unsupported(self) -> str | None:
        """The first parameter set to a value edgellm would otherwise have to ignore."""
        for name, neutral in UNSUPPORTED.items():
            if getattr(self, name, None) not in neutral:
                return name
        return None

    @field_validator("seed")
    @classmethod
    def _no_seed(cls, v: int | None) -> int | None:
        return None if v == -1 else v


class CompletionRequest(_Req):
    prompt: Text | Texts
    logprobs: int | None = Field(None, ge=0, le=5)  # legacy completions: the N most likely tokens too


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Name
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_ITEMS)] | None = None
    name: Name | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class ChatCompletionRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_ITEMS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class UpdateRequest(BaseModel):
    """Install ``version`` of ``model`` now (all fields empty: what the fleet assigned this device).

    ``rollback`` allows going to an older version; ``force`` reinstalls the current version or
    retries a rejected one. Only admin callers reach this: the admin token (HTTP), the control
    plane (MQTT, mutually authenticated) or the device's owner (CLI)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str | None = None
    version: str | None = None
    rollback: bool = False
    force: bool = False
    rollout: str | None = None  # the control plane's rollout that asked for it (reported back)

    @field_validator("model", "version", "rollout")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not valid_id(v):
            raise ValueError(f"must be {ID_RULE}")
        return v

    @classmethod
    def parse(cls, data: Any) -> UpdateRequest:
        """From a dict (an MQTT command's args); raises :class:`~agent.errors.ConfigError` naming the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            where = ".".join(str(x) for x in err.get("loc", ())) or "request"
            raise ConfigError(
                f"update request: {where}: {err.get('msg')}",
                hint="an update request has only model, version, rollback, force and rollout",
            ) from None
