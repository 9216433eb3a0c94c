"""Device text on the operator's terminal: data, never markup or terminal control.

A device's status and events are its own to write. Printed as they came, an ESC sequence
could retitle the terminal, clear it or write the operator's clipboard (OSC 52), rich markup
could restyle or crash the table, and a lone surrogate could crash the encoder. Everything
a device wrote goes through :func:`printable` before a terminal sees it, and through
:func:`markup` where rich renders markup. ``--json`` output needs neither: JSON escapes
control characters and surrogates itself.
"""

from __future__ import annotations

import re

from rich.markup import escape

# C0 and C1 controls (ESC, CSI, OSC, BEL, ...), DEL, and lone surrogates; tabs and newlines included: a
# device's value is one cell or one line
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(value: object) -> str:
    """``value`` as text a terminal shows as it is: every control character and surrogate as U+FFFD."""
    return _UNPRINTABLE.sub("\ufffd", str(value))


def markup(value: object) -> str:
    """:func:`printable`, escaped for rich markup."""
    return escape(printable(value))
