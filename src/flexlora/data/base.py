"""The client-source contract: a fixed list of clients, an in-memory index, and lazy per-client loading."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from typing import ClassVar

from flexlora.data.checks import require_int
from flexlora.data.examples import ClientData, ClientInfo

__all__ = ["ClientSource", "DEFAULT_CACHE_SIZE"]

DEFAULT_CACHE_SIZE = 16  # loaded clients kept in memory; a round samples about 8-10 clients


class ClientSource(ABC):
    """A federated data set: clients, each with its own train / eval / test examples.

    ``client_ids``, ``info`` and ``len`` answer from a small in-memory index (ids, task, category and
    split sizes). ``load`` reads one client's examples on demand; the ``cache_size`` most recently loaded
    clients are kept in an LRU cache, so a federation over 1,455 clients holds only a handful at once.
    ``load`` returns fresh lists each call: callers may shuffle or trim them without touching the cache.

    Subclasses pass their index to ``__init__`` and implement ``_read``.

    Example:
        >>> from flexlora.data import open_source
        >>> source = open_source("synthetic", num_clients=4)
        >>> len(source), source.info("0").num_train > 0
        (4, True)
        >>> source.load("0").train[0].instruction != ""
        True
    """

    format: ClassVar[str]  # the name ``open_source(..., format=...)`` takes

    def __init__(self, name: str, infos: Mapping[str, ClientInfo], cache_size: int = DEFAULT_CACHE_SIZE):
        require_int("cache_size", cache_size, 0)
        if not infos:
            raise ValueError(f"{name}: the source has no clients")
        self.name = name
        self._infos = dict(infos)
        self._cache_size = cache_size
        self._cache: OrderedDict[str, ClientData] = OrderedDict()

    @abstractmethod
    def _read(self, client_id: str) -> ClientData:
        """Read one known client's examples from storage (or generate them)."""

    def client_ids(self) -> list[str]:
        """All client ids, in the source's order (file order, or sorted where the storage has none)."""
        return list(self._infos)

    def info(self, client_id: str) -> ClientInfo:
        """A client's task, category and split sizes, from the index (no examples are read).

        Raises:
            KeyError: the source has no such client.
        """
        try:
            return self._infos[client_id]
        except KeyError:
            raise KeyError(f"{self.name} has no client {client_id!r} ({len(self)} clients)") from None

    def load(self, client_id: str) -> ClientData:
        """One client's examples; reads only this client's records.

        Raises:
            KeyError: the source has no such client.
        """
        data = self._cache.get(client_id)
        if data is None:
            self.info(client_id)
            data = self._read(client_id)
            if self._cache_size:
                self._cache[client_id] = data
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(client_id)
        return ClientData(data.info, list(data.train), list(data.eval), list(data.test))

    def cached_ids(self) -> list[str]:
        """Ids of the clients now held in the LRU cache, least recently used first."""
        return list(self._cache)

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {len(self)} clients>"
