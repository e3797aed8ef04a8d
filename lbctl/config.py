"""The declarative config file: one YAML document, the whole desired state, validated strictly
(pydantic) with every error pointing at its file, line and field; and its inverse, the live
state written back as a file that loads again (`lbctl export`)."""
from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lbctl.errors import ConfigError
from lbctl.maglev import MAX_WEIGHT
from lbctl.model import (
    FORWARDING_NAMES,
    FORWARDING_NOT_YET,
    SNAT_PORTS_DEFAULT,
    BackendSpec,
    Config,
    VipSpec,
    backend_problem,
    format_port_range,
    parse_endpoint,
    parse_port_range,
    parse_snat_addrs,
    snat_family_problem,
)
from xdp.codec import Endpoint

# Values the contract names for later work: refused with "not supported yet", never ignored.
# Forwarding modes come from lbctl/model.py, which says which are built.
SUPPORTED_NOW = {"mode": ("l4", "l7"),
                 "forwarding": tuple(f for f in FORWARDING_NAMES if f not in FORWARDING_NOT_YET),
                 "affinity": ("flow", "client")}
PLANNED: dict[str, tuple[str, ...]] = {"mode": (), "forwarding": tuple(FORWARDING_NOT_YET), "affinity": ()}

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


# -- the L7 proxy's block (mode: l7 VIPs); every default works, so `mode: l7` alone runs ----
def _check_duration(v: Any) -> Any:
    parse_duration_ms(v)
    return v


class L7PoolFile(_Strict):
    """Upstream keep-alive connections, one pool per backend per worker."""

    # false: every request opens its own upstream connection and closes it after (the
    # comparison the pool is measured against, and for backends that mishandle keep-alive).
    enabled: bool = True
    max_size: int = Field(64, ge=1, le=10_000)
    min_idle: int = Field(0, ge=0, le=10_000)
    idle_timeout: Any = "60s"
    warmup: Literal["eager", "lazy"] = "lazy"

    _d = field_validator("idle_timeout")(classmethod(lambda cls, v: _check_duration(v)))

    @model_validator(mode="after")
    def _sizes(self) -> L7PoolFile:
        if self.min_idle > self.max_size:
            raise ValueError(f"min_idle {self.min_idle} is more than max_size {self.max_size}")
        if not self.enabled and self.warmup == "eager":
            raise ValueError("warmup eager keeps connections open and the pool is off (enabled: "
                             "false); set warmup: lazy, or enabled: true")
        if self.warmup == "eager" and self.min_idle == 0:
            raise ValueError("warmup eager opens min_idle connections at start, and min_idle is 0; "
                             "set min_idle: 1 or more, or warmup: lazy")
        return self


class L7LimitsFile(_Strict):
    """What bad or slow clients and backends meet (docs/l7.md has the table)."""

    header_timeout: Any = "10s"        # request headers complete within this, or the connection closes
    keepalive_timeout: Any = "60s"     # an idle client connection closes after this
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)
    max_headers: int = Field(100, ge=1, le=10_000)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=0)
    connect_timeout: Any = "2s"        # to a backend; past it the request retries or gets 502
    read_timeout: Any = "30s"          # a backend's response head; past it 504
    drain_timeout: Any = "10s"         # shutdown waits this long for requests in flight

    _d = field_validator("header_timeout", "keepalive_timeout", "connect_timeout", "read_timeout",
                         "drain_timeout")(classmethod(lambda cls, v: _check_duration(v)))


class L7EjectionFile(_Strict):
    """Passive health: consecutive connect failures or 5xx answers take a backend out."""

    failures: int = Field(5, ge=1, le=1000)
    cooldown: Any = "10s"

    _d = field_validator("cooldown")(classmethod(lambda cls, v: _check_duration(v)))


