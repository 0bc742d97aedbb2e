"""ZeroMQ CURVE keys generated per run: the learner's socket refuses peers without them.

``wire.curve = "auto"`` turns CURVE on when the learner binds anything but loopback (across
machines); ``"on"`` / ``"off"`` force it. The learner generates two key pairs for the run, its
own (server) and one for the run's rollout servers (client), and writes them to
``OUTPUT_DIR/wire_keys.json`` (mode 0600) before it publishes its endpoint; a resumed run keeps
them. A rollout server reads ``CLIMBRL_WIRE_KEYS`` (``RunKeys.client_json``: the learner's
public key and the client pair, never the learner's secret; the Ray launcher passes it to
servers it places on other machines) or that file. The learner's ROUTER is a CURVE server whose ZAP
handler (pyzmq's authenticator thread) accepts only the run's client key, so a peer with no
key, or another run's key, never gets a message through.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq

ENV_VAR = "CLIMBRL_WIRE_KEYS"
FILE_NAME = "wire_keys.json"


@dataclass(frozen=True)
class RunKeys:
    server_public: str
    server_secret: str
    client_public: str
    client_secret: str

    @classmethod
    def generate(cls) -> RunKeys:
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq was built without CURVE: cannot secure the wire "
                               "(set wire.curve = 'off' only on a trusted network)")
        sp, ss = zmq.curve_keypair()
        cp, cs = zmq.curve_keypair()
        return cls(sp.decode(), ss.decode(), cp.decode(), cs.decode())

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, path)

    def client_json(self) -> str:
        """What a rollout server needs, without the learner's secret: the value a launcher
        that places servers on other machines passes in ``CLIMBRL_WIRE_KEYS``."""
        return json.dumps({"server_public": self.server_public,
                           "client_public": self.client_public,
                           "client_secret": self.client_secret})

    @classmethod
    def parse(cls, text: str, where: str, client_only: bool = False) -> RunKeys:
        """The learner's full key file, or (``client_only``) also the client view, whose
        ``server_secret`` is left empty."""
        fields = list(cls.__dataclass_fields__)
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            if client_only and "server_secret" not in d:
                d = {**d, "server_secret": ""}
            keys = cls(**{k: str(d[k]) for k in fields})
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: not a climbrl wire key file ({e})") from None
        for k, v in asdict(keys).items():
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


def learner_keys(wire: Any, out: Path) -> RunKeys | None:
    """The run's keys (generated once, kept across resumes), or None with CURVE off."""
    if not curve_enabled(wire):
        return None
    path = Path(out) / FILE_NAME
    if path.is_file():
        return RunKeys.parse(path.read_text(), str(path))
    keys = RunKeys.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    keys.save(path)
    return keys


def rollout_keys(wire: Any, out: Path) -> RunKeys | None:
    if not curve_enabled(wire):
        return None
    text = os.environ.get(ENV_VAR)
    if text:
        return RunKeys.parse(text, ENV_VAR, client_only=True)
    path = Path(out) / FILE_NAME
    if not path.is_file():
        raise RuntimeError(f"wire.curve is on but {path} does not exist and {ENV_VAR} is not set: "
                           "start the learner first, or pass the run's keys")
    return RunKeys.parse(path.read_text(), str(path), client_only=True)


class _AllowRunKey:
    def __init__(self, client_public: bytes):
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:  # pyzmq passes the Z85 form
        return key == self.client_public


def secure_server(ctx: zmq.Context, sock: zmq.Socket, keys: RunKeys) -> Any:
    """Make ``sock`` (before bind) a CURVE server that admits only the run's client key.
    Returns the authenticator; stop it when the socket closes."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_AllowRunKey(
        keys.client_public.encode()))
    sock.curve_secretkey = keys.server_secret.encode()
    sock.curve_publickey = keys.server_public.encode()
    sock.curve_server = True
    return auth


def secure_client(sock: zmq.Socket, keys: RunKeys) -> None:
    """Make ``sock`` (before connect) a CURVE client of the run's learner."""
    sock.curve_secretkey = keys.client_secret.encode()
    sock.curve_publickey = keys.client_public.encode()
    sock.curve_serverkey = keys.server_public.encode()
