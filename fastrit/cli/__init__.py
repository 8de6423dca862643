"""``fastrit <subcommand>`` and ``python -m fastrit``: one module per subcommand group.

A user error (a missing file, a model that does not load, bad arguments, an unwritable output) prints one line,
``fastrit <subcommand>: error: ...``, and exits with status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from . import attribute, bench, demo, evaluate, mine, prepare, tune
from ._common import HelpFormatter

__all__ = ["main"]

# each group module has add_parsers(subparsers) and sets `run` (a function of the parsed args) on its parsers
_GROUPS = (attribute, mine, prepare, tune, evaluate, bench, demo)

_USER_ERRORS = (OSError, ValueError, TypeError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastrit",
        description="Neuro-RIT, fast and small: neuron attribution, mining and tuning for RAG language models.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in _GROUPS:
        group.add_parsers(subparsers)
    return parser


def _version() -> str:
    from .. import __version__

    return f"fastrit {__version__}"


@contextmanager
def _progress_bars_of_libraries(enabled: bool) -> Iterator[None]:
    """🤗 datasets' and transformers' own progress bars (building a dataset, loading weights) off when ``enabled`` is
    False, as fastrit's are with ``--no-progress``; their previous state restored afterwards."""
    import datasets
    from transformers.utils import logging as transformers_logging

    if enabled:
        yield
        return
    datasets_were_on = not datasets.are_progress_bars_disabled()
    transformers_were_on = transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_were_on:
            datasets.enable_progress_bars()
        if transformers_were_on:
            transformers_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet = getattr(args, "no_progress", False)
    try:
        with _progress_bars_of_libraries(enabled=not quiet):
            args.run(args)
    except KeyboardInterrupt:
        print(f"fastrit {args.command}: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"fastrit {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0
