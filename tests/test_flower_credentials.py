"""``python -m pfedmoap.flower.credentials``: a federation's CA, the SuperLink's certificate and the SuperNodes' key
pairs, with file modes that keep private keys private and nothing ever overwritten. Fast (no Flower process)."""

from __future__ import annotations

import ipaddress
import stat

import pytest

pytest.importorskip("cryptography")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key  # noqa: E402

from pfedmoap.flower.credentials import create, main  # noqa: E402


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_files_their_modes_and_the_certificate_chain(tmp_path):
    creds = create(tmp_path / "creds", nodes=2, hosts=["10.1.2.3", "server.example.org"])
    assert _mode(creds.folder) == 0o700
    assert sorted(p.name for p in creds.folder.iterdir()) == [
        "ca.crt", "ca.key", "node-0.key", "node-0.pub", "node-1.key", "node-1.pub", "superlink.crt", "superlink.key",
    ]  # fmt: skip
    for name in ("ca.key", "superlink.key", "node-0.key", "node-1.key"):
        assert _mode(creds.folder / name) == 0o600, name
    for name in ("ca.crt", "superlink.crt", "node-0.pub"):
        assert _mode(creds.folder / name) == 0o644, name
    ca = x509.load_pem_x509_certificate(creds.ca.read_bytes())
    link = x509.load_pem_x509_certificate(creds.certificate.read_bytes())
    link.verify_directly_issued_by(ca)  # raises if the SuperLink's certificate is not the CA's
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not link.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a) for a in ("127.0.0.1", "10.1.2.3")}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "server.example.org"}
    # the node keys are what flower-supernode and flwr supernode register read: OpenSSH EC keys that pair up
    for k in range(2):
        private = load_ssh_private_key(creds.node_key(k).read_bytes(), None)
        public = load_ssh_public_key(creds.node_public(k).read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()
        assert public.curve.name == "secp384r1"
    other = load_ssh_public_key(creds.node_public(1).read_bytes())
    assert other.public_numbers() != load_ssh_public_key(creds.node_public(0).read_bytes()).public_numbers()


def test_a_used_folder_or_a_bad_host_is_one_line_and_nothing_is_overwritten(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "ca.crt").write_text("someone's CA")
    assert main([str(used), "--nodes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists and is not an empty folder" in err
    assert [p.name for p in used.iterdir()] == ["ca.crt"] and (used / "ca.crt").read_text() == "someone's CA"
    assert main([str(tmp_path / "new"), "--nodes", "1", "--host", "a b"]) == 2
    assert "is not an IP address or a DNS name" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main([str(tmp_path / "ok"), "--nodes", "3"]) == 0
    assert "3 SuperNodes" in capsys.readouterr().out
