"""What every script in scripts/ promises its user: a mistake ends in one line and a non-zero exit status.

- A usage error (argparse, or a script's own check of its arguments through `parser.error`) exits 2 with
  `<script>: error: <what> (see --help)`, without argparse's usage dump; an unknown option close to a known one
  (`--max_iters`, `--lr-rate`) gets "did you mean".
- A runtime error exits 1 with `<script>: error: <message>` on stderr, without a traceback.
- Ctrl-C exits 130 with `<script>: <message>` when the KeyboardInterrupt carries one (the training loop's names the
  iteration reached, the last complete checkpoint and the command that resumes), `<script>: interrupted` otherwise.
- `--debug` (every parser made here has it) or the environment variable IMAGENETS_DEBUG=1 lets the exception
  through, traceback included (also one a script turned into a usage error; argparse's own have none).

Which exceptions are user errors: ValueError (bad values and bad file contents: `ImageNetSDataError`, `RecipeError`,
`RunFolderError`, `ListFileError`, ...), OSError (`FileNotFoundError`, `FileExistsError`, `PermissionError`,
network errors), FloatingPointError (`NonFiniteLossError`) and ImportError (a missing optional dependency, such as
matplotlib for a chart). The library raises these at the source with a message that names the input and the way
out, so the message is printed as it is. A torchvision built for another torch (`operator torchvision::nms does not exist`
when it is first imported) is named as such in one line. Anything else is a bug or something unforeseen: it is one line too, with
the exception's type and a pointer to --debug.

A message is one line. The library's only multi-line messages list the files concerned under their first line,
indented (`MissingFilesError`, `ImageNetSDataError` for several bad files): those listed lines are kept below the
error line; any other line break is joined into the one line.

An exception raised in a DataLoader worker is shown by what the worker raised (torch puts the worker's traceback in
its message).

Scripts use it like this:

    @cli.entry_point
    def main(argv=None) -> int | None:
        parser = cli.ArgumentParser(description=__doc__)
        ...
        args = parser.parse_args(argv)
        if args.no_progress:
            cli.disable_progress_bars()
        ...

    if __name__ == "__main__":
        sys.exit(main())
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

DEBUG_FLAG = "--debug"
DEBUG_ENV = "IMAGENETS_DEBUG"
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)
EXIT_RUNTIME_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

# torch re-raises an exception from a DataLoader worker with the worker's whole traceback as its message.
_WORKER_TRACEBACK = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) and the `--debug` flag. Descriptions keep their line breaks."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            DEBUG_FLAG,
            action="store_true",
            help=f"on an error, show the full traceback instead of one line (or set {DEBUG_ENV}=1)",
        )

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # for --debug in `error`
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self._suggestions(unknown)}")
        return namespace

    def _suggestions(self, unknown: list[str]) -> str:
        """The "; did you mean --max-iters?" tail for unknown options close to known ones (Python 3.11's argparse
        suggests nothing); an underscore counts as a hyphen."""
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        options = [argument.split("=", 1)[0] for argument in unknown if argument.startswith("--") and argument != "--"]
        hints = []
        for option in options:
            spelled = option.replace("_", "-")
            # a known option with a word added (--lr-rate: --lr) before one spelled alike (--drop-path-rate)
            extended = [known_option for known_option in known if spelled.startswith(known_option + "-")]
            if spelled in known:
                close = spelled
            elif extended:
                close = max(extended, key=len)
            else:
                close = next(iter(difflib.get_close_matches(spelled, known, n=1, cutoff=0.6)), None)
            if close is not None:
                hints.append(f"{option} -> {close}" if len(options) > 1 else close)
        return f"; did you mean {', '.join(hints)}?" if hints else ""

    def error(self, message: str) -> NoReturn:
        handled = sys.exc_info()[1]  # a library error a script turned into a usage error (e.g. a bad recipe value)
        if handled is not None and not isinstance(handled, argparse.ArgumentError):
            if debug_requested(getattr(self, "_argv", sys.argv[1:])):
                raise handled
        self.exit(EXIT_USAGE_ERROR, f"{self.prog}: error: {error_lines(message)[0]} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (counts, sizes, iterations)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0 (warm-up iterations and such)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer of at least {low}, got {value}")
    return value


def pixel_size(text: str) -> tuple[int, int]:
    """argparse type: a size in pixels, "96" (square) or "96x128" (height x width), each at least 1."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected N or HxW pixels (e.g. 224 or 224x320), got {text!r}")
    height, width = (int(parts[0]), int(parts[-1]))
    if min(height, width) < 1:
        raise argparse.ArgumentTypeError(f"expected sizes of at least 1 pixel, got {text!r}")
    return height, width


def add_inference_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """The inference-mode options of evaluate.py and predict.py (see `imagenets_hf.evaluation.modes`)."""
    group = parser.add_argument_group("inference mode (default: the official protocol, whole image)")
    group.add_argument("--mode", choices=["whole", "slide"], default="whole", help="whole image or sliding windows")
    group.add_argument(
        "--crop-size",
        type=pixel_size,
        help="slide: window, N or HxW pixels of the processed image (default: the recipe's crop_size)",
    )
    group.add_argument("--stride", type=pixel_size, help="slide: step between windows (default: 2/3 of the window)")
    group.add_argument(
        "--scales",
        nargs="+",
        metavar="SCALE",
        help="test-time augmentation: scales of the processor's sizes, e.g. 0.5 1.0 1.5; 'mmseg' for 0.5 0.75 1.0 "
        "1.25 1.5 1.75 (default: 1.0)",
    )
    group.add_argument("--flip", action="store_true", help="test-time augmentation: also predict the mirror images")


