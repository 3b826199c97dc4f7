"""The OpenAI wire format: request bodies, their checks, and the response and chunk shapes.

Request bodies are pydantic models in strict mode (a string where a number belongs is an error,
not a conversion) that keep unknown fields (OpenAI ignores what it does not know; a few of our
own extras, like `speculative_config`, ride along the same way). Fields that would change what
the answer means and that gearshift does not implement (tools, logit_bias, penalties, echo, ...)
are refused with a 400 rather than silently ignored. Every number has a range (no NaN or
infinity), and the stop list a size: what one request may ask for must not cost the others
(every stop string is checked after every token). Every refusal is an `APIError`, which the app
turns into OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..ead import EAD
from ..errors import GearshiftError
from ..sequence import Completion, Logprob


class APIError(Exception):
    """An error the client gets in OpenAI's envelope, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------- request bodies

MAX_STOP = 16  # stop strings per request (OpenAI allows 4; vLLM and llama-server set no limit)
MAX_STOP_CHARS = 256  # characters per stop string
INT32 = 2**31 - 1  # the top of every count
INT64 = 2**63  # seeds are OpenAI's int64


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


_Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"message content of type {part.type!r} is not supported; only text parts are",
                    param="messages",
                )
        return "".join(part.text for part in self.content)


class _Common(_Strict):
    """Fields both endpoints share. `None` means "not given" (the server's default applies)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    temperature: float | None = Field(None, ge=0, le=2)  # below 1e-5: greedy, as 0 (vLLM's rule)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32)  # vLLM's extra: -1 or 0 = off
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: _Stop | Annotated[list[_Stop], Field(max_length=MAX_STOP)] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI does
    ignore_eos: bool = False  # vLLM's extra
    speculative_config: dict | None = None  # ours: this request's strategy, shaped like --speculative-config
    kv_policy: str | None = None  # ours: streaming, snapkv, h2o, pyramid (kv_policy.py); None: the full cache
    kv_budget: int | None = Field(None, ge=1, le=INT32)  # ours: entries kept per layer and KV head
    # changes what the answer means; refused unless left at their neutral values
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    def unsupported(self) -> list[str]:
        bad = [f for f in ("presence_penalty", "frequency_penalty") if getattr(self, f)]
        return bad + (["logit_bias"] if self.logit_bias else [])


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        bad += [f for f in ("tools", "functions") if getattr(self, f)]
        if self.tool_choice not in (None, "none"):
            bad.append("tool_choice")
        if self.response_format and self.response_format.get("type", "text") != "text":
            bad.append("response_format")
        return bad


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=INT32)

    def unsupported(self) -> list[str]:
        bad = super().unsupported() + (["echo"] if self.echo else []) + (["suffix"] if self.suffix else [])
        return bad + (["best_of"] if self.best_of not in (None, self.n) else [])


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def check_supported(body: _Common) -> None:
    bad = body.unsupported()
    if bad:
        raise APIError(400, f"{bad[0]} is not supported by this server", param=bad[0], code="unsupported_parameter")


def messages_as_dicts(messages: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.text()} for m in messages]


# ---------------------------------------------------------------------------- strategies


@dataclass
class Strategy:
    """What one request decodes with: a drafter name (None = plain), EAD, and a draft-length cap."""

    drafter: str | None = None
    ead: EAD | None = None
    k: int | None = None

    @property
    def label(self) -> str:
        if self.ead is not None:
            return ("ead+verify:" if self.ead.verify else "ead:") + self.ead.small
        return self.drafter or "plain"


_METHODS = {
    "ngram": "lookup",
    "lookup": "lookup",
    "suffix": "suffix",
    "recycling": "recycling",
    "hybrid": "hybrid",
    "early_exit": "early-exit",
    "early-exit": "early-exit",
}


def parse_speculative_config(cfg: dict | str | None, param: str = "speculative_config") -> Strategy:
    """vLLM's shape: {"method": "ngram", "num_speculative_tokens": 5}, {"model": PATH, ...},
    {"method": "eagle", "model": DIR}; ours adds
    the methods lookup, suffix, recycling, hybrid, early-exit (with "num_layers"), ead and ead+verify
    (with "small", "tau", "window", "min_run"), and "none" for plain decoding."""
    if cfg is None:
        return Strategy()
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except ValueError as e:
            raise GearshiftError(f"{param} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise GearshiftError(f"{param} must be a JSON object")
    cfg = dict(cfg)
    method = cfg.pop("method", None)
    model = cfg.pop("model", None)
    k = cfg.pop("num_speculative_tokens", None)
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64):
        raise GearshiftError(f"{param}.num_speculative_tokens must be an integer from 1 to 64, got {k!r}")
    if model is not None and not isinstance(model, str):
        raise GearshiftError(f"{param}.model must be a string")
    if method in (None, "draft_model") and model is not None:
        strategy = Strategy(f"model:{model}", k=k)
    elif method in ("eagle", "eagle3"):  # vLLM's shape: {"method": "eagle", "model": DIR}
        if model is None:
            raise GearshiftError(f'{param}: method eagle needs "model" (a directory of gearshift distill --head eagle)')
        strategy = Strategy(f"eagle:{model}", k=k)
    elif method in (None, "none"):
        strategy = Strategy()
    elif method in ("ead", "ead+verify"):
        fields = {f: cfg.pop(f) for f in ("small", "tau", "window", "min_run") if f in cfg}
        for f, ok, what in (
            ("small", lambda v: isinstance(v, str), "a drafter name"),
            ("tau", lambda v: _number(v) and 0 <= v <= 100, "a number from 0 to 100"),
            ("window", lambda v: _integer(v) and 1 <= v <= 1024, "an integer from 1 to 1024"),
            ("min_run", lambda v: _integer(v) and 1 <= v <= 1024, "an integer from 1 to 1024"),
        ):
            if f in fields and not ok(fields[f]):
                raise GearshiftError(f"{param}.{f} must be {what}, got {fields[f]!r}")
        strategy = Strategy(ead=EAD(**fields, verify=method == "ead+verify"), k=k)
    elif method in _METHODS:
        name = _METHODS[method]
        layers = cfg.pop("num_layers", None)
        if layers is not None:
            if name != "early-exit":
                raise GearshiftError(f"{param}.num_layers only applies to early-exit")
            if not (_integer(layers) or isinstance(layers, str)):
                raise GearshiftError(f"{param}.num_layers must be a layer count (or a trained exit's directory)")
            name = f"early-exit:{layers}"
        strategy = Strategy(name, k=k)
    else:
        raise GearshiftError(
            f"{param}.method {method!r} is unknown; choose ngram (lookup), suffix, recycling, hybrid, "
            "early-exit, draft_model or eagle (with model), ead, ead+verify or none"
        )
    cfg.pop("prompt_lookup_max", None), cfg.pop("prompt_lookup_min", None)  # vLLM's n-gram sizes: ours adapt
    if cfg:
        raise GearshiftError(f"{param} has unknown fields: {', '.join(sorted(map(str, cfg))[:8])}")
    return strategy


def parse_speculative_configs(text: str | None, param: str = "--speculative-config") -> list[Strategy]:
    """The server's `--speculative-config`: one strategy (shaped as above), or a JSON list of them.
    The first is the server-wide default; requests may choose any of them, or a training-free one."""
    if text is None:
        return [Strategy()]
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise GearshiftError(f"{param} is not valid JSON: {e}") from None
    items = cfg if isinstance(cfg, list) else [cfg]
    if not items:
        raise GearshiftError(f"{param} is an empty list")
    return [parse_speculative_config(c, param) for c in items]


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(groups: list[list[Completion]]) -> dict:
    """OpenAI's usage, from one list of completions per prompt (its n samples): each prompt counted
    once, every generated token; a prompt's cached tokens are those all its samples found cached."""
    prompt = sum(g[0].prompt_tokens for g in groups)
    out = sum(len(c.token_ids) for g in groups for c in g)
    cached = sum(min(c.cached_tokens for c in g) for g in groups)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": out,
        "total_tokens": prompt + out,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def engine_report(completions: list[Completion], strategy: str) -> dict:
    """Ours, beside OpenAI's fields: which strategy ran and what it bought."""
    stats = [c.stats for c in completions if c.stats is not None]
    spec = [st.spec for st in stats if st.spec is not None]
    proposed, accepted = sum(s.proposed for s in spec), sum(s.accepted for s in spec)
    decode_s = max((st.timing.decode_s for st in stats), default=0.0)
    report = {
        "strategy": completions[0].strategy if completions else strategy,  # the name the engine ran
        "acceptance_rate": accepted / proposed if proposed else None,
        "mean_accepted_tokens": sum(st.work.mat for st in stats) / len(stats) if stats else 0.0,
        "ttft_s": min((st.timing.ttft_s for st in stats), default=0.0),
        "tokens_per_s": sum(st.tok_per_s for st in stats) if decode_s else 0.0,
    }
    if stats and stats[0].kv_full_bytes:
        report["kv_bytes"] = sum(st.kv_bytes for st in stats)
        report["kv_full_bytes"] = sum(st.kv_full_bytes for st in stats)
    ead = [st.ead for st in stats if st.ead is not None]
    if ead:
        report["relative_compute"] = sum(e.relative_compute for e in ead) / len(ead)
    return report


def chat_logprobs(entries: list[Logprob] | None) -> dict | None:
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top_logprobs],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[Logprob] | None, offset: int = 0) -> dict | None:
    """The legacy completions shape: parallel lists, and the alternatives as {token: logprob}."""
    if entries is None:
        return None
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        "text_offset": offsets,
    }


def envelope(kind: str, rid: str, model: str, choices: list[dict], **extra) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
