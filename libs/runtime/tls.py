"""TLS for every tierflow link: a local CA and its certificates, and the contexts built from them.

Why one module: HTTP (the router's front door), gRPC (router and registry) and NATS (every
service, the CLI) all need the same three files (certificate, key, CA) turned into their
library's idea of TLS; doing it in one place keeps the choices (TLS 1.2 at least, hostname
checks on, client certificates only where asked) the same on every link.

Map:

- `TlsFiles`: the `--tls-cert/--tls-key/--tls-ca` a process was given (paths; empty: unset),
  checked once so a missing or unreadable file is a sentence, not an SSL traceback later.
- `generate_ca`, `issue_certificate`: pure, they take the time (`now`) and return PEM bytes.
  Leaf certificates carry both serverAuth and clientAuth, because one file serves as a
  service's server certificate and as its client identity towards NATS (which checks
  client certificates under `tierflow up --tls`, and always does between cluster routes).
- `ensure_local_pki(directory, hosts, now)`: what `tierflow up --tls` keeps under DATA/tls:
  the CA, a server certificate for `hosts` (127.0.0.1, ::1, localhost and this host's
  name are always in it) and a client certificate (the CLI's, the tests'), every file
  0600 in a 0700 directory. Made once and reused; a server certificate that no longer
  covers the hosts asked for, or is near its end, is issued again from the same CA.
- `server_ssl_context`, `client_ssl_context`: `ssl.SSLContext`s for asyncio servers,
  nats-py and httpx.
- `grpc_server_credentials`, `grpc_channel_credentials`: the same files for grpcio.

No global state, nothing at import beyond the standard library: `cryptography` is
imported by the functions that make certificates, which only `tierflow up --tls` calls.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

__all__ = [
    "TlsFiles",
    "TlsError",
    "LocalPki",
    "default_hosts",
    "generate_ca",
    "issue_certificate",
    "ensure_local_pki",
    "server_ssl_context",
    "client_ssl_context",
    "grpc_server_credentials",
    "grpc_channel_credentials",
    "cli_client_files",
]

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client.pem"
CLIENT_KEY = "client-key.pem"
IN_USE = "in-use"  # written by `tierflow up --tls` while it runs with these files, removed by a plain `tierflow up`
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity clients such as macOS still accept for a server certificate
RENEW_BEFORE = dt.timedelta(days=30)


class TlsError(ValueError):
    """A TLS setting that cannot work (a missing file, a key without its certificate, ...)."""


@dataclass(frozen=True)
class TlsFiles:
    """The TLS files one process was given; empty strings are unset.

    `cert` + `key`: what a server presents (and a client, where the other end asks for a
    certificate). `ca`: whom to trust: the certificate a server must show, and the client
    certificates a server that asks for them accepts. TLS is on when any is set.
    """

    cert: str = ""
    key: str = ""
    ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)

    @property
    def can_serve(self) -> bool:
        """True when there is a certificate to serve TLS with."""
        return bool(self.cert and self.key)

    def check(self) -> TlsFiles:
        """Self, once every named file is readable and cert/key come as a pair; else TlsError."""
        if bool(self.cert) != bool(self.key):
            given, missing = ("--tls-cert", "--tls-key") if self.cert else ("--tls-key", "--tls-cert")
            raise TlsError(f"{given} needs {missing} too (a certificate and its private key go together)")
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path and not os.access(path, os.R_OK):
                raise TlsError(f"{flag} {path}: no such readable file")
        return self


# --------------------------------------------------------------------------- certificates


def _name(common_name: str):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tierflow"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())  # small, fast, accepted by Go (nats-server), BoringSSL (gRPC) and OpenSSL


def _pem_key(key) -> bytes:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert) -> bytes:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def generate_ca(common_name: str = "tierflow local CA", *, now: dt.datetime, days: int = CA_DAYS) -> tuple[bytes, bytes]:
    """A self-signed CA allowed to sign leaf certificates only: (certificate PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # a little clock skew between processes
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem_cert(cert), _pem_key(key)


def _san(hosts: Iterable[str]):  # type: ignore[no-untyped-def]
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip("[]") for h in hosts if h):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue_certificate(
    ca_cert_pem: bytes, ca_key_pem: bytes, common_name: str, *, hosts: Sequence[str] = (), now: dt.datetime, days: int = LEAF_DAYS,
) -> tuple[bytes, bytes]:
    """A leaf certificate signed by the CA, good for TLS servers (at `hosts`: IPs and DNS
    names) and clients alike: (certificate PEM, key PEM). Without hosts it is a client
    certificate only in practice (no name a server could be reached by)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return _pem_cert(cert), _pem_key(key)


def _covers(cert_pem: bytes, hosts: Sequence[str], now: dt.datetime) -> bool:
    """Whether a certificate names every host and stays valid past `RENEW_BEFORE`."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return not hosts
    have = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    return {h.strip("[]") for h in hosts} <= have


