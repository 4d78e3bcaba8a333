"""Fixtures of the kvmstub model's SEV tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from kvmstub.uapi import PAGE_SIZE


@pytest.fixture
def memfds(request: pytest.FixtureRequest) -> Iterator[Callable[[], int]]:
    """`make()`: a fresh memfd of the test module's PAGES guest pages, closed after the test."""
    size = request.module.PAGES * PAGE_SIZE
    made: list[int] = []

    def make() -> int:
        fd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        os.close(fd)
