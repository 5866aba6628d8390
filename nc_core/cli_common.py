"""Command-line pieces shared by cevpn-server and cevpn-agent.

Both commands serve NETCONF over SSH from a state directory (datastores, host
key, locks) and share the same subcommands: ``adduser`` to create an account
before the first start (no account exists by default; nothing is anonymous),
``host-key`` to print the public host key clients must pin, and ``validate``
to check instance documents against the served YANG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from nc_core.config_file import add_config_argument
from nc_core.log_setup import LOG_FORMATS, configure_logging
from nc_core.schema import Schema, ValidationFailed
from nc_core.transaction import Application

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]")
    return host or "::", int(port)


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int = 830) -> None:
    parser.add_argument("--state-dir", type=Path, help="state directory (datastores, host key)")
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("::", default_port),
        metavar="HOST:PORT",
        help=f"address to listen on (default: all addresses, port {default_port})",
    )
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=64 * 1024 * 1024,
        metavar="OCTETS",
        help="largest NETCONF message accepted (default 64 MiB)",
    )
    parser.add_argument(
        "--recovery-user",
        metavar="NAME",
        help="an account NACM never restricts: the recovery session of RFC 8341 3.4, "
        "for repairing a rule set that locked everyone out (default: none)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=256,
        metavar="N",
        help="NETCONF sessions at most (default 256; the last 16 only for administrators)",
    )
    parser.add_argument(
        "--max-sessions-per-user",
        type=int,
        default=64,
        metavar="N",
        help="NETCONF sessions one account may hold (default 64)",
    )
    parser.add_argument(
        "--filter-budget",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="time an XPath or subtree filter that may be costly can run (in a worker "
        "process) before it is refused with resource-denied (default 5)",
    )
    parser.add_argument(
        "--metrics-listen",
        type=parse_listen,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics "
        "(default: off; :PORT is every address)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="'text': lines (without timestamps under systemd's journal), or 'json': one "
        "object a line for log pipelines (default text)",
    )
    parser.add_argument(
        "--debug-libraries",
        action="store_true",
        help="log asyncssh, paramiko and ncclient at DEBUG too (default: their warnings only)",
    )


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line both servers share: serve options and common subcommands."""
    from nc_core.version import version_text

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=version_text(prog))
    add_config_argument(parser)
    add_server_arguments(parser)
    return parser


def add_common_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    add = commands.add_parser(
        "adduser",
        help="create or update a NETCONF account in the state directory (server stopped)",
        description="Add an account to /system/authentication/user of the running "
        "datastore, with a password (read from a file, first line) and/or SSH public keys, "
        "and put it in NACM groups.  Group 'admin' has full access.",
    )
    add.add_argument("--state-dir", type=Path, required=True)
    add.add_argument("name")
    add.add_argument("--password-file", type=Path, help="file whose first line is the password")
    add.add_argument(
        "--key", type=Path, action="append", default=[], help="OpenSSH public key file"
    )
    add.add_argument("--group", action="append", default=[], help="NACM group (repeatable)")

    hk = commands.add_parser(
        "host-key",
        help="print the SSH host public key clients must pin",
        description="Print the host public key as an OpenSSH public key line (key type, key, "
        "comment), or with --known-hosts as one known_hosts line.",
    )
    hk.add_argument("--state-dir", type=Path, required=True)
    hk.add_argument(
        "--known-hosts",
        metavar="HOST[:PORT][,...]",
        type=known_hosts_patterns,
        help="print a known_hosts line for these hosts instead ('PATTERNS KEYTYPE KEY', "
        "no comment); HOST:PORT becomes [HOST]:PORT as OpenSSH looks it up (port 22 "
        "stays HOST); an IPv6 address with a port is written [ADDR]:PORT",
    )

    show = commands.add_parser(
        "stored-config",
        help="print a datastore as the state directory keeps it (also while serving)",
        description="Print the last committed running (or startup) configuration kept in the "
        "state directory, as XML, without disturbing a server that uses it.  It holds what "
        "the datastore holds, password hashes and keys included: the directory is 0700.",
    )
    show.add_argument("--state-dir", type=Path, required=True)
    show.add_argument("--datastore", choices=("running", "startup"), default="running")

    cmd = commands.add_parser(
        "validate",
        help="check configuration documents (XML or RFC 7951 JSON) against the served YANG",
        description="Validate instance documents with libyang: types, patterns, ranges, "
        "mandatory, unique, leafref, must and when.  Exit status 1 if any is invalid.",
    )
    cmd.add_argument("documents", nargs="+", type=Path, metavar="FILE")


