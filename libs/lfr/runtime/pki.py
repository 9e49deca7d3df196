"""Development PKI: a local CA and one EC P-256 certificate per name (service, nats, client), each usable
as both TLS server and TLS client certificate (mutual TLS). For development and tests only: production
certificates come from the operator's own PKI, in the same file layout (ca.pem, <name>.pem, <name>.key)."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes as PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
RENEW_BEFORE = timedelta(days=1)  # a certificate expiring within this is replaced
CA_MIN_DAYS = 365


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file atomically, readable by its owner only (the mode is set before any byte is written)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_common_name(pem_bytes: bytes) -> str:
    """The subject CN of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(pem_bytes)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _load(folder: Path, name: str) -> x509.Certificate | None:
    """The certificate <name>.pem if it and its key exist and it is not about to expire."""
    pem, key = folder / f"{name}.pem", folder / f"{name}.key"
    if not (pem.is_file() and key.is_file()):
        return None
    try:
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
    except ValueError:
        return None
    return cert if cert.not_valid_after_utc - RENEW_BEFORE > datetime.now(UTC) else None


def _issue(folder: Path, name: str, subject: x509.Name, extensions: list[tuple[x509.ExtensionType, bool]],
           days: int, issuer: tuple[x509.Certificate, PrivateKey] | None) -> tuple[x509.Certificate, PrivateKey]:
    """Create <name>.key and <name>.pem; self-signed when issuer is None. Returns (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, signing_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    cert = builder.sign(signing_key, hashes.SHA256())
    write_private(folder / f"{name}.key", key_pem(key))
    write_private(folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _subject_alt_names(name: str, hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in dict.fromkeys([name, "localhost", *hosts]):  # ordered, without duplicates
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _still_good(cert: x509.Certificate | None, ca: x509.Certificate, sans: list[x509.GeneralName]) -> bool:
    """cert was signed by ca and names at least sans."""
    if cert is None:
        return False
    try:
        cert.verify_directly_issued_by(ca)
        present = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:  # InvalidSignature, ValueError (issuer name), TypeError (key type), ExtensionNotFound
        return False
    return set(sans) <= set(present)


def create_dev_pki(folder: str | os.PathLike, names: Iterable[str],
                   hosts: Iterable[str] = ("localhost", "127.0.0.1"), days: int = 30) -> Path:
    """Create or refresh a development CA (ca.pem, ca.key) and <name>.pem / <name>.key for each name in
    folder. Idempotent: files still valid for more than a day, signed by the current CA and naming all the
    hosts are kept. Returns the folder."""
    names, hosts = list(names), list(hosts)
    for name in names:
        if not NAME_RE.fullmatch(name) or name == "ca":
            raise ValueError(f"certificate name {name!r}: use letters, digits, '_' and '-' (and not 'ca')")
    if days < 1:
        raise ValueError("days must be at least 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)

    ca_cert = _load(folder, "ca")
    if ca_cert is not None and ca_cert.not_valid_after_utc < datetime.now(UTC) + timedelta(days=days):
        ca_cert = None  # the CA must outlive the certificates it signs
    if ca_cert is None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                f"LFR development CA {secrets.token_hex(4)}")])
        ca = _issue(folder, "ca", subject, [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                           encipher_only=False, decipher_only=False), True),
        ], max(days, CA_MIN_DAYS), None)
    else:
        ca = (ca_cert, serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None))

    for name in names:
        sans = _subject_alt_names(name, hosts)
        if _still_good(_load(folder, name), ca[0], sans):
            continue
        _issue(folder, name, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                           encipher_only=False, decipher_only=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            (x509.SubjectAlternativeName(sans), False),
        ], days, ca)
    return folder
