"""Bearer-token authentication and TLS file loading for the Flight server and client.

The server installs :class:`BearerTokenMiddlewareFactory` as Flight middleware: every RPC
(``DoExchange``, ``DoAction``, ``ListActions``, ``Handshake``, ...) must carry the header
``authorization: Bearer <token>`` or it is refused with UNAUTHENTICATED before any handler
runs. The token is compared in constant time and never logged or echoed in an error.

:func:`load_token` reads the token from a file (``--token-file``) or an environment
variable; :func:`auth_headers` builds the header list for ``FlightCallOptions``;
:func:`read_tls_files` turns PEM files into the objects ``FlightServerBase`` takes.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence

import pyarrow.flight as flight

__all__ = [
    "SecurityConfigError",
    "BearerTokenMiddlewareFactory",
    "load_token",
    "auth_headers",
    "read_tls_files",
    "TOKEN_ENV_VAR",
]

TOKEN_ENV_VAR = "FLIGHTQUANT_TOKEN"
_HEADER = "authorization"
_SCHEME = "bearer"


class SecurityConfigError(ValueError):
    """A token or TLS file that cannot be used; the message says which and why."""


def _check_token(token: str, source: str) -> str:
    token = token.strip()
    if not token:
        raise SecurityConfigError(
            f"the bearer token from {source} is empty: put the token (one line) there, "
            "or leave the token unset to run without authentication"
        )
    # gRPC metadata values must be printable ASCII; a space would split "Bearer <token>".
    if not all(0x21 <= ord(ch) <= 0x7E for ch in token):
        raise SecurityConfigError(
            f"the bearer token from {source} contains whitespace or non-printable / "
            "non-ASCII characters; use printable ASCII only (e.g. `openssl rand -hex 32`)"
        )
    return token


class _AuthenticatedCall(flight.ServerMiddleware):
    """Marker middleware instance for a call that passed the token check."""


class BearerTokenMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Refuse every RPC that lacks ``authorization: Bearer <token>``.

    Parameters
    ----------
    token : str
        The shared secret. Surrounding whitespace is stripped; it must be non-empty
        printable ASCII.
    on_reject : callable, optional
        Called with the call's ``CallInfo`` before a call is refused (the server counts
        it); what it raises is ignored.

    Examples
    --------
    >>> factory = BearerTokenMiddlewareFactory("s3cret")
    >>> # FlightServerBase(location, middleware={"auth": factory})
    """

    def __init__(self, token: str, on_reject=None):
        super().__init__()
        self._on_reject = on_reject
        if not isinstance(token, str):
            raise SecurityConfigError(f"the bearer token must be a str, got {type(token).__name__}")
        self._expected = _check_token(token, "the server configuration").encode("ascii")

    def __repr__(self) -> str:  # never show the token
        return f"{type(self).__name__}(token=<redacted>)"

    def start_call(self, info, headers: Mapping[str, Sequence[str | bytes]]):
        values = headers.get(_HEADER)
        if values is None:
            # header names arrive lowercased from gRPC, but be lenient with other transports
            for key, value in headers.items():
                if key.lower() == _HEADER:
                    values = value
                    break
        if not values:
            self._rejected(info)
            raise flight.FlightUnauthenticatedError(
                "missing bearer token: send the header 'authorization: Bearer <token>' "
                "(flightquant.Client(token=...))"
            )
        ok = False
        for value in values:
            raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
            scheme, _, presented = raw.strip().partition(b" ")
            if scheme.lower() != _SCHEME.encode():
                continue
            # compare_digest runs in time independent of where the bytes differ
            if hmac.compare_digest(presented.strip(), self._expected):
                ok = True
        if not ok:
            self._rejected(info)
            raise flight.FlightUnauthenticatedError(
                "invalid bearer token: the 'authorization' header does not hold "
                "'Bearer <token>' with the token this server was started with"
            )
        return _AuthenticatedCall()

    def _rejected(self, info) -> None:
        if self._on_reject is not None:
            try:
                self._on_reject(info)
            except Exception:
                pass  # counting must never change the answer


