"""Per-run wire credentials: the learner's socket admits only peers that hold them.

Every connection to the learner is authenticated, loopback included, before ZeroMQ attaches it
to the learner's ROUTER, so a peer without the run's credentials never gets a message through
and never takes over a rollout server's routing id. ``wire.curve = "auto"`` picks the mechanism:
CURVE (encrypted, authenticated by the run's client key) when the learner binds anything but
loopback, and ZeroMQ's PLAIN mechanism with the run's random secret on loopback, where no other
user can read the traffic and encryption would only slow the weight frames (about 3x);
``"on"`` / ``"off"`` force CURVE or PLAIN. Both are checked by a ZAP handler (pyzmq's
authenticator thread) with a constant-time compare.

The learner generates the run's credentials (two CURVE key pairs, its own and the rollout
servers', and the secret) and writes them to ``OUTPUT_DIR/wire_keys.json`` (mode 0600) before
it publishes its endpoint; a resumed run keeps them. A rollout server reads ``CLIMBRL_WIRE_KEYS``
(``RunKeys.client_json``: everything but the learner's secret key; the Ray launcher passes it to
the servers it places) or that file.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

log = logging.getLogger("climbrl.wirekeys")

ENV_VAR = "CLIMBRL_WIRE_KEYS"
FILE_NAME = "wire_keys.json"
PLAIN_USER = "climbrl"


@dataclass(frozen=True)
class RunKeys:
    server_public: str
    server_secret: str
    client_public: str
    client_secret: str
    secret: str = ""  # the PLAIN password of the run (loopback)

    @classmethod
    def generate(cls) -> RunKeys:
        if not zmq.has("curve"):
            raise RuntimeError(
                "this libzmq was built without CURVE: cannot secure the wire "
                "(install pyzmq's wheel, which bundles a libzmq with CURVE)"
            )
        sp, ss = zmq.curve_keypair()
        cp, cs = zmq.curve_keypair()
        return cls(sp.decode(), ss.decode(), cp.decode(), cs.decode(), secrets.token_hex(32))

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, path)

    def client_json(self) -> str:
        """What a rollout server needs, without the learner's secret key: the value a launcher
        passes in ``CLIMBRL_WIRE_KEYS``."""
        return json.dumps(
            {
                "server_public": self.server_public,
                "client_public": self.client_public,
                "client_secret": self.client_secret,
                "secret": self.secret,
            }
        )

    @classmethod
    def parse(cls, text: str, where: str, client_only: bool = False) -> RunKeys:
        """The learner's full key file, or (``client_only``) also the client view, whose
        ``server_secret`` is left empty. A file without ``secret`` (written before the wire
        was authenticated on loopback) parses with an empty one."""
        fields = [f for f in cls.__dataclass_fields__ if f != "secret"]
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            if client_only and "server_secret" not in d:
                d = {**d, "server_secret": ""}
            keys = cls(**{k: str(d[k]) for k in fields}, secret=str(d.get("secret", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: not a climbrl wire key file ({e})") from None
        for k in fields:
            v = getattr(keys, k)
            if len(v) != 40 and not (client_only and k == "server_secret" and v == ""):
                raise ValueError(f"{where}: {k} is not a Z85 CURVE key (40 characters)")
        return keys


def curve_enabled(wire: Any) -> bool:
    if wire.curve != "auto":
        return wire.curve == "on"
    return not is_loopback(wire.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def learner_keys(wire: Any, out: Path) -> RunKeys:
    """The run's credentials: generated once, kept across resumes."""
    path = Path(out) / FILE_NAME
    if path.is_file():
        keys = RunKeys.parse(path.read_text(), str(path))
        if keys.secret:
            return keys
        keys = replace(keys, secret=secrets.token_hex(32))  # a file from before PLAIN auth
    else:
        keys = RunKeys.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    keys.save(path)
    return keys


def rollout_keys(wire: Any, out: Path) -> RunKeys:
    text = os.environ.get(ENV_VAR)
    if text:
        keys = RunKeys.parse(text, ENV_VAR, client_only=True)
        where = ENV_VAR
    else:
        path = Path(out) / FILE_NAME
        if not path.is_file():
            raise RuntimeError(
                f"the learner's wire credentials are not in {path} and {ENV_VAR} "
                "is not set: start the learner first, or pass the run's keys in "
                f"{ENV_VAR}"
            )
        keys = RunKeys.parse(path.read_text(), str(path), client_only=True)
        where = str(path)
    if not curve_enabled(wire) and not keys.secret:
        raise ValueError(
            f"{where} has no 'secret': the learner that wrote it predates PLAIN "
            "authentication on loopback; restart the learner"
        )
    return keys


class _RunAuthenticator:
    """ZAP checks of the run's credentials, constant-time: the CURVE client key, or the PLAIN
    user and secret. Mixed into pyzmq's ThreadAuthenticator (``secure_server``)."""

    client_public: bytes
    secret: bytes

    def _authenticate_plain(self, domain: str, username: str, password: str) -> tuple[bool, bytes]:
        ok = (
            bool(self.secret)
            and username == PLAIN_USER
            and hmac.compare_digest(password.encode(), self.secret)
        )
        return ok, b"OK" if ok else b"wrong run secret"

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        key = z85.encode(client_key) if len(client_key) == 32 else client_key
        ok = hmac.compare_digest(key, self.client_public)
        return ok, b"OK" if ok else b"not this run's client key"


def secure_server(ctx: zmq.Context, sock: zmq.Socket, keys: RunKeys, curve: bool) -> Any:
    """Make ``sock`` (before bind) admit only peers with the run's credentials: a CURVE server
    (``curve``) or a PLAIN server checking the run's secret. Returns the authenticator thread;
    stop it when the socket closes."""
    from zmq.auth.thread import ThreadAuthenticator

    cls = type("RunAuthenticator", (_RunAuthenticator, ThreadAuthenticator), {})
    auth = cls(ctx, log=logging.getLogger("climbrl.wirekeys.zap"))
    auth.client_public = keys.client_public.encode()
    auth.secret = keys.secret.encode()
    auth.start()
    if curve:
        sock.curve_secretkey = keys.server_secret.encode()
        sock.curve_publickey = keys.server_public.encode()
        sock.curve_server = True
    else:
        if not keys.secret:
            raise ValueError(
                "the run's wire credentials have no secret: regenerate them "
                f"(delete {FILE_NAME}) or set wire.curve = 'on'"
            )
        sock.plain_server = True
    return auth


def secure_client(sock: zmq.Socket, keys: RunKeys, curve: bool) -> None:
    """Make ``sock`` (before connect) a client of the run's learner (CURVE or PLAIN)."""
    if curve:
        sock.curve_secretkey = keys.client_secret.encode()
        sock.curve_publickey = keys.client_public.encode()
        sock.curve_serverkey = keys.server_public.encode()
    else:
        sock.plain_username = PLAIN_USER.encode()
        sock.plain_password = keys.secret.encode()
