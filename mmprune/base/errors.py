"""Errors that mean the user's input is wrong; entry points print them as one line and exit 2."""


class UserInputError(Exception):
    """Bad input (path, option, data). The message names the problem and the fix."""


class NonFiniteActivationError(UserInputError):
    """A calibration activation holds NaN or inf."""
