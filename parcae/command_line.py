"""The command line of every ``parcae`` verb outside LightningCLI, read from a typed, documented function.

    def fit_loops(results: str, /, *, mean_recurrence: Optional[int] = None) -> None:
        '''Fit L(T) to a loop sweep.

        Args:
            results: test_loops.json or its run directory.
            mean_recurrence: μ_rec (default: read from the file).
        '''

    run_main("fit-loops", fit_loops)          # `parcae fit-loops RESULTS [--mean_recurrence N]`

Parameters before ``/`` are positional (a list one takes several values), the others ``--name`` flags of the
annotated type with the docstring's help (a list flag takes several values: ``--input a b c``); a bool is a switch (``--meta``, ``--meta false``, ``--no_meta``); a
dataclass parameter (``DepthOptions``) adds its fields as flags of their own names, except those the function
declares itself. Every verb also takes ``--config FILE`` (YAML, keys = flag names) and ``--print_config``.
Parsing is jsonargparse's (what LightningCLI uses for fit/validate/test/predict); a mistake is one line.

Ctrl-C and SIGTERM end a verb with one line and status 130 / 143 (``interruptible``). Plain Python, no Lightning:
``python -m parcae.inference.serve`` uses it without importing training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import signal
import sys
import threading
import typing
from argparse import ArgumentError
from typing import Any, Callable, NoReturn, Optional

import docstring_parser
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from parcae.errors import UsageError


def verb_parser(verb: str, function: Callable) -> ArgumentParser:
    """The parser of ``parcae <verb>``, built from ``function``'s signature and docstring."""
    doc = docstring_parser.parse(function.__doc__ or "")
    description = "\n\n".join(d for d in (doc.short_description, doc.long_description) if d)
    parser = ArgumentParser(prog=f"parcae {verb}", description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (keys = flag names)")
    add_parameters(parser, function)
    return parser


def add_parameters(parser: ArgumentParser, function: Callable, skip: frozenset = frozenset()) -> None:
    """The flags of ``function``'s parameters (or a dataclass's fields) on ``parser``, by the rules above."""
    hints = typing.get_type_hints(function)
    helps = {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse(function.__doc__ or "").params}
    params = inspect.signature(function).parameters.values()
    for param in params:
        name, hint, default = param.name, hints.get(param.name, str), param.default
        given = {} if default is inspect.Parameter.empty else {"default": default}
        if name in skip:
            continue
        if dataclasses.is_dataclass(hint):
            add_parameters(parser, hint, skip=frozenset(p.name for p in params))
        elif param.kind is inspect.Parameter.POSITIONAL_ONLY:
            many = typing.get_origin(hint) is list
            nargs = ("*" if given else "+") if many else ("?" if given else None)
            parser.add_argument(name, type=typing.get_args(hint)[0] if many else hint, nargs=nargs,
                                help=helps.get(name), **given)
        elif hint is bool:
            parser.add_argument(f"--{name}", action=ActionYesNo, nargs="?", help=helps.get(name), **given)
        elif typing.get_origin(hint) is list:  # `--input a b c`, as argparse's nargs="+"
            parser.add_argument(f"--{name}", type=typing.get_args(hint)[0], nargs="+", help=helps.get(name),
                                required=not given, **given)
        else:
            parser.add_argument(f"--{name}", type=hint, help=helps.get(name), required=not given, **given)


def _call(function: Callable, parsed) -> Any:
    """Call a verb's function with the parsed values (dataclass parameters rebuilt from their flags)."""
    hints = typing.get_type_hints(function)
    own = inspect.signature(function).parameters
    args, kwargs = [], {}
    for param in own.values():
        hint = hints.get(param.name)
        if dataclasses.is_dataclass(hint):
            value = hint(**{f.name: parsed[f.name] for f in dataclasses.fields(hint) if f.name not in own})
        else:
            value = parsed[param.name]
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[param.name] = value
    return function(*args, **kwargs)


def _one_line(err: Exception, parser: ArgumentParser) -> str:
    """jsonargparse's parse errors (several lines for a value of the wrong type) as one line naming the flag."""
    text = str(err)
    missing = re.match(r"the following arguments are required: (.*)", text)
    if missing:
        flags = {s for action in parser._actions for s in action.option_strings}
        names = [f"--{n}" if f"--{n}" in flags else n for n in missing.group(1).split(", ")]
        return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} required"
    key, given = re.search(r'Parser key "([\w.]+)"', text), re.search(r"(?:Given|Got) value: (.*)", text)
    if key and given:
        choices = re.search(r"Literal\[(.*?)\]", text)
        expected = [t for t in re.findall(r"Expected a <class '(\w+)'>", text) if t != "NoneType"]
        wanted = f"one of {choices.group(1)}" if choices else " or ".join(expected) or "a valid value"
        return f"--{key.group(1)}: {given.group(1).strip()!r} is not {wanted}"
    if key:
        return f"--{key.group(1)}: " + " ".join(text[key.end():].lstrip(": ").split())
    required = re.match(r'Key "([\w.]+)" is required', text)
    if required:
        return f"--{required.group(1)} is required"
    return " ".join(text.split())


