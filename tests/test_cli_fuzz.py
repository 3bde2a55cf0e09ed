"""A seeded fuzz of the real CLI: random combinations of flags and values, valid and invalid, through the parser
and the whole config validation (``--print-config``: everything a run checks before it builds anything).

Every case must end in exit code 0 (the resolved config printed as JSON) or exit code 2 with exactly one line on
stderr; nothing else may escape (no traceback, no other exit code). Nothing trains, so the whole fuzz takes
seconds. The generator is seeded: a failure names its case and reproduces.
"""

from __future__ import annotations

import json
import random

import pytest
from conftest import cli_value_flags

from pfedmoap.base import tracing as profiling
from pfedmoap.train import main

CASES = 1500  # random flag combinations per run of this test

# (plausible, implausible) values by flag type; a case draws a plausible one 70% of the time, so that combinations
# get past the parser into the config's own checks
INTS = (["1", "2", "3", "4", "9", "10", "16", "0"],
        ["-1", "-7", "2147483648", "99999999999999999999", "three", "1.5", "", "0x10", "1e3", " 7", "٣"])  # fmt: skip
FLOATS = (["0.5", "0.001", "1", "1.0", "0", "0.25", "2", "1e-9"],
          ["-0.5", "1.5", "nan", "inf", "-inf", "1e400", "abc", "", "0,5", "--"])  # fmt: skip
WORDS = ["nope", "", "Ünïcode", "knn;rm -rf /", "a b", "NONE", "-x"]


def _values_for(flag: str, kind, text: str, tmp) -> tuple[list[str], list[str]]:
    """(plausible, implausible) values for one flag, from its type and the choices its help text lists."""
    if flag in ("--out", "--data-root", "--pretrained"):
        return tmp["paths"][:2], tmp["paths"][2:] + (["laion9b"] if flag == "--pretrained" else [])
    if flag == "--domains":
        return ["faded", "faded,outline", "photo,noisy,striped"], ["watercolour", ",", "", "faded,,faded"]
    if flag == "--attn-scale":
        return ["sqrt", "10", "0.25"], ["0", "-1", "big", "nan", "inf", ""]
    if kind is int:
        return INTS
    if kind is float:
        return FLOATS
    choices = [c.strip().split(" ")[0] for c in text.split("|")] if "|" in text else []
    if flag == "--dataset":
        choices = ["synthetic", "cifar10", "dtd"]
    return choices or ["synthetic"], WORDS + (["imagenet-xxl"] if flag == "--dataset" else [])


def _case(rng: random.Random, tmp) -> list[str]:
    argv: list[str] = []
    for _ in range(rng.randint(0, 6)):
        roll = rng.random()
        if roll < 0.75:
            flag, _, kind, text = rng.choice(cli_value_flags())
            good, bad = _values_for(flag, kind, text, tmp)
            argv += [flag, rng.choice(good if rng.random() < 0.7 else bad)]
        elif roll < 0.82:
            argv += ["--preset", rng.choice(["synthetic", "synthetic-dirichlet", "cifar10", "dtd", "nope", ""])]
        elif roll < 0.88:
            argv += [rng.choice(["--fused", "--no-fused", "--augment", "--no-augment", "--progress", "--nvtx"])]
        elif roll < 0.92:
            argv += ["--engine", rng.choice(["local", "flower", "ray", ""])]
        elif roll < 0.95:
            argv += ["--resume", rng.choice(tmp["paths"])]
        elif roll < 0.97:
            argv += [rng.choice(["--frobnicate", "--rounds=", "-x", "positional", "--lambda"])]
        else:
            argv += ["--profile", str(tmp["dir"] / "trace.json")]
    return argv + ["--print-config"]


@pytest.fixture
def paths(tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    (held / "config.json").write_text("{}")  # a folder that already holds a run
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    return {
        "dir": tmp_path,
        "paths": [
            str(tmp_path / "new-run"),
            str(held),
            str(a_file),
            str(a_file / "under-a-file"),
            str(tmp_path / ("x" * 300)),
            "",
            "/proc/nope/run",
            str(tmp_path / "spaced name" / "ünï"),
            str(tmp_path / "w.pt"),
        ],
    }


def test_random_flag_combinations_are_accepted_or_refused_in_one_line(paths, capsys):
    rng = random.Random(20261201)
    outcomes = {0: 0, 2: 0}
    for i in range(CASES):
        argv = _case(rng, paths)
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors exit from inside parse_args
            code = exc.code
        except BaseException as exc:  # noqa: BLE001 - anything else is the bug this test exists to find
            pytest.fail(f"case {i} {argv!r} raised {type(exc).__name__}: {exc}")
        finally:
            profiling.disable()
        out, err = capsys.readouterr()
        assert code in (0, 2), (i, argv, code, err)
        assert "Traceback" not in err, (i, argv, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and ": error: " in lines[0], (i, argv, err)
        else:
            config = json.loads(out)
            assert isinstance(config, dict) and "method" in config, (i, argv)
        outcomes[code] += 1
    assert sum(outcomes.values()) == CASES
    # both sides are exercised: the generator is not all-valid or all-invalid
    assert outcomes[0] > CASES // 10 and outcomes[2] > CASES // 10, outcomes
    assert not (paths["dir"] / "new-run").exists()  # checking an --out creates nothing
