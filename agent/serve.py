"""`agent serve`: describe the env, load the backend, run the server until a signal."""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import sys
import threading

import zmq

from agent.backends import BackendError, load_backend
from agent.backends.base import parse_option_pairs
from agent.envspec import describe_env
from agent.server import Server, ServerConfig


def _report_periodically(server: Server, every_s: float, done: threading.Event) -> None:
    last = -1
    while not done.wait(every_s):
        stats = server.stats()
        if stats["requests"] != last:
            last = stats["requests"]
            print(
                f"[serve] {stats['decisions']} decisions, {stats['errors']} errors, "
                f"mean batch {stats['mean_batch']:.1f}, open episodes {stats['open_episodes']}, "
                f"recorded {stats['recorded_episodes']}",
                flush=True,
            )


def tune_allocator(mmap_threshold: int = 4 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Set glibc's allocator for a server that receives large messages all day.

    By default glibc moves its thresholds as blocks come and go: after one huge
    message (refused) later ones land on the heap and the server's memory stays
    at the peak, while 150 kB images freed at the top of the heap are given
    back and faulted in again on every request (page faults and zeroing; see
    docs/performance.md#runtime for what the loop's CPU was before and after). Fixed thresholds
    give every block over `mmap_threshold` its own mapping, unmapped when
    freed, and keep up to `trim_threshold` of freed heap for the next
    requests. False where the C library has no `mallopt`.
    """
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(None)
        return bool(
            libc.mallopt(m_mmap_threshold, mmap_threshold)
            and libc.mallopt(m_trim_threshold, trim_threshold)
        )
    except (OSError, AttributeError):
        return False


def serve(args: argparse.Namespace) -> int:
    tune_allocator()
    try:
        env = describe_env(args.env)
    except ValueError as exc:
        print(f"agent serve: {exc}", file=sys.stderr)
        return 2
    try:
        config = ServerConfig(
            bind=args.bind,
            max_batch=args.max_batch,
            batch_timeout_ms=args.batch_timeout_ms,
            max_message_bytes=int(args.max_message_mb * 1024 * 1024),
            episode_timeout_s=args.episode_timeout_s,
            record_dir=args.record,
            curve_dir=args.curve,
            reload_every_s=args.reload_every_s,
        )
        options = parse_option_pairs(args.backend_opt)
        teacher_options = parse_option_pairs(args.teacher_opt)
    except (ValueError, BackendError) as exc:
        print(f"agent serve: {exc}", file=sys.stderr)
        return 2
    if args.openpi_port is not None and args.curve is not None:
        print("agent serve: --openpi-port cannot be combined with --curve", file=sys.stderr)
        return 2
    backend_name = args.backend or ("oracle" if env.info.has_skills else "zero")
    if args.swap_at is not None:
        options["swap_at"] = args.swap_at
    try:
        backend = load_backend(backend_name, env.info, args.model, **options)
        if args.teacher is not None:
            from agent.backends.teaching import Teaching

            teacher = load_backend(args.teacher, env.info, args.teacher_model, **teacher_options)
            backend = Teaching(
                backend,
                teacher,
                beta=args.beta,
                escalate_below=args.escalate_below,
                label=args.label,
                seed=args.teacher_seed,
            )
        elif args.beta or args.escalate_below is not None:
            raise BackendError("--beta and --escalate-below need a --teacher")
        backend.warmup()
    except BackendError as exc:
        print(f"agent serve: {exc}", file=sys.stderr)
        return 2
    try:
        server = Server(backend, config, env)
    except OSError as exc:
        print(f"agent serve: cannot record to {args.record}: {exc}", file=sys.stderr)
        return 2
    try:
        endpoint = server.bind()
    except (zmq.ZMQError, OSError, ValueError) as exc:
        server.close()
        print(f"agent serve: cannot listen on {args.bind}: {exc}", file=sys.stderr)
        return 2
    gateway = None
    if args.openpi_port is not None:
        from agent.openpi_gateway import OpenpiGateway

        local = endpoint.replace("//0.0.0.0:", "//127.0.0.1:").replace("//*:", "//127.0.0.1:")
        gateway = OpenpiGateway(
            local, args.openpi_host, args.openpi_port, max_message_bytes=config.max_message_bytes
        )
        try:
            port = gateway.start()
        except (ImportError, OSError) as exc:  # websockets missing, port in use
            server.close()
            print(f"agent serve: cannot start the openpi front door: {exc}", file=sys.stderr)
            return 2
        print(
            f"[serve] openpi WebSocket front door on ws://{args.openpi_host}:{port} (GET /healthz)",
            flush=True,
        )

    def stop_all() -> None:
        if gateway is not None:  # first, so openpi robots' episodes end while the server answers
            gateway.stop()
        server.stop()

    def graceful(sig: int, _frame: object) -> None:
        # off the loop's thread: the gateway's last requests need the loop to answer them;
        # a second signal is not caught: it interrupts a stuck shutdown
        threading.Thread(target=stop_all, name="shutdown", daemon=True).start()
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, graceful)
    print(
        f"[serve] {args.env} · backend {backend.name} ({backend.model_id}, "
        f"version {backend.model_version}) · listening on {endpoint} · max batch {config.max_batch}, "
        f"window {config.batch_timeout_ms} ms"
        + (f" · recording to {args.record}" if args.record else "")
        + (" · CURVE on" if args.curve else ""),
        flush=True,
    )
    done = threading.Event()
    if not args.quiet:
        threading.Thread(
            target=_report_periodically, args=(server, 10.0, done), daemon=True
        ).start()
    try:
        server.run()
    finally:
        done.set()
        if gateway is not None:
            gateway.stop()
    print(
        "[serve] stopped: "
        + json.dumps({k: v for k, v in server.stats().items() if k != "backend"}),
        flush=True,
    )
    return 0
