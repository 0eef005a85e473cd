"""TLS, mutual TLS and bearer tokens over real loopback Flight sockets.

Certificates are minted at test time with ``cryptography`` (a throwaway CA, a server
certificate for localhost/127.0.0.1, a client certificate, and a rogue CA whose client
certificate must be refused).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import stat

import pyarrow as pa
import pyarrow.flight as flight
import pytest

cryptography = pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from flightquant.security import (  # noqa: E402
    BearerTokenMiddlewareFactory,
    SecurityConfigError,
    auth_headers,
    load_token,
    read_tls_files,
)

TOKEN = "t0ken-for-tests-0123456789abcdef"


# --------------------------------------------------------------------------- certificates
def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_ca(name: str):
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(ca_key, ca_cert, name: str, *, server: bool):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Write a CA, a server pair, a client pair and a rogue client pair as PEM files."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _make_ca("flightquant test CA")
    srv_key, srv = _make_leaf(ca_key, ca, "localhost", server=True)
    cli_key, cli = _make_leaf(ca_key, ca, "flightquant test client", server=False)
    rogue_ca_key, rogue_ca = _make_ca("rogue CA")
    rogue_key, rogue = _make_leaf(rogue_ca_key, rogue_ca, "rogue client", server=False)
    files = {
        "ca": _pem_cert(ca),
        "server_cert": _pem_cert(srv),
        "server_key": _pem_key(srv_key),
        "client_cert": _pem_cert(cli),
        "client_key": _pem_key(cli_key),
        "rogue_cert": _pem_cert(rogue),
        "rogue_key": _pem_key(rogue_key),
    }
    paths = {}
    for name, data in files.items():
        p = d / f"{name}.pem"
        p.write_bytes(data)
        paths[name] = str(p)
    return {"bytes": files, "paths": paths}


# --------------------------------------------------------------------------- servers
class _EchoServer(flight.FlightServerBase):
    """Minimal Flight server: echoes DoExchange batches, one action. Tests the security
    pieces independently of the flightquant server."""

    def do_exchange(self, context, descriptor, reader, writer):
        started = False
        for chunk in reader:
            if chunk.data is None:
                continue
            if not started:
                writer.begin(chunk.data.schema)
                started = True
            writer.write_batch(chunk.data)

    def list_actions(self, context):
        return [("health", "ok")]

    def do_action(self, context, action):
        yield flight.Result(b'{"status": "ok"}')


def _fq_server_cls():
    try:
        from flightquant.server import Server
    except ImportError:  # pragma: no cover - the server module lands separately
        return None
    return Server


_BATCH = pa.record_batch(
    {
        "layer_name": pa.array(["a", "b"]),
        "weights": pa.array([[0.5, -1.0, 2.0, 0.25], [1.0, 2.0, 3.0, 4.0]], pa.list_(pa.float32())),
    }
)


def _exchange(client: flight.FlightClient, options=None, command: bytes = b"{}"):
    desc = flight.FlightDescriptor.for_command(command)
    writer, reader = client.do_exchange(desc, options=options)
    with writer:
        writer.begin(_BATCH.schema)
        writer.write_batch(_BATCH)
        writer.done_writing()
        table = reader.read_all()
    return table


def _every_rpc(client: flight.FlightClient, options=None):
    """Call each RPC kind once; return {name: exception or None}."""
    outcomes = {}
    calls = {
        "do_exchange": lambda: _exchange(client, options),
        "do_action": lambda: list(client.do_action(flight.Action("health", b""), options=options)),
        "list_actions": lambda: client.list_actions(options=options),
        "list_flights": lambda: list(client.list_flights(options=options)),
        "get_flight_info": lambda: client.get_flight_info(
            flight.FlightDescriptor.for_command(b"{}"), options=options
        ),
        "do_get": lambda: client.do_get(flight.Ticket(b"x"), options=options).read_all(),
    }
    for name, call in calls.items():
        try:
            call()
            outcomes[name] = None
        except Exception as exc:  # noqa: BLE001 - the test inspects each outcome
            outcomes[name] = exc
    return outcomes


# --------------------------------------------------------------------------- token unit tests
def test_auth_headers_shape():
    assert auth_headers(None) == []
    assert auth_headers(" abc\n") == [(b"authorization", b"Bearer abc")]
    with pytest.raises(SecurityConfigError):
        auth_headers("has space")
    with pytest.raises(SecurityConfigError):
        auth_headers("")


def test_load_token_file_wins_and_strips(tmp_path, monkeypatch):
    f = tmp_path / "token"
    f.write_text("  from-file\n")
    monkeypatch.setenv("FQ_TEST_TOKEN", "from-env")
    assert load_token(str(f), env_var="FQ_TEST_TOKEN") == "from-file"
    assert load_token(None, env_var="FQ_TEST_TOKEN") == "from-env"
    monkeypatch.delenv("FQ_TEST_TOKEN")
    assert load_token(None, env_var="FQ_TEST_TOKEN") is None


def test_load_token_errors_are_clear(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.write_text("\n \n")
    with pytest.raises(SecurityConfigError, match="empty"):
        load_token(str(empty))
    with pytest.raises(SecurityConfigError, match="does not exist"):
        load_token(str(tmp_path / "missing"))
    with pytest.raises(SecurityConfigError, match="directory"):
        load_token(str(tmp_path))
    monkeypatch.setenv("FQ_TEST_TOKEN", "   ")
    with pytest.raises(SecurityConfigError, match="FQ_TEST_TOKEN.*empty"):
        load_token(None, env_var="FQ_TEST_TOKEN")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.write_text("secret")
        locked.chmod(0)
        try:
            with pytest.raises(SecurityConfigError, match="permission"):
                load_token(str(locked))
        finally:
            locked.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_middleware_never_shows_token():
    factory = BearerTokenMiddlewareFactory(TOKEN)
    assert TOKEN not in repr(factory)
    with pytest.raises(flight.FlightUnauthenticatedError) as info:
        factory.start_call(None, {"authorization": ["Bearer wrong-" + TOKEN]})
    assert TOKEN not in str(info.value)
    with pytest.raises(flight.FlightUnauthenticatedError, match="missing"):
        factory.start_call(None, {})
    with pytest.raises(flight.FlightUnauthenticatedError):
        factory.start_call(None, {"authorization": ["Basic " + TOKEN]})
    with pytest.raises(flight.FlightUnauthenticatedError):
        factory.start_call(None, {"authorization": ["Bearer " + TOKEN[:-1]]})
    assert factory.start_call(None, {"authorization": ["Bearer " + TOKEN]}) is not None
    assert factory.start_call(None, {"authorization": ["bearer " + TOKEN]}) is not None
    with pytest.raises(SecurityConfigError):
        BearerTokenMiddlewareFactory("")


def test_read_tls_files_errors(tmp_path, pki):
    p = pki["paths"]
    certs, roots = read_tls_files(p["server_cert"], p["server_key"])
    assert roots is None and certs[0].cert == pki["bytes"]["server_cert"]
    certs, roots = read_tls_files(p["server_cert"], p["server_key"], p["ca"])
    assert roots == pki["bytes"]["ca"]
    with pytest.raises(SecurityConfigError, match="certificate file .* does not exist"):
        read_tls_files(tmp_path / "nope.pem", p["server_key"])
    with pytest.raises(SecurityConfigError, match="private key file .* does not exist"):
        read_tls_files(p["server_cert"], tmp_path / "nope.key")
    with pytest.raises(SecurityConfigError, match="client CA file .* does not exist"):
        read_tls_files(p["server_cert"], p["server_key"], tmp_path / "nope-ca.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a pem file")
    with pytest.raises(SecurityConfigError, match="not a PEM"):
        read_tls_files(garbage, p["server_key"])
    with pytest.raises(SecurityConfigError, match="PRIVATE KEY"):
        read_tls_files(p["server_cert"], p["server_cert"])  # cert where the key should be


# --------------------------------------------------------------------------- token over the wire
@pytest.fixture(params=["echo", "flightquant"])
def token_server(request):
    if request.param == "echo":
        server = _EchoServer(
            "grpc://127.0.0.1:0", middleware={"auth": BearerTokenMiddlewareFactory(TOKEN)}
        )
    else:
        cls = _fq_server_cls()
        if cls is None:
            pytest.skip("flightquant.server not available yet")
        server = cls("grpc://127.0.0.1:0", auth_token=TOKEN)
    try:
        yield server
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [(b"authorization", b"Bearer wrong")],
        [(b"authorization", b"Bearer " + TOKEN.encode() + b"x")],
        [(b"authorization", TOKEN.encode())],
        [(b"authorization", b"Basic " + TOKEN.encode())],
    ],
    ids=["missing", "wrong", "longer", "no-scheme", "basic"],
)
def test_bad_token_refused_on_every_rpc(token_server, headers):
    options = flight.FlightCallOptions(headers=headers, timeout=10) if headers else None
    with flight.connect(f"grpc://127.0.0.1:{token_server.port}") as client:
        outcomes = _every_rpc(client, options)
    for name, exc in outcomes.items():
        assert isinstance(exc, flight.FlightUnauthenticatedError), (name, exc)
        assert TOKEN not in str(exc)


def test_right_token_works(token_server):
    options = flight.FlightCallOptions(headers=auth_headers(TOKEN), timeout=10)
    with flight.connect(f"grpc://127.0.0.1:{token_server.port}") as client:
        table = _exchange(client, options)
        assert table.num_rows == 2
        actions = {a.type for a in client.list_actions(options=options)}
        assert "health" in actions
        results = list(client.do_action(flight.Action("health", b""), options=options))
        assert json.loads(results[0].body.to_pybytes())["status"] == "ok"


# --------------------------------------------------------------------------- TLS
def _tls_server(pki, *, mtls: bool, kind: str, token=None):
    p = pki["paths"]
    certs, roots = read_tls_files(p["server_cert"], p["server_key"], p["ca"] if mtls else None)
    if kind == "echo":
        middleware = {"auth": BearerTokenMiddlewareFactory(token)} if token else None
        return _EchoServer(
            "grpc+tls://127.0.0.1:0",
            tls_certificates=certs,
            verify_client=mtls,
            root_certificates=roots,
            middleware=middleware,
        )
    cls = _fq_server_cls()
    if cls is None:
        pytest.skip("flightquant.server not available yet")
    return cls(
        "grpc+tls://127.0.0.1:0",
        tls_certificates=certs,
        verify_client=mtls,
        root_certificates=roots,
        auth_token=token,
    )


KINDS = ["echo", "flightquant"]


@pytest.mark.parametrize("kind", KINDS)
def test_tls_roundtrip_and_plaintext_refused(pki, kind):
    server = _tls_server(pki, mtls=False, kind=kind)
    try:
        with flight.connect(
            f"grpc+tls://localhost:{server.port}", tls_root_certs=pki["bytes"]["ca"]
        ) as client:
            assert _exchange(client).num_rows == 2
        # a plain-text client cannot talk to a TLS port
        with flight.connect(f"grpc://127.0.0.1:{server.port}") as plain:
            with pytest.raises(flight.FlightUnavailableError):
                plain.list_actions(options=flight.FlightCallOptions(timeout=5))
        # a TLS client that does not trust the issuing CA is refused too
        with flight.connect(f"grpc+tls://localhost:{server.port}") as untrusting:
            with pytest.raises(flight.FlightUnavailableError):
                untrusting.list_actions(options=flight.FlightCallOptions(timeout=5))
    finally:
        server.shutdown()


@pytest.mark.parametrize("kind", KINDS)
def test_mtls_requires_client_cert_from_ca(pki, kind):
    b = pki["bytes"]
    server = _tls_server(pki, mtls=True, kind=kind)
    loc = f"grpc+tls://localhost:{server.port}"
    short = flight.FlightCallOptions(timeout=5)
    try:
        with flight.connect(
            loc, tls_root_certs=b["ca"], cert_chain=b["client_cert"], private_key=b["client_key"]
        ) as client:
            assert _exchange(client).num_rows == 2
        with flight.connect(loc, tls_root_certs=b["ca"]) as no_cert:
            with pytest.raises(flight.FlightUnavailableError):
                no_cert.list_actions(options=short)
        with flight.connect(
            loc, tls_root_certs=b["ca"], cert_chain=b["rogue_cert"], private_key=b["rogue_key"]
        ) as rogue:
            with pytest.raises(flight.FlightUnavailableError):
                rogue.list_actions(options=short)
    finally:
        server.shutdown()


@pytest.mark.parametrize("kind", KINDS)
def test_tls_plus_token(pki, kind):
    server = _tls_server(pki, mtls=False, kind=kind, token=TOKEN)
    try:
        with flight.connect(
            f"grpc+tls://localhost:{server.port}", tls_root_certs=pki["bytes"]["ca"]
        ) as client:
            outcomes = _every_rpc(client)
            assert all(isinstance(e, flight.FlightUnauthenticatedError) for e in outcomes.values())
            ok = flight.FlightCallOptions(headers=auth_headers(TOKEN), timeout=10)
            assert _exchange(client, ok).num_rows == 2
    finally:
        server.shutdown()


def _as_table(data) -> pa.Table:
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return data.combine_chunks()
    return pa.Table.from_batches(list(data))


def test_fq_client_with_token_and_tls(pki):
    """The flightquant Client passes token and TLS roots through (once client.py exists)."""
    cls = _fq_server_cls()
    try:
        from flightquant.client import Client
    except ImportError:
        pytest.skip("flightquant.client not available yet")
    if cls is None:
        pytest.skip("flightquant.server not available yet")
    import flightquant as fq

    server = _tls_server(pki, mtls=False, kind="flightquant", token=TOKEN)
    try:
        loc = f"grpc+tls://localhost:{server.port}"
        with Client(loc, token=TOKEN, tls_root_certs=pki["bytes"]["ca"]) as client:
            got = client.quantize(_BATCH, bits=4, group_size=2)
        want = fq.quantize(_BATCH, bits=4, group_size=2)
        assert _as_table(got).equals(_as_table(want))
        with Client(loc, token="wrong", tls_root_certs=pki["bytes"]["ca"]) as bad:
            with pytest.raises(flight.FlightUnauthenticatedError):
                bad.quantize(_BATCH, bits=4, group_size=2)
    finally:
        server.shutdown()
