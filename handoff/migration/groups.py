"""Exception groups of the page pipelines (cross-host migration): one stage fails, the other is
cancelled, and the failure is raised as itself, as the serial loops raised it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def one_failure() -> AsyncIterator[None]:
    """Around a nursery: a group holding a single failure is raised as that failure."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = leaves(group)
        if len(found) != 1:
            raise
        raise found[0] from None


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside `exc`, however nested in groups (`exc` itself if not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]
