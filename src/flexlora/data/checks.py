"""Option checks shared by the sources; messages name the option and its value."""

from __future__ import annotations

import math

__all__ = ["require_int", "require_number"]


def require_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value!r}")
    return value


def require_number(name: str, value: object, above: float, at_most: float = math.inf) -> float:
    """``value`` if it is a number in ``(above, at_most]``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not above < value <= at_most:
        bounds = f"> {above}" if at_most == math.inf else f"in ({above}, {at_most}]"
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
    return float(value)