class L7RouteFile(_Strict):
    host: str | None = None            # exact, or '*.example.com' for any subdomain
    path_prefix: str = "/"
    group: str | None = None
    split: dict[str, int] | None = None   # group -> weight, e.g. {stable: 90, canary: 10}

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or any(c.isspace() for c in v):
            raise ValueError(f"path_prefix '{v}' must start with / and hold no spaces, e.g. /api/")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(\*\.)?[A-Za-z0-9.-]+", v):
            raise ValueError(f"host '{v}' is not a host name; write it like api.example.com or "
                             "*.example.com")
        return v.lower() if v is not None else v

    @field_validator("split")
    @classmethod
    def _split(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None:
            if not v:
                raise ValueError("split is empty; name at least one group with its weight")
            for name, weight in v.items():
                if not 0 <= weight <= 10_000:
                    raise ValueError(f"split weight {weight} of '{name}' is out of range 0-10000")
            if sum(v.values()) == 0:
                raise ValueError("split weights add up to 0; give a group a weight above 0")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> L7RouteFile:
        if (self.group is None) == (self.split is None):
            raise ValueError("a route names exactly one of 'group' or 'split'")
        return self


class L7CacheFile(_Strict):
    """The optional GET/HEAD response cache, per worker; max_bytes 0 turns it off."""

    max_bytes: int = Field(0, ge=0, le=16 * 1024**3)
    max_entry_bytes: int = Field(1024 * 1024, ge=1, le=1024**3)


class L7TlsFile(_Strict):
    cert: str
    key: str


class L7Http2File(_Strict):
    """HTTP/2 from clients: each stream is one request, balanced and forwarded as HTTP/1.1."""

    tls: bool = True                   # offer h2 by ALPN on a TLS VIP (http/1.1 stays offered)
    cleartext: bool = True             # accept h2c with prior knowledge on a plain VIP
    max_concurrent_streams: int = Field(128, ge=1, le=10_000)
    # What one stream's upload may have in flight before the proxy has passed it upstream: the
    # memory an upload holds, and (with the round trip) its speed.
    stream_window_bytes: int = Field(256 * 1024, ge=65_535, le=2**31 - 1)


class L7File(_Strict):
    workers: int = Field(0, ge=0, le=256)        # 0: one per core
    balancing: Literal["round_robin", "least_outstanding", "hash"] = "round_robin"
    hash_on: str | None = None                   # 'header:X-User' or 'cookie:session'
    pool: L7PoolFile = L7PoolFile()
    limits: L7LimitsFile = L7LimitsFile()
    ejection: L7EjectionFile = L7EjectionFile()
    groups: dict[str, list[str]] = {}            # name -> backend addrs of this VIP
    routes: list[L7RouteFile] = []
    tls: L7TlsFile | None = None
    cache: L7CacheFile = L7CacheFile()
    http2: L7Http2File = L7Http2File()

    @field_validator("hash_on")
    @classmethod
    def _hash_on(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(header|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+", v):
            raise ValueError(f"hash_on '{v}' is not 'header:NAME' or 'cookie:NAME'")
        return v

    @model_validator(mode="after")
    def _hash_needs_key(self) -> L7File:
        if self.balancing == "hash" and self.hash_on is None:
            raise ValueError("balancing hash needs hash_on: header:NAME or cookie:NAME")
        if self.balancing != "hash" and self.hash_on is not None:
            raise ValueError(f"hash_on is for balancing: hash (this is {self.balancing})")
        return self


class VipFile(_Strict):
    vip: str
    proto: Literal["tcp", "udp"] = "tcp"
    mode: str = "l4"
    forwarding: str = "nat"
    affinity: str = "flow"
    # forwarding: fullnat only: source addresses (a list, or "a,b") and the source-port range.
    snat: list[str] | str | None = None
    snat_ports: str | int | None = None
    health: HealthFile | None = None
    l7: L7File | None = None
    backends: list[BackendFile] = []
    # Announced over BGP only while at least this many backends pass their checks (vc5's
    # `need`): a node that cannot serve the VIP well gives its share to the other nodes.
    min_healthy: int = Field(1, ge=1, le=100_000)

    @field_validator("mode", "forwarding", "affinity")
    @classmethod
    def _not_yet(cls, v: str, info: Any) -> str:
        key = info.field_name
        if v in SUPPORTED_NOW[key]:
            return v
        if v in PLANNED[key]:
            raise ValueError(f"{key} '{v}' is not supported yet; use {key}: {SUPPORTED_NOW[key][0]}")
        later = f" ({', '.join(PLANNED[key])} not supported yet)" if PLANNED[key] else ""
        raise ValueError(f"unknown {key} '{v}'; use {' or '.join(SUPPORTED_NOW[key] + PLANNED[key])}"
                         f"{later}")

    @model_validator(mode="after")
    def _l7_only(self) -> VipFile:
        if self.l7 is not None and self.mode != "l7":
            raise ValueError("an 'l7' block is for mode: l7 VIPs only (this one is l4); "
                             "add mode: l7 or remove the block")
        if self.mode == "l7" and self.proto != "tcp":
            raise ValueError(f"mode l7 serves HTTP over tcp; this VIP is {self.proto}")
        if self.mode == "l7" and self.forwarding != "nat":
            raise ValueError(f"forwarding {self.forwarding} is for mode: l4 VIPs (the L7 proxy opens "
                             "its own connections to the backends); remove forwarding or use mode: l4")
        return self


class BgpPeerFile(_Strict):
    addr: str
    # `as` is a Python keyword: the field is asn, the key in the file stays `as`.
    asn: int = Field(alias="as", ge=1, le=4_294_967_295)

    @field_validator("addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        return _ipv4(v, "peer address")


class BgpFile(_Strict):
    """The agent's BGP speaker (its own BIRD 2): announces each VIP as a /32 while it can serve it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)
    local_as: int = Field(ge=1, le=4_294_967_295)
    router_id: str | None = None        # default: the first address of the first interface
    hold_time: int = Field(9, ge=3, le=65535)   # seconds; RFC 4271 allows 0 or >= 3, BIRD the same
    peers: list[BgpPeerFile] = Field(min_length=1)

    @field_validator("router_id")
    @classmethod
    def _router_id(cls, v: str | None) -> str | None:
        return None if v is None else _ipv4(v, "router_id")


def _ipv4(v: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(v))
    except ValueError:
        raise ValueError(f"{what} '{v}' is not an IPv4 address, e.g. 10.0.1.1") from None


class ConfigFile(_Strict):
    interfaces: list[str] = []
    # auto: each interface gets its driver's default, as `lbctl attach` without --mode (native
    # on NIC drivers, tc on veth where XDP copies every socket-made packet: #15, #8). It
    # is the default for the same reason `attach` picks by driver when --mode is not given.
    # tc: the same program on the tc ingress hook (`lbctl attach --mode tc`).
    xdp_mode: Literal["native", "generic", "tc", "auto"] = "auto"
    vips: list[VipFile] = []
    bgp: BgpFile | None = None


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
class L7Route:
    host: str | None                         # lower case; '*.example.com' matches subdomains
    path_prefix: str
    split: tuple[tuple[str, int], ...]       # (group, weight); one entry for a plain group


@dataclass(frozen=True)
class L7Spec:
    """A mode: l7 VIP's proxy settings, durations in ms, groups resolved to backend names."""

    workers: int = 0
    balancing: str = "round_robin"
    hash_on: tuple[str, str] | None = None   # ('header'|'cookie', name)
    pool_enabled: bool = True
    pool_max_size: int = 64
    pool_min_idle: int = 0
    pool_idle_timeout_ms: int = 60_000
    warmup: str = "lazy"
    header_timeout_ms: int = 10_000
    keepalive_timeout_ms: int = 60_000
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_body_bytes: int = 10 * 1024 * 1024
    connect_timeout_ms: int = 2000
    read_timeout_ms: int = 30_000
    drain_timeout_ms: int = 10_000
    eject_failures: int = 5
    eject_cooldown_ms: int = 10_000
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    routes: tuple[L7Route, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    cache_max_bytes: int = 0
    cache_max_entry_bytes: int = 1024 * 1024
    http2_tls: bool = True
    http2_cleartext: bool = True
    http2_max_streams: int = 128
    http2_stream_window_bytes: int = 256 * 1024


@dataclass(frozen=True)
class VipEntry:
    spec: VipSpec
    health: HealthSpec | None
    mode: str = "l4"
    l7: L7Spec | None = None                  # set (defaults filled) for every mode: l7 VIP
    min_healthy: int = 1                      # announced over BGP only with this many healthy


@dataclass(frozen=True)
class BgpPeer:
    addr: str
    asn: int


@dataclass(frozen=True)
class BgpSpec:
    """The bgp block, resolved: router_id is None when the file leaves it to the agent (the
    first address of the first interface, known only where the agent runs)."""

    local_as: int
    router_id: str | None
    hold_time_s: int
    peers: tuple[BgpPeer, ...]


@dataclass(frozen=True)
class DesiredState:
    """A loaded file: what `apply` and the agent work from."""

    source: str
    interfaces: tuple[str, ...]
    xdp_mode: str
    vips: dict[Endpoint, VipEntry]
    bgp: BgpSpec | None = None

    def config(self) -> Config:
        """The part the planner compares with the maps: L4 VIPs only. A mode: l7 VIP is never
        in the maps, so the XDP program passes its packets up to the proxy untouched."""
        return {vip: entry.spec for vip, entry in self.vips.items() if entry.mode == "l4"}

    def l7_vips(self) -> dict[Endpoint, VipEntry]:
        return {vip: entry for vip, entry in self.vips.items() if entry.mode == "l7"}


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
    field = next((p for p in reversed(loc) if isinstance(p, str)), "")
    hints = {
        "weight": f"a weight is 1-{MAX_WEIGHT}; use state: drain to stop new connections",
        "rise": "rise and fall count checks: 1-100", "fall": "rise and fall count checks: 1-100",
        "check": "check is tcp, http or none", "state": "state is active, drain or down",
        "proto": "proto is tcp or udp", "interval": "write a duration like 1s or 500ms",
        "timeout": "write a duration like 1s or 500ms", "xdp_mode": "xdp_mode is native, generic, tc or auto",
        "balancing": "balancing is round_robin, least_outstanding or hash",
        "warmup": "warmup is eager or lazy", "hash_on": "write it like header:X-User or cookie:session",
        "idle_timeout": "write a duration like 60s", "cooldown": "write a duration like 10s",
        "mode": "mode is l4 (XDP) or l7 (the HTTP proxy)",
        "hold_time": "hold_time is whole seconds, 3-65535 (BGP allows no 1 or 2)",
        "local_as": "an AS number is 1-4294967295 (private: 64512-65534)",
        "as": "an AS number is 1-4294967295 (private: 64512-65534)",
        "min_healthy": "min_healthy is how many healthy backends the VIP needs to be announced, 1 or more",
        "peers": "list the routers as peers: [{addr: 10.0.1.1, as: 65000}]",
    }
    doc = "docs/l7.md" if "l7" in loc else "docs/scale-out.md" if "bgp" in loc else "docs/operations.md"
    if kind == "extra_forbidden":
        return f"check the spelling; {doc} lists every key"
    if kind == "missing":
        return f"add '{loc[-1]}'"
    if field.endswith("_timeout"):
        return "write a duration like 10s or 500ms"
    return hints.get(field, f"{doc} shows a complete example")


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
        lines_text = text.splitlines()
        at = lines_text[line - 1] if 0 < line <= len(lines_text) else ""
        unquoted_v6 = re.search(r":\s*(\[[0-9A-Fa-f:.]*\]:\d+)", at)
        if unquoted_v6:
            # YAML reads [2001:db8::10]:80 as a list: the most likely cause on such a line.
            raise ConfigError(f"{source}:{line}: not valid YAML: {what}; hint: quote an IPv6 "
                              f"endpoint: \"{unquoted_v6.group(1)}\"") from None
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
            if ep.ipv6 != vip.ipv6:
                fam, vfam = ("IPv6", "IPv4") if ep.ipv6 else ("IPv4", "IPv6")
                raise _fail(source, lines, where, f"backend {ep} is {fam} but VIP {vip} is {vfam}",
                            "a VIP and its backends share one address family")
            if (ep.addr, ep.port) == (vip.addr, vip.port):
                raise _fail(source, lines, where, f"backend {ep} is the VIP itself",
                            "name the address and port of a real server")
            problem = backend_problem(vip, v.forwarding, ep.addr, ep.port)
            if problem is not None:
                raise _fail(source, lines, where, *_split(ConfigError(problem)))
            if str(ep) in backends:
                raise _fail(source, lines, where, f"duplicate backend {ep} in VIP {vip}",
                            "list each backend once; weight sets its share")
            backends[str(ep)] = BackendSpec(ep.addr, ep.port, b.weight, b.state)
        spec = VipSpec(vip, tuple(sorted(backends.values(), key=lambda b: (b.addr, b.port))), v.affinity,
                       v.forwarding)
        if v.snat is not None or v.snat_ports is not None:
            key = "snat" if v.snat is not None else "snat_ports"
            if v.forwarding != "fullnat":
                raise _fail(source, lines, ("vips", i, key), f"{key} is for forwarding: fullnat "
                            f"(this VIP forwards by {v.forwarding})",
                            "add forwarding: fullnat, or remove the key")
            try:
                if v.snat is not None:
                    key = "snat"
                    spec = replace(spec, snat=parse_snat_addrs(v.snat))
                    problem = snat_family_problem(vip, spec.snat)
                    if problem is not None:
                        raise ConfigError(problem)
                if v.snat_ports is not None:
                    key = "snat_ports"
                    spec = replace(spec, snat_ports=parse_port_range(str(v.snat_ports)))
            except ConfigError as exc:
                raise _fail(source, lines, ("vips", i, key), *_split(exc)) from None
        l7 = _l7(v.l7 or L7File(), spec, source, lines, ("vips", i, "l7")) if v.mode == "l7" else None
        if v.min_healthy > len(v.backends) and v.backends:
            raise _fail(source, lines, ("vips", i, "min_healthy"), f"min_healthy {v.min_healthy} is "
                        f"more than the VIP's {len(v.backends)} backends, so it would never be announced",
                        f"use 1-{len(v.backends)}")
        vips[vip] = VipEntry(spec, _health(v.health), v.mode, l7, v.min_healthy)
    return DesiredState(source, tuple(model.interfaces), model.xdp_mode, vips,
                        _bgp(model.bgp, model.interfaces, source, lines))


def _bgp(b: BgpFile | None, interfaces: list[str], source: str, lines: dict[Loc, int]) -> BgpSpec | None:
    if b is None:
        return None
    if b.router_id is None and not interfaces:
        raise _fail(source, lines, ("bgp",), "no router_id and no interfaces to take it from",
                    "add router_id: with one of this node's addresses")
    seen: dict[str, int] = {}
    for k, p in enumerate(b.peers):
        if p.addr in seen:
            raise _fail(source, lines, ("bgp", "peers", k, "addr"), f"peer {p.addr} listed twice "
                        f"(also peers[{seen[p.addr]}])", "list each peer once")
        if p.addr == b.router_id:
            raise _fail(source, lines, ("bgp", "peers", k, "addr"), f"peer {p.addr} is this node's own "
                        "router_id", "name the router's address")
        seen[p.addr] = k
    return BgpSpec(b.local_as, b.router_id, b.hold_time, tuple(BgpPeer(p.addr, p.asn) for p in b.peers))


def _l7(f: L7File, spec: VipSpec, source: str, lines: dict[Loc, int], at: Loc) -> L7Spec:
    """Cross-checks of an l7 block: groups name this VIP's backends, routes name known groups,
    and the TLS files load as a certificate and its key."""
    names = {b.name for b in spec.backends}
    groups: dict[str, tuple[str, ...]] = {}
    for gname, members in f.groups.items():
        out = []
        for k, addr in enumerate(members):
            try:
                ep = parse_endpoint(addr, "tcp", "backend")
            except ConfigError as exc:
                raise _fail(source, lines, at + ("groups", gname, k), *_split(exc)) from None
            if str(ep) not in names:
                raise _fail(source, lines, at + ("groups", gname, k), f"group '{gname}' names {ep}, "
                            "which is not a backend of this VIP", "list it under backends first")
            out.append(str(ep))
        if not out:
            raise _fail(source, lines, at + ("groups", gname), f"group '{gname}' is empty",
                        "name at least one backend")
        groups[gname] = tuple(out)
    routes = []
    for r_i, r in enumerate(f.routes):
        split = ((r.group, 1),) if r.group is not None else tuple((r.split or {}).items())
        for gname, _ in split:
            if gname not in groups:
                key = "group" if r.group is not None else "split"
                raise _fail(source, lines, at + ("routes", r_i, key), f"unknown group '{gname}'",
                            f"groups here are: {', '.join(groups) or 'none (add an l7.groups block)'}")
        routes.append(L7Route(r.host, r.path_prefix, split))
    if f.tls is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(f.tls.cert, f.tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise _fail(source, lines, at + ("tls",), f"cannot load the certificate {f.tls.cert} with "
                        f"key {f.tls.key}: {getattr(exc, 'strerror', None) or exc}",
                        "give PEM files readable here, the key matching the certificate") from None
    kind, _, name = (f.hash_on or "").partition(":")
    lim = f.limits
    return L7Spec(
        workers=f.workers, balancing=f.balancing,
        hash_on=(kind, name.lower() if kind == "header" else name) if f.hash_on else None,
        pool_enabled=f.pool.enabled, pool_max_size=f.pool.max_size, pool_min_idle=f.pool.min_idle,
        pool_idle_timeout_ms=parse_duration_ms(f.pool.idle_timeout), warmup=f.pool.warmup,
        header_timeout_ms=parse_duration_ms(lim.header_timeout),
        keepalive_timeout_ms=parse_duration_ms(lim.keepalive_timeout),
        max_header_bytes=lim.max_header_bytes, max_headers=lim.max_headers,
        max_body_bytes=lim.max_body_bytes, connect_timeout_ms=parse_duration_ms(lim.connect_timeout),
        read_timeout_ms=parse_duration_ms(lim.read_timeout),
        drain_timeout_ms=parse_duration_ms(lim.drain_timeout),
        eject_failures=f.ejection.failures, eject_cooldown_ms=parse_duration_ms(f.ejection.cooldown),
        groups=tuple(groups.items()), routes=tuple(routes),
        tls_cert=f.tls.cert if f.tls else None, tls_key=f.tls.key if f.tls else None,
        cache_max_bytes=f.cache.max_bytes, cache_max_entry_bytes=f.cache.max_entry_bytes,
        http2_tls=f.http2.tls, http2_cleartext=f.http2.cleartext,
        http2_max_streams=f.http2.max_concurrent_streams,
        http2_stream_window_bytes=f.http2.stream_window_bytes)


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
def _l7_block(spec: L7Spec) -> dict[str, Any]:
    """A mode: l7 VIP's `l7:` block with the keys that differ from the defaults, so the file
    says what was chosen and loads back to the same L7Spec."""
    d = L7Spec()
    out: dict[str, Any] = {}

    def sub(block: str, pairs: list[tuple[str, Any, Any]]) -> None:
        items = {key: value for key, value, default in pairs if value != default}
        if items:
            out[block] = items

    if spec.workers != d.workers:
        out["workers"] = spec.workers
    if spec.balancing != d.balancing:
        out["balancing"] = spec.balancing
    if spec.hash_on is not None:
        out["hash_on"] = f"{spec.hash_on[0]}:{spec.hash_on[1]}"
    dur = format_duration
    sub("pool", [("enabled", spec.pool_enabled, d.pool_enabled),
                 ("max_size", spec.pool_max_size, d.pool_max_size),
                 ("min_idle", spec.pool_min_idle, d.pool_min_idle),
                 ("idle_timeout", dur(spec.pool_idle_timeout_ms), dur(d.pool_idle_timeout_ms)),
                 ("warmup", spec.warmup, d.warmup)])
    sub("limits", [(key, dur(getattr(spec, key + "_ms")), dur(getattr(d, key + "_ms")))
                   for key in ("header_timeout", "keepalive_timeout")]
        + [(key, getattr(spec, key), getattr(d, key))
           for key in ("max_header_bytes", "max_headers", "max_body_bytes")]
        + [(key, dur(getattr(spec, key + "_ms")), dur(getattr(d, key + "_ms")))
           for key in ("connect_timeout", "read_timeout", "drain_timeout")])
    sub("ejection", [("failures", spec.eject_failures, d.eject_failures),
                     ("cooldown", dur(spec.eject_cooldown_ms), dur(d.eject_cooldown_ms))])
    if spec.groups:
        out["groups"] = {name: list(members) for name, members in spec.groups}
    if spec.routes:
        routes = []
        for r in spec.routes:
            route: dict[str, Any] = {}
            if r.host is not None:
                route["host"] = r.host
            route["path_prefix"] = r.path_prefix
            if len(r.split) == 1 and r.split[0][1] == 1:
                route["group"] = r.split[0][0]     # `group: g` loads as the split {g: 1}
            else:
                route["split"] = dict(r.split)
            routes.append(route)
        out["routes"] = routes
    if spec.tls_cert is not None and spec.tls_key is not None:
        out["tls"] = {"cert": spec.tls_cert, "key": spec.tls_key}
    sub("cache", [("max_bytes", spec.cache_max_bytes, d.cache_max_bytes),
                  ("max_entry_bytes", spec.cache_max_entry_bytes, d.cache_max_entry_bytes)])
    sub("http2", [("tls", spec.http2_tls, d.http2_tls),
                  ("cleartext", spec.http2_cleartext, d.http2_cleartext),
                  ("max_concurrent_streams", spec.http2_max_streams, d.http2_max_streams),
                  ("stream_window_bytes", spec.http2_stream_window_bytes, d.http2_stream_window_bytes)])
    return out


def vip_item(vip: Endpoint, entry: VipEntry) -> dict[str, Any]:
    """One VIP as the file writes it (JSON-able: the agent publishes its L7 VIPs so)."""
    item: dict[str, Any] = {"vip": str(vip), "proto": vip.proto}
    if entry.mode != "l4":
        item["mode"] = entry.mode
    if entry.spec.forwarding != "nat":
        item["forwarding"] = entry.spec.forwarding
    if entry.spec.affinity != "flow":
        item["affinity"] = entry.spec.affinity
    if entry.spec.snat:
        item["snat"] = list(entry.spec.snat)
    if entry.spec.snat_ports != SNAT_PORTS_DEFAULT:
        item["snat_ports"] = format_port_range(entry.spec.snat_ports)
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
    if entry.mode == "l7" and entry.l7 is not None:
        block = _l7_block(entry.l7)
        if block:
            item["l7"] = block
    item["backends"] = [{"addr": b.name, "weight": b.weight, "state": b.state}
                        for b in entry.spec.backends]
    return item


def dump(interfaces: list[str], xdp_mode: str, vips: dict[Endpoint, VipEntry],
         items: list[dict[str, Any]] | None = None) -> str:
    """A config document for this state, in the contract's key order, that load_text accepts.
    `items` are VIPs already written as the file writes them (the agent's L7 VIPs, which the
    maps do not hold); all VIPs come out in address order."""
    rows = [(vip, vip_item(vip, vips[vip])) for vip in vips]
    for item in items or []:
        rows.append((parse_endpoint(item["vip"], item.get("proto", "tcp"), "VIP"), item))
    doc: dict[str, Any] = {"interfaces": list(interfaces), "xdp_mode": xdp_mode,
                           "vips": [item for _, item in sorted(rows, key=lambda r: r[0])]}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