def run_common_command(
    args: argparse.Namespace,
    modules: Sequence[str],
    make_app: Callable[[], Application],
    offline_app: Callable[[Path], Application] | None = None,
) -> int | None:
    """Run validate, adduser or host-key if that is the command; None when serving.

    ``offline_app`` builds the application on a scratch state directory for
    ``validate``, so a document is checked exactly as a commit would be (the
    application's validate phase, as a dry run), not by YANG alone.
    """
    if args.command == "validate":
        if offline_app is not None:
            return asyncio.run(run_full_validate(offline_app, args.documents))
        return run_validate(Schema(modules), args.documents)
    if args.command == "adduser":
        return run_adduser(args, make_app)
    if args.command == "host-key":
        return run_host_key(args)
    if args.command == "stored-config":
        return run_stored_config(args, make_app)
    return None


def run_stored_config(args: argparse.Namespace, make_app: Callable[[], Application]) -> int:
    """Print a committed datastore from the state directory, read-only."""
    from nc_core.server import LOCK_FILE

    state_dir: Path = args.state_dir
    if not (state_dir / LOCK_FILE).exists():  # a mistyped path: make nothing there
        print(f"stored-config: {state_dir} holds no server state", file=sys.stderr)
        return 1
    data = make_app().persistence(state_dir).peek(args.datastore)
    if data is None:
        print(f"stored-config: no {args.datastore} configuration in {state_dir}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(data if data.endswith(b"\n") else data + b"\n")
    return 0


def run_validate(schema: Schema, documents: list[Path]) -> int:
    status = 0
    for path in documents:
        try:
            schema.parse_config_file(path)
        except ValidationFailed as exc:
            status = 1
            for issue in exc.issues:
                where = f"\n    at {issue.path}" if issue.path else ""
                print(f"{path}: invalid: {issue.message}{where}", file=sys.stderr)
        except (OSError, ValueError) as exc:
            status = 1
            print(f"{path}: {exc}", file=sys.stderr)
        else:
            print(f"{path}: valid")
    return status


async def run_full_validate(make_app: Callable[[Path], Application], documents: list[Path]) -> int:
    """Check each document as a commit of it would be: YANG, then the application's rules
    (NetconfServer.check_configuration), in a server that never listens."""
    import tempfile

    from nc_core.errors import RpcError, RpcErrors
    from nc_core.server import NetconfServer, ServerOptions

    status = 0
    with tempfile.TemporaryDirectory(prefix="cevpn-validate-") as scratch:
        server = NetconfServer(ServerOptions(state_dir=Path(scratch)), make_app(Path(scratch)))
        for path in documents:
            try:
                root = server.validator.load_document(path)
                await server.check_configuration(root, None)
            except RpcErrors as exc:
                status = 1
                for error in exc.errors:
                    _print_invalid(path, error)
            except RpcError as error:
                status = 1
                _print_invalid(path, error)
            except (OSError, ValueError) as exc:
                status = 1
                print(f"{path}: {exc}", file=sys.stderr)
            else:
                print(f"{path}: valid")
        server.close()
    return status


def _print_invalid(path: Path, error: Any) -> None:
    where = f"\n    at {error.path}" if error.path else ""
    print(f"{path}: invalid: {error.message}{where}", file=sys.stderr)


def run_adduser(args: argparse.Namespace, make_app: Callable[[], Application]) -> int:
    from nc_core.server import NetconfServer, ServerOptions, StateDirLocked

    password = None
    if args.password_file is not None:
        lines = args.password_file.read_text().splitlines()
        password = lines[0] if lines else ""
        if not password:
            print(f"{args.password_file}: empty password", file=sys.stderr)
            return 2
    keys = [line for path in args.key for line in path.read_text().splitlines() if line.strip()]
    if password is None and not keys:
        print("adduser: give --password-file or --key (an account needs a way in)", file=sys.stderr)
        return 2
    server = NetconfServer(ServerOptions(state_dir=args.state_dir), make_app())
    try:
        server.add_user_offline(args.name, password=password, public_keys=keys, groups=args.group)
    except StateDirLocked as exc:
        print(
            f"adduser: {exc}: stop it first, or add the user over NETCONF "
            "(/system/authentication/user and /nacm/groups)",
            file=sys.stderr,
        )
        return 1
    except ValueError as exc:
        print(f"adduser: {exc}", file=sys.stderr)
        return 2
    groups = f" in group(s) {', '.join(args.group)}" if args.group else ""
    print(f"user {args.name!r} saved{groups}")
    return 0


def run_host_key(args: argparse.Namespace) -> int:
    """Print the host key clients pin, from a state directory a server uses.

    A mistyped directory must not yield a brand-new key that an operator then
    pins: the key is printed (and made, the first time) only where a server
    has already left its state (an account added, or a start).
    """
    from nc_core.server import LOCK_FILE
    from nc_core.transport_ssh import HOST_KEY_FILE, host_key_line

    state_dir: Path = args.state_dir
    if not (state_dir / HOST_KEY_FILE).exists() and not (state_dir / LOCK_FILE).exists():
        print(
            f"host-key: {state_dir} holds no server state (no host key, never used by "
            "adduser or a server): check the path, or run the server once first",
            file=sys.stderr,
        )
        return 1
    line = host_key_line(state_dir)
    if args.known_hosts is not None:
        key_type, key = line.split()[:2]
        line = f"{args.known_hosts} {key_type} {key}"
    print(line)
    return 0


def known_hosts_patterns(text: str) -> str:
    """The host field of a known_hosts line for ``HOST[:PORT][,HOST[:PORT]...]``.

    OpenSSH looks a host up as ``HOST`` on port 22 and as ``[HOST]:PORT`` on any other;
    scrapli's paramiko and asyncssh transports look it up as ``HOST`` whatever the port.
    An IPv6 address takes a port only in brackets, ``[ADDR]:PORT``.
    """
    patterns = []
    for item in text.split(","):
        item = item.strip()
        host, port = item, None
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"{item!r} is not [HOST]:PORT")
            port = rest[1:]
        elif item.count(":") == 1:
            host, port = item.split(":")
        if not host or any(c.isspace() or c in "#,[]" for c in host):
            raise argparse.ArgumentTypeError(f"{item!r} is not HOST or HOST:PORT")
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise argparse.ArgumentTypeError(f"{item!r}: the port must be 1 to 65535")
        patterns.append(f"[{host}]:{int(port)}" if port is not None and int(port) != 22 else host)
    return ",".join(patterns)


