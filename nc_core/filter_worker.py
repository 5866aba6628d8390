"""Costly <filter>s (RFC 6241 Sections 6 and 8.9) evaluated in worker processes, under a budget.

A server answers all its sessions from one event loop, and an XPath filter can cost
polynomial time in the size of the data (``//*[count(//*[count(//*//*) > 0]) > 0]``
is cubic: 30 s on a fresh server, every other session waiting).  So a filter that
:func:`nc_core.filters.cheap` cannot prove near-linear is not evaluated on the loop:
:class:`FilterRunner` sends it, with the data it filters, to a worker process
(``python -m nc_core.filter_worker``), awaits the answer for at most the budget, and
kills the worker when the budget runs out -- libxml2 cannot be interrupted, a process
can.  The client then gets resource-denied, and the worker is replaced when next needed.

The worker only *selects* (:func:`nc_core.filters.select`): it answers with the
selection as element-child index paths from the data root, which the server maps back
onto its own tree (the worker parsed a serialization of that very tree, so the element
structure is the same) and builds the reply from, in-process and in linear time.  The
worker never sees anything but the filter and the data the user may read, and its
answer is checked before use: a worker that dies or answers garbage is replaced and the
request answered with operation-failed.

Framing, both ways, on the worker's stdin and stdout: a 4-byte big-endian length, a JSON
header of that length, then the raw parts the header's "sizes" announce.  A request is
``{"budget": seconds, "sizes": [f, d]}`` followed by the <filter> element (f octets,
serialized with its in-scope namespace declarations, so the select expression's prefixes
resolve) and the ``<data>`` tree (d octets).  An answer has no parts:
``{"selection": S}`` where S is "whole" or a list of ``[child index, S]`` pairs (element
children only, in document order), or ``{"error": {...}}`` for an RpcError select()
raised (a bad XPath...), or ``{"failed": reason}``.  The worker says ``{"ready": true}``
once it has started.

The worker imports lxml and nc_core.filters, errors and xmlutil only, with json, resource
and signal from the standard library (it starts in about the time of a bare interpreter
plus lxml): the server half of this module imports asyncio and logging inside its
functions.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from lxml import etree

from nc_core import filters
from nc_core.errors import RpcError
from nc_core.xmlutil import XmlRejected, parse_message

if TYPE_CHECKING:
    import asyncio

MAX_HEADER = 1 << 30
"""Largest JSON header accepted (an answer's selection can be long; a garbage length not)."""

START_TIMEOUT = 30.0
"""Seconds a new worker may take to start (not counted in any filter's budget)."""

WHOLE = "whole"


# -- framing and the selection's encoding (both sides) --------------------------------------


def frame(header: dict[str, Any], *parts: bytes) -> bytes:
    """One message: length, JSON header, raw parts (their sizes go in the header)."""
    if parts:
        header = {**header, "sizes": [len(p) for p in parts]}
    body = json.dumps(header, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body + b"".join(parts)


def _elements(parent: etree._Element) -> list[etree._Element]:
    """The element children (comments and processing instructions are not counted: the
    worker's parser drops them, and filters never select them)."""
    return [child for child in parent if isinstance(child.tag, str)]


def encode(parent: etree._Element, selection: filters.Selection | None) -> Any:
    """The selection under parent as child index paths: "whole", or [[index, sub], ...]."""
    if selection is None:
        return WHOLE
    out: list[list[Any]] = []
    for index, child in enumerate(_elements(parent)):
        if child in selection:
            out.append([index, encode(child, selection[child])])
    return out


def decode(parent: etree._Element, encoded: Any) -> filters.Selection | None:
    """The selection that :func:`encode` encoded, on this tree; ValueError if it does not fit."""
    if encoded == WHOLE:
        return None
    if not isinstance(encoded, list):
        raise ValueError("a selection is 'whole' or a list")
    children = _elements(parent)
    selection: filters.Selection = {}
    for item in encoded:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int):
            raise ValueError("a selected child is [index, selection]")
        index, sub = item
        if not 0 <= index < len(children):
            raise ValueError(f"child {index} of {len(children)} does not exist")
        selection[children[index]] = decode(children[index], sub)
    return selection


# -- the worker process ------------------------------------------------------------------------


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    """size octets, or None at the end of the stream."""
    chunks: list[bytes] = []
    while size > 0:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _read_request(stream: IO[bytes]) -> tuple[dict[str, Any], list[bytes]] | None:
    prefix = _read_exactly(stream, 4)
    if prefix is None:
        return None
    length = int.from_bytes(prefix, "big")
    if length > MAX_HEADER:
        raise ValueError("request header too long")
    body = _read_exactly(stream, length)
    if body is None:
        return None
    header = json.loads(body)
    parts: list[bytes] = []
    for size in header.get("sizes", []):
        part = _read_exactly(stream, int(size))
        if part is None:
            return None
        parts.append(part)
    return header, parts


def _no_keys(elem: etree._Element) -> tuple[str, ...]:
    return ()  # select() does not need list keys; build() does, in the server


def answer(filter_xml: bytes, data_xml: bytes) -> dict[str, Any]:
    """The worker's answer to one request (never raises for the request's content)."""
    try:
        filter_elem = parse_message(filter_xml)
        data = parse_message(data_xml)
    except XmlRejected as exc:
        return {"failed": f"unreadable request: {exc}"}
    try:
        selection = filters.select(data, filter_elem, _no_keys)
    except RpcError as err:
        return {
            "error": {
                "tag": err.tag,
                "type": err.type,
                "message": err.message,
                "info": err.info,
                "app_tag": err.app_tag,
            }
        }
    return {"selection": encode(data, selection)}


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """Answer requests until the server closes the pipe (or kills this process)."""
    answers.write(frame({"ready": True}))
    answers.flush()
    while True:
        request = _read_request(requests)
        if request is None:
            return
        header, parts = request
        try:
            if len(parts) != 2:
                raise ValueError("a request has a filter and data")
            if isinstance(header.get("budget"), int | float):
                _limit_cpu(header["budget"])
            reply = answer(parts[0], parts[1])
        except Exception as exc:  # a bug must not leave the server waiting for nothing
            reply = {"failed": type(exc).__name__}
        answers.write(frame(reply))
        answers.flush()


def _limit_cpu(budget: float) -> None:
    """Let the kernel stop this process (SIGXCPU) if it computes much longer than the budget.

    The server kills a worker whose budget ran out; this covers a server that died (or was
    killed) meanwhile, which would otherwise leave the worker computing for hours.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + budget) + 2
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ValueError, OSError):
        pass  # the server's own kill still applies


def main() -> int:
    import signal

    # Ctrl-C on a server in a terminal reaches its workers too: the server stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


# -- the server side -----------------------------------------------------------------------


class WorkerFailed(Exception):
    """A worker died, could not start, or answered something that is not an answer."""


@dataclass(eq=False)
class _Worker:
    process: asyncio.subprocess.Process

    async def ask(self, request: bytes) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(request)
            await stdin.drain()
        except (ConnectionError, OSError) as exc:
            raise WorkerFailed(f"cannot write to the worker: {exc}") from None
        return await _read_answer(stdout)


async def _read_answer(stream: asyncio.StreamReader) -> dict[str, Any]:
    import asyncio

    try:
        length = int.from_bytes(await stream.readexactly(4), "big")
        if length > MAX_HEADER:
            raise WorkerFailed(f"the worker announced an answer of {length} octets")
        body = await stream.readexactly(length)
    except asyncio.IncompleteReadError:
        raise WorkerFailed("the worker exited") from None
    try:
        reply = json.loads(body)
    except ValueError:
        raise WorkerFailed("the worker's answer is not JSON") from None
    if not isinstance(reply, dict):
        raise WorkerFailed("the worker's answer is not an object")
    return reply


def _selection_of(data: etree._Element, reply: dict[str, Any]) -> filters.Selection | None:
    """The worker's answer as a selection of data; RpcError if select() refused the filter."""
    if "error" in reply:
        raise _rpc_error(reply["error"])
    if "selection" not in reply:
        raise WorkerFailed(f"the worker failed: {str(reply.get('failed'))[:200]}")
    try:
        return decode(data, reply["selection"])
    except (ValueError, RecursionError) as exc:
        raise WorkerFailed(f"the worker's selection does not fit the data: {exc}") from None


def _rpc_error(fields: Any) -> RpcError:
    try:
        info = [(str(name), str(text)) for name, text in fields.get("info") or []]
        app_tag = fields.get("app_tag")
        return RpcError(
            str(fields["tag"]),
            str(fields["message"]),
            type=fields["type"],
            info=info,
            app_tag=None if app_tag is None else str(app_tag),
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        raise WorkerFailed("the worker's error is malformed") from None


def _log() -> Any:
    import logging

    return logging.getLogger("cevpn.netconf")


def _refusal(message: str) -> RpcError:
    return RpcError(
        "resource-denied",
        message,
        type="application",
        app_tag="filter-too-costly",
        info=[("bad-element", "filter")],
    )


HOW_TO_NARROW = (
    "Narrow the filter: start it from an absolute path to the data you need, such as "
    "/prefix:container/prefix:list[prefix:key='value']; inside predicates use no absolute "
    "paths and no '//', nor the ancestor, preceding or following axes; or use a subtree filter."
)


class FilterRunner:
    """Applies <filter>s: cheap ones in-process, costly ones in worker processes under a budget.

    At most ``workers`` costly filters are evaluated at once, the others waiting their
    turn (waiting does not count against the budget); one user may have at most
    ``max_pending_per_user`` costly filters running or waiting, so one account cannot
    fill the queue.  Workers start when first needed and are replaced when killed.
    """

    worker_command: tuple[str, ...] = (sys.executable, "-P", "-m", "nc_core.filter_worker")
    """How a worker starts: a fresh interpreter (no shell, no fork of the server's state);
    -P keeps the server's working directory off the worker's import path."""

    def __init__(
        self,
        *,
        workers: int = 2,
        budget: float = 5.0,
        max_pending_per_user: int = 2,
        in_process_steps: int = filters.SUBTREE_COST_LIMIT,
    ) -> None:
        import asyncio

        self.workers = workers
        self.budget = budget
        """Seconds one costly filter may run in its worker."""
        self.in_process_steps = in_process_steps
        """Data nodes a subtree filter the static bound calls costly may visit on the event
        loop before it is handed to a worker (:func:`nc_core.filters.bounded_in_process`)."""
        self.max_pending_per_user = max_pending_per_user
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        """Every live worker, idle or busy."""
        self._pending: dict[str, int] = {}
        """Costly filters running or waiting, per user."""
        self._reapers: set[asyncio.Task[int]] = set()
        self._slots = asyncio.Semaphore(workers)
        self._closed = False

    async def apply(
        self,
        data: etree._Element,
        filter_elem: etree._Element | None,
        keys_of: filters.KeysOf,
        *,
        user: str,
        max_depth: int | None = None,
    ) -> etree._Element:
        """What :func:`nc_core.filters.apply_filter` returns, without stalling the event loop.

        data is only read (it may be a stored datastore tree).  ``max_depth`` cuts each
        selected node that many levels down (:func:`nc_core.filters.limit_depth`).  Raises
        the filter's RpcErrors, resource-denied when the budget runs out or ``user`` has
        too many costly filters pending, operation-failed when a worker fails.
        """
        selection: filters.Selection | None
        if filter_elem is None or filters.cheap(data, filter_elem):
            if max_depth is None:
                return filters.apply_filter(data, filter_elem, keys_of)
            selection = filters.select(data, filter_elem, keys_of)
        elif filters.bounded_in_process(filter_elem):
            try:
                selection = filters.select(
                    data, filter_elem, keys_of, max_steps=self.in_process_steps
                )
            except filters.OverBudget:
                selection = await self.select(data, filter_elem, user=user)
        else:
            selection = await self.select(data, filter_elem, user=user)
        if max_depth is not None:
            selection = filters.limit_depth(data, selection, max_depth)
        return filters.build(data, selection, keys_of)

    async def select(
        self, data: etree._Element, filter_elem: etree._Element, *, user: str
    ) -> filters.Selection | None:
        """:func:`nc_core.filters.select` in a worker, within the budget."""
        pending = self._pending.get(user, 0)
        if pending >= self.max_pending_per_user:
            _log().info(
                "costly filter of user %r refused: %d already running or waiting", user, pending
            )
            raise _refusal(
                f"You already have {pending} costly filters running or waiting, the most one "
                f"user may have; send this one when they are answered.  {HOW_TO_NARROW}"
            )
        self._pending[user] = pending + 1
        try:
            async with self._slots:
                return await self._select_in_worker(data, filter_elem, user)
        finally:
            left = self._pending[user] - 1
            if left:
                self._pending[user] = left
            else:
                del self._pending[user]

    async def _select_in_worker(
        self, data: etree._Element, filter_elem: etree._Element, user: str
    ) -> filters.Selection | None:
        import asyncio

        try:
            worker = await self._take()
        except WorkerFailed as exc:
            _log().warning("no filter worker for user %r: %s", user, exc)
            raise _failed() from None
        request = frame(
            {"budget": self.budget},
            etree.tostring(filter_elem, with_tail=False),  # with its in-scope declarations
            etree.tostring(data, with_tail=False),
        )
        try:
            reply = await asyncio.wait_for(worker.ask(request), self.budget)
            selection = _selection_of(data, reply)
        except TimeoutError:
            self._discard(worker)
            _log().info("filter of user %r stopped: over its %g s budget", user, self.budget)
            raise _refusal(
                f"The filter did not finish within its {self.budget:g} s budget and was "
                f"stopped.  {HOW_TO_NARROW}"
            ) from None
        except WorkerFailed as exc:
            self._discard(worker)
            _log().warning("filter worker failed (user %r): %s", user, exc)
            raise _failed() from None
        except RpcError:
            self._release(worker)
            raise
        except BaseException:  # cancelled (the session closed): the worker is mid-request
            self._discard(worker)
            raise
        self._release(worker)
        return selection

    async def _take(self) -> _Worker:
        """An idle worker, or a new one (its start-up does not count against any budget)."""
        import asyncio

        if self._closed:
            raise WorkerFailed("the filter runner is closed")
        while self._idle:
            worker = self._idle.pop()
            if worker.process.returncode is None:
                return worker
            self._discard(worker)
        try:
            process = await asyncio.create_subprocess_exec(
                *self.worker_command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise WorkerFailed(f"cannot start a worker: {exc}") from None
        worker = _Worker(process)
        self._live.add(worker)
        try:
            assert process.stdout is not None
            hello = await asyncio.wait_for(_read_answer(process.stdout), START_TIMEOUT)
            if hello.get("ready") is not True:
                raise WorkerFailed("the worker did not say it was ready")
        except TimeoutError:
            self._discard(worker)
            raise WorkerFailed(f"the worker did not start within {START_TIMEOUT:g} s") from None
        except BaseException:
            self._discard(worker)
            raise
        return worker

    def _release(self, worker: _Worker) -> None:
        if self._closed:
            self._discard(worker)
        else:
            self._idle.append(worker)

    def _discard(self, worker: _Worker) -> None:
        """Kill a worker (it is replaced when next needed) and reap it in the background."""
        import asyncio

        self._live.discard(worker)
        process = worker.process
        if process.returncode is None:
            try:
                process.kill()
            except ProcessLookupError:
                pass
        if process.stdin is not None:
            process.stdin.close()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        reaper = loop.create_task(process.wait())
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)

    def pending(self, user: str) -> int:
        """Costly filters of this user running or waiting for a worker."""
        return self._pending.get(user, 0)

    @property
    def processes(self) -> list[asyncio.subprocess.Process]:
        """The worker processes alive now (for monitoring and tests)."""
        return [w.process for w in self._live if w.process.returncode is None]

    def close(self) -> None:
        """Kill every worker; a filter being evaluated gets operation-failed."""
        self._closed = True
        self._idle.clear()
        for worker in list(self._live):
            self._discard(worker)

    async def aclose(self) -> None:
        """close(), then wait until the killed workers are reaped."""
        import asyncio

        self.close()
        await asyncio.gather(*self._reapers, return_exceptions=True)

    async def __aenter__(self) -> FilterRunner:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _failed() -> RpcError:
    return RpcError(
        "operation-failed",
        "The filter could not be evaluated: the process evaluating it failed.  Try again; "
        "if it fails again, simplify the filter.",
        type="application",
        info=[("bad-element", "filter")],
    )


if __name__ == "__main__":
    sys.exit(main())
