"""A `synthval` command line as data: conf values become arguments, never command-line text.

An argv is a list of items (`Argv`): a string is a template that renders to exactly one argument
whatever the params hold (the DAGs render templates as strings, never as native objects, so a param
holding ``"['test', '--log-level', 'DEBUG']"`` stays that one string); `Flag` renders its value into one
``--flag=value`` argument (so a value starting with ``-`` cannot pass for a flag); `ParamFlag` turns an
optional or list param into zero, one or one-per-item ``--flag=value``; `Computed` lists arguments built
in Python from the params. Nothing is ever split, spliced or parsed out of a rendered string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def format_arg(value: Any) -> str:
    """One argument's text. Booleans as true/false; small floats in fixed notation (PyYAML reads "1e-05"
    as a string). Anything that is not one value (None, a list, a mapping) is a bug in the DAG."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text or "E" in text:
            text = f"{value:.15f}".rstrip("0").rstrip(".")
        return text
    if isinstance(value, (str, int)):
        return str(value)
    raise TypeError(f"a command-line argument must be one value, got {value!r}")


@dataclass(frozen=True)
class Flag:
    """``--flag=value`` as one argument; ``value`` is a template or a mapped task group's argument.

    The ``=`` form keeps a value that starts with ``-`` a value: ``--split=--log-level`` sets the split.
    """

    flag: str
    value: Any

    def __repr__(self) -> str:
        return f"{self.flag}={self.value}"


@dataclass(frozen=True)
class ParamFlag:
    """``--flag=value`` per value of the param ``param``: none when it is unset (None, "", []), one per
    item when it is a list."""

    flag: str
    param: str

    def __repr__(self) -> str:
        return f"{self.flag}=<each of params.{self.param}>"


@dataclass(frozen=True)
class Computed:
    """Arguments built in Python from the run's context: ``fn(context)`` returns a list, one argument per
    item (strings as they are, numbers and booleans by `format_arg`)."""

    fn: Callable[[Any], list[Any]]

    def __repr__(self) -> str:
        return f"<{self.fn.__name__}()>"


class Argv:
    """A `synthval` command line as a task's ``argv`` template field: a list of items (see the module
    docstring). Airflow renders a callable template field by calling it with the run's context; this
    returns the command line as a list of strings, which is what the task then holds and the UI shows.
    """

    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)

    def __call__(self, *, context: Any, jinja_env: Any = None) -> list[str]:
        return render_argv(self.items, context, jinja_env)

    def serialize(self) -> list[str]:
        """The un-rendered command line, as the serialized DAG (and the UI before a run) shows it."""
        return [item if isinstance(item, str) else repr(item) for item in self.items]

    def __repr__(self) -> str:
        return f"Argv({self.serialize()!r})"


def render_argv(items: list[Any], context: Any, jinja_env: Any = None) -> list[str]:
    """Render argv ``items`` for a run: each string and each `Flag` to exactly one argument."""
    from airflow.sdk.definitions._internal.templater import render_template_to_string

    env = jinja_env or context["dag"].get_template_env()

    def value_of(item: Any) -> Any:
        if isinstance(item, str):
            return render_template_to_string(env.from_string(item), context)
        resolve = getattr(item, "resolve", None)  # an argument of a mapped task group
        return resolve(context) if resolve is not None else item

    argv: list[str] = []
    for item in items:
        if isinstance(item, Flag):
            argv.append(f"{item.flag}={format_arg(value_of(item.value))}")
        elif isinstance(item, ParamFlag):
            argv += param_flags(item.flag, context["params"].get(item.param))
        elif isinstance(item, Computed):
            argv += [format_arg(value) for value in item.fn(context)]
        else:
            argv.append(format_arg(value_of(item)))
    return argv


def param_flags(flag: str, value: Any) -> list[str]:
    """``[flag=value]``, one per item of a list, nothing for an unset value (None, "", [])."""
    if value is None or value == "" or value == []:
        return []
    return [f"{flag}={format_arg(v)}" for v in (value if isinstance(value, list) else [value])]


def set_flags(keys: dict[str, Any], overrides: Any = ()) -> list[str]:
    """``--set=key=value`` for each set value of ``keys`` (dotted config keys), then for each "key=value"
    override."""
    flags = [f"--set={key}={format_arg(value)}" for key, value in keys.items() if value is not None and value != ""]
    return flags + [f"--set={format_arg(override)}" for override in overrides or ()]