def run_event_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run the server on uvloop: it halves the event loop's share of each request."""
    import uvloop

    uvloop.run(coro)


def run_server(args: argparse.Namespace, make_app: Callable[[], Application], name: str) -> int:
    from nc_core.server import NetconfServer, ServerOptions, StateDirLocked
    from nc_core.transport_ssh import serve_forever

    configure_logging(args.log_level, name, args.log_format, args.debug_libraries)
    # `kill -USR2 PID` writes every thread's stack to the log (stderr): how a daemon that
    # does not stop, or stalls, is read without stopping it.
    faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
    if args.state_dir is None:
        print(f"{name}: --state-dir is required", file=sys.stderr)
        return 2
    host, port = args.listen
    options = ServerOptions(
        state_dir=args.state_dir,
        host=host,
        port=port,
        max_message_size=args.max_message_size,
        recovery_user=args.recovery_user,
        filter_budget=args.filter_budget,
        max_sessions=args.max_sessions,
        max_sessions_per_user=args.max_sessions_per_user,
        reserved_admin_sessions=min(16, args.max_sessions // 4),
        name=name,
        metrics_listen=args.metrics_listen,
    )

    async def main() -> None:
        server = NetconfServer(options, make_app())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def shutdown(sig: signal.Signals) -> None:
            logging.getLogger("cevpn").info("%s received: shutting down", sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, shutdown, sig)
        await serve_forever(server, stop)

    try:
        run_event_loop(main())
    except StateDirLocked as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{name}: cannot listen on {host} port {port}: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    return 0
