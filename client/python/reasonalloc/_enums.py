"""Proto enum values from plain spellings, derived from the enum descriptors.

Every value of an enum is accepted by its proto name ("GQA_REDUCE_MEAN") and by its short name, the
proto name without the prefix all the enum's values share, in lower case ("mean"); case does not
matter and "-" stands for "_". Numbers and None (the UNSPECIFIED value, 0) pass through.
"""
from __future__ import annotations

import os
from typing import Dict, Union

from google.protobuf.descriptor import EnumDescriptor

EnumValue = Union[str, int, None]


def short_names(enum: EnumDescriptor) -> Dict[str, int]:
    """{short name: number} of every value of `enum`, in declaration order."""
    names = [v.name for v in enum.values]
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[:prefix.rfind("_") + 1]
    return {v.name[len(prefix):].lower(): v.number for v in enum.values}


def parse(enum: EnumDescriptor, value: EnumValue, parameter: str) -> int:
    """The number of `value` in `enum`; ValueError naming `parameter` and the accepted spellings
    when it is none of them."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        if value in enum.values_by_number:
            return value
    elif isinstance(value, str):
        key = value.strip().replace("-", "_")
        by_name = enum.values_by_name.get(key.upper())
        if by_name is not None:
            return by_name.number
        number = short_names(enum).get(key.lower())
        if number is not None:
            return number
    full = ", ".join(v.name for v in enum.values)
    raise ValueError(f"{parameter}: {value!r} is not a {enum.name}; accepted: "
                     f"{', '.join(short_names(enum))} (or {full})")


def short_name(enum: EnumDescriptor, number: int) -> str:
    """The short name of value `number` of `enum`."""
    for name, n in short_names(enum).items():
        if n == number:
            return name
    raise ValueError(f"{number} is not a value of {enum.name}")
