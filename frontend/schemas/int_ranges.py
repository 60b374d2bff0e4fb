"""Every integer in a decoded request body fits a signed 64-bit int, or the request is a 400 naming it.

JSON allows any integer and msgspec decodes one past 2**64 into a Python int; the wire (msgpack) and
torch do not take it, so without this check such a body failed late, as a 503, after state was made."""

from __future__ import annotations

from typing import Any

import msgspec

from frontend.errors import invalid_request

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_int_ranges(value: Any, param: str = "") -> None:
    """Walks structs and lists (free-form JSON objects such as schemas and tool parameters are left
    alone: they travel as text, never as wire integers)."""
    if isinstance(value, msgspec.Struct):
        for name, json_name in zip(value.__struct_fields__, value.__struct_encode_fields__, strict=True):
            check_int_ranges(getattr(value, name), f"{param}.{json_name}" if param else json_name)
    elif isinstance(value, list):
        try:  # the common case, a long list of token ids, at C speed
            if min(value) >= INT64_MIN and max(value) <= INT64_MAX:
                return
        except (TypeError, ValueError):  # mixed or unorderable items, or an empty list
            pass
        for index, item in enumerate(value):
            check_int_ranges(item, f"{param}[{index}]")
    elif type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        raise invalid_request(
            f"`{param}` must be an integer in [{INT64_MIN}, {INT64_MAX}], got {value}.", param or None
        )
