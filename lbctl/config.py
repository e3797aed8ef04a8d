"""The declarative config file: one YAML document, the whole desired state, validated strictly
(pydantic) with every error pointing at its file, line and field; and its inverse, the live
state written back as a file that loads again (`lbctl export`)."""
from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lbctl.errors import ConfigError
from lbctl.maglev import MAX_WEIGHT
from lbctl.model import BackendSpec, Config, VipSpec, parse_endpoint
from xdp.codec import Endpoint

# Values the contract names for later work: refused with "not supported yet", never ignored.
SUPPORTED_NOW = {"mode": ("l4",), "forwarding": ("nat",), "affinity": ("flow",)}
PLANNED = {"mode": ("l7",), "forwarding": ("fullnat", "dsr"), "affinity": ("client",)}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000}


def parse_duration_ms(value: object) -> int:
    """'1s', '500ms', '1.5s', '2m' -> milliseconds. A bare number is refused: 1 could mean a
    second or a millisecond, and a config file should not leave that to guessing."""
    if isinstance(value, bool) or not isinstance(value, str):
        # ValueError, not TypeError: pydantic reports only ValueError as a field's error.
        raise ValueError(f"duration {value!r} has no unit; write it like 1s or 500ms")  # noqa: TRY004
    m = _DURATION.match(value)
    if m is None:
        raise ValueError(f"'{value}' is not a duration; write it like 1s, 500ms or 2m")
    ms = float(m.group(1)) * _UNIT_MS[m.group(2)]
    if ms != int(ms):
        raise ValueError(f"duration '{value}' is finer than a millisecond")
    if ms <= 0:
        raise ValueError(f"duration '{value}' must be more than 0")
    return int(ms)


