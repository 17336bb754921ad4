"""Secured nats-servers for the security tests, with every secret generated at test time.

- TLS: a `trustme` CA, a server certificate for 127.0.0.1/localhost and client certificates (mutual TLS), plus a
  second, unrelated CA whose client certificate the server must refuse.
- nkey users: fresh seeds with the `nkeys` package, written to seed files as `nsc` does.
- operator mode: operator, account and user JWTs signed with `nkeys` (a JWT is three base64url parts; the
  signature is the issuer's ed25519 nkey over `header.claims`), and `.creds` files in the standard armored format.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nkeys
import trustme

from llmbus.config import Config
from llmbus.nats_server import NatsServer, tls_config, write_config
from llmbus.permissions import Role, grants, jwt_permissions, server_permissions

# --- TLS ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    stranger_cert: str  # a client certificate from another CA: the server must refuse it
    stranger_key: str


def make_tls(directory: Path) -> TlsFiles:
    ca, stranger_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("llmbus-client@example.test")
    stranger = stranger_ca.issue_cert("stranger@example.test")
    paths = {
        "ca": directory / "ca.pem",
        "server_cert": directory / "server.pem",
        "server_key": directory / "server.key",
        "client_cert": directory / "client.pem",
        "client_key": directory / "client.key",
        "stranger_cert": directory / "stranger.pem",
        "stranger_key": directory / "stranger.key",
    }
    ca.cert_pem.write_to_path(paths["ca"])
    for name, leaf in (("server", server), ("client", client), ("stranger", stranger)):
        leaf.cert_chain_pems[0].write_to_path(paths[f"{name}_cert"])
        leaf.private_key_pem.write_to_path(paths[f"{name}_key"])
    return TlsFiles(**{name: str(path) for name, path in paths.items()})


# --- nkeys and JWTs ----------------------------------------------------------------------------------------


def new_keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(secrets.token_bytes(32), prefix))


def public(kp: nkeys.KeyPair) -> str:
    return kp.public_key.decode()


def write_secret(path: Path, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(subject: nkeys.KeyPair, issuer: nkeys.KeyPair, name: str, nats: dict[str, Any]) -> str:
    """A nats-io/jwt v2 token: claims about `subject`, signed by `issuer`."""
    claims = {
        "jti": _b64(secrets.token_bytes(24)),
        "iat": int(time.time()),
        "iss": public(issuer),
        "name": name,
        "sub": public(subject),
        "nats": {**nats, "version": 2},
    }
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


UNLIMITED_ACCOUNT = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
JETSTREAM_LIMITS = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def creds_text(user_jwt: str, user: nkeys.KeyPair) -> str:
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )


# --- secured servers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    """One user: the Config connection fields that log in as it, and the secrets a log must never show."""

    name: str
    fields: dict[str, Any]
    secrets: tuple[str, ...] = ()

    def config(self, server: NatsServer, tls: TlsFiles, **overrides: Any) -> Config:
        """A Config that reaches `server` over mutual TLS as this user."""
        base = Config(
            nats_url=server.url,
            nats_tls_ca=tls.ca,
            nats_tls_cert=tls.client_cert,
            nats_tls_key=tls.client_key,
            **self.fields,
        )
        return replace(base, **overrides)


@dataclass(frozen=True)
class RoleUser:
    """A user to create: its role's grants, as `llmbus nats-permissions` prints them (role None: no permissions
    block, may do anything), and its inbox prefix."""

    name: str
    role: Role | None = None
    subject_prefix: str = "llm"
    inbox_prefix: str | None = None
    durable: bool = False
    custom: dict[str, Any] | None = None  # a hand-made permissions block instead of the role's (experiments)

    def server_permissions(self) -> dict[str, Any] | None:
        if self.custom is not None:
            return self.custom
        if self.role is None:
            return None
        return server_permissions(grants(self.role, self.subject_prefix, self.inbox_prefix, self.durable))

    def jwt_permissions(self) -> dict[str, Any]:
        if self.role is None:
            return {}
        return jwt_permissions(grants(self.role, self.subject_prefix, self.inbox_prefix, self.durable))

    def inbox_fields(self) -> dict[str, Any]:
        return {"nats_inbox_prefix": self.inbox_prefix} if self.inbox_prefix else {}


@dataclass
class SecureServer:
    server: NatsServer
    tls: TlsFiles
    logins: dict[str, Login] = field(default_factory=dict)

    def config(self, user: str, **overrides: Any) -> Config:
        return self.logins[user].config(self.server, self.tls, **overrides)

    @property
    def secrets(self) -> list[str]:
        return [secret for login in self.logins.values() for secret in login.secrets]

    def stop(self) -> None:
        self.server.stop()


def _start(directory: Path, tls: TlsFiles, auth: dict[str, Any], jetstream: bool) -> NatsServer:
    config = {"tls": tls_config(tls.server_cert, tls.server_key, tls.ca, verify=True), **auth}
    path = write_config(directory / "nats-server.conf", config)
    return NatsServer(config_file=path, tls=True, jetstream=jetstream).start()


def users_server(directory: Path, tls: TlsFiles, users: list[RoleUser], nkey_users: list[RoleUser]) -> SecureServer:
    """Mutual TLS, plus user/password users and nkey users, each with its role's permissions."""
    entries: list[dict[str, Any]] = []
    logins: dict[str, Login] = {}
    for user in users:
        password = secrets.token_urlsafe(18)
        entries.append({"user": user.name, "password": password} | _perms(user.server_permissions()))
        fields = {"nats_user": user.name, "nats_password": password} | user.inbox_fields()
        logins[user.name] = Login(user.name, fields, (password,))
    for user in nkey_users:
        kp = new_keypair(nkeys.PREFIX_BYTE_USER)
        entries.append({"nkey": public(kp)} | _perms(user.server_permissions()))
        seed_file = write_secret(directory / f"{user.name}.nk", kp.seed.decode() + "\n")
        logins[user.name] = Login(user.name, {"nats_nkey_seed": seed_file} | user.inbox_fields(), (kp.seed.decode(),))
    server = _start(directory, tls, {"authorization": {"timeout": 5, "users": entries}}, jetstream=True)
    return SecureServer(server, tls, logins)


