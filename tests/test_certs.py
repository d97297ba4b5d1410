"""Tests for the project CA, party certificates and identity extraction over mTLS."""

from __future__ import annotations

import datetime as dt
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.verification import DNSName, PolicyBuilder, Store, VerificationError

from securecollab.net.certs import (
    ROLES,
    PartyIdentity,
    TlsFiles,
    create_ca,
    default_role,
    identity_from_auth_context,
    identity_from_pem,
    issue_party_cert,
    make_certs,
    parse_party_spec,
)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _builder(ca_path: Path) -> PolicyBuilder:
    return PolicyBuilder().store(Store([_load(ca_path)])).time(dt.datetime.now(dt.timezone.utc))


@pytest.fixture
def cert_dir(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    make_certs(d, ["coordinator", "client-0", "party-1:dealer"])
    return d


@pytest.fixture
def other_dir(tmp_path: Path) -> Path:
    """A second, unrelated CA with a cert that must not be trusted by ours."""
    d = tmp_path / "other"
    make_certs(d, ["client-0"])
    return d


def test_party_cert_verifies_as_client_and_server(cert_dir: Path):
    ca = cert_dir / "ca.pem"
    leaf = _load(cert_dir / "client-0.pem")
    verified = _builder(ca).build_client_verifier().verify(leaf, [])
    assert "securecollab://client/client-0" in [
        s.value for s in verified.subjects if isinstance(s, x509.UniformResourceIdentifier)
    ]
    for host in ("localhost", "client-0"):
        _builder(ca).build_server_verifier(DNSName(host)).verify(leaf, [])


def test_ca_and_leaf_constraints(cert_dir: Path):
    ca = _load(cert_dir / "ca.pem")
    leaf = _load(cert_dir / "coordinator.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH}
    leaf.verify_directly_issued_by(ca)  # signature checked with the CA public key


def test_cert_from_other_ca_does_not_verify(cert_dir: Path, other_dir: Path):
    foreign = _load(other_dir / "client-0.pem")
    with pytest.raises(VerificationError):
        _builder(cert_dir / "ca.pem").build_client_verifier().verify(foreign, [])
    # Same CA name, different key: only the signature check can tell them apart.
    with pytest.raises(InvalidSignature):
        foreign.verify_directly_issued_by(_load(cert_dir / "ca.pem"))


def test_identity_round_trip(cert_dir: Path):
    pem = lambda pid: (cert_dir / f"{pid}.pem").read_bytes()  # noqa: E731
    assert identity_from_pem(pem("coordinator")) == PartyIdentity("coordinator", "coordinator")
    assert identity_from_pem(pem("client-0")) == PartyIdentity("client-0", "client")
    assert identity_from_pem(pem("party-1")) == PartyIdentity("party-1", "dealer")


def test_san_contains_hosts_and_loopback(tmp_path: Path):
    create_ca(tmp_path)
    cert_path, _ = issue_party_cert(tmp_path, "he-0", "he", hosts=["he.internal", "10.0.0.7"])
    san = _load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"he-0", "localhost", "he.internal"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.7"}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("client-3", PartyIdentity("client-3", "client")),
        ("party-0", PartyIdentity("party-0", "party")),
        ("coordinator", PartyIdentity("coordinator", "coordinator")),
        ("split-12", PartyIdentity("split-12", "split")),
        ("alice:party", PartyIdentity("alice", "party")),
        ("ops-1:operator", PartyIdentity("ops-1", "operator")),
    ],
)
def test_party_spec_parsing(spec, expected):
    assert parse_party_spec(spec) == expected


def test_default_role_only_strips_trailing_digits():
    assert default_role("client-3") == "client"
    assert default_role("client-x") == "client-x"
    assert default_role("he") == "he"


@pytest.mark.parametrize("party_id", ["", "a/b", "../x", ".hidden", "x" * 65, "sp ace", "ca", "é"])
def test_invalid_party_ids_rejected(tmp_path: Path, party_id: str):
    create_ca(tmp_path)
    with pytest.raises(ValueError, match="party id"):
        issue_party_cert(tmp_path, party_id, "party")


