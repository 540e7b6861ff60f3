"""The data types every source yields: examples and one client's splits."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Example", "ClientInfo", "ClientData"]


@dataclass(frozen=True)
class Example:
    """One instruction-following example. ``instruction`` is the task definition (shared by a client's
    examples for Natural Instructions), ``input`` the instance input (may be empty), ``output`` the reference
    response."""

    instruction: str
    input: str
    output: str
    category: str = ""


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows about a client without loading its examples."""

    client_id: str
    task: str
    category: str
    num_train: int
    num_eval: int = 0
    num_test: int = 0


@dataclass
class ClientData:
    """One client's examples, split into train / eval / test."""

    info: ClientInfo
    train: list[Example] = field(default_factory=list)
    eval: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    @property
    def client_id(self) -> str:
        return self.info.client_id

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "eval", "test"):
            raise ValueError(f"split must be train, eval or test, got {name!r}")
        return getattr(self, name)
