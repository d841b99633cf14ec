"""Parse Ollama-style Modelfiles (FROM, PARAMETER, TEMPLATE, SYSTEM, ADAPTER, LICENSE, MESSAGE)."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SourceError

__all__ = [
    "Modelfile",
    "ModelfileError",
    "ParamValue",
    "load_modelfile",
    "parse_modelfile",
    "request_defaults",
]

ParamValue = int | float | bool | str

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE")
ROLES = ("system", "user", "assistant")


class ModelfileError(SourceError):
    """A Modelfile that does not parse: where, which instruction, and what was wrong."""


@dataclass(frozen=True)
class Modelfile:
    """A parsed Modelfile; `parameters` keep file order and `stop` may repeat."""

    source: str
    from_: str
    from_line: int
    parameters: tuple[tuple[str, ParamValue], ...] = ()
    template: str | None = None
    system: str | None = None
    adapters: tuple[str, ...] = ()
    license: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()

    def param(self, name: str, default: Any = None) -> Any:
        """The last value of PARAMETER `name` (a list of every value for `stop`), or `default`."""
        if name == "stop":
            return list(self.stops) or default
        for key, value in reversed(self.parameters):
            if key == name:
                return value
        return default

    @property
    def stops(self) -> tuple[str, ...]:
        """Every `stop` PARAMETER, in file order."""
        return tuple(str(v) for k, v in self.parameters if k == "stop")


# --- PARAMETER names and types ------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_TRUE = frozenset({"true", "t", "1", "yes", "on"})
_FALSE = frozenset({"false", "f", "0", "no", "off"})


def _to_int(raw: str) -> int:
    if not _INT_RE.fullmatch(raw):
        raise ValueError("expected an integer")
    return int(raw)


def _to_float(raw: str) -> float:
    if not _FLOAT_RE.fullmatch(raw) or not math.isfinite(float(raw)):
        raise ValueError("expected a number")
    return float(raw)


def _to_bool(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError("expected true or false")


def _to_stop(raw: str) -> str:
    if not raw:
        raise ValueError("expected a non-empty string")
    return raw


_INT_PARAMS = ("num_ctx", "num_batch", "num_gpu", "num_thread", "num_predict", "repeat_last_n",
               "top_k", "seed", "mirostat", "num_keep")
_FLOAT_PARAMS = ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                 "frequency_penalty", "mirostat_eta", "mirostat_tau", "tfs_z", "typical_p")
_BOOL_PARAMS = ("use_mmap", "use_mlock", "numa")

_CONVERTERS: dict[str, Callable[[str], ParamValue]] = {
    **{name: _to_int for name in _INT_PARAMS},
    **{name: _to_float for name in _FLOAT_PARAMS},
    **{name: _to_bool for name in _BOOL_PARAMS},
    "stop": _to_stop,
}

# Inclusive (low, high) bounds; None leaves that side open.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "num_ctx": (1, None),
    "num_batch": (1, None),
    "num_thread": (0, None),
    "temperature": (0, None),
    "top_p": (0, 1),
    "min_p": (0, 1),
    "typical_p": (0, 1),
}


def _check_range(name: str, value: ParamValue) -> None:
    low, high = _RANGES.get(name, (None, None))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if low is not None and high is not None and not low <= value <= high:
        raise ValueError(f"expected a value between {low:g} and {high:g}")
    if low is not None and value < low:
        raise ValueError(f"expected a value >= {low:g}")


# --- scanning -----------------------------------------------------------------------------------


class _Lines:
    """The file's lines with a cursor; raises ModelfileError with the file name attached."""

    def __init__(self, text: str, source: str) -> None:
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        self.lines = text.split("\n")
        self.source = source
        self.index = 0

    def error(self, line: int | None, key: str, message: str) -> ModelfileError:
        return ModelfileError(self.source, line, key, message)


def _find_close(text: str, triple: bool) -> int:
    """Index of the closing quote in `text`, or -1; in "..." a backslash escapes the next char."""
    if triple:
        return text.find('"""')
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return -1


def _unescape(text: str) -> str:
    return re.sub(r'\\(["\\])', r"\1", text)


def _read_value(lines: _Lines, rest: str, line: int, key: str) -> str:
    """The value that starts with `rest`: bare, "quoted" or a triple-quoted block."""
    triple = rest.startswith('"""')
    if not rest.startswith('"'):
        if not rest.strip():
            raise lines.error(line, key, "expected a value, got nothing")
        return rest.strip()
    text = rest[3:] if triple else rest[1:]
    parts: list[str] = []
    while (end := _find_close(text, triple)) < 0:
        parts.append(text)
        lines.index += 1
        if lines.index >= len(lines.lines):
            quote = '"""' if triple else '"'
            message = f"expected a closing {quote} for the value opened here, got the end of file"
            raise lines.error(line, key, message)
        text = lines.lines[lines.index]
    parts.append(text[:end])
    trailing = text[end + (3 if triple else 1):].strip()
    if trailing:
        raise lines.error(line, key, f"unexpected text after the closing quote: {trailing!r}")
    value = "\n".join(parts)
    return value if triple else _unescape(value)


