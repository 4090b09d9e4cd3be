"""The ``partc`` command line: a thin argparse layer over the Python API.

``partc.cli.model`` holds the compiler's commands (inspect, profile, plan, compile) and
``partc.cli.deploy`` the runtime's (run, serve, bundle, testbed); each module's
``add_commands`` adds them to the parser that ``build_parser`` returns.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from partc.cli import deploy, model
from partc.errors import PartcError

log = logging.getLogger("partc")


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
    _quiet_torch(args.verbose)
    try:
        return args.func(args)
    except PartcError as err:
        if args.debug:
            log.exception("traceback")
        print(f"partc: error: {err}", file=sys.stderr)
        return err.exit_code


def _quiet_torch(verbose: int) -> None:
    """Keep torch's own loggers and Python warnings (deprecations) off stderr unless -v / -vv."""
    import torch._logging

    torch._logging.set_logs(all=logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())

