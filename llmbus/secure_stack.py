"""`llmbus up --secure`: the embedded nats-server with TLS and one generated nkey login per role.

Files in the secure directory (default `<cache dir>/secure`, mode 0700; keys and seeds 0600):

    ca.pem, ca.key                   a private CA, made once and kept (clients trust ca.pem)
    server.pem, server.key           the server's certificate, issued by that CA for 127.0.0.1 and localhost
    worker.nk, gateway.nk, client.nk one nkey seed per role, made once and kept
    nats-server.conf                 TLS, and each role's nkey with its least-privilege permissions
    worker.env, gateway.env, client.env
                                     LLMBUS_* settings that log in as that role: `set -a; . client.env; set +a`

The directory is made absolute (a relative --secure-dir or LLMBUS_CACHE_DIR would leave relative CA and seed paths
in the env files, wrong from any other directory), and each env value is shell-quoted, so that sourcing a file in
sh or bash sets exactly those values, whatever the directory's name (spaces, `$`, quotes).

The seeds and the CA are kept between runs, so a client's credentials stay valid across restarts; delete the
directory to rotate everything. Only the `client` login is for people: the worker and the bridge of `llmbus up`
use their own.

Keys, seeds, certificates and env files are written atomically (a temp file in the directory, fsynced, renamed over
the old one), so a crash leaves the old file or the new one, never an empty or partial one. A file that cannot be
read or used anyway (damaged by hand, another user's directory) raises `SecureDirError`, naming the file and saying
to delete it, or the directory, so that the next run makes a new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import secrets
import shlex
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nkeys
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from llmbus.config import Config
from llmbus.nats_server import tls_config, write_config
from llmbus.permissions import ROLES, Role, default_inbox_prefix, grants, server_permissions

CA_DAYS = 3650
SERVER_CERT_DAYS = 365
# what reading, parsing or writing a file of the directory raises when the file (or the directory) is unusable
FILE_ERRORS = (OSError, ValueError, TypeError, UnsupportedAlgorithm, nkeys.NkeysError)


class SecureDirError(RuntimeError):
    """A file of the secure directory (or the directory) that cannot be used; the message names it and the fix."""


def secure_root() -> Path:
    """`<cache dir>/secure`: the model cache's root (LLMBUS_CACHE_DIR, else $XDG_CACHE_HOME/llmbus), absolute."""
    if custom := os.environ.get("LLMBUS_CACHE_DIR"):
        return absolute(custom) / "secure"
    return absolute(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmbus" / "secure"


def absolute(path: str | Path) -> Path:
    """`path` with `~` expanded, made absolute against the working directory (symlinks kept)."""
    return Path(path).expanduser().absolute()


@dataclass(frozen=True)
class SecureSetup:
    directory: Path
    url: str
    subject_prefix: str

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_config(self) -> Path:
        return self.directory / "nats-server.conf"

    def seed(self, role: Role) -> Path:
        return self.directory / f"{role}.nk"

    def env_file(self, role: Role) -> Path:
        return self.directory / f"{role}.env"

    def load_command(self, role: Role) -> str:
        """The shell line that loads `<role>.env` into the environment, its path quoted for sh."""
        return f"set -a; . {shlex.quote(str(self.env_file(role)))}; set +a"

    def settings(self, role: Role) -> dict[str, str]:
        """The connection fields that log in as `role` (also written to `<role>.env` as LLMBUS_* variables)."""
        return {
            "nats_url": self.url,
            "nats_tls_ca": str(self.ca),
            "nats_nkey_seed": str(self.seed(role)),
            "nats_inbox_prefix": default_inbox_prefix(role),
            "subject_prefix": self.subject_prefix,
        }

    def config_for(self, role: Role, config: Config) -> Config:
        return dataclasses.replace(config, **self.settings(role))


def prepare(config: Config, host: str, port: int) -> SecureSetup:
    """Make (or reuse) the CA and the seeds, issue the server certificate, and write the server config and the
    per-role env files for a server on `host:port`. Raises `SecureDirError` for a file (or directory) it cannot use."""
    directory = absolute(config.secure_dir) if config.secure_dir else secure_root()
    with blamed(directory, "it must be a directory of yours: delete it, or pick another with --secure-dir"):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
    setup = SecureSetup(directory, f"tls://{host}:{port}", config.subject_prefix)
    ca_key, ca_cert = ensure_ca(directory)
    with blamed(directory / "server.key", regenerate(directory)):
        issue_server_cert(directory, ca_key, ca_cert, host)
    users = []
    for role in ROLES:
        with blamed(setup.seed(role), regenerate(directory, f" (the {role} login changes)")):
            public_key = ensure_seed(setup.seed(role))
        role_grants = grants(
            role, config.subject_prefix, default_inbox_prefix(role), config.durable, config.queue_group
        )
        users.append({"nkey": public_key, "permissions": server_permissions(role_grants)})
        with blamed(setup.env_file(role), regenerate(directory)):
            write_env(setup.env_file(role), setup.settings(role))
    server_tls = tls_config(str(directory / "server.pem"), str(directory / "server.key"))
    with blamed(setup.server_config, regenerate(directory)):
        write_config(setup.server_config, {"tls": server_tls, "authorization": {"timeout": 5, "users": users}})
    return setup


def regenerate(directory: Path, consequence: str = "") -> str:
    """The remedy for an unusable file of `directory`: the next run makes whatever file is missing."""
    return f"delete it{consequence}, or the directory {directory}, and run again to make a new one"


@contextlib.contextmanager
def blamed(path: Path, remedy: str) -> Iterator[None]:
    """Turns `FILE_ERRORS` raised within the block into a `SecureDirError` naming `path`, the error and `remedy`."""
    try:
        yield
    except FILE_ERRORS as exc:
        raise SecureDirError(f"cannot use {path} ({type(exc).__name__}: {exc}): {remedy}") from exc


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` with `mode`, atomically: a temp file in the same directory (made 0600), fsynced,
    renamed over `path`; a crash leaves the old file or the new one, never an empty or partial one."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable (not every file system can fsync a directory)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def ensure_seed(path: Path) -> str:
    """The public key of the user nkey seed in `path`, made first if the file is missing."""
    if not path.exists():
        write_private(path, nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER) + b"\n")
    keypair = nkeys.from_seed(path.read_bytes().strip())
    try:
        return keypair.public_key.decode()
    finally:
        keypair.wipe()


def write_env(path: Path, settings: dict[str, str]) -> None:
    """`LLMBUS_<NAME>=<value>` lines, each value quoted for sh (a plain value such as a URL stays as it is)."""
    lines = [f"LLMBUS_{name.upper()}={shlex.quote(value)}" for name, value in settings.items()]
    write_private(path, ("\n".join(lines) + "\n").encode())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmbus"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA's key and certificate: ca.key and ca.pem, made (both) where either is missing, not an EC key, or
    expires within a day. Raises `SecureDirError` for one that cannot be read (delete it: clients must then trust
    the new ca.pem)."""
    key_path, cert_path = directory / "ca.key", directory / "ca.pem"
    remedy = regenerate(directory, " (clients must then trust the new ca.pem)")
    if key_path.exists() and cert_path.exists():
        with blamed(key_path, remedy):
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        with blamed(cert_path, remedy):
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > _now() + datetime.timedelta(1):
            return key, cert
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("llmbus local CA")
    cert = (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    with blamed(key_path, remedy):
        write_private(key_path, _pem_key(key))
    with blamed(cert_path, remedy):
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, cert


def issue_server_cert(
    directory: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        address = ipaddress.ip_address(host)
        if str(address) != "127.0.0.1":
            names.append(x509.IPAddress(address))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    cert = (
        _builder(_name("llmbus nats-server"), ca_cert.subject, key.public_key(), SERVER_CERT_DAYS)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(directory / "server.key", _pem_key(key))
    write_private(directory / "server.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
    names += ("key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{name: allowed.get(name, False) for name in names})


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
