"""Settings fields that are also command-line options: ``option`` declares one, ``flag_of`` names
its flag, ``check_choices`` checks a dataclass's values against the choices its fields declare."""

from __future__ import annotations

from dataclasses import field, fields

from lungxray.errors import ConfigError


def option(flag: str, default=None, *, choices: tuple | None = None, metavar: str | None = None, default_factory=None):
    """A dataclass field that is also a command-line option ``flag`` (with ``choices``, if any)."""
    metadata = {"flag": flag, "choices": choices, "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(cls, name: str) -> str:
    """The command-line flag of field ``name`` of dataclass ``cls`` (its name when it has none)."""
    return next((f.metadata.get("flag") or name for f in fields(cls) if f.name == name), name)


def check_choices(obj) -> None:
    """Every field with choices holds one of them, or a tuple of them (None, where allowed, means
    'the recipe's')."""
    for f in fields(obj):
        choices = f.metadata.get("choices")
        given = getattr(obj, f.name)
        many = isinstance(f.default, tuple)  # a repeated flag (tuple[str, ...]): each value one of them
        if choices and many != isinstance(given, tuple):
            takes = "a list of values" if many else "one value"
            raise ConfigError(f"{f.metadata['flag']} takes {takes}, got {given!r}")
        for value in given if many else (given,):
            if choices and (value is None and many or value is not None and value not in choices):
                raise ConfigError(f"{f.metadata['flag']} must be one of {', '.join(map(str, choices))}, got {value!r}")
