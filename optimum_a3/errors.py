"""``A3Error``: the base of every error optimum-a3 raises on purpose (bad input, unusable files, a refused
operation), so that callers, and the CLI, can catch the library's own errors in one clause. Each error
also keeps its standard base (``ValueError``, ``FileExistsError``, ``RuntimeError``), as before."""


class A3Error(Exception):
    """An error optimum-a3 raises on purpose; its message is one line that says what to do."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (whitespace runs collapsed), or its type name when it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__
