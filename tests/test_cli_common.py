"""Output helpers every command shares: whole lines into pipes, word-boundary cuts on a tty."""

from __future__ import annotations

import io

import pytest

from tunnelscope.cli import common


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


LINE = "  PC1-PC2 pre  > IPv4 10.0.0.1 > 10.0.0.2: ICMP echo request id 4660 seq 2"


def test_a_pipe_gets_the_whole_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdout", io.StringIO())
    monkeypatch.setenv("COLUMNS", "20")
    assert common.fit_to_terminal(LINE) == LINE


def test_a_terminal_gets_a_cut_at_a_word_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdout", Terminal())
    monkeypatch.setenv("COLUMNS", "60")
    fitted = common.fit_to_terminal(LINE)
    assert fitted == "  PC1-PC2 pre  > IPv4 10.0.0.1 > 10.0.0.2: ICMP echo\u2026"
    assert len(fitted) <= 60
    monkeypatch.setenv("COLUMNS", "200")
    assert common.fit_to_terminal(LINE) == LINE


def test_direction_text_names_each_cause() -> None:
    stats = {"received": 30, "forwarded": 18, "dropped": {"freq_drop": 10, "bpf": 2}, "queued": 0}
    assert common.direction_text(stats) == (
        "received 30 forwarded 18 dropped 12 (bpf 2, freq_drop 10)"
    )
