"""A deployment that lets no one in: TLS and SuperNode authentication on the loopback.

One SuperLink with TLS (this federation's own CA, ``python -m pfedmoap.flower.credentials``) and SuperNode
authentication (``--enable-supernode-auth``, keys registered with ``flwr supernode register``), and six partitions:
two SuperNodes as they should be, and four that must not get in: one whose public key was never registered, one
that connects without TLS, one that trusts another CA, and one that presents a registered public key but signs
with another private key. The run goes on with the two, says in its log which partitions have no node, and counts
them failed in every round; none of the four ever receives a message. (The TLS + authenticated deployment's equality
with the in-process run is tests/test_flower_deploy.py: profiling/flower_deploy.sh is secure by default.) Slow.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("cryptography")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="Flower's CLI is not on PATH"),
]

from test_flower_faults import Loopback, _rounds  # noqa: E402

from pfedmoap.flower.credentials import create  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOOD, UNREGISTERED, NO_TLS, OTHER_CA, WRONG_KEY = 0, 2, 3, 4, 5
CLIENTS = 6
# a SuperNode that presents node 5's registered public key and signs with another private key: Flower's SuperNode
# derives the public key from the private one, so this test-only launcher hands it both
IMPOSTOR = """
import importlib
import sys
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

cli = importlib.import_module("flwr.supernode.cli.flower_supernode")

