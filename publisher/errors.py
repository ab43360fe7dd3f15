"""Errors a user can act on. The CLI prints them as one line and exits with their code."""

from __future__ import annotations


class PublisherError(Exception):
    """A failure caused by input or environment, reported without a traceback."""

    exit_code = 1


class RecipeError(PublisherError):
    """The recipe (or another user-supplied file) is invalid. Message: `file:line: field: problem`."""

    exit_code = 2


class ParityError(PublisherError):
    """A converted component is further from the PyTorch reference than the recipe allows."""

    exit_code = 3


class HubError(PublisherError):
    """Publishing to the Hub failed (auth, namespace, concurrency, network)."""

    exit_code = 4