def inference_mode(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The `InferenceMode` of `add_inference_mode_arguments`' options; a bad combination is a usage error."""
    from imagenets_hf.evaluation.modes import MMSEG_SCALES, InferenceMode

    scales = (1.0,)
    if args.scales == ["mmseg"]:
        scales = MMSEG_SCALES
    elif args.scales:
        try:
            scales = tuple(float(text) for text in args.scales)
        except ValueError:
            parser.error(f"--scales: expected numbers (or 'mmseg'), got {' '.join(args.scales)!r}")
    try:
        return InferenceMode(args.mode, args.crop_size, args.stride, scales, args.flip)
    except ValueError as err:
        parser.error(str(err))


def split_choice(*choices: str) -> Callable[[str], str]:
    """argparse type: a split name among `choices` ("train_semi", "validation", ...), also taken in its folder's
    spelling with hyphens ("train-semi"); the value is the split name with underscores."""

    def split(text: str) -> str:
        from imagenets_hf.data.imagenets import split_name  # the one rule for split names

        try:
            name = split_name(text)
        except ValueError:
            name = None
        if name not in choices:
            raise argparse.ArgumentTypeError(f"unknown split {text!r}; expected one of {', '.join(choices)}")
        return name

    return split


def entry_point(main: Callable[[Sequence[str] | None], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a script's `main(argv)`: the wrapped function returns the exit status (None from `main` is 0) and turns
    every error into one line (see the module docstring). Usage errors still raise SystemExit(2) from argparse."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        if debug_requested(sys.argv[1:] if argv is None else argv):
            return main(argv) or 0
        try:
            return main(argv) or 0
        except KeyboardInterrupt as interrupt:
            _print_lines([str(interrupt).strip() or "interrupted"], prefix="")
            return EXIT_INTERRUPTED
        except Exception as error:  # every error ends in one line; --debug shows the traceback
            _print_lines(error_lines(error), prefix="error: ")
            return EXIT_RUNTIME_ERROR

    return run


def debug_requested(argv: Sequence[str]) -> bool:
    """True when IMAGENETS_DEBUG=1 or the arguments hold --debug (or an abbreviation argparse would take for it)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    for argument in argv:
        if argument == "--":
            break
        if len(argument) > 2 and DEBUG_FLAG.startswith(argument):
            return True
    return False


def error_lines(error: BaseException | str) -> list[str]:
    """The error line (first) and any listed lines below it; see the module docstring."""
    mismatch = None if isinstance(error, str) else torch_mismatch(error)
    if mismatch is not None:
        return [mismatch]
    message = error if isinstance(error, str) else _message(error)
    first, *rest = message.strip().splitlines() or [""]
    lines = [first.strip()]
    for line in rest:
        if line.startswith((" ", "\t")) and line.strip():
            lines.append(line.rstrip())  # a listed item under the error line
        elif line.strip():
            lines[0] = f"{lines[0]} {line.strip()}"
    if not isinstance(error, (str, *USER_ERRORS)):
        lines[0] = f"{type(error).__name__}: {lines[0]} (unexpected error; rerun with {DEBUG_FLAG} for the traceback)"
    return lines


# What importing a torchvision built for another torch raises (a CPU torch with a CUDA torchvision, say).
_TORCHVISION_OPERATOR_MISSING = re.compile(r"operator torchvision::\w+ does not exist")


def torch_mismatch(error: BaseException) -> str | None:
    """One line naming the torch and torchvision builds when `error` (or what caused it: transformers and timm wrap
    import errors) is torchvision failing to load its operators into this torch; None otherwise."""
    from importlib.metadata import PackageNotFoundError, version

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _TORCHVISION_OPERATOR_MISSING.search(str(error)):
            try:
                torch_version, torchvision_version = version("torch"), version("torchvision")
            except PackageNotFoundError:
                torch_version = torchvision_version = "?"
            return (
                f"torch {torch_version} and torchvision {torchvision_version} do not match "
                f"({_TORCHVISION_OPERATOR_MISSING.search(str(error)).group(0)}): install matching builds from the same "
                "index, e.g. pip install --force-reinstall torch torchvision --index-url "
                "https://download.pytorch.org/whl/cpu (or the CUDA index your torch came from)"
            )
        error = error.__cause__ or error.__context__
    return None


def _message(error: BaseException) -> str:
    message = str(error)
    if _WORKER_TRACEBACK.match(message):
        # keep what the worker raised: the traceback's last "Type: message" line and what follows it
        name = re.escape(type(error).__name__)
        found = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", message, re.MULTILINE))
        if found:
            message = message[found[-1].end() :]
    if isinstance(error, KeyError) and message.startswith(("'", '"')):
        message = message[1:-1]  # KeyError's str() is the repr of its argument
    return message or type(error).__name__


def _print_lines(lines: list[str], prefix: str) -> None:
    sys.stdout.flush()  # what the script printed before comes first
    prog = os.path.basename(sys.argv[0]) or "imagenets_hf"
    print(f"{prog}: {prefix}{lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(line, file=sys.stderr)
    sys.stderr.flush()


def disable_progress_bars() -> None:
    """Hide the bars the Hugging Face libraries draw on their own: datasets (Arrow cache generation, shard writing),
    transformers (loading and writing weights) and huggingface_hub (downloads). The project's own bars are turned
    off by the `progress=False` argument of the library functions."""
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
