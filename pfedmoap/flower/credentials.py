"""Throwaway credentials for a Flower deployment with TLS and SuperNode authentication.

``python -m pfedmoap.flower.credentials OUT --nodes N --host HOST ...`` writes into a new folder ``OUT``:

- ``ca.crt`` / ``ca.key``: a certificate authority made for this federation alone;
- ``superlink.crt`` / ``superlink.key``: the SuperLink's TLS certificate, signed by that CA, valid for every
  ``--host`` (an IP address or a DNS name the SuperNodes and ``flwr`` reach it by; 127.0.0.1 and localhost always);
- ``node-K.key`` / ``node-K.pub`` for K = 0 .. N-1: each SuperNode's authentication key pair (EC P-384, OpenSSH
  format, as ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read them).

Private keys are created with mode 0600 in a folder of mode 0700 (no moment where another user could read them);
certificates and public keys are 0644. What goes where: ``ca.crt`` to every SuperNode and to wherever ``flwr`` runs
(``root-certificates``), ``superlink.crt`` / ``superlink.key`` / ``ca.crt`` to the SuperLink, ``node-K.key`` to
SuperNode K only, and every ``node-K.pub`` through ``flwr supernode register``. ``ca.key`` signs nothing after this
command: keep it offline or delete it. See docs/flower.md ("Who can join, who can read the wire").
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..base.cli import OneLineParser, run_command
from ..base.errors import UserError

PROG = "python -m pfedmoap.flower.credentials"
LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Credentials:
    """The files of one federation's credentials (see the module docstring)."""

    folder: Path
    nodes: int
    hosts: tuple[str, ...]  # what the SuperLink's certificate is valid for

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def certificate(self) -> Path:
        return self.folder / "superlink.crt"

    @property
    def key(self) -> Path:
        return self.folder / "superlink.key"

    def node_key(self, k: int) -> Path:
        return self.folder / f"node-{k}.key"

    def node_public(self, k: int) -> Path:
        return self.folder / f"node-{k}.pub"


def create(folder: str | os.PathLike, nodes: int, hosts: Sequence[str] = (), days: int = 30) -> Credentials:
    """Write a new federation's CA, SuperLink certificate and ``nodes`` SuperNode key pairs into ``folder``, which
    must not exist or be empty (nothing is ever overwritten). Returns where they are."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if nodes < 0:
        raise UserError(f"nodes={nodes} must be 0 or more")
    if days < 1:
        raise UserError(f"days={days} must be at least 1")
    names = list(dict.fromkeys([*LOOPBACK, *hosts]))
    for host in names:
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise UserError(f"host={host!r} is not an IP address or a DNS name")
    out = Path(folder)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"out={str(out)!r} exists and is not an empty folder; credentials are never overwritten")
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        out.chmod(0o700)
    except OSError as exc:
        raise UserError(f"out={str(out)!r} cannot be created ({exc.strerror or type(exc).__name__})") from None

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def certificate(subject: str, key, issuer_name, issuer_key, ca: bool, sans=()) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        )
        if ca:
            usage = dict(key_cert_sign=True, crl_sign=True, digital_signature=False)
        else:
            usage = dict(key_cert_sign=False, crl_sign=False, digital_signature=True)
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        builder = builder.add_extension(
            x509.KeyUsage(content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False, **usage),
            critical=True,
        )  # fmt: skip
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pfedmoap federation CA")])
    link_key = ec.generate_private_key(ec.SECP384R1())
    sans = [_san(host) for host in names]
    creds = Credentials(out, nodes, tuple(names))
    _write(out / "ca.key", pem_key(ca_key), private=True)
    _write(creds.ca, certificate("pfedmoap federation CA", ca_key, ca_name, ca_key, ca=True), private=False)
    _write(creds.key, pem_key(link_key), private=True)
    _write(creds.certificate, certificate("pfedmoap superlink", link_key, ca_name, ca_key, False, sans), False)
    for k in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(creds.node_key(k), private, private=True)
        _write(creds.node_public(k), public + f" pfedmoap-node-{k}\n".encode(), private=False)
    return creds


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool) -> None:
    """A new file, created with its final mode (a private key is never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if private else 0o644)  # the umask may have taken bits away from 0644


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a new folder for the credentials")
    parser.add_argument("--nodes", type=int, required=True, help="SuperNode key pairs to make (node-0 .. node-N-1)")
    parser.add_argument(
        "--host", action="append", default=[], help="an address the SuperLink is reached at (repeat; loopback always)"
    )
    parser.add_argument("--days", type=int, default=30, help="how long the certificates are valid (30)")
    args = parser.parse_args(argv)

    def job() -> int:
        creds = create(args.out, args.nodes, args.host, args.days)
        print(f"credentials for a SuperLink at {', '.join(creds.hosts)} and {creds.nodes} SuperNodes in {creds.folder}")
        return 0

    return run_command(PROG, job)


if __name__ == "__main__":
    sys.exit(main())