def load_token(token_file: str | os.PathLike | None, env_var: str = TOKEN_ENV_VAR) -> str | None:
    """Read the bearer token from ``token_file``, else from the environment variable.

    The file wins when both are given. Surrounding whitespace (a trailing newline) is
    stripped. Returns None when neither is set (authentication off).

    Raises
    ------
    SecurityConfigError
        The file is missing or unreadable, or the token is empty or not printable ASCII.

    Examples
    --------
    >>> load_token(None, env_var="FLIGHTQUANT_TEST_UNSET_VARIABLE") is None
    True
    """
    if token_file is not None:
        path = os.fspath(token_file)
        raw = _read_file(path, "token", limit=1 << 16)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise SecurityConfigError(
                f"token file {path!r} is not ASCII text; the token must be printable ASCII"
            ) from None
        return _check_token(text, f"token file {path!r}")
    value = os.environ.get(env_var) if env_var else None
    if value is None:
        return None
    return _check_token(value, f"environment variable {env_var}")


def auth_headers(token: str | None) -> list[tuple[bytes, bytes]]:
    """Headers for ``pyarrow.flight.FlightCallOptions(headers=...)``.

    Returns an empty list when ``token`` is None (no authentication).

    Examples
    --------
    >>> auth_headers("abc")
    [(b'authorization', b'Bearer abc')]
    >>> auth_headers(None)
    []
    """
    if token is None:
        return []
    if not isinstance(token, str):
        raise SecurityConfigError(f"the bearer token must be a str, got {type(token).__name__}")
    token = _check_token(token, "the client's token argument")
    return [(_HEADER.encode("ascii"), b"Bearer " + token.encode("ascii"))]


def _read_file(path: str, what: str, limit: int = -1) -> bytes:
    """The bytes of a secret/certificate file, or an error that says what is wrong."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except FileNotFoundError:
        raise SecurityConfigError(f"{what} file {path!r} does not exist") from None
    except IsADirectoryError:
        raise SecurityConfigError(f"{what} file {path!r} is a directory, not a file") from None
    except PermissionError:
        raise SecurityConfigError(
            f"{what} file {path!r} is not readable by this user (permission denied)"
        ) from None
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} file {path!r}: {exc.strerror}") from None


def _read_pem(path: str | os.PathLike, what: str, marker: bytes) -> bytes:
    p = os.fspath(path)
    data = _read_file(p, what)
    if b"-----BEGIN " not in data or marker not in data:
        raise SecurityConfigError(
            f"{what} file {p!r} is not a PEM file with a {marker.decode()} block "
            "(expected '-----BEGIN ...-----' text, as written by openssl)"
        )
    return data


def read_tls_files(
    cert_path: str | os.PathLike,
    key_path: str | os.PathLike,
    client_ca_path: str | os.PathLike | None = None,
) -> tuple[list[flight.CertKeyPair], bytes | None]:
    """Load PEM files for ``FlightServerBase(tls_certificates=..., root_certificates=...)``.

    Parameters
    ----------
    cert_path, key_path : path
        The server's certificate chain and private key (PEM).
    client_ca_path : path, optional
        CA bundle (PEM) that signs accepted client certificates; pass the second return
        value as ``root_certificates`` together with ``verify_client=True`` for mutual TLS.

    Returns
    -------
    (tls_certificates, root_certificates)
        A one-element list of ``CertKeyPair`` and the CA bytes (None without a client CA).

    Examples
    --------
    >>> # certs, roots = read_tls_files("server.pem", "server.key", "clients-ca.pem")
    >>> # Server("grpc+tls://0.0.0.0:8815", tls_certificates=certs,
    >>> #        verify_client=roots is not None, root_certificates=roots)
    """
    cert = _read_pem(cert_path, "TLS certificate", b"CERTIFICATE")
    key = _read_pem(key_path, "TLS private key", b"PRIVATE KEY")
    if b"PRIVATE KEY" in cert and b"CERTIFICATE" not in cert:  # pragma: no cover - caught above
        raise SecurityConfigError("the TLS certificate and key files look swapped")
    roots = None
    if client_ca_path is not None:
        roots = _read_pem(client_ca_path, "TLS client CA", b"CERTIFICATE")
    return [flight.CertKeyPair(cert=cert, key=key)], roots
