"""``--config FILE``: every daemon flag from a TOML file, flags on the command line winning.

The file maps each long option of the command line, without its dashes, to a value::

    state-dir = "/var/lib/cevpn-server"
    listen = "[::]:830"
    log-level = "info"
    max-sessions = 512
    debug-libraries = false

Nothing here names an option: every long option of the daemon's parser is a key, so a
flag added to the command line later is configurable without code.  A value is
checked as the flag's would be (its type and choices); a key that is not a flag, a
value of the wrong kind and an unreadable file are refused naming the key and the file.
Command-line flags override the file: the file's values become the parser's defaults.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

NOT_CONFIGURABLE = frozenset({"help", "version", "config"})


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file setting any of these options by its long name without dashes "
        '(listen = "[::]:830"); options given here override it',
    )


def configurable_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each long option of ``parser`` (not its subcommands'), by its name without dashes."""
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option[2:] not in NOT_CONFIGURABLE:
                options[option[2:]] = action
    return options


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` with the values of ``--config FILE`` as defaults.

    The namespace's ``configured`` holds the destinations the file set.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    settings: dict[str, Any] = {}
    if known.config is not None:
        settings = load_config(parser, known.config)
        parser.set_defaults(**settings)
    args = parser.parse_args(argv)
    args.configured = frozenset(settings)
    return args


def load_config(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """{destination: value} from the file, each value checked as its flag would be."""

    def refuse(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: {path}: {message}\n")

    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        refuse(f"cannot read the configuration file: {exc.strerror or exc}")
    except tomllib.TOMLDecodeError as exc:
        refuse(f"not TOML: {exc}")
    options = configurable_options(parser)
    settings: dict[str, Any] = {}
    for key, value in document.items():
        action = options.get(key)
        if action is None:
            refuse(
                f"unknown key {key!r}: the keys are the long options of "
                f"`{parser.prog} --help` without their dashes ({', '.join(sorted(options))})"
            )
        try:
            settings[action.dest] = _value(action, value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            refuse(f"key {key!r}: {exc}")
    return settings


def _value(action: argparse.Action, value: Any) -> Any:
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise TypeError(f"expects true or false, not {value!r}")
        if isinstance(action, argparse._StoreFalseAction):
            return not value
        return action.const if value else action.default
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, item) for item in items]
    return _scalar(action, value)


def _scalar(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"expects a {'string' if action.type is None else 'value'}, not {value!r}")
    if action.type is None and not isinstance(value, str):
        raise TypeError(f"expects a string, not {value!r}")
    converted = value if action.type is None else action.type(str(value))  # type: ignore[operator]
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"invalid choice {converted!r} (choose from {choices})")
    return converted