def format_duration(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def parse_expect(value: object) -> tuple[int, int]:
    """HTTP status codes that pass a check: 200, '200' or '200-399'."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not re.fullmatch(r"\d{3}(-\d{3})?", text.strip()):
        raise ValueError(f"expect {value!r} is not a status or a range; write it like 200 or 200-399")
    lo_text, _, hi_text = text.strip().partition("-")
    lo, hi = int(lo_text), int(hi_text or lo_text)
    if not 100 <= lo <= hi <= 599:
        raise ValueError(f"expect '{value}' must be within 100-599, low to high")
    return lo, hi


class _Strict(BaseModel):
    # Unknown keys are errors (a typo such as `wieght` must not be silently dropped), and
    # values are not coerced between types ('1' is not the weight 1).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class HealthFile(_Strict):
    """How a VIP's backends are checked; the timing follows HAProxy's interval/rise/fall."""

    check: Literal["tcp", "http", "none"]
    path: str | None = None
    expect: Any = None                 # 200 or '200-399'; checked by parse_expect
    interval: Any = "2s"                # a duration with its unit: 1s, 500ms
    timeout: Any = "1s"
    rise: int = Field(2, ge=1, le=100)
    fall: int = Field(3, ge=1, le=100)
    port: int | None = Field(None, ge=1, le=65535)   # check another port than the service's

    @field_validator("interval", "timeout")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        parse_duration_ms(v)
        return v

    @field_validator("expect")
    @classmethod
    def _expect(cls, v: Any) -> Any:
        if v is not None:
            parse_expect(v)
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or any(c.isspace() for c in v)):
            raise ValueError(f"path '{v}' must start with / and hold no spaces, e.g. /healthz")
        return v

    @model_validator(mode="after")
    def _http_only(self) -> HealthFile:
        if self.check != "http":
            for key in ("path", "expect"):
                if getattr(self, key) is not None:
                    raise ValueError(f"'{key}' is for http checks only (this one is {self.check})")
        return self

    @property
    def interval_ms(self) -> int:
        return parse_duration_ms(self.interval)

    @property
    def timeout_ms(self) -> int:
        return parse_duration_ms(self.timeout)

    @property
    def expect_range(self) -> tuple[int, int]:
        return parse_expect(self.expect) if self.expect is not None else (200, 399)


class BackendFile(_Strict):
    addr: str
    weight: int = Field(1, ge=1, le=MAX_WEIGHT)
    state: Literal["active", "drain", "down"] = "active"


class VipFile(_Strict):
    vip: str
    proto: Literal["tcp", "udp"] = "tcp"
    mode: str = "l4"
    forwarding: str = "nat"
    affinity: str = "flow"
    health: HealthFile | None = None
    backends: list[BackendFile] = []

    @field_validator("mode", "forwarding", "affinity")
    @classmethod
    def _not_yet(cls, v: str, info: Any) -> str:
        key = info.field_name
        if v in SUPPORTED_NOW[key]:
            return v
        if v in PLANNED[key]:
            raise ValueError(f"{key} '{v}' is not supported yet; use {key}: {SUPPORTED_NOW[key][0]}")
        raise ValueError(f"unknown {key} '{v}'; use {' or '.join(SUPPORTED_NOW[key] + PLANNED[key])} "
                         f"({', '.join(PLANNED[key])} not supported yet)")


class ConfigFile(_Strict):
    interfaces: list[str] = []
    xdp_mode: Literal["native", "generic"] = "native"
    vips: list[VipFile] = []


# -- the validated result ------------------------------------------------------------------
@dataclass(frozen=True)
class HealthSpec:
    check: str                 # tcp | http | none
    path: str = "/"
    expect: tuple[int, int] = (200, 399)
    interval_ms: int = 2000
    timeout_ms: int = 1000
    rise: int = 2
    fall: int = 3
    port: int | None = None


@dataclass(frozen=True)
class VipEntry:
    spec: VipSpec
    health: HealthSpec | None


@dataclass(frozen=True)
class DesiredState:
    """A loaded file: what `apply` and the agent work from."""

    source: str
    interfaces: tuple[str, ...]
    xdp_mode: str
    vips: dict[Endpoint, VipEntry]

    def config(self) -> Config:
        """The part the planner compares with the maps."""
        return {vip: entry.spec for vip, entry in self.vips.items()}


# -- loading with line numbers -------------------------------------------------------------
Loc = tuple[Any, ...]


def _line_map(node: yaml.Node, source: str, where: Loc = (), out: dict | None = None) -> dict[Loc, int]:
    """Path of every key and item in the document -> its line (1-based). Also refuses a key
    written twice in one mapping, which PyYAML would resolve silently by keeping the last."""
    out = {} if out is None else out
    out.setdefault(where, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{source}:{line}: {_dotted(where + (key,))}: key written twice "
                                  f"(first on line {seen[key]}); hint: keep one")
            seen[key] = line
            out[where + (key,)] = line
            _line_map(value_node, source, where + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, source, where + (i,), out)
    return out


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top)"


def _line_of(lines: dict[Loc, int], loc: Loc) -> int:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return 1


def _describe(err: Any, loc: Loc) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"unknown key '{loc[-1]}'"
    if kind == "missing":
        return "required key missing"
    if kind == "literal_error":
        return f"{err['input']!r} is not one of {ctx.get('expected', '')}"
    if kind in ("greater_than_equal", "less_than_equal"):
        return f"{err['input']!r} is out of range ({err['msg'].lower()})"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind.endswith("_type"):
        return f"{err['input']!r} is the wrong type ({err['msg'].lower()})"
    return f"{err['msg']} (got {err['input']!r})"


def _hint(loc: Loc, kind: str) -> str:
    hints = {
        "weight": f"a weight is 1-{MAX_WEIGHT}; use state: drain to stop new connections",
        "rise": "rise and fall count checks: 1-100", "fall": "rise and fall count checks: 1-100",
        "check": "check is tcp, http or none", "state": "state is active, drain or down",
        "proto": "proto is tcp or udp", "interval": "write a duration like 1s or 500ms",
        "timeout": "write a duration like 1s or 500ms", "xdp_mode": "xdp_mode is native or generic",
    }
    if kind == "extra_forbidden":
        return "check the spelling; docs/operations.md lists every key"
    if kind == "missing":
        return f"add '{loc[-1]}'"
    field = next((p for p in reversed(loc) if isinstance(p, str)), "")
    return hints.get(field, "docs/operations.md shows a complete example")


def _fail(source: str, lines: dict[Loc, int], loc: Loc, message: str, hint: str) -> ConfigError:
    return ConfigError(f"{source}:{_line_of(lines, loc)}: {_dotted(loc)}: {message}; hint: {hint}")


def load_text(text: str, source: str = "<config>",
              interface_exists: Callable[[str], bool] | None = None) -> DesiredState:
    """Parses and validates one config document. Raises ConfigError (one line: file, line,
    field, what is wrong, a hint) on the first problem; nothing is ever half-loaded."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            lines = _line_map(node, source) if node is not None else {}
            data = loader.construct_document(node) if node is not None else {}
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{source}:{line}: not valid YAML: {what}; hint: check indentation and "
                          "that lists start with '- '") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}; hint: check the file's syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: (top): the document is a {type(data).__name__}, not a mapping; "
                          "hint: start with 'interfaces:' and 'vips:'")
    try:
        model = ConfigFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        raise _fail(source, lines, loc, _describe(err, loc), _hint(loc, err["type"])) from None
    return _resolve(model, source, lines, interface_exists)