def token_server(directory: Path, tls: TlsFiles) -> SecureServer:
    token = secrets.token_urlsafe(24)
    server = _start(directory, tls, {"authorization": {"timeout": 5, "token": token}}, jetstream=False)
    return SecureServer(server, tls, {"token": Login("token", {"nats_token": token}, (token,))})


def operator_server(directory: Path, tls: TlsFiles, users: list[RoleUser]) -> SecureServer:
    """Operator (JWT) mode: one operator, the system account and an account `LLM` (JetStream on) with `users`,
    each logging in with a `.creds` file whose JWT carries the role's permissions."""
    operator = new_keypair(nkeys.PREFIX_BYTE_OPERATOR)
    system, account = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT), new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    operator_jwt = encode_jwt(operator, operator, "llmbus-test", {"type": "operator", "system_account": public(system)})
    system_jwt = encode_jwt(system, operator, "SYS", {"type": "account", "limits": UNLIMITED_ACCOUNT})
    account_jwt = encode_jwt(
        account, operator, "LLM", {"type": "account", "limits": UNLIMITED_ACCOUNT | JETSTREAM_LIMITS}
    )
    logins: dict[str, Login] = {}
    for user in users:
        kp = new_keypair(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "subs": -1, "data": -1, "payload": -1, **user.jwt_permissions()}
        user_jwt = encode_jwt(kp, account, user.name, claims)
        creds = write_secret(directory / f"{user.name}.creds", creds_text(user_jwt, kp))
        logins[user.name] = Login(user.name, {"nats_creds": creds} | user.inbox_fields(), (kp.seed.decode(),))
    auth = {
        "operator": operator_jwt,
        "system_account": public(system),
        "resolver": "MEMORY",
        "resolver_preload": {public(system): system_jwt, public(account): account_jwt},
    }
    server = _start(directory, tls, auth, jetstream=True)
    return SecureServer(server, tls, logins)


def _perms(permissions: dict[str, Any] | None) -> dict[str, Any]:
    return {} if permissions is None else {"permissions": permissions}
