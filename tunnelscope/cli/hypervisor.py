"""`tunnelscope hypervisor`: tunnelscope in ubridge's place, for a GNS3 server."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import sys
import threading
from collections.abc import Callable
from typing import IO

import click

from tunnelscope import __version__
from tunnelscope.cli.common import Address, Failure
from tunnelscope.datapath.engine import Engine
from tunnelscope.lab.control import (
    UBRIDGE_VERSION,
    Switchboard,
    exposure_warning,
    gns3_captures_dir,
    parse_address,
    run_service,
)


@click.command()
@click.option(
    "-H",
    "listen",
    type=Address(listen=True),
    metavar="[HOST:]PORT",
    help="Serve the control protocol here.",
)
@click.option("-v", "show_version", is_flag=True, help="Print `ubridge version X` and exit.")
@click.option(
    "-d",
    "debug",
    type=click.IntRange(min=0),
    default=0,
    metavar="LEVEL",
    help="1: log the exchange.",
)
@click.option(
    "--captures-dir",
    type=click.Path(file_okay=False),
    help="Capture files must lie inside this directory [default: the GNS3 project of the"
    " working directory (its project-files' parent), else the working directory].",
)
@click.option(
    "--log",
    "log_path",
    type=click.Path(dir_okay=False),
    help="Append every request and reply to this file.",
)
@click.option(
    "--install-launcher",
    "launcher",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help="Write an executable GNS3's ubridge_path can point at (with these options), and exit.",
)
@click.option(
    "--backend", type=click.Choice(["auto", "c", "python"]), default="auto", show_default=True
)
def hypervisor(
    listen: str | None,
    show_version: bool,
    debug: int,
    captures_dir: str | None,
    log_path: str | None,
    launcher: str | None,
    backend: str,
) -> None:
    """Stand in for ubridge (`ubridge -H 127.0.0.1:PORT`): GNS3 drives tunnelscope instead.

    GNS3 starts its ubridge as `UBRIDGE_PATH -v` (to check the version), then
    `UBRIDGE_PATH -H 127.0.0.1:PORT [-d 1]`, and drives it over that port. Install a
    launcher and give its path to GNS3 (gns3_server.conf, [Server] ubridge_path = PATH).
    GNS3 starts it in the node's directory (PROJECT/project-files/TYPE/NODE), so by default
    capture files must lie in that node's project; --captures-dir widens or narrows that.

    \b
    Examples:
      tunnelscope hypervisor --install-launcher ~/bin/tunnelscope-ubridge
      tunnelscope hypervisor -H 4242 --log exchange.log     # by hand, then: nc 127.0.0.1 4242
    """
    if show_version:
        click.echo(f"ubridge version {UBRIDGE_VERSION} (tunnelscope {__version__})")
        return
    if launcher:
        _install_launcher(launcher, captures_dir, log_path, backend)
        return
    if not listen:
        raise Failure("give -H [HOST:]PORT (or -v, or --install-launcher PATH)")
    try:
        address = parse_address(listen)
        engine = Engine(backend)
    except ValueError as exc:
        raise Failure(str(exc)) from None
    log_file = _open_log(log_path)
    log = _logger(log_file, echo=debug > 0)
    switchboard = Switchboard(engine, captures_dir or gns3_captures_dir(os.getcwd()))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: engine.stop())

    def ready(bound: tuple[str, int]) -> None:
        click.echo(f"Hypervisor TCP control server started (IP {bound[0]} port {bound[1]}).")
        click.echo(f"Capture files go inside {switchboard.captures}")
        warning = exposure_warning(bound)
        if warning:
            click.echo(f"tunnelscope: warning: {warning}", err=True)
        sys.stdout.flush()

    try:
        notes = run_service(
            switchboard,
            address,
            on_ready=ready,
            log=log,
            on_news=lambda news: click.echo(f"tunnelscope: warning: {news}", err=True),
        )
    except OSError as exc:
        raise Failure(str(exc)) from None
    finally:
        engine.close()
        if log_file:
            log_file.close()
    for note in notes:
        click.echo(note)


def _open_log(path: str | None) -> IO[str] | None:
    if path is None:
        return None
    try:
        return open(path, "a", encoding="utf-8", buffering=1)
    except OSError as exc:
        raise Failure(f"cannot write {path}: {exc.strerror}") from None


def _logger(log_file: IO[str] | None, echo: bool) -> Callable[[str], None] | None:
    """Lines of the exchange to the log file and, with -d, to stdout (GNS3's ubridge.log)."""
    if log_file is None and not echo:
        return None
    lock = threading.Lock()  # connections log from their own threads

    def log(line: str) -> None:
        with lock:
            if log_file:  # several hypervisors may share the file: name the process
                log_file.write(f"[{os.getpid()}] {line}\n")
            if echo:
                click.echo(line)

    return log


def _install_launcher(
    path: str, captures_dir: str | None, log_path: str | None, backend: str
) -> None:
    """A shell script that runs this Python's tunnelscope with the options fixed (without
    --captures-dir, each hypervisor finds its own node's project when it starts)."""
    command = [sys.executable, "-m", "tunnelscope", "hypervisor", "--backend", backend]
    if captures_dir:
        command += ["--captures-dir", os.path.abspath(captures_dir)]
    if log_path:
        command += ["--log", os.path.abspath(log_path)]
    script = (
        "#!/bin/sh\n"
        "# tunnelscope in ubridge's place: GNS3's ubridge_path may point at this file.\n"
        f'exec {" ".join(shlex.quote(word) for word in command)} "$@"\n'
    )
    try:
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(script)
        mode = os.stat(path).st_mode
        os.chmod(path, mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError as exc:
        raise Failure(f"cannot write {path}: {exc.strerror}") from None
    click.echo(f"launcher written: {os.path.abspath(path)}")
    click.echo(f"GNS3: set [Server] ubridge_path = {os.path.abspath(path)}")
