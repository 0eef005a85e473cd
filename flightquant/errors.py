"""Exceptions with the context a person needs to fix their input."""

from __future__ import annotations


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
