"""Capture filters: tcpdump expressions compiled by libpcap, run by a classic-BPF interpreter.

`compile_filter` asks libpcap (through ctypes, `pcap_open_dead` + `pcap_compile`) for the
program of an expression *for the link's own link type*, so offsets are right on C-HDLC (104),
PPP (50), Frame Relay (107) and Ethernet (1). `run` is the reference interpreter; the C fast
path runs the same programs (`bpf_run` in tunnelscope/nio/fastpath/bpf.c), both forward only
and bounds-checked: a load past the end of the frame rejects it, as in the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

Instruction = tuple[int, int, int, int]  # code, jt, jf, k
Program = list[Instruction]

SNAPLEN = 262144
NETMASK_UNKNOWN = 0xFFFFFFFF
MEMWORDS = 16
MASK = 0xFFFFFFFF


class FilterError(Exception):
    """The expression does not compile (libpcap's message), or libpcap is missing."""

    def __init__(self, text: str, reason: str = "") -> None:
        super().__init__(text)
        self.reason = reason or text  # libpcap's own words ("syntax error")


class _Insn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_Insn))]


@functools.cache
def _libpcap() -> ctypes.CDLL:
    names = ["libpcap.so.0.8", "libpcap.so.1", ctypes.util.find_library("pcap")]
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(_Program),
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_uint32,
        ]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_Program)]
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        return lib
    raise FilterError("capture filters need libpcap (Debian package libpcap0.8)")


def compile_filter(expression: str, linktype: int) -> Program:
    """The BPF program of a tcpdump expression on frames of `linktype`. Raises FilterError."""
    lib = _libpcap()
    handle = lib.pcap_open_dead(linktype, SNAPLEN)
    if not handle:
        raise FilterError(f"libpcap does not know link type {linktype}")
    try:
        program = _Program()
        if lib.pcap_compile(handle, ctypes.byref(program), expression.encode(), 1, NETMASK_UNKNOWN):
            message = lib.pcap_geterr(handle).decode(errors="replace")
            raise FilterError(f"invalid capture filter {expression!r}: {message}", message)
        try:
            return [
                (i.code, i.jt, i.jf, i.k)
                for i in (program.bf_insns[n] for n in range(program.bf_len))
            ]
        finally:
            lib.pcap_freecode(ctypes.byref(program))
    finally:
        lib.pcap_close(handle)


def _load(data: bytes, at: int, size: int) -> int | None:
    if at < 0 or at + size > len(data):
        return None
    return int.from_bytes(data[at : at + size], "big")


_ALU = {
    0x00: lambda a, v: a + v,
    0x10: lambda a, v: a - v,
    0x20: lambda a, v: a * v,
    0x40: lambda a, v: a | v,
    0x50: lambda a, v: a & v,
    0x60: lambda a, v: a << v if v < 32 else 0,
    0x70: lambda a, v: a >> v if v < 32 else 0,
    0x80: lambda a, v: -a,
    0xA0: lambda a, v: a ^ v,
}


def run(program: Program, data: bytes) -> int:
    """Run a program (as libpcap compiled it) on one frame: bytes to keep, 0 = rejected."""
    a = x = 0
    mem = [0] * MEMWORDS
    pc = 0
    length = len(data)
    while True:
        code, jt, jf, k = program[pc]
        cls, mode, op = code & 0x07, code & 0xE0, code & 0xF0
        size = {0x10: 1, 0x08: 2}.get(code & 0x18, 4)
        src = x if code & 0x08 else k
        if cls in (0x00, 0x01):  # LD, LDX
            if mode == 0x00:
                value: int | None = k
            elif mode == 0x80:
                value = length
            elif mode == 0x60:
                value = mem[k]
            elif cls == 0x01:  # MSH: 4 * (low nibble of a byte)
                value = _load(data, k, 1)
                value = None if value is None else (value & 0x0F) * 4
            else:
                value = _load(data, (x + k) & MASK if mode == 0x40 else k, size)
                if mode == 0x40 and x + k > MASK:
                    value = None
            if value is None:
                return 0
            if cls == 0x00:
                a = value
            else:
                x = value
        elif cls == 0x02:
            mem[k] = a
        elif cls == 0x03:
            mem[k] = x
        elif cls == 0x04:
            if op in (0x30, 0x90):
                if src == 0:
                    return 0
                a = a // src if op == 0x30 else a % src
            else:
                a = _ALU[op](a, src) & MASK
        elif cls == 0x05:
            if op == 0x00:
                pc += k
            else:
                taken = {0x10: a == src, 0x20: a > src, 0x30: a >= src}.get(op, a & src != 0)
                pc += jt if taken else jf
        elif cls == 0x06:
            return {0x10: a, 0x08: x}.get(code & 0x18, k)
        else:  # MISC: TAX, TXA
            if code & 0x80:
                a = x
            else:
                x = a
        pc += 1
