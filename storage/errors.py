"""Errors the CLI reports to users."""


class BadInput(Exception):
    """Bad user input (a wrong id, a corrupted file, a refused query).

    The message is one line naming the problem; the CLI prints it and exits with code 2.
    """
