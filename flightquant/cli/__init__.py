"""Command line entry point: ``flightquant serve|quantize|dequantize|inspect|imatrix``.

Each sub-command lives in its own module, which adds its arguments and runs it; this file
only wires them together, so the CLI stays a thin layer over the server, the model files
and the API.
"""

from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr (exit 2), like every other CLI error."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"flightquant: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flightquant",
        description="Arrow Flight server and CLI that quantize float tensors to 2/4/8 bits.",
    )
    parser.add_argument("--version", action="version", version=f"flightquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from . import dequantize, imatrix, inspect, quantize, serve

    for command in (serve, quantize, dequantize, inspect, imatrix):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("flightquant: interrupted\n")
        return 130
    except Exception as exc:  # the sub-commands report their own errors; this is the net
        if os.environ.get("FLIGHTQUANT_DEBUG"):
            raise
        sys.stderr.write(
            f"flightquant: error: {type(exc).__name__}: {exc} "
            "(set FLIGHTQUANT_DEBUG=1 for a traceback)\n"
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
