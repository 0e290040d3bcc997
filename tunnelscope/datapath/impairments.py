"""Impairments as users write them ("a2b freq_drop 3"), checked and compiled to integers.

Both backends run compiled `Stage`s: every probability becomes a 53-bit threshold and every
duration integer nanoseconds here, once, so the C loop and the Python reference take the same
decisions bit for bit (docs/pipeline.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

DIRECTIONS = ("a2b", "b2a", "both")
PROBABILITY_ONE = 1 << 53
MASK64 = (1 << 64) - 1


class ImpairmentError(ValueError):
    """A user-facing, one-line reason an impairment was refused."""


class Kind(IntEnum):
    FREQ_DROP = 1
    PACKET_LOSS = 2
    BURST_LOSS = 3
    DELAY = 4
    RATE = 5
    CORRUPT = 6
    DUPLICATE = 7
    REORDER = 8


@dataclass(frozen=True)
class Stage:
    """One compiled impairment in one direction's chain (the tuple the C loop receives)."""

    kind: Kind
    name: str
    params: tuple[int, ...]
    seed: int
    shared: int = -1  # freq_drop on "both": the id of the counter the two directions share

    def as_tuple(self) -> tuple[int, str, tuple[int, ...], int, int]:
        return (int(self.kind), self.name, self.params, self.seed, self.shared)


@dataclass(frozen=True)
class Impairment:
    """What the user asked for: a direction, a name, its arguments as typed."""

    direction: str
    name: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join((self.direction, self.name, *self.args))

    @property
    def expression(self) -> str | None:
        """bpf's tcpdump expression: the frames it drops (compiled where the link type is
        known, by the engine)."""
        return " ".join(self.args) if self.name == "bpf" else None

    def compile(self, direction: str, position: int, seed: int) -> Stage:
        if self.name == "bpf":  # freq_drop -1 on the frames its expression matches
            kind, params = Kind.FREQ_DROP, (-1,)
        else:
            kind, params = _SPECS[self.name].compile(self.args)
        shared = position if kind is Kind.FREQ_DROP and self.direction == "both" else -1
        code = DIRECTIONS.index(direction)
        return Stage(kind, self.name, params, stream_seed(seed, code, position), shared)


