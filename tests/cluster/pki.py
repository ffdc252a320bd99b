"""Certificates and keys for the test control plane, generated fresh at every start.

What lives here: a throwaway CA, the API server's serving certificate (for
127.0.0.1, localhost and the in-cluster service names), client certificates
for the admin, kube-controller-manager, kube-scheduler and the API server's
kubelet client, and the service-account signing key pair.

Imports: the ``cryptography`` package and the standard library.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():
    # P-256 keys: generation is instant, unlike RSA, and every component accepts them.
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(path: Path, cert) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _builder(subject, issuer, public_key):
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7)))


def generate(directory: Path) -> dict[str, Path]:
    """Write all certificates and keys into ``directory``; return a name -> path map.

    Names: ca.crt/ca.key, apiserver.crt/.key, admin.crt/.key,
    controller-manager.crt/.key, scheduler.crt/.key, kubelet-client.crt/.key, node.crt/.key,
    sa.key (service-account signing key, PKCS#8) and sa.pub.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    ca_key = _key()
    ca_name = _name("morphml-test-ca")
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    for name in ("ca.key", "ca.crt"):
        paths[name] = directory / name
    _write_key(paths["ca.key"], ca_key)
    _write_cert(paths["ca.crt"], ca_cert)

    def leaf(stem: str, cn: str, org: str | None, server: bool) -> None:
        key = _key()
        builder = _builder(_name(cn, org), ca_name, key.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        if server:
            dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                   "kubernetes.default.svc.cluster.local"]
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(d) for d in dns]
                + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "10.96.0.1")]),
                critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        paths[f"{stem}.key"] = directory / f"{stem}.key"
        paths[f"{stem}.crt"] = directory / f"{stem}.crt"
        _write_key(paths[f"{stem}.key"], key)
        _write_cert(paths[f"{stem}.crt"], cert)

    leaf("apiserver", "kube-apiserver", None, server=True)
    leaf("node", "system:node:morphml-node-0", "system:nodes", server=True)  # the node agent's log endpoint
    leaf("admin", "kubernetes-admin", "system:masters", server=False)
    leaf("controller-manager", "system:kube-controller-manager", None, server=False)
    leaf("scheduler", "system:kube-scheduler", None, server=False)
    leaf("kubelet-client", "kube-apiserver-kubelet-client", "system:masters", server=False)

    sa_key = _key()
    paths["sa.key"] = directory / "sa.key"
    paths["sa.pub"] = directory / "sa.pub"
    _write_key(paths["sa.key"], sa_key)
    paths["sa.pub"].write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return paths