signing = load_ssh_private_key(open(sys.argv[1], "rb").read(), None)
presented = load_ssh_public_key(open(sys.argv[2], "rb").read())
cli._try_setup_client_authentication = lambda args: (signing, presented)
sys.argv = ["flower-supernode", *sys.argv[3:]]
sys.exit(cli.flower_supernode())
"""


class SecureLoopback(Loopback):
    """The test Loopback with TLS on the SuperLink, SuperNode authentication, and a ``flwr`` connection that trusts
    the federation's CA."""

    def __init__(self, root: Path, port: int, creds):
        super().__init__(root, port)
        self.creds = creds
        (self.home / "config.toml").write_text(
            f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{creds.ca}"\n'
        )

    def superlink(self, database: Path | None = None) -> subprocess.Popen:
        args = ["flower-superlink", "--ssl-ca-certfile", str(self.creds.ca), "--ssl-certfile",
                str(self.creds.certificate), "--ssl-keyfile", str(self.creds.key), "--enable-supernode-auth",
                "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        return self._wait_port(self._start(args, "link.log"))

    def register(self, k: int) -> int:
        """Put node ``k``'s public key on the SuperLink's list; the node id the SuperLink gives it."""
        done = subprocess.run(
            ["flwr", "supernode", "register", str(self.creds.node_public(k)), "loopback"],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return int(re.search(r"SuperNode (\d+) registered", done.stdout).group(1))

    def secure_node(self, pid: int, head: list[str]) -> None:
        state = self.root / f"node-{pid}"
        config = f"partition-id={pid} num-partitions={CLIENTS} state-dir='{state}' feature-cache='{state}/features'"
        self.nodes[pid] = self._start(
            [*head, "--superlink", f"127.0.0.1:{self.port}", "--port", str(self.port + 10 + pid),
             "--node-config", config],
            f"supernode-{pid}.log",
        )  # fmt: skip


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """One run: partitions 0 and 1 on good SuperNodes, 2-5 on SuperNodes that must not get in."""
    root = tmp_path_factory.mktemp("secure")
    creds = create(root / "credentials", nodes=CLIENTS)
    other = create(root / "other-ca", nodes=1)
    lb = SecureLoopback(root, 19900, creds)
    try:
        lb.superlink()
        # every key but UNREGISTERED's is on the list
        ids = {k: lb.register(k) for k in (0, 1, NO_TLS, OTHER_CA, WRONG_KEY)}
        auth = ["--auth-supernode-private-key"]
        for k in (0, 1):
            lb.secure_node(k, ["flower-supernode", "--root-certificates", str(creds.ca), *auth, str(creds.node_key(k))])
        lb.secure_node(UNREGISTERED, ["flower-supernode", "--root-certificates", str(creds.ca), *auth,
                                      str(create(root / "stranger", nodes=1).node_key(0))])  # fmt: skip
        # plaintext gRPC against the TLS SuperLink (with a key, Flower's SuperNode would not even start: exit 303)
        lb.secure_node(NO_TLS, ["flower-supernode", "--insecure"])
        lb.secure_node(OTHER_CA, ["flower-supernode", "--root-certificates", str(other.ca), *auth,
                                  str(creds.node_key(OTHER_CA))])  # fmt: skip
        impostor = [sys.executable, "-c", IMPOSTOR, str(other.node_key(0)), str(creds.node_public(WRONG_KEY)),
                    "--root-certificates", str(creds.ca), *auth, str(other.node_key(0))]  # fmt: skip
        lb.secure_node(WRONG_KEY, impostor)
        run = root / "run"
        flwr = lb.flwr_run(f"clients={CLIENTS} experts=1 rounds=2 connect-timeout=25 out='{run}'")
        assert flwr.wait(timeout=480) == 0, (root / "flwr-run.log").read_text()[-3000:]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (run / "summary.json").exists():
            time.sleep(0.2)
        yield root, run, ids
    finally:
        lb.close()


def _log(root: Path, name: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", (root / name).read_text(errors="replace"))


def _never_reached(root: Path, pid: int) -> None:
    """The node of partition ``pid`` never received a message: no worker, no saved state, no feature cache."""
    state = root / f"node-{pid}"
    assert not state.exists() or not any(state.rglob("*.state")), list(state.rglob("*"))
    assert not (state / "worker.log").exists()
    assert "SuperNode ID:" not in _log(root, f"supernode-{pid}.log")  # the SuperLink never gave it a node id


def _failed_every_round(run: Path, pid: int) -> None:
    rounds = _rounds(run)
    assert len(rounds) == 2
    for record in rounds:
        failed = {int(item["client"]): item["reason"] for item in record["failed"]}
        assert pid in failed and "no node" in failed[pid], record["failed"]
        assert {int(item["client"]) for item in record["eval_failed"]} >= {pid}


def test_the_run_goes_on_with_the_nodes_that_got_in(refused):
    root, run, ids = refused
    rounds = _rounds(run)
    assert [r["round"] for r in rounds] == [1, 2]
    log = (root / "flwr-run.log").read_text()
    assert "only 2 of 6 nodes connected" in log and "partitions [2, 3, 4, 5] have no node" in log
    for pid in (0, 1):
        assert (root / f"node-{pid}" / "worker.log").exists()  # the good nodes trained
        assert f"Activated node_id={ids[pid]}" in _log(root, "link.log")
    assert _log(root, "link.log").count("[Fleet.ActivateNode] Activated") == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["engine"] == "flower"


def test_a_node_whose_key_is_not_registered_is_refused(refused):
    root, run, ids = refused
    _never_reached(root, UNREGISTERED)
    _failed_every_round(run, UNREGISTERED)
    assert "Failed to activate SuperNode" in _log(root, f"supernode-{UNREGISTERED}.log")
    assert "No SuperNode found with the given public key" in _log(root, "link.log")


def test_a_node_without_tls_cannot_join(refused):
    root, run, ids = refused
    _never_reached(root, NO_TLS)
    _failed_every_round(run, NO_TLS)


def test_a_node_that_trusts_another_ca_cannot_join(refused):
    root, run, ids = refused
    _never_reached(root, OTHER_CA)
    _failed_every_round(run, OTHER_CA)
    assert "CERTIFICATE_VERIFY_FAILED" in _log(root, f"supernode-{OTHER_CA}.log")


def test_a_registered_public_key_with_the_wrong_private_key_is_refused(refused):
    root, run, ids = refused
    _never_reached(root, WRONG_KEY)
    _failed_every_round(run, WRONG_KEY)
    # the SuperLink answered its signed requests with 401: the registered node was never activated, the impostor
    # got no node id and its SuperNode stopped
    assert f"Activated node_id={ids[WRONG_KEY]}" not in _log(root, "link.log")
    assert "SuperNode ID:" not in _log(root, f"supernode-{WRONG_KEY}.log")
    assert "terminated" in _log(root, f"supernode-{WRONG_KEY}.log")
