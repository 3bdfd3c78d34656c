"""Errors that mean the user's input is wrong; entry points print them as one line and exit 2."""


class UserInputError(Exception):
    """Bad input (path, option, data). The message names the problem and the fix."""


class NonFiniteActivationError(UserInputError):
    """A calibration activation holds NaN or inf."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (libraries such as transformers write several), cut to
    `limit` characters, so that an `error:` line stays the last line of stderr."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
