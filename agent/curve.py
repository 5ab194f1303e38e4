"""ZeroMQ CURVE keys: authentication and encryption between robots and the server.

Layout made by `agent keys DIR`:

    DIR/server.key, DIR/server.key_secret      the server's pair (robots need server.key)
    DIR/<client>.key, DIR/<client>.key_secret  one pair per robot / fleet
    DIR/authorized/<client>.key                public keys the server accepts

Key files are ZeroMQ's certificate text format (never pickle); secret key
files are readable by their owner only.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUTHORIZED = "authorized"


@dataclass(frozen=True)
class CurveKeys:
    """One side's key pair plus, for a client, the server's public key."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None


def create_keys(directory: str | Path, clients: tuple[str, ...] = ("client",)) -> list[Path]:
    """Create the server pair (if missing) and one authorised pair per client name."""

    directory = Path(directory)
    authorized = directory / AUTHORIZED
    authorized.mkdir(parents=True, exist_ok=True)
    for name in clients:
        if not name.isidentifier() or name == "server":
            raise ValueError(f"client name {name!r} must be a plain identifier other than server")
    made = []
    if not (directory / "server.key_secret").exists():
        made += _create_pair(directory, "server")
    for name in clients:
        public, secret = _create_pair(directory, name)
        shutil.copy(public, authorized / public.name)
        made += [public, secret]
    return made


def _create_pair(directory: Path, name: str) -> list[Path]:
    import zmq.auth

    public, secret = (Path(p) for p in zmq.auth.create_certificates(directory, name))
    os.chmod(secret, 0o600)
    return [public, secret]


def server_keys(directory: str | Path) -> CurveKeys:
    import zmq.auth

    public, secret = zmq.auth.load_certificate(Path(directory) / "server.key_secret")
    if secret is None:
        raise ValueError(f"{directory}/server.key_secret holds no secret key")
    return CurveKeys(public, secret)


def client_keys(directory: str | Path, name: str = "client") -> CurveKeys:
    import zmq.auth

    directory = Path(directory)
    public, secret = zmq.auth.load_certificate(directory / f"{name}.key_secret")
    server_public, _ = zmq.auth.load_certificate(directory / "server.key")
    if secret is None:
        raise ValueError(f"{directory}/{name}.key_secret holds no secret key")
    return CurveKeys(public, secret, server_public)


def authorized_dir(directory: str | Path) -> Path:
    return Path(directory) / AUTHORIZED


def serve_curve(context: Any, sock: Any, directory: str | Path) -> Any:
    """Make `sock` (a server socket, before bind) accept only robots whose keys are authorized
    in `directory`, encrypted; returns the started authenticator (stop it with the socket)."""
    from zmq.auth.thread import ThreadAuthenticator

    keys = server_keys(directory)
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized_dir(directory)))
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    return auth
