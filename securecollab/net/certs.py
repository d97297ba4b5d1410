"""Project CA and per-party TLS certificates that carry each party's identity.

Every service talks mutual TLS. A party's identity (party id + role) lives in
its certificate as a SAN URI ``securecollab://<role>/<party_id>`` (with CN/OU as
a fallback), so servers can read who is calling from the gRPC auth context.
Keys are ECDSA P-256, signatures SHA-256.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("coordinator", "party", "dealer", "client", "aggregator", "he", "split", "operator", "owner")

URI_SCHEME = "securecollab"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"

# First char alphanumeric so ids are never "." / ".." or look like options.
_PARTY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Allow for small clock differences between containers.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class PartyIdentity:
    party_id: str
    role: str


def validate_party_id(party_id: str) -> str:
    if not isinstance(party_id, str) or not _PARTY_ID_RE.fullmatch(party_id):
        raise ValueError(
            f"invalid party id {party_id!r}: use 1-64 chars from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    # The CA's own files are ca.pem / ca.key; a party named "ca" would clobber them.
    if party_id.lower() == "ca":
        raise ValueError("party id 'ca' is reserved for the certificate authority")
    return party_id


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def default_role(party_id: str) -> str:
    """Role implied by a party id: 'client-3' -> 'client', 'coordinator' -> 'coordinator'."""
    return re.sub(r"-\d+$", "", party_id)


def identity_uri(identity: PartyIdentity) -> str:
    return f"{URI_SCHEME}://{identity.role}/{identity.party_id}"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    # gRPC needs an unencrypted key; file permissions are what protect it.
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode is ignored for existing files
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    now = dt.datetime.now(dt.timezone.utc)
    return now - _BACKDATE, now + dt.timedelta(days=days)


def create_ca(
    out_dir: Path,
    *,
    name: str = "securecollab CA",
    days: int = 365,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Create the project CA in out_dir; returns (ca.pem, ca.key)."""
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    # Replacing the CA silently would invalidate every issued party cert.
    if not overwrite and (cert_path.exists() or key_path.exists()):
        raise FileExistsError(f"CA already exists in {out_dir}; pass overwrite=True to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def _load_ca(out_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    for path in (cert_path, key_path):
        if not path.exists():
            raise FileNotFoundError(f"CA file {path} not found; create the CA first (create_ca)")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    return cert, key


def _san(identity: PartyIdentity, hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(identity))]
    # party_id as a DNS name: in containers the service name equals the party id.
    dns = [identity.party_id, "localhost"]
    ips = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    for host in hosts:
        try:
            ips.append(ipaddress.ip_address(host))
        except ValueError:
            dns.append(host)
    names += [x509.DNSName(d) for d in dict.fromkeys(dns)]
    names += [x509.IPAddress(ip) for ip in dict.fromkeys(ips)]
    return x509.SubjectAlternativeName(names)


def issue_party_cert(
    out_dir: Path,
    party_id: str,
    role: str,
    *,
    hosts: Sequence[str] = (),
    days: int = 365,
) -> tuple[Path, Path]:
    """Issue a cert for party_id/role signed by the CA in out_dir; returns (<id>.pem, <id>.key)."""
    identity = PartyIdentity(validate_party_id(party_id), validate_role(role))
    out_dir = Path(out_dir)
    ca_cert, ca_key = _load_ca(out_dir)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, identity.party_id),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
    ])
    not_before, not_after = _validity(days)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        # Both: every party serves and also calls other services.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(_san(identity, hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out_dir / f"{party_id}.pem", out_dir / f"{party_id}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def parse_party_spec(spec: str) -> PartyIdentity:
    """Parse 'party_id[:role]'; the role defaults to the id minus a trailing '-<digits>'."""
    party_id, sep, role = spec.partition(":")
    if not sep:
        role = default_role(party_id)
    return PartyIdentity(validate_party_id(party_id), validate_role(role))


def make_certs(out_dir: Path, parties: Sequence[str], hosts: Sequence[str] = ()) -> list[Path]:
    """Create the CA if missing, then a cert per 'party_id[:role]' spec; returns the cert paths."""
    out_dir = Path(out_dir)
    # Validate every spec first so a typo doesn't leave a half-written directory.
    identities = [parse_party_spec(spec) for spec in parties]
    if not (out_dir / CA_CERT).exists():
        create_ca(out_dir)
    return [
        issue_party_cert(out_dir, ident.party_id, ident.role, hosts=hosts)[0]
        for ident in identities
    ]


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA cert and one party's cert/key, as gRPC credentials need them."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def for_party(cls, cert_dir: Path, party_id: str) -> TlsFiles:
        cert_dir = Path(cert_dir)
        validate_party_id(party_id)
        return cls(cert_dir / CA_CERT, cert_dir / f"{party_id}.pem", cert_dir / f"{party_id}.key")

    def read(self) -> tuple[bytes, bytes, bytes]:
        """Return (ca_pem, cert_pem, key_pem)."""
        out = []
        for what, path in (("CA certificate", self.ca), ("certificate", self.cert), ("private key", self.key)):
            try:
                out.append(Path(path).read_bytes())
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"TLS {what} not found at {path}; generate it with make_certs"
                ) from None
        return out[0], out[1], out[2]


@functools.lru_cache(maxsize=4096)
def identity_from_pem(cert_pem: bytes) -> PartyIdentity:
    """Read the party identity from a PEM certificate (SAN URI, else CN/OU).

    Cached: every call of a party carries the same certificate, and parsing it is a good part of a
    small call's handling (a split-learning step)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    for uri in uris:
        parts = urlsplit(uri)
        party_id = parts.path.lstrip("/")
        if parts.scheme == URI_SCHEME and parts.netloc and party_id:
            return PartyIdentity(party_id=party_id, role=parts.netloc)

    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if cn and ou:
        return PartyIdentity(party_id=str(cn[0].value), role=str(ou[0].value))
    raise ValueError("certificate carries no securecollab identity (no SAN URI and no CN/OU)")


def identity_from_auth_context(auth_context: dict) -> PartyIdentity | None:
    """Peer identity from grpc ServicerContext.auth_context(); None without a client cert."""
    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        return None
    pem = pems[0]
    return identity_from_pem(pem.encode() if isinstance(pem, str) else pem)
