"""The ``partc`` command line: a thin argparse layer over the Python API.

``partc.cli.model`` holds the compiler's commands (inspect, profile, plan, compile) and
``partc.cli.deploy`` the runtime's (run, serve, bundle, testbed); each module's
``add_commands`` adds them to the parser that ``build_parser`` returns.

Every way a command ends goes through ``main``: bad input exits with 2 and a failure at
run time with 1, each with one line on stderr (``partc: error: ...``); a stop signal
(SIGINT, SIGTERM, SIGHUP) is raised in the main thread as ``Interrupted``, a
``KeyboardInterrupt``, so that every cleanup (``with``, ``finally``, ``except
BaseException``) runs as for Ctrl-C; further signals wait for the cleanup, and the command
exits with 128 + the signal's number. ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence

from partc.cli import deploy, model
from partc.errors import PartcError
from partc.version import __version__

log = logging.getLogger("partc")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised in the main thread where it would have ended the process.

    Attributes:
        signum: the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a description, keeps indented lines (examples) as they are, and shows every
    flag's default that its help does not already give."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(line if line.startswith(" ") or not line.strip() else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _add_common_flags(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v``, ``-q`` and ``--debug``; ``default`` is SUPPRESS on a command, so that its parser
    overwrites the values given before the command only when given after it."""
    parser.add_argument("-v", "--verbose", action="count", default=default, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress output; log errors only")
    parser.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``partc`` command."""
    parser = argparse.ArgumentParser(
        prog="partc",
        description="partc compiles a PyTorch model for a device / edge / cloud deployment: it traces "
        "the model, chooses where each layer runs, emits per-tier artifacts and runs the pipeline.",
        epilog="run 'partc COMMAND --help' for a command's flags and an example; -v, -q and --debug go before "
        "or after COMMAND",
    )
    parser.add_argument("--version", action="version", version=f"partc {__version__}")
    _add_common_flags(parser, None)
    parser.set_defaults(verbose=0, quiet=False, debug=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model.add_commands(sub)
    deploy.add_commands(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        _add_common_flags(command, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the partc command line; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.ERROR if args.quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        with _stop_signals():
            _quiet_torch(args.verbose)
            return args.func(args)
    except PartcError as err:
        if args.debug:
            log.exception("traceback")
        print(f"partc: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        if args.debug:
            log.exception("traceback")
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"partc: error: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """Turn the first stop signal into ``Interrupted``; ignore those that arrive while it unwinds."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return
    stopping = []

    def stop(signum: int, frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _quiet_torch(verbose: int) -> None:
    """Keep torch's own loggers and Python warnings (deprecations) off stderr unless -v / -vv."""
    import torch._logging

    torch._logging.set_logs(all=logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())

