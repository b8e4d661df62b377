"""The app, its consoles and the one way a command fails: one line naming the problem and the fix."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, get_args

import typer
from rich.console import Console
from rich.markup import escape

from upcycle.errors import UpcycleError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    help="Turn a dense Hugging Face model into an exact Mixture-of-Experts model, verify it, train it.",
    epilog="Exit codes: 0 done; 1 verify or demo found the models not equivalent, or cache verify a damaged entry; "
    "2 bad input (one line: the problem, then Fix:); 3 a checkpoint is missing, damaged or cannot be written; "
    "4 training diverged (non-finite loss for too many steps); 128 + N stopped by signal N (130: Ctrl-C).",
)
console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}
EXIT_NOT_EQUIVALENT = 1
EXIT_BAD_INPUT = 2
EXIT_SIGNAL_BASE = 128  # a command a signal stopped exits 128 + its number, as shells report it (Ctrl-C: 130)
NOTHING_WRITTEN = "nothing was left behind. Fix: run the command again."

# Options several commands take, worded once.
SIZE_SYNTAX = "2GB: powers of 1000; 2GiB: of 1024"
ReplaceOutput = Annotated[bool, typer.Option("--force", help="Replace the output if it exists (atomically).")]
ShardSize = Annotated[str, typer.Option(help=f"Maximum size of one safetensors file ({SIZE_SYNTAX}).")]


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from upcycle import __version__

        console.print(f"upcycle {__version__}")
        raise typer.Exit(0)
    STATE["debug"] = debug
    quiet_transformers()
    show_fetching()


def show_fetching() -> None:
    """The library says what it fetches or builds once (a pip download, a de-quantisation, a tokenisation) through
    its loggers; on the command line those lines go to stderr, so nothing slow happens unannounced."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        """Writes to whatever sys.stderr is when a line comes (a test runner swaps it), not the one at set-up."""

        @property
        def stream(self):  # type: ignore[override]
            return sys.stderr

        @stream.setter
        def stream(self, _value) -> None:
            pass

    for name in ("upcycle.assets", "upcycle.train.token_cache", "upcycle.hub"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = CurrentStderr()
            handler.setFormatter(logging.Formatter("upcycle: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


def one_of(literal: Any) -> str:
    """An option's choices as --help shows them, from the Literal the library declares and checks them with (the
    library's check keeps its one-line error and fix)."""
    return "[" + "|".join(get_args(literal)) + "]"


def quiet_transformers() -> None:
    """transformers' per-tensor loading bars and advisory warnings drown the report; errors still show."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].utils.logging.disable_progress_bar()


@contextmanager
def failing(interrupted: str = NOTHING_WRITTEN) -> Iterator[None]:
    """A command's work: an UpcycleError or a Ctrl-C inside becomes the command's one-line failure (`fail`)."""
    try:
        yield
    except (UpcycleError, KeyboardInterrupt) as error:
        raise fail(error, interrupted) from None


def fail(error: BaseException, interrupted: str = NOTHING_WRITTEN) -> typer.Exit:
    """One line naming the problem and the fix; the traceback only with --debug. ``interrupted`` is what a Ctrl-C
    left behind and how to go on, which only the command knows."""
    if STATE["debug"]:
        console.print_exception()
    if isinstance(error, UpcycleError):
        err_console.print(f"[bold red]error:[/] {escape(error.line())}", highlight=False)  # 'upcycle[gguf]' stays
        return typer.Exit(error.exit_code)
    if isinstance(error, KeyboardInterrupt):
        err_console.print(f"[bold red]interrupted:[/] {escape(interrupted)}", highlight=False)
        return typer.Exit(EXIT_SIGNAL_BASE + getattr(error, "signum", signal.SIGINT))
    raise error
