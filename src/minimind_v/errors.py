"""The one exception a user ever sees: a mistake in their input, reported in one line."""


class UserError(Exception):
    """Bad usage or bad input. The CLI prints `error: <message>` and exits with status 2.

    The message names the file, line or field at fault, so the user can fix it without a traceback.
    """


def first_line(err: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none: a reason that fits in one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def short_list(items: list[str], limit: int) -> str:
    """The first `limit` items, comma-separated, and how many more; "none" for no items."""
    if not items:
        return "none"
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
