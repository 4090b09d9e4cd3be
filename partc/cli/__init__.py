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
import threading
from collections.abc import Iterator, Sequence

from partc.cli import deploy, model
from partc.errors import PartcError

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


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``partc`` command."""
    parser = argparse.ArgumentParser(
        prog="partc",
        description="partc compiles a PyTorch model for a device / edge / cloud deployment: it traces "
        "the model, chooses where each layer runs, emits per-tier artifacts and runs the pipeline.",
        epilog="run 'partc COMMAND --help' for a command's flags and an example",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model.add_commands(sub)
    deploy.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the partc command line; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
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

