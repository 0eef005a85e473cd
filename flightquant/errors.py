"""Exceptions with the context a person needs to fix their input."""

from __future__ import annotations

import reprlib

#: longest piece of a caller's input an error message repeats (then "..."): a message
#: travels in gRPC metadata, which a client refuses past ~8-16 KiB
ECHO_LIMIT = 200
#: longest message the server sends (several echoes plus the advice around them)
MESSAGE_LIMIT = 2000

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = ECHO_LIMIT
_REPR.maxother = ECHO_LIMIT
_REPR.maxlong = 60
for _attr in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_REPR, _attr, 8)


def shorten(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, ending in "..." when cut."""
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """A bounded ``repr`` of a caller's value for an error message.

    Deep or long containers, long strings and huge integers are elided (``reprlib``), so
    neither the message's size nor building it depends on the input's size or depth.

    >>> len(echo("x" * 100_000)) <= ECHO_LIMIT
    True
    >>> echo([[[[[1]]]]])
    '[[[[...]]]]'
    >>> echo(10**400)
    '<an integer of 401 digits>'
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        # (str() of an int over 4300 digits raises, by Python's own limit)
        digits = len(str(abs(value))) if value.bit_length() < 14000 else "over 4000"
        return f"<an integer of {digits} digits>"
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails (e.g. recursion inside a user object)
        text = f"<{type(value).__name__}>"
    return shorten(text, limit)


def echo_list(values, items: int = 20, limit: int = 100) -> str:
    """``'a', 'b', ...``: each value echoed (at most ``limit`` characters), at most
    ``items`` of them, then how many more.

    >>> echo_list(["w", "ints"])
    "'w', 'ints'"
    >>> echo_list(range(30), items=2)
    '0, 1 and 28 more'
    """
    values = list(values)
    shown = ", ".join(echo(v, limit) for v in values[:items])
    return shown + (f" and {len(values) - items} more" if len(values) > items else "")


class CodecError(ValueError):
    """A batch that cannot be quantized or decoded; the message says why and what to do."""


class NonFiniteError(ValueError):
    """A NaN or an infinity in the input.

    ``row`` is the row (tensor) and ``element`` the element index within that row; the
    codec replaces ``context`` (default "row N") with the column, the row and the row's
    key before the message reaches a user.
    """

    def __init__(self, row: int, element: int, value: float, context: str = ""):
        self.row = row
        self.element = element
        self.value = value
        where = context or f"row {row}"
        super().__init__(
            f"non-finite value {value!r} in {where}, element {element}: "
            "remove or replace NaN/Inf before quantizing (e.g. numpy.nan_to_num)"
        )