def test_invalid_role_rejected(tmp_path: Path):
    create_ca(tmp_path)
    with pytest.raises(ValueError, match="role"):
        issue_party_cert(tmp_path, "bob", "admin")
    # "bob" has no valid default role, so make_certs must refuse it too.
    with pytest.raises(ValueError, match="role"):
        make_certs(tmp_path, ["bob"])
    assert not (tmp_path / "bob.pem").exists()
    assert "admin" not in ROLES


def test_key_files_are_private(cert_dir: Path):
    for key in ("ca.key", "coordinator.key", "client-0.key"):
        assert stat.S_IMODE((cert_dir / key).stat().st_mode) == 0o600


def test_reissue_tightens_existing_key_mode(cert_dir: Path):
    key = cert_dir / "client-0.key"
    key.chmod(0o644)
    issue_party_cert(cert_dir, "client-0", "client")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_refuses_to_overwrite_ca(cert_dir: Path):
    before = (cert_dir / "ca.pem").read_bytes()
    with pytest.raises(FileExistsError):
        create_ca(cert_dir)
    assert (cert_dir / "ca.pem").read_bytes() == before
    # make_certs reuses the existing CA rather than replacing it.
    make_certs(cert_dir, ["aggregator"])
    assert (cert_dir / "ca.pem").read_bytes() == before
    create_ca(cert_dir, overwrite=True)
    assert (cert_dir / "ca.pem").read_bytes() != before


def test_issue_without_ca_is_clear(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="create the CA"):
        issue_party_cert(tmp_path, "party-0", "party")


def test_tls_files(cert_dir: Path):
    files = TlsFiles.for_party(cert_dir, "client-0")
    ca, cert, key = files.read()
    assert ca == (cert_dir / "ca.pem").read_bytes()
    assert identity_from_pem(cert) == PartyIdentity("client-0", "client")
    assert b"PRIVATE KEY" in key
    with pytest.raises(FileNotFoundError, match="certificate not found"):
        TlsFiles.for_party(cert_dir, "nobody").read()


def test_identity_fallback_and_absent():
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def self_signed(name: x509.Name) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    cn_ou = x509.Name([
        x509.NameAttribute(x509.NameOID.COMMON_NAME, "party-2"),
        x509.NameAttribute(x509.NameOID.ORGANIZATIONAL_UNIT_NAME, "party"),
    ])
    assert identity_from_pem(self_signed(cn_ou)) == PartyIdentity("party-2", "party")
    bare = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "nobody")])
    with pytest.raises(ValueError, match="no securecollab identity"):
        identity_from_pem(self_signed(bare))


def test_identity_from_auth_context_without_cert():
    assert identity_from_auth_context({}) is None
    assert identity_from_auth_context({"transport_security_type": [b"ssl"]}) is None


# --- real mutual-TLS gRPC round trip -------------------------------------------------

_METHOD = "/securecollab.test.Whoami/Whoami"


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    ident = identity_from_auth_context(context.auth_context())
    return b"" if ident is None else f"{ident.role}/{ident.party_id}".encode()


@pytest.fixture
def mtls_port(cert_dir: Path):
    ca, cert, key = TlsFiles.for_party(cert_dir, "coordinator").read()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "securecollab.test.Whoami",
        {"Whoami": grpc.unary_unary_rpc_method_handler(_whoami)},  # bytes in, bytes out
    )
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    assert port
    server.start()
    yield port
    server.stop(grace=None)


def _call(port: int, creds: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        return channel.unary_unary(_METHOD)(b"ping", timeout=5)


def test_grpc_mtls_peer_identity(cert_dir: Path, mtls_port: int):
    ca, cert, key = TlsFiles.for_party(cert_dir, "party-1").read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    assert _call(mtls_port, creds) == b"dealer/party-1"


def test_grpc_rejects_client_from_other_ca(cert_dir: Path, other_dir: Path, mtls_port: int):
    ca = (cert_dir / "ca.pem").read_bytes()  # client trusts our server ...
    _, cert, key = TlsFiles.for_party(other_dir, "client-0").read()  # ... but its cert is foreign
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with pytest.raises(grpc.RpcError) as err:
        _call(mtls_port, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_rejects_client_without_cert(cert_dir: Path, mtls_port: int):
    creds = grpc.ssl_channel_credentials(root_certificates=(cert_dir / "ca.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        _call(mtls_port, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
