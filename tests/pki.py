"""A throwaway certificate authority for the TLS tests: keys, certificates and PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def new_cert(subject: str, key, issuer_cert=None, issuer_key=None, ca=False, ip=None):
    """A certificate for key, self-signed unless an issuer is given; ip: its one SAN."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(root: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Each file written 0600 under root -> its path, by name."""
    paths = {}
    for name, data in files.items():
        paths[name] = root / name
        paths[name].write_bytes(data)
        paths[name].chmod(0o600)
    return paths


def internal_tls_files(root: Path) -> dict[str, Path]:
    """A CA and one certificate for 127.0.0.1 signed by it, with its key, written under root: the
    StackConfig settings of a stack whose services use them for mutual TLS."""
    ca_key, key = new_key(), new_key()
    ca = new_cert("tokenpool internal CA", ca_key, ca=True)
    cert = new_cert("tokenpool service", key, ca, ca_key, ip="127.0.0.1")
    paths = write_private(root, {"ca.pem": pem(ca), "service.key": pem(key), "service.pem": pem(cert)})
    return {"internal_tls_cert": paths["service.pem"], "internal_tls_key": paths["service.key"],
            "internal_tls_ca": paths["ca.pem"]}