def default_hosts(*extra: str) -> list[str]:
    """The names a local server certificate always carries, then `extra` (wildcard bind
    addresses are dropped: nobody connects to 0.0.0.0)."""
    hosts = ["127.0.0.1", "::1", "localhost", socket.gethostname(), *extra]
    return [h for h in dict.fromkeys(hosts) if h and h not in ("0.0.0.0", "::", "")]


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to a file only its owner can read, never visible half-written or wider."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o600)  # the umask cannot widen it, an older file's mode does not carry over
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class LocalPki:
    """The files of a local CA directory (see `ensure_local_pki`)."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_CERT

    @property
    def server(self) -> TlsFiles:
        """What every service is started with: the server certificate, its key, the CA."""
        return TlsFiles(str(self.directory / SERVER_CERT), str(self.directory / SERVER_KEY), str(self.ca))

    @property
    def client(self) -> TlsFiles:
        """What a client (the CLI, a test) presents where a client certificate is asked for."""
        return TlsFiles(str(self.directory / CLIENT_CERT), str(self.directory / CLIENT_KEY), str(self.ca))

    def exists(self) -> bool:
        return all((self.directory / name).is_file() for name in (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY))


def ensure_local_pki(directory: Path, *, hosts: Sequence[str], now: dt.datetime) -> LocalPki:
    """The CA and certificates under `directory`, made on first use and reused after.

    A CA already there is kept (clients may trust it by now); a server certificate that
    does not cover `hosts` or is within `RENEW_BEFORE` of its end is issued again from
    it, as is a missing client certificate. `now` must be timezone-aware (UTC).
    """
    pki = LocalPki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_key_path = directory / CA_KEY
    if not (pki.ca.is_file() and ca_key_path.is_file()):
        ca_cert, ca_key = generate_ca(now=now)
        _write_private(ca_key_path, ca_key)
        _write_private(pki.ca, ca_cert)
        for stale in (SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY):  # signed by a CA that is gone
            (directory / stale).unlink(missing_ok=True)
    ca_cert, ca_key = pki.ca.read_bytes(), ca_key_path.read_bytes()
    server_cert = directory / SERVER_CERT
    if not (server_cert.is_file() and (directory / SERVER_KEY).is_file() and _covers(server_cert.read_bytes(), hosts, now)):
        cert, key = issue_certificate(ca_cert, ca_key, "tierflow server", hosts=hosts, now=now)
        _write_private(directory / SERVER_KEY, key)
        _write_private(server_cert, cert)
    client_cert = directory / CLIENT_CERT
    if not (client_cert.is_file() and (directory / CLIENT_KEY).is_file() and _covers(client_cert.read_bytes(), (), now)):
        cert, key = issue_certificate(ca_cert, ca_key, "tierflow client", now=now)
        _write_private(directory / CLIENT_KEY, key)
        _write_private(client_cert, cert)
    return pki


def cli_client_files(environ: Mapping[str, str], data_dir: Path) -> TlsFiles | None:
    """What a command-line client (`tierflow status`, `apply`, `nodes`, ...) connects with.

    TIERFLOW_TLS_CA (with TIERFLOW_TLS_CERT / TIERFLOW_TLS_KEY for a client certificate)
    when set; else the client files of `data_dir`/tls when `tierflow up --tls` runs on that
    data dir (it leaves DATA/tls/in-use); else None: plain. Never a guess from a server's
    answer, so nobody in the middle can talk a client down to plaintext.
    """
    explicit = TlsFiles(environ.get("TIERFLOW_TLS_CERT", ""), environ.get("TIERFLOW_TLS_KEY", ""), environ.get("TIERFLOW_TLS_CA", ""))
    if explicit.enabled:
        return explicit
    pki = LocalPki(data_dir / "tls")
    return pki.client if (pki.directory / IN_USE).is_file() and pki.exists() else None


# --------------------------------------------------------------------------- contexts


def server_ssl_context(files: TlsFiles, *, require_client_cert: bool = False) -> ssl.SSLContext:
    """For an asyncio server: presents `cert`/`key`; with `require_client_cert`, refuses
    clients without a certificate signed by `ca`."""
    files.check()
    if not files.can_serve:
        raise TlsError("serving TLS needs --tls-cert and --tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    if require_client_cert:
        if not files.ca:
            raise TlsError("requiring client certificates needs --tls-ca (the CA that signs them)")
        context.load_verify_locations(files.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """For a client (nats-py, httpx, the openai client): verifies the server against `ca`
    (the system's trust store when none is given) and its hostname; presents `cert`/`key`
    when given, for servers that ask for a client certificate."""
    files.check()
    context = ssl.create_default_context(cafile=files.ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.can_serve:
        context.load_cert_chain(files.cert, files.key)
    return context


def grpc_server_credentials(files: TlsFiles, *, require_client_cert: bool = False) -> grpc.ServerCredentials:
    """grpcio's server side of `server_ssl_context`."""
    import grpc

    files.check()
    if not files.can_serve:
        raise TlsError("serving gRPC over TLS needs --tls-cert and --tls-key")
    root = Path(files.ca).read_bytes() if files.ca and require_client_cert else None
    if require_client_cert and root is None:
        raise TlsError("requiring client certificates needs --tls-ca (the CA that signs them)")
    pair = (Path(files.key).read_bytes(), Path(files.cert).read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=require_client_cert)


def grpc_channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """grpcio's client side of `client_ssl_context` (for `grpc.aio.secure_channel`)."""
    import grpc

    files.check()
    read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
    return grpc.ssl_channel_credentials(
        root_certificates=read(files.ca), private_key=read(files.key) if files.can_serve else None,
        certificate_chain=read(files.cert) if files.can_serve else None,
    )  # fmt: skip
