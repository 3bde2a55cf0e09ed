"""A client's frozen image features on disk (``--feature-cache DIR``), so that a process that builds the same
client again (a fresh Flower ClientApp process per message, a rerun of an experiment) loads them instead of running
the image encoder over every image.

One file per client, ``DIR/client-<cid>.pt``, holding the features, the labels and a **key**: a hash of everything
the features depend on:

- the image tower's weights: a fingerprint of its parameters and buffers, so a weights file, a tag and random
  weights all count by what they are;
- the dataset: its name, root, domains, sizes and data seed (its files' contents are not hashed: a dataset folder
  replaced in place under the same name and root is not detected);
- the client's partition: the very train / test indices of its split;
- the preprocessing: image size, ``--precision`` (bf16 features differ), local or pooled features.

A file is written atomically (a temporary file in the same folder, then ``os.replace``), so a killed process
leaves the old file or the new one, never half of one. On load, the key and a checksum of the tensors' bytes are
verified; a file that is truncated, corrupt, or made for another model, dataset or partition is rebuilt, and one
log line says why. Nothing private is in it: the features are what the node's own frozen encoder makes of its own
images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base.files import atomic_file

FORMAT = 2  # 2: the own 80/20 splits of domainnet, office-caltech10 and office31 are drawn per domain


def tower_fingerprint(module: nn.Module) -> str:
    """A hash of a module's parameters and buffers (names, shapes, dtypes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _checksum(tensors: Mapping[str, torch.Tensor | None]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        if t is not None:
            h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
            h.update(_bytes(t))
    return h.hexdigest()


def client_key(parts: Mapping[str, Any], train_idx: np.ndarray, test_idx: np.ndarray) -> str:
    """The key of one client's features: ``parts`` (model fingerprint, dataset, preprocessing; JSON values) and its
    split's indices."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(dict(parts), sort_keys=True).encode())
    for idx in (train_idx, test_idx):
        h.update(np.asarray(idx, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


class FeatureCache:
    """Client feature files in one folder; ``log`` gets one line whenever a file is not used as it stands."""

    def __init__(self, root: str | Path, log: Callable[[str], None]):
        self.root = Path(root)
        self.log = log

    def path(self, cid: int) -> Path:
        return self.root / f"client-{cid}.pt"

    def load(self, cid: int, key: str) -> dict[str, torch.Tensor | None] | None:
        """The stored tensors of client ``cid`` if the file is whole and made for ``key``, else None (said)."""
        path = self.path(cid)
        if not path.exists():
            return None
        if not path.is_file():
            self.log(f"feature cache {path} is not a file; client {cid}'s features are encoded and not cached")
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            tensors = blob["tensors"]
            ok_format = blob.get("format") == FORMAT
            ok_key = blob.get("key") == key
            ok_sum = ok_format and ok_key and blob.get("checksum") == _checksum(tensors)
        except Exception as exc:  # noqa: BLE001 (a truncated, empty or foreign file: rebuild it)
            self.log(f"feature cache {path} does not load ({type(exc).__name__}); re-encoding client {cid}")
            return None
        if not ok_format or not ok_key:
            self.log(f"feature cache {path} was made for another model, dataset or partition; re-encoding client {cid}")
            return None
        if not ok_sum:
            self.log(f"feature cache {path} fails its checksum (corrupt); re-encoding client {cid}")
            return None
        return tensors

    def store(self, cid: int, key: str, tensors: Mapping[str, torch.Tensor | None]) -> None:
        """Write client ``cid``'s tensors atomically (on CPU). A cache that cannot be written (a folder in the file's
        place, a full disk) costs only the caching: one log line, and the run goes on."""
        path = self.path(cid)
        if path.exists() and not path.is_file():
            return  # said when it was loaded
        cpu = {k: None if t is None else t.detach().cpu() for k, t in tensors.items()}
        blob = {"format": FORMAT, "key": key, "checksum": _checksum(cpu), "tensors": cpu}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as f:
                torch.save(blob, f)
        except OSError as exc:
            self.log(f"feature cache {path} cannot be written ({exc.strerror or type(exc).__name__}); not cached")
