"""``python -m distcomp.launch.agent ARGS``: torch's elastic agent (``torchrun ARGS``) with two fixes of distcomp's.

* **Stores bind to their own address.** torch's c10d TCPStore servers listen on
  every interface: the rendezvous store (``--rdzv-endpoint``, on the node that
  hosts it) and the store the agent of rendezvous rank 0 hosts for its workers
  (a free port, torch >= 2.4). Here every store server this agent starts binds
  only to the address it advertises (the endpoint's host, or ``--local-addr``),
  so a single-node job listens on 127.0.0.1 alone. Where that address is a host
  name (give ``addr=IP`` in the hostfile) or not one of this machine's, the store
  falls back to torch's every-interface listen.
* **A fresh worker store each rendezvous round.** torch >= 2.4 hands the workers
  a store hosted by the agent and keeps it across restarts: restarted workers
  then read the previous attempt's keys (gloo dials a dead peer: "Connection
  refused"). Here every round gets a new one, as the first round does, so
  ``--max-restarts`` keeps the store on the agent (bound as above) instead of
  falling back to ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, under which the
  workers' rank 0 hosts a store on every interface.
* **Worker output arrives in whole lines.** With ``--tee``, torch tails each
  worker's log file and copies what it reads, including half-written lines
  (``readline`` at end-of-file): two ranks' output could then be glued into
  one line. Here a partial line waits for its end before it is written.

All three replace torch internals (``torch.distributed.TCPStore`` as the
rendezvous modules see it, ``DynamicRendezvousHandler.next_rendezvous``,
``tail_log.tail_logfile``); where torch has moved them, the agent logs a warning
and runs unchanged (with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for restarts).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from threading import Event
from typing import TYPE_CHECKING, Any, TextIO

import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

logger = logging.getLogger("distcomp.launch.agent")


def bound_listener(host: str, port: int) -> socket.socket | None:
    """A listening socket on ``host:port`` only (``port`` 0: a free one); ``None`` unless ``host`` is a local IP.

    A host *name* is left to torch: resolved here it may give another address than
    the other hosts get for it (Debian maps its own name to 127.0.1.1).
    """
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    family, kind, proto, _, addr = socket.getaddrinfo(str(ip), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:  # the address is another machine's
            return None
        raise
    sock.listen(4096)
    return sock


class BoundTCPStore(dist.TCPStore):
    """A TCPStore whose server listens on ``host_name`` alone (see the module docstring)."""

    def __init__(self, host_name: str, port: int, *args: Any, is_master: bool = False, **kwargs: Any) -> None:
        if is_master and kwargs.get("master_listen_fd") is None:
            sock = bound_listener(host_name, port)
            if sock is None:
                logger.info(
                    "%s is a name or not an address of this machine: the store listens on every interface", host_name
                )
            else:
                self._listener = sock  # the server uses this descriptor: it must live as long as the store
                port = sock.getsockname()[1]
                kwargs["master_listen_fd"] = sock.fileno()
                kwargs.setdefault("wait_for_workers", False)
        # In kwargs, not as is_master=: beside *args the type checker cannot rule out a positional is_master too.
        kwargs["is_master"] = is_master
        super().__init__(host_name, port, *args, **kwargs)


def tail_whole_lines(
    header: str,
    file: str,
    dst: TextIO,
    finished: Event,
    interval_sec: float,
    log_line_filter: Callable[[str], bool] | None = None,
) -> None:
    """torch's ``tail_logfile``, except that a line is written only once its newline is there."""
    while not os.path.exists(file):
        if finished.is_set():
            return
        time.sleep(interval_sec)
    partial = ""
    with open(file, errors="replace") as fp:
        while True:
            text = fp.readline()
            if text.endswith("\n") or (not text and finished.is_set() and partial):
                line, partial = partial + (text or "\n"), ""
                if log_line_filter is None or log_line_filter(line):
                    dst.write(f"{header}{line}")
                    dst.flush()
            elif text:
                partial += text
            elif finished.is_set():
                break
            else:
                time.sleep(interval_sec)


def _fresh_store_each_round(handler_cls: type[DynamicRendezvousHandler]) -> bool:
    """Make every rendezvous round of ``handler_cls`` build a new worker store; False where torch changed."""
    original = getattr(handler_cls, "next_rendezvous", None)
    code = getattr(handler_cls.__init__, "__code__", None)
    # The two attributes torch caches the worker store in: reset, the round builds a new store as the first does.
    if (
        original is None
        or code is None
        or not {"_shared_tcp_store_server", "_bootstrap_store_info"} <= set(code.co_names)
    ):
        return False

    def next_rendezvous(self: Any) -> Any:
        self._shared_tcp_store_server = None
        self._bootstrap_store_info = None
        return original(self)

    handler_cls.next_rendezvous = next_rendezvous  # type: ignore[method-assign]  # the patch: torch's method replaced
    return True


def patch_torch() -> None:
    """Install :class:`BoundTCPStore`, a fresh store per round and :func:`tail_whole_lines` in torch's agent."""
    try:
        from torch.distributed.elastic.multiprocessing import tail_log
        from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous
    except ImportError as exc:
        logger.warning("torch's agent modules moved (%s): stores listen on every interface, lines may split", exc)
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        return
    if not _fresh_store_each_round(dynamic_rendezvous.DynamicRendezvousHandler):
        logger.warning("torch's rendezvous handler changed: restarted workers get a store of their own")
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    replacements = (
        (dist, "TCPStore", BoundTCPStore),
        (c10d_rendezvous_backend, "TCPStore", BoundTCPStore),
        (tail_log, "tail_logfile", tail_whole_lines),
    )
    for module, name, replacement in replacements:
        if hasattr(module, name):
            setattr(module, name, replacement)
        else:
            logger.warning("%s.%s is gone in this torch: left as it is", module.__name__, name)


def main(argv: Sequence[str] | None = None) -> None:
    """Run torch's agent with ``argv`` (torchrun's options) after :func:`patch_torch`."""
    from torch.distributed import run as torchrun

    args = list(sys.argv[1:] if argv is None else argv)
    patch_torch()
    log_dir = None
    if "--log-dir" not in args and "--tee" in args:
        # torch would leave its tee files in a fresh /tmp folder for good; this one goes when the agent ends.
        log_dir = tempfile.mkdtemp(prefix="distcomp-agent-")
        args = ["--log-dir", log_dir, *args]
    try:
        torchrun.main(args)
    finally:
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
