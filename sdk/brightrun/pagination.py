"""Auto-paginating lists (AIP-158).

``client.jobs.list(...)`` returns a :class:`Pager`: iterate it for every item
across pages (fetched lazily, one page at a time), or call :meth:`Pager.iter_pages`
for the pages themselves with their opaque ``next_page_token``. A pager can be
iterated more than once; each iteration starts again from its first page.
:class:`AsyncPager` is the same with ``async for``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["AsyncPager", "Page", "Pager"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list: its items, the token of the next page ("" on the
    last) and, where the server counts them, the matches across all pages."""

    items: tuple[T, ...]
    next_page_token: str
    total_size: int | None = None

    @property
    def is_last(self) -> bool:
        return not self.next_page_token

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class Pager(Generic[T]):
    """Items of a paged list; see the module docstring."""

    def __init__(self, fetch: Callable[[str], Page[T]], *, page_token: str = "", limit: int | None = None) -> None:
        self._fetch = fetch
        self._start = page_token
        self._limit = limit

    def iter_pages(self) -> Iterator[Page[T]]:
        """Each page in turn, starting at the pager's first page token."""
        token = self._start
        while True:
            page = self._fetch(token)
            yield page
            if page.is_last or page.next_page_token == token:
                return
            token = page.next_page_token

    def __iter__(self) -> Iterator[T]:
        remaining = self._limit
        if remaining is not None and remaining <= 0:
            return
        for page in self.iter_pages():
            for item in page.items:
                yield item
                if remaining is not None:
                    remaining -= 1
                    if remaining <= 0:
                        return

    def first(self) -> T | None:
        """The first item, or None for an empty list (fetches one page)."""
        return next(iter(self), None)

    def to_list(self) -> list[T]:
        """Every item (fetches every page)."""
        return list(self)


class AsyncPager(Generic[T]):
    """Items of a paged list, for ``async for``; see the module docstring."""

    def __init__(
        self, fetch: Callable[[str], Awaitable[Page[T]]], *, page_token: str = "", limit: int | None = None
    ) -> None:
        self._fetch = fetch
        self._start = page_token
        self._limit = limit

    async def iter_pages(self) -> AsyncGenerator[Page[T], None]:
        """Each page in turn, starting at the pager's first page token."""
        token = self._start
        while True:
            page = await self._fetch(token)
            yield page
            if page.is_last or page.next_page_token == token:
                return
            token = page.next_page_token

    async def __aiter__(self) -> AsyncGenerator[T, None]:
        remaining = self._limit
        if remaining is not None and remaining <= 0:
            return
        async with aclosing(self.iter_pages()) as pages:
            async for page in pages:
                for item in page.items:
                    yield item
                    if remaining is not None:
                        remaining -= 1
                        if remaining <= 0:
                            return

    async def first(self) -> T | None:
        """The first item, or None for an empty list (fetches one page)."""
        async with aclosing(self.__aiter__()) as items:
            async for item in items:
                return item
        return None

    async def to_list(self) -> list[T]:
        """Every item (fetches every page)."""
        return [item async for item in self]
