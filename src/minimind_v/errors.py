"""The one exception a user ever sees: a mistake in their input, reported in one line."""


class UserError(Exception):
    """Bad usage or bad input. The CLI prints `error: <message>` and exits with status 2.

    The message names the file, line or field at fault, so the user can fix it without a traceback.
    """


def preview(items: list, limit: int = 4, sep: str = ", ") -> str:
    """The first `limit` of `items` for a one-line message, and how many more there are."""
    shown = sep.join(map(str, items[:limit]))
    return shown if len(items) <= limit else f"{shown}{sep}... {len(items) - limit} more"
