"""Bad command lines as a user types them: one line on stderr, exit status 2, nothing left behind.

The walk enumerates the click tree from the root group, so a command or an option added later
is walked too: every typed option and argument gets values its type must refuse, every command
an unknown option, every group an unknown command, every required parameter a command line
without it. The walk runs in-process through the root group (the one-line form comes from
there); one case per command, and every case the issue names, run the real entry point as a
subprocess.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from command import run_tunnelscope

from tunnelscope.cli import cli
from tunnelscope.cli.common import Address, PortSet
from tunnelscope.demo import free_udp_ports

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Case:
    path: tuple[str, ...]  # the command's words after `tunnelscope`
    words: tuple[str, ...]  # what follows them
    says: str  # a fragment the error line must hold (which parameter, what went wrong)

    @property
    def args(self) -> list[str]:
        return [*self.path, *self.words]

    def __str__(self) -> str:
        return " ".join(self.args)


def walk(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command under `group`, groups included, with the words that name it."""
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from walk(command, (*path, name))


def bad_values(param: click.Parameter) -> list[str] | None:
    """Values the parameter's type must refuse; None for a type that takes any text."""
    kind = param.type
    if isinstance(param, click.Option) and param.is_flag:
        return None
    if isinstance(kind, click.Choice):
        return ["bogus"]
    if isinstance(kind, Address):
        return [
            "127.0.0.1:99999",
            "127.0.0.1:-1",
            "127.0.0.1:port",
            *([] if kind.listen else ["0"]),
        ]
    if isinstance(kind, PortSet):
        return ["0-99999", "abc", "20-10", "0", "1,,2"]
    if isinstance(kind, click.types.IntParamType):  # INT and IntRange
        values = ["abc", "1.5"]
        if isinstance(kind, click.IntRange) and kind.min is not None:
            values.append(str(kind.min if kind.min_open else kind.min - 1))
        if isinstance(kind, click.IntRange) and kind.max is not None:
            values.append(str(kind.max if kind.max_open else kind.max + 1))
        return values
    if isinstance(kind, click.types.FloatParamType):  # FLOAT, FloatRange: nan and inf never
        values = ["abc", "nan", "inf", "-inf"]
        if isinstance(kind, click.FloatRange) and kind.min is not None:
            values.append(str(kind.min if kind.min_open else kind.min - 1))
        if isinstance(kind, click.FloatRange) and kind.max is not None:
            values.append(str(kind.max if kind.max_open else kind.max + 1))
        return values
    if isinstance(kind, (click.types.StringParamType, click.Path)):
        return None
    raise AssertionError(f"the walk knows no bad values for {param.name} of type {kind!r}")


def placeholder(param: click.Parameter) -> str:
    """A value that parses (the command never runs: another parameter is wrong)."""
    return "127.0.0.1:9" if isinstance(param.type, Address) else "x"


def command_cases(path: tuple[str, ...], command: click.Command) -> Iterator[Case]:
    ctx = click.Context(command, info_name=path[-1])
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    required_options = [p for p in command.params if isinstance(p, click.Option) and p.required]

    def option_words(option: click.Parameter, value: str) -> list[str]:
        long = [name for name in option.opts if name.startswith("--")]
        return [f"{long[0]}={value}"] if long else [option.opts[0], value]

    for param in command.params:
        for value in bad_values(param) or ():
            if isinstance(param, click.Option):
                # `--stats -1`: an option whose value may be left out reads -1 as an option
                if getattr(param, "_flag_needs_value", False) and value.startswith("-"):
                    continue
                words = option_words(param, value)
            else:
                before = arguments[: arguments.index(param)]
                words = [*(placeholder(p) for p in before), value]
            yield Case(path, tuple(words), f"invalid value for {param.get_error_hint(ctx)}")
    if not command.context_settings.get("ignore_unknown_options"):  # `filter` passes words on
        yield Case(path, ("--no-such-option",), "no such option")
    if isinstance(command, click.Group):
        yield Case(path, ("no-such-command",), "no such command")
    for param in (*required_options, *(p for p in arguments if p.required)):
        words = [w for p in required_options if p is not param for w in option_words(p, "x")]
        given = arguments[: arguments.index(param)] if param in arguments else arguments
        words += [placeholder(p) for p in given if p.required]
        missing = f"missing {param.param_type_name} {param.get_error_hint(ctx)}"
        yield Case(path, tuple(words), missing)


COMMANDS = list(walk(cli))
CASES = [
    Case((), ("no-such-command",), "no such command"),
    Case((), ("--no-such-option",), "no such option"),
]
CASES += [case for path, command in COMMANDS for case in command_cases(path, command)]


def assert_one_line(code: int, stdout: str, stderr: str, says: str, hint: str | None) -> None:
    """Exit 2, nothing on stdout, exactly one line on stderr: `tunnelscope: error: ...`."""
    assert "Traceback" not in stderr, stderr
    assert code == 2, stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), stderr
    assert lines[0].startswith("tunnelscope: error: "), stderr
    assert says in lines[0], stderr
    if hint is not None:
        assert lines[0].endswith(f" (try '{hint} --help')"), stderr


def help_of(path: tuple[str, ...]) -> str:
    return " ".join(("tunnelscope", *path))


def test_the_walk_covers_every_command_and_typed_option() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"bridge", "decap", "sniff", "probe", "stats", "extcap install"} <= names
    assert len(names) == len(cli.commands) + 1  # extcap's `install`
    walked = {(case.path, case.says) for case in CASES if case.says.startswith("invalid value")}
    for path, option in [(("bridge",), "'--flush-ms'"), (("bridge",), "'--stream'"),
                         (("stats",), "'--count'"), (("sink",), "'--idle'")]:  # fmt: skip
        assert (path, f"invalid value for {option}") in walked