def _resolve(model: ConfigFile, source: str, lines: dict[Loc, int],
             interface_exists: Callable[[str], bool] | None) -> DesiredState:
    """Checks what crosses items (duplicates, a backend that is its VIP, interfaces that must
    exist here) and builds the planner's view."""
    seen_if: dict[str, int] = {}
    for i, name in enumerate(model.interfaces):
        if name in seen_if:
            raise _fail(source, lines, ("interfaces", i), f"interface '{name}' listed twice "
                        f"(also interfaces[{seen_if[name]}])", "list each interface once")
        seen_if[name] = i
        if interface_exists is not None and not interface_exists(name):
            here = ", ".join(n for _, n in socket.if_nameindex())
            raise _fail(source, lines, ("interfaces", i), f"unknown interface '{name}'",
                        f"interfaces here are: {here}")
    vips: dict[Endpoint, VipEntry] = {}
    first_at: dict[Endpoint, int] = {}
    for i, v in enumerate(model.vips):
        try:
            vip = parse_endpoint(v.vip, v.proto, "VIP")
        except ConfigError as exc:
            raise _fail(source, lines, ("vips", i, "vip"), *_split(exc)) from None
        if vip in vips:
            raise _fail(source, lines, ("vips", i, "vip"), f"duplicate VIP {vip} ({vip.proto}), "
                        f"also vips[{first_at[vip]}]", "list each VIP once per protocol")
        first_at[vip] = i
        backends: dict[str, BackendSpec] = {}
        for j, b in enumerate(v.backends):
            where = ("vips", i, "backends", j, "addr")
            try:
                ep = parse_endpoint(b.addr, v.proto, "backend")
            except ConfigError as exc:
                raise _fail(source, lines, where, *_split(exc)) from None
            if (ep.addr, ep.port) == (vip.addr, vip.port):
                raise _fail(source, lines, where, f"backend {ep} is the VIP itself",
                            "name the address and port of a real server")
            if str(ep) in backends:
                raise _fail(source, lines, where, f"duplicate backend {ep} in VIP {vip}",
                            "list each backend once; weight sets its share")
            backends[str(ep)] = BackendSpec(ep.addr, ep.port, b.weight, b.state)
        spec = VipSpec(vip, tuple(sorted(backends.values(), key=lambda b: (b.addr, b.port))))
        vips[vip] = VipEntry(spec, _health(v.health))
    return DesiredState(source, tuple(model.interfaces), model.xdp_mode, vips)


def _split(exc: ConfigError) -> tuple[str, str]:
    """A model.py message 'what; hint: how' -> (what, how)."""
    what, _, hint = str(exc).partition("; hint: ")
    return what, hint or "e.g. 10.0.0.10:80"


def _health(h: HealthFile | None) -> HealthSpec | None:
    if h is None:
        return None
    return HealthSpec(h.check, h.path or "/", h.expect_range, h.interval_ms, h.timeout_ms,
                      h.rise, h.fall, h.port)


def interface_here(name: str) -> bool:
    """Whether the calling thread's network namespace has this interface."""
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def load_file(path: str, check_interfaces: bool = True) -> DesiredState:
    """Reads and validates a config file (interfaces are looked up in the current namespace)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}; hint: check the path "
                          "and its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); hint: a YAML config file is text") from None
    return load_text(text, path, interface_here if check_interfaces else None)


# -- the inverse: live state -> a file -----------------------------------------------------
def dump(interfaces: list[str], xdp_mode: str, vips: dict[Endpoint, VipEntry]) -> str:
    """A config document for this state, in the contract's key order, that load_text accepts."""
    doc: dict[str, Any] = {"interfaces": list(interfaces), "xdp_mode": xdp_mode, "vips": []}
    for vip in sorted(vips):
        entry = vips[vip]
        item: dict[str, Any] = {"vip": f"{vip.addr}:{vip.port}", "proto": vip.proto}
        if entry.health is not None:
            h = entry.health
            block: dict[str, Any] = {"check": h.check}
            if h.check == "http":
                block["path"] = h.path
                block["expect"] = f"{h.expect[0]}-{h.expect[1]}" if h.expect[0] != h.expect[1] \
                    else h.expect[0]
            block.update(interval=format_duration(h.interval_ms), timeout=format_duration(h.timeout_ms),
                         rise=h.rise, fall=h.fall)
            if h.port is not None:
                block["port"] = h.port
            item["health"] = block
        item["backends"] = [{"addr": b.name, "weight": b.weight, "state": b.state}
                            for b in entry.spec.backends]
        doc["vips"].append(item)
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
