"""A node-local worker that keeps the model loaded across messages (deployment, node config ``keep-model=true``).

A SuperNode runs every message in a fresh ClientApp process, which would import torch and transformers and
load the model each time. With ``keep-model=true`` in its node config, the ClientApp process instead forwards
the message to this node's service: a long-lived process, started by the first ClientApp that needs it, which
holds the :class:`~flexlora.engines.flower.worker.Worker` (model, tokenizer, data source) and answers over a
Unix socket in a directory only this user can enter (``$TMPDIR/flexlora-<uid>/``). The forwarding side
imports neither torch nor flexlora's model code.

Wire: each frame is an 8-byte big-endian length and its bytes. A request is a JSON header (``kind``,
``node_id``, ``node_config``, ``run_config``) and the message content as Flower's own protobuf
(``RecordDict``); the answer is a JSON status (``{"ok": true}`` or ``{"error": "..."}``) and, if ok, the reply
content in the same protobuf. Nothing is unpickled. One request at a time; the service exits when the
SuperNode that started it is gone or after ``idle`` seconds without a request.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

__all__ = ["keeps_model", "forward", "serve"]

log = logging.getLogger(__name__)
KEEP_KEY = "keep-model"
MAX_FRAME = 4 << 30  # 4 GiB: an r200 adapter on every projection of a 7B model fits
START_TIMEOUT = 300.0


def keeps_model(node_config: Any) -> bool:
    """Whether the node config asks for a kept worker (``keep-model=true``)."""
    return str(node_config.get(KEEP_KEY, "false")).lower() in ("1", "true", "yes")


def socket_path(node_id: int) -> Path:
    """The node's socket, in a per-user directory of mode 0700."""
    base = Path(tempfile.gettempdir()) / f"flexlora-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    if base.stat().st_uid != os.getuid() or base.stat().st_mode & 0o077:
        raise PermissionError(f"{base} is not private to this user; remove it")
    return base / f"node-{node_id}.sock"


def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack(">Q", len(data)) + data)


def _recv(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">Q", _exact(sock, 8))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return _exact(sock, size)


def _exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        buf += chunk
    return bytes(buf)


# ------------------------------------------------------------------------------------------- ClientApp side
def _connect(path: Path, timeout: float) -> socket.socket:
    """Connect to the node's service, starting it (once, under a lock) if nobody listens."""
    deadline = time.monotonic() + timeout
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if not started:
                path.unlink(missing_ok=True)
                cmd = [
                    sys.executable,
                    "-m",
                    __name__,
                    "--socket",
                    str(path),
                    "--parent-pid",
                    str(os.getppid()),
                ]
                with open(path.with_suffix(".log"), "a") as out:  # not the ClientApp's pipes: they close
                    subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True)
                started = True
            if time.monotonic() > deadline:
                raise TimeoutError(f"the node service at {path} did not start within {timeout:.0f}s")
            time.sleep(0.05)


def forward(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """Have the node's kept worker answer a ``train`` or ``evaluate`` message; returns the reply content.

    Raises:
        RuntimeError: the worker failed (its reason in the message).
    """
    header = {
        "kind": kind,
        "node_id": int(context.node_id),
        "node_config": dict(context.node_config),
        "run_config": dict(context.run_config),
    }
    with _connect(socket_path(context.node_id), START_TIMEOUT) as sock:
        _send(sock, json.dumps(header).encode())
        _send(sock, recorddict_to_proto(content).SerializeToString())
        status = json.loads(_recv(sock))
        if "error" in status:
            raise RuntimeError(f"node worker: {status['error']}")
        proto = ProtoRecordDict()
        proto.ParseFromString(_recv(sock))
    return recorddict_from_proto(proto)


# --------------------------------------------------------------------------------------------- service side
def _answer(header: dict, content: RecordDict) -> RecordDict:
    from flexlora.engines.flower.worker import evaluate_reply, train_reply

    handlers = {"train": train_reply, "evaluate": evaluate_reply}
    if header.get("kind") not in handlers:
        raise ValueError(f"unknown request kind {header.get('kind')!r}")
    context = Context(
        run_id=0,
        node_id=int(header["node_id"]),
        node_config=header["node_config"],
        state=RecordDict(),
        run_config=header["run_config"],
    )
    return handlers[header["kind"]](content, context)


def _watch(parent_pid: int, server: socket.socket, idle: float, last: list[float]) -> None:
    """Close the server when the SuperNode is gone or nothing came for ``idle`` seconds."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() - last[0] > idle:
            break
    server.close()
    os._exit(0)


def serve(path: Path, parent_pid: int, idle: float = 1800.0) -> None:
    """Listen on ``path`` and answer requests one at a time until the parent is gone or ``idle`` passes."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(8)
    last = [time.monotonic()]
    threading.Thread(target=_watch, args=(parent_pid, server, idle, last), daemon=True).start()
    while True:
        conn, _ = server.accept()
        last[0] = float("inf")  # busy: never idle while a request runs
        with conn:
            try:
                header = json.loads(_recv(conn))
                proto = ProtoRecordDict()
                proto.ParseFromString(_recv(conn))
                reply = _answer(header, recorddict_from_proto(proto))
            except Exception as exc:  # one bad request must not stop the node's worker
                log.exception("node service: request failed")
                _send(conn, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            else:
                _send(conn, json.dumps({"ok": True}).encode())
                _send(conn, recorddict_to_proto(reply).SerializeToString())
        last[0] = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="flexlora node service (started by the ClientApp)")
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--idle", type=float, default=1800.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s flexlora-node-service %(message)s")
    serve(args.socket, args.parent_pid, args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