@pytest.mark.parametrize("case", CASES, ids=str)
def test_walk_bad_input_is_one_line(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("TUNNELSCOPE_CONTROL", "TUNNELSCOPE_STREAM_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, case.args)
    assert isinstance(result.exception, SystemExit), result.exception  # nothing else escaped
    assert_one_line(result.exit_code, result.stdout, result.stderr, case.says, help_of(case.path))
    assert os.listdir(tmp_path) == []


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, in `cwd`, with no TUNNELSCOPE_* variable but those in `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELSCOPE_")}
    return run_tunnelscope(*args, cwd=cwd, env={**clean, **env})


SAMPLE = list({case.path: case for case in reversed(CASES)}.values())  # each command's first


@pytest.mark.parametrize("case", SAMPLE, ids=str)
def test_each_command_through_the_entry_point(case: Case, tmp_path: Path) -> None:
    done = run(case.args, tmp_path)
    assert_one_line(done.returncode, done.stdout, done.stderr, case.says, help_of(case.path))
    assert os.listdir(tmp_path) == []


# The invocations of issue 15 (and a few found on the way), each with what the line must name.
# A and B are the two ends of a bridge, C and D probe ends: the command would run if the bad
# value got through, creating x.pcap/out.pcapng (which must not exist afterwards).
ISSUE_CASES = [
    ("bridge A B -w x.pcap --flush-ms -1", "invalid value for '--flush-ms'"),
    ("bridge A B -w x.pcap --flush-ms nan", "invalid value for '--flush-ms'"),
    ("bridge A B -w x.pcap --duration -5", "invalid value for '--duration'"),
    ("bridge A B -w x.pcap --duration nan", "invalid value for '--duration'"),
    ("bridge A B -w x.pcap --stream 127.0.0.1:99999", "invalid value for '--stream'"),
    ("bridge A B -w x.pcap --seed abc", "invalid value for '--seed'"),
    ("bridge A B -w x.pcap --stats 0", "invalid value for '--stats'"),
    ("bridge A B -w x.pcap --stats -1", "no such option '-1'"),  # -1 read as an option
    ("bridge A B -w x.pcap --no-such-option", "no such option '--no-such-option'"),
    ("bridge A B -w x.pcap -c 0", "invalid value for '-c'"),
    ("no-such-command", "no such command 'no-such-command'"),
    ("stats --count -1", "invalid value for '--count'"),
    ("stats --interval nan", "invalid value for '--interval'"),
    ("decode -c -1 in.pcap", "invalid value for '-c' / '--count'"),
    ("decap in.pcap", "give either -w OUT or --split DIR"),
    ("decap in.pcap -w out.pcapng --ports 0-99999", "invalid value for '--ports'"),
    ("blast C --frame bogus", "invalid value for '--frame'"),
    ("blast C --stream -1 --count 1", "invalid value for '--stream'"),  # was struct.error
    ("sink C --idle -1", "invalid value for '--idle'"),
    ("probe --from C", "missing option '--to'"),
    ("probe --from C --to D --count 0", "invalid value for '--count'"),
    ("probe --from C --to D --confidence nan", "invalid value for '--confidence'"),  # ran
    ("sniff -w out.pcapng --ports abc", "invalid value for '--ports'"),
    ("sniff -w out.pcapng --duration nan", "invalid value for '--duration'"),
    ("compare a.pcap b.pcap --window inf", "invalid value for '--window'"),
    ("serve lab.toml --control 127.0.0.1:70000", "invalid value for '--control'"),
    ("hypervisor -H 99999", "invalid value for '-H'"),
    ("stream 127.0.0.1:0 -w x.pcap", "invalid value for 'HOST:PORT'"),
    ("extcap --extcap-interface tunnelscope-sniff --capture --fifo x.pcap --ports 0", "'--ports'"),
]


@pytest.mark.parametrize(("line", "says"), ISSUE_CASES, ids=[line for line, _ in ISSUE_CASES])
def test_issue_invocations_are_one_line_and_leave_nothing(
    line: str, says: str, tmp_path: Path
) -> None:
    ports = iter(free_udp_ports(8))
    ends = {name: f"udp:{next(ports)}:127.0.0.1:{next(ports)}" for name in "ABCD"}
    args = [ends.get(word, word) for word in line.split()]
    done = run(args, tmp_path)
    path = (args[0],) if args[0] in cli.commands else ()
    assert_one_line(done.returncode, done.stdout, done.stderr, says, help_of(path))
    assert os.listdir(tmp_path) == []


def test_a_bad_address_in_the_environment_is_a_usage_error(tmp_path: Path) -> None:
    done = run(["links"], tmp_path, TUNNELSCOPE_CONTROL="127.0.0.1:99999")
    assert_one_line(done.returncode, done.stdout, done.stderr, "'--control'", "tunnelscope links")


def test_a_runtime_check_of_bad_input_is_one_line_too(tmp_path: Path) -> None:
    """-a/-b values are checked by the capture's Ring (no click type): nan never stopped."""
    a, b, c, d = free_udp_ports(4)
    args = ["bridge", f"udp:{a}:127.0.0.1:{b}", f"udp:{c}:127.0.0.1:{d}", "-w", "x.pcap"]
    done = run([*args, "-a", "duration:nan"], tmp_path)
    assert_one_line(done.returncode, done.stdout, done.stderr, "-a duration:nan", None)
    assert os.listdir(tmp_path) == []


def test_help_and_a_bare_command_still_show_the_usage(tmp_path: Path) -> None:
    assert "Usage: tunnelscope bridge" in run(["bridge", "--help"], tmp_path).stdout
    bare = run([], tmp_path)
    assert "Usage: tunnelscope" in bare.stdout + bare.stderr and "error" not in bare.stderr