def splitmix64(state: int) -> tuple[int, int]:
    """One step of splitmix64: (new state, output). The C loop has the same 6 lines."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def stream_seed(seed: int, direction: int, position: int) -> int:
    return splitmix64((seed + ((direction << 16) | position)) & MASK64)[1]


def parse_impairment(text: str) -> Impairment:
    """Parse "[a2b|b2a|both] NAME ARGS..." (direction defaults to both) and check the values."""
    words = text.split()
    if not words:
        raise ImpairmentError("empty impairment")
    direction = words.pop(0) if words[0] in DIRECTIONS else "both"
    if not words:
        raise ImpairmentError(f"{text!r}: missing impairment name after {direction!r}")
    name = ALIASES.get(words[0], words[0])
    if name == "bpf":
        if len(words) < 2:
            raise ImpairmentError("bpf: expected bpf EXPRESSION (the frames it drops)")
        return Impairment(direction, name, tuple(words[1:]))
    if name not in _SPECS:
        known = ", ".join(sorted([*_SPECS, "bpf"]))
        raise ImpairmentError(f"unknown impairment {words[0]!r} (known: {known})")
    impairment = Impairment(direction, name, tuple(words[1:]))
    _SPECS[name].compile(impairment.args)  # validate now, not when traffic arrives
    return impairment


def chains(impairments: list[Impairment], seed: int) -> dict[str, list[Stage]]:
    """Compile the configuration list into the a2b and b2a chains, in configuration order."""
    result: dict[str, list[Stage]] = {"a2b": [], "b2a": []}
    for position, impairment in enumerate(impairments):
        for direction in ("a2b", "b2a"):
            if impairment.direction in (direction, "both"):
                result[direction].append(impairment.compile(direction, position, seed))
    return result


# --- argument checking -------------------------------------------------------------------


def _number(name: str, what: str, text: str, low: float, high: float, integer: bool) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ImpairmentError(f"{name}: {what} {text!r} is not {kind}") from None
    if not (low <= value <= high) or (not integer and not math.isfinite(value)):
        raise ImpairmentError(f"{name}: {what} {text} is out of range {low:g}..{high:g}")
    return value


def _threshold(percent: float) -> int:
    return round(percent / 100 * PROBABILITY_ONE)


def _ns(ms: float) -> int:
    return round(ms * 1_000_000)


@dataclass(frozen=True)
class _Spec:
    kind: Kind
    usage: str
    args: tuple[tuple[str, float, float, bool, float | None], ...]  # what, low, high, int, default

    def compile(self, args: tuple[str, ...]) -> tuple[Kind, tuple[int, ...]]:
        name = self.usage.split()[0]
        required = sum(1 for a in self.args if a[4] is None)
        if not required <= len(args) <= len(self.args):
            raise ImpairmentError(f"{name}: expected {self.usage}, got {len(args)} argument(s)")
        values = [
            _number(name, what, text, low, high, integer)
            for (what, low, high, integer, _), text in zip(self.args, args)
        ]
        values += [spec[4] for spec in self.args[len(args) :]]
        return self.kind, _COMPILERS[self.kind](*values)


def _rate(kbit: float, burst: float, limit: float) -> tuple[int, ...]:
    tau = -(-int(burst) * 8_000_000 // int(kbit))
    return (int(kbit), tau, int(limit))


_COMPILERS = {
    Kind.FREQ_DROP: lambda n: (int(n),),
    Kind.PACKET_LOSS: lambda p: (_threshold(p),),
    Kind.BURST_LOSS: lambda p, r, lb, lg: tuple(_threshold(x) for x in (p, r, lb, lg)),
    Kind.DELAY: lambda ms, jitter: (_ns(ms), _ns(jitter)),
    Kind.RATE: _rate,
    Kind.CORRUPT: lambda p: (_threshold(p),),
    Kind.DUPLICATE: lambda p: (_threshold(p),),
    Kind.REORDER: lambda p, gap: (_threshold(p), int(gap)),
}

_PERCENT = (0.0, 100.0, False)
_SPECS = {
    "freq_drop": _Spec(Kind.FREQ_DROP, "freq_drop N", (("N", -1, 2**31 - 1, True, None),)),
    "packet_loss": _Spec(Kind.PACKET_LOSS, "packet_loss PERCENT", (("PERCENT", *_PERCENT, None),)),
    "burst_loss": _Spec(
        Kind.BURST_LOSS,
        "burst_loss P R [LOSS_BAD [LOSS_GOOD]]",
        (
            ("P (good->bad %)", *_PERCENT, None),
            ("R (bad->good %)", *_PERCENT, None),
            ("LOSS_BAD %", *_PERCENT, 100.0),
            ("LOSS_GOOD %", *_PERCENT, 0.0),
        ),
    ),
    "delay": _Spec(
        Kind.DELAY,
        "delay MS [JITTER_MS]",
        (("MS", 0, 60000, False, None), ("JITTER_MS", 0, 60000, False, 0.0)),
    ),
    "rate": _Spec(
        Kind.RATE,
        "rate KBIT [BURST_BYTES [LIMIT_FRAMES]]",
        (
            ("KBIT", 1, 100_000_000, True, None),
            ("BURST_BYTES", 1, 1 << 30, True, 3000),
            ("LIMIT_FRAMES", 1, 1_000_000, True, 1000),
        ),
    ),
    "corrupt": _Spec(Kind.CORRUPT, "corrupt PERCENT", (("PERCENT", *_PERCENT, None),)),
    "duplicate": _Spec(Kind.DUPLICATE, "duplicate PERCENT", (("PERCENT", *_PERCENT, None),)),
    "reorder": _Spec(
        Kind.REORDER,
        "reorder PERCENT [GAP]",
        (("PERCENT", *_PERCENT, None), ("GAP", 1, 1000, True, 1)),
    ),
}
ALIASES = {"frequency_drop": "freq_drop", "loss": "packet_loss", "limit": "rate"}
NAMES = (*_SPECS, "bpf")