def _split_word(text: str) -> tuple[str, str]:
    """The first whitespace-delimited word of `text` and the rest (trailing whitespace kept)."""
    parts = text.split(None, 1)
    if not parts:
        return "", ""
    return parts[0], parts[1] if len(parts) > 1 else ""


# --- building -----------------------------------------------------------------------------------


class _Builder:
    """Collects instructions as they are read and checks the ones that need context."""

    def __init__(self, lines: _Lines) -> None:
        self.lines = lines
        self.from_: str | None = None
        self.from_line = 0
        self.parameters: list[tuple[str, ParamValue]] = []
        self.template: str | None = None
        self.system: str | None = None
        self.adapters: list[str] = []
        self.license: list[str] = []
        self.messages: list[tuple[str, str]] = []

    def instruction(self, word: str, rest: str, line: int) -> None:
        name = word.upper()
        if name == "PARAMETER":
            self.parameter(rest, line)
        elif name == "MESSAGE":
            self.message(rest, line)
        elif name in INSTRUCTIONS:
            self.simple(name, _read_value(self.lines, rest, line, name), line)
        else:
            hint = _suggest(name, INSTRUCTIONS)
            message = f"unknown instruction{hint}; expected one of {', '.join(INSTRUCTIONS)}"
            raise self.lines.error(line, word, message)

    def simple(self, name: str, value: str, line: int) -> None:
        if name == "FROM":
            if self.from_ is not None:
                raise self.lines.error(line, name, "expected exactly one FROM, found a second "
                                       f"(the first is at line {self.from_line})")
            self.from_, self.from_line = value, line
        elif name == "TEMPLATE":
            self.template = value
        elif name == "SYSTEM":
            self.system = value
        elif name == "ADAPTER":
            self.adapters.append(value)
        else:
            self.license.append(value)

    def parameter(self, rest: str, line: int) -> None:
        raw_name, rest = _split_word(rest)
        if not raw_name:
            raise self.lines.error(line, "PARAMETER", "expected a name and a value, got nothing")
        name = raw_name.lower()
        key = f"PARAMETER {name}"
        if name not in _CONVERTERS:
            raise self.lines.error(line, key, f"unknown parameter{_suggest(name, _CONVERTERS)}")
        raw = _read_value(self.lines, rest, line, key)
        try:
            value = _CONVERTERS[name](raw)
            _check_range(name, value)
        except ValueError as exc:
            raise self.lines.error(line, key, f"{exc}, got {raw!r}") from None
        self.parameters.append((name, value))

    def message(self, rest: str, line: int) -> None:
        role, rest = _split_word(rest)
        if role.lower() not in ROLES:
            got = repr(role) if role else "nothing"
            message = f"expected a role of system, user or assistant, got {got}"
            raise self.lines.error(line, "MESSAGE", message)
        self.messages.append((role.lower(), _read_value(self.lines, rest, line, "MESSAGE")))

    def build(self) -> Modelfile:
        if self.from_ is None:
            raise self.lines.error(None, "FROM", "expected a FROM instruction, found none")
        return Modelfile(
            source=self.lines.source, from_=self.from_, from_line=self.from_line,
            parameters=tuple(self.parameters), template=self.template, system=self.system,
            adapters=tuple(self.adapters), license=tuple(self.license),
            messages=tuple(self.messages),
        )


def _suggest(word: str, known: Any) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# --- public API ---------------------------------------------------------------------------------


def parse_modelfile(text: str, source: str = "Modelfile") -> Modelfile:
    """Parse Modelfile text; `source` names the file in error messages."""
    lines = _Lines(text, source)
    builder = _Builder(lines)
    while lines.index < len(lines.lines):
        raw = lines.lines[lines.index]
        if raw.strip() and not raw.lstrip().startswith("#"):
            word, rest = _split_word(raw)
            builder.instruction(word, rest, lines.index + 1)
        lines.index += 1
    return builder.build()


def load_modelfile(path: Path) -> Modelfile:
    """Read and parse the Modelfile at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelfileError(str(path), None, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelfileError(str(path), None, "", f"cannot read: {exc}") from None
    return parse_modelfile(text, str(path))


_REQUEST_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                   "frequency_penalty", "seed")


def request_defaults(mf: Modelfile) -> dict[str, object]:
    """OpenAI chat request fields from the Modelfile's PARAMETERs (num_predict -> max_tokens)."""
    out: dict[str, object] = {}
    for name in _REQUEST_FIELDS:
        value = mf.param(name)
        if value is not None:
            out[name] = value
    if mf.stops:
        out["stop"] = list(mf.stops)
    num_predict = mf.param("num_predict")
    # -1 (no limit) and -2 (fill the context) have no max_tokens equivalent.
    if num_predict is not None and num_predict > 0:
        out["max_tokens"] = num_predict
    return out