def call_verb(verb: str, function: Callable, argv: list[str]) -> Any:
    """Parse ``argv`` for ``parcae <verb>`` and call ``function``; a bad command line is a UsageError."""
    parser = verb_parser(verb, function)
    try:
        parsed = parser.parse_args(argv)
    except ArgumentError as err:
        if str(err).startswith("Unexpected config"):  # jsonargparse says only this, then the file's text
            raise UsageError(_config_problem(argv)) from None
        raise UsageError(_one_line(err, parser)) from None
    return _call(function, parsed)


def _config_problem(argv: list[str]) -> str:
    """Why a ``--config`` is not a set of options, in one line naming the file: empty, or not ``name: value``."""
    import yaml

    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    named += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for value in named:
        try:
            with open(value, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # the parser's own message covers files it could not read
        if loaded is None:
            return f"--config {value} is empty: write the options as `name: value`, one a line"
        if not isinstance(loaded, dict):
            return (f"--config {value} holds a {type(loaded).__name__}, not options: write them as `name: value`, "
                    "one a line")
    return "--config: not options: write them as `name: value`, one a line"


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM: the command stops where it is. A BaseException, so no ``except Exception`` on the
    way swallows it, and not a KeyboardInterrupt, whose handling in Lightning ends the process with status 1."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible(verb: str, hint: Optional[str] = None):
    """Ctrl-C and SIGTERM end the command with one line and status 128 + signal (130, 143), no traceback. What
    was being written says so itself: result files stay ``<name>.partial`` and add a note with their record count
    (parcae.runs.output), checkpoints are written atomically. ``hint`` ends the line (how to resume)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, _raise_interrupted) for s in stops}
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as err:
        for s in stops:  # a second Ctrl-C while we report would only add a traceback
            signal.signal(s, signal.SIG_IGN)
        signum = getattr(err, "signum", signal.SIGINT)
        notes = [*getattr(err, "__notes__", []), *([hint] if hint else [])]
        what = "interrupted" if signum == signal.SIGINT else "terminated"
        print(f"parcae {verb}: {what} ({signal.Signals(signum).name})" + "".join(f"; {n}" for n in notes),
              file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_with_error(verb: str, message: object) -> NoReturn:
    """The one way a verb's user error reaches the terminal: ``parcae <verb>: error: ...``, status 1."""
    sys.exit(f"parcae {verb}: error: {message}")


def run_main(verb: str, function: Callable, argv: Optional[list[str]] = None) -> Any:
    """``python -m <module>`` of a verb: the same command line, one-line errors and interrupts as ``parcae <verb>``."""
    with interruptible(verb):
        try:
            return call_verb(verb, function, sys.argv[1:] if argv is None else argv)
        except UsageError as err:
            exit_with_error(verb, err)
