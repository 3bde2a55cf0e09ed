"""Ablation suites: grids of runs defined as data, run resumably, reported as tables and plots.

A suite is a JSON file (the built-in ``ablations`` is ``pfedmoap/suites/ablations.json``)::

    {"seeds": [1, 2, 3], "preset": "synthetic", "method": "pfedmoap", "set": {...},
     "studies": [{"name": "experts", "title": "...", "vary": {"experts": [1, 3, 5, 9]}, "plot": "line"}, ...]}

A study varies config fields either as a product (``vary``: field -> values) or as a list of explicit
``cases`` (each a dict of fields), on top of the suite's and the study's ``set``; it may pick its own
``preset`` and ``method``. Every case runs once per seed in its own run directory, named by how its config
differs from its preset's, so a case that appears in two studies (the default in most of them) runs once.
A finished run is reused; an interrupted one resumes from its last complete round; a run directory made with
another config is refused. Plots: ``line`` (accuracy vs the one varied field), ``bar`` (one bar per case),
``bytes`` (measured and theoretical bytes per round vs the varied field) and ``heatmap`` (two varied fields).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..base.errors import ConfigError, UserError
from ..base.files import bad_file, read_json
from ..config import Config, load_preset
from ..engine.records import seed_stats
from ..federated.plan import make_config, plugin_settings
from ..federated.wire import format_bytes

SUITE_KEYS = ("description", "seeds", "preset", "method", "set", "studies")
STUDY_KEYS = ("name", "title", "preset", "method", "set", "vary", "cases", "plot", "paper", "scale")
SCALE_KEYS = ("width", "experts")
PLOTS = ("line", "bar", "bytes", "heatmap")
# fields a suite may not set: they name where and how a run is shown, not what it computes
_NOT_SETTABLE = ("seed", "out", "preset", "progress", "extra")
# config fields that do not change a run's numbers (ignored when a finished run is reused)
_PRESENTATION = ("out", "progress", "tensorboard", "extra", "preset")
README_BEGIN = "<!-- ablations:begin (written by python -m pfedmoap.experiments --suite ablations --readme) -->"
README_END = "<!-- ablations:end -->"


def list_suites() -> list[str]:
    """Names of the suites shipped in ``pfedmoap/suites/``."""
    folder = resources.files("pfedmoap") / "suites"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


@dataclass(frozen=True)
class Case:
    """One point of a study: its varied values (for tables) and its full config (seed 1)."""

    values: dict[str, Any]
    config: Config
    key: str  # the run folder's name: how the config differs from its preset's

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.values.items()) or "default"


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    axes: tuple[str, ...]  # the fields that vary, in table order
    cases: tuple[Case, ...]
    plot: str | None = None
    paper: str = ""
    scale: dict[str, Any] | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    seeds: tuple[int, ...]
    studies: tuple[Study, ...]

    def runs(self) -> list[tuple[Case, int]]:
        """Every distinct (case, seed), in study order."""
        seen: dict[tuple[str, int], tuple[Case, int]] = {}
        for study in self.studies:
            for case in study.cases:
                for seed in self.seeds:
                    seen.setdefault((run_folder(case), seed), (case, seed))
        return list(seen.values())


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def run_folder(case: Case) -> str:
    return f"{case.config.preset}/{case.key}"


def _diff_key(cfg: Config) -> str:
    """``field=value,...`` for every field where ``cfg`` differs from its preset's config (``default`` if none)."""
    base = make_config(cfg.preset, method=cfg.method, seed=cfg.seed)
    parts = []
    if cfg.method != (load_preset(cfg.preset).get("method") or Config.method):
        parts.append(f"method={cfg.method}")
    defaults = base.to_dict()
    for name, value in cfg.to_dict().items():  # the shared fields, then the plug-ins' settings
        if name in ("method", "seed", *_PRESENTATION):
            continue
        if value != defaults.get(name):
            parts.append(f"{name}={_show(value)}")
    key = ",".join(parts) or "default"
    return re.sub(r"[^A-Za-z0-9=.,_+-]", "_", key)


def _normalise(cfg: Config) -> Config:
    """Spell a setting the way the method's default spells it, so equal runs share a folder (e.g.
    ``gate_sharing=private`` is pFedMoAP's own sharing, i.e. ``None``)."""
    from ..federated import registry

    if cfg.gate_sharing is not None:
        method = registry.method_class(cfg.method)
        if method.resolve(cfg) is method.resolve(cfg.replace(gate_sharing=None)):
            cfg = cfg.replace(gate_sharing=None)
    return cfg


def _check_keys(where: str, data: Any, valid: tuple[str, ...]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object")
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")


def _check_fields(where: str, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object of config fields")
    shared = [name for name in Config.shared_fields() if name not in _NOT_SETTABLE]
    known = shared + list(plugin_settings())
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}: {key!r} is not a config field a suite can set; valid: {', '.join(known)}")
    return dict(data)


def load_suite(spec: str, overrides: dict[str, Any] | None = None, seeds: list[int] | None = None) -> Suite:
    """A built-in suite by name, or a JSON file; every case's config is built and validated here, so a bad
    suite fails before anything runs. ``overrides`` apply to every run (e.g. ``rounds``), ``seeds`` replace
    the suite's."""
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        if not path.exists():
            raise ConfigError(f"suite={spec!r}: no such file")
        name = path.stem
    elif spec in list_suites():
        path, name = Path(str(resources.files("pfedmoap") / "suites" / f"{spec}.json")), spec
    else:
        raise ConfigError(f"suite={spec!r} is not one of: {', '.join(list_suites())} (or a .json file)")
    data = read_json(path, "suite file")
    _check_keys(f"suite {name}", data, SUITE_KEYS)
    run_seeds = seeds if seeds is not None else data.get("seeds", [1, 2, 3])
    if not isinstance(run_seeds, list) or not run_seeds or not all(isinstance(s, int) for s in run_seeds):
        raise ConfigError(f"suite {name}: seeds={run_seeds!r} must be a non-empty list of integers")
    shared = _check_fields(f"suite {name}: set", data.get("set", {}))
    extra = _check_fields("--set", overrides or {})
    studies_data = data.get("studies")
    if not isinstance(studies_data, list) or not studies_data:
        raise ConfigError(f"suite {name}: studies must be a non-empty list")
    studies, names = [], set()
    for i, sd in enumerate(studies_data):
        where = f"suite {name}: studies[{i}]"
        _check_keys(where, sd, STUDY_KEYS)
        sname = sd.get("name")
        if not isinstance(sname, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", sname):
            raise ConfigError(f"{where}: name={sname!r} must be a word of letters, digits, _ or -")
        if sname in names:
            raise ConfigError(f"{where}: name={sname!r} is used twice")
        names.add(sname)
        where = f"suite {name}: study {sname}"
        if ("vary" in sd) == ("cases" in sd):
            raise ConfigError(f"{where}: give exactly one of 'vary' (a product of values) or 'cases' (a list)")
        if "vary" in sd:
            vary = _check_fields(f"{where}: vary", sd["vary"])
            if not vary or not all(isinstance(v, list) and v for v in vary.values()):
                raise ConfigError(f"{where}: vary must map each field to a non-empty list of values")
            axes = tuple(vary)
            points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*vary.values())]
        else:
            cases_data = sd["cases"]
            if not isinstance(cases_data, list) or not cases_data:
                raise ConfigError(f"{where}: cases must be a non-empty list of objects")
            points = [_check_fields(f"{where}: cases[{j}]", c) for j, c in enumerate(cases_data)]
            axes = tuple(dict.fromkeys(k for p in points for k in p))
        plot = sd.get("plot")
        if plot is not None and plot not in PLOTS:
            raise ConfigError(f"{where}: plot={plot!r} is not one of: {', '.join(PLOTS)}")
        if plot in ("line", "bytes") and len(axes) != 1:
            raise ConfigError(f"{where}: plot={plot} needs exactly one varied field (got {', '.join(axes)})")
        if plot == "heatmap" and len(axes) != 2:
            raise ConfigError(f"{where}: plot=heatmap needs exactly two varied fields (got {', '.join(axes)})")
        scale = sd.get("scale")
        if scale is not None:
            _check_keys(f"{where}: scale", scale, SCALE_KEYS)
        preset = sd.get("preset", data.get("preset", "synthetic"))
        method = sd.get("method", data.get("method"))
        study_set = _check_fields(f"{where}: set", sd.get("set", {}))
        cases = []
        for point in points:
            fields = {**shared, **study_set, **point, **extra, "progress": False}
            if method is not None:
                fields.setdefault("method", method)
            try:
                cfg = _normalise(make_config(preset, seed=run_seeds[0], **fields))
            except ConfigError as exc:
                label = ", ".join(f"{k}={_show(v)}" for k, v in point.items())
                raise ConfigError(f"{where} ({label}): {exc}") from None
            # a field a case leaves out shows the value the run has (e.g. knn's distance in a selection study)
            shown = {a: point[a] if a in point else getattr(cfg, a) for a in axes}
            cases.append(Case(values=shown, config=cfg, key=_diff_key(cfg)))
        studies.append(
            Study(
                name=sname,
                title=str(sd.get("title", sname)),
                axes=axes,
                cases=tuple(cases),
                plot=plot,
                paper=str(sd.get("paper", "")),
                scale=scale,
            )
        )
    return Suite(
        name=name, description=str(data.get("description", "")), seeds=tuple(run_seeds), studies=tuple(studies)
    )


# ---------------------------------------------------------------------------------------------- running
def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _PRESENTATION and k != "_meta"}


def check_folder(cfg: Config, run_dir: Path) -> None:
    """Refuse (UserError) a run folder that holds a run of another config (e.g. the preset changed since)."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        return
    try:
        saved = read_json(config_file, "config.json")
    except UserError:
        saved = None
    wanted = _comparable(cfg.to_dict())
    if saved is not None:
        # a field added to Config after the run was made: the run had its default behaviour
        defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
        saved = {**{k: defaults[k] for k in wanted if k not in saved and k in defaults}, **saved}
    if saved is None or _comparable(saved) != wanted:
        different = (
            ["config.json unreadable"]
            if saved is None
            else [f"{k}={_show(saved.get(k))} (wanted {_show(v)})" for k, v in wanted.items() if saved.get(k) != v]
        )
        raise UserError(
            f"{run_dir} holds a run with another config ({different[0] if different else 'other fields'}); "
            "use another --out or remove that folder"
        )


def run_one(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> str:
    """Make ``run_dir`` hold the finished run of ``cfg``: ``reused``, ``resumed`` or ``ran``."""
    from ..engine import checkpoint, launch

    check_folder(cfg, run_dir)
    if (run_dir / "config.json").is_file():
        if (run_dir / "summary.json").is_file():
            return "reused"
        if checkpoint.checkpoint_path(run_dir).is_file():
            launch.resume(run_dir, log=log, progress=False)
            return "resumed"
        for name in ("config.json", "metrics.jsonl"):  # killed before its first round ended
            (run_dir / name).unlink(missing_ok=True)
    launch.run(cfg, out=run_dir, log=log)
    return "ran"


def run_suite(suite: Suite, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (case, seed) not yet finished under ``out/runs``, printing progress, and summarise."""
    todo = suite.runs()
    for case, seed in todo:  # every folder checked before anything runs
        check_folder(case.config.replace(seed=seed), out / "runs" / run_folder(case) / f"seed{seed}")
    done_before = sum((out / "runs" / run_folder(c) / f"seed{s}" / "summary.json").is_file() for c, s in todo)
    log(
        f"suite {suite.name}: {len(todo)} runs ({len({run_folder(c) for c, _ in todo})} configs x "
        f"{len(suite.seeds)} seeds), {done_before} already finished"
    )
    started, ran = time.perf_counter(), 0
    for i, (case, seed) in enumerate(todo, 1):
        run_dir = out / "runs" / run_folder(case) / f"seed{seed}"
        if (run_dir / "summary.json").is_file():
            continue
        t0 = time.perf_counter()
        what = run_one(case.config.replace(seed=seed), run_dir, log=lambda _: None)
        ran += 1
        summary = read_json(run_dir / "summary.json", "summary.json")
        elapsed = time.perf_counter() - started
        left = sum(not (out / "runs" / run_folder(c) / f"seed{s}" / "summary.json").is_file() for c, s in todo)
        eta = elapsed / ran * left
        log(
            f"[{i}/{len(todo)}] {run_folder(case)} seed {seed}: {what}, "
            f"{summary['final_mean_acc']:.2f}% in {time.perf_counter() - t0:.0f} s; {left} left, ~{eta / 60:.0f} min"
        )
    log(f"suite {suite.name}: ran {ran} runs in {(time.perf_counter() - started) / 60:.1f} min")
    return summarise(suite, out)


def theoretical_bytes(cfg: Config, width: int, participants: int, element_size: int) -> tuple[int, int]:
    """Bytes per round with experts in the pool: each participant downloads P_g and its K experts and
    uploads its prompt, each n_ctx x width values."""
    prompt = cfg.n_ctx * width * element_size
    return participants * (cfg.experts + 1) * prompt, participants * prompt


def summarise(suite: Suite, out: Path) -> dict[str, Any]:
    """{study: {title, axes, ..., rows: [{values, key, final, best, seconds, bytes...}]}} from the run folders."""
    from ..engine.rundir import read_metrics
    from ..federated.wire import wire_dtype

    result: dict[str, Any] = {"suite": suite.name, "description": suite.description, "seeds": list(suite.seeds)}
    studies = {}
    for study in suite.studies:
        rows = []
        for case in study.cases:
            finals, bests, seconds, done = [], [], [], []
            for seed in suite.seeds:
                summary_file = out / "runs" / run_folder(case) / f"seed{seed}" / "summary.json"
                if not summary_file.is_file():
                    continue  # not run yet (--report-only on an unfinished suite)
                summary = read_json(summary_file, "summary.json")
                done.append(seed)
                finals.append(summary["final_mean_acc"])
                bests.append(summary["best_mean_acc"])
                seconds.append(summary["seconds"])
            if not done:
                rows.append({"values": case.values, "label": case.label, "run": run_folder(case), "seeds_done": []})
                continue
            first = out / "runs" / run_folder(case) / f"seed{done[0]}"
            rounds = read_metrics(first)
            if not rounds:
                raise bad_file(first / "metrics.jsonl", "metrics file", "it holds no round")
            last = rounds[-1]
            meta = read_json(first / "config.json", "config.json").get("_meta", {})
            participants = len(last["client_bytes_down"])
            row = {
                "values": case.values,
                "label": case.label,
                "run": run_folder(case),
                "seeds_done": done,
                "final": seed_stats(finals),
                "best": seed_stats(bests),
                "final_per_seed": finals,
                "seconds": seed_stats(seconds),
                "last_round_bytes_down": last["bytes_down"],
                "last_round_bytes_up": last["bytes_up"],
                "last_round_participants": participants,
            }
            width = meta.get("prompt_width")
            if width is not None:
                element = wire_dtype(case.config.comm_dtype).itemsize
                down, up = theoretical_bytes(case.config, width, participants, element)
                row.update(prompt_width=width, theoretical_bytes_down=down, theoretical_bytes_up=up)
            rows.append(row)
        measured = [r for r in rows if r["seeds_done"]]
        studies[study.name] = {
            "title": study.title,
            "axes": list(study.axes),
            "plot": study.plot,
            "paper": study.paper,
            "scale": study.scale,
            "rows": rows,
            "complete": all(len(r["seeds_done"]) == len(suite.seeds) for r in rows),
            "best": max(measured, key=lambda r: r["final"][0])["label"] if measured else None,
            "spread": max(r["final"][0] for r in measured) - min(r["final"][0] for r in measured) if measured else 0.0,
            "max_seed_std": max((r["final"][1] for r in measured), default=0.0),
        }
    result["studies"] = studies
    return result


# ---------------------------------------------------------------------------------------------- reporting
def _cell(stats: list[float] | tuple[float, float]) -> str:
    return f"{stats[0]:.2f} ± {stats[1]:.2f}"


def study_markdown(name: str, study: dict[str, Any], seeds: list[int], image: str | None = None) -> str:
    axes = study["axes"]
    lines = [f"#### {study['title']}", ""]
    if study["paper"]:
        lines += [f"Paper: {study['paper']}", ""]
    bytes_cols = study["plot"] == "bytes"
    header = [*axes, "final accuracy (%)", "best round (%)", "down / round", "up / round"]
    if bytes_cols:
        header += ["theoretical down", "theoretical up", "measured / theoretical"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in study["rows"]:
        cells = [_show(row["values"][a]) for a in axes]
        if not row["seeds_done"]:
            lines.append("| " + " | ".join(cells + ["not run yet"] + ["-"] * (len(header) - len(cells) - 1)) + " |")
            continue
        final = _cell(row["final"])
        if len(row["seeds_done"]) < len(seeds):
            final += f" (seeds {', '.join(map(str, row['seeds_done']))} only)"
        cells += [final, _cell(row["best"])]
        cells += [format_bytes(row["last_round_bytes_down"]), format_bytes(row["last_round_bytes_up"])]
        if bytes_cols:
            down, up = row.get("theoretical_bytes_down"), row.get("theoretical_bytes_up")
            if down is None:
                cells += ["-", "-", "-"]
            else:
                ratio = (row["last_round_bytes_down"] + row["last_round_bytes_up"]) / (down + up)
                cells += [format_bytes(down), format_bytes(up), f"{ratio:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = (
        f"Best: {study['best']}; the means span {study['spread']:.2f} points; the largest std over seeds is "
        f"{study['max_seed_std']:.2f}. Bytes: the last round, all participants, the first seed run."
    )
    if not study.get("complete", True):
        summary = "**Incomplete: the suite has not finished this study (rerun it to go on).** " + summary
    lines += ["", summary]
    scale = study.get("scale")
    if bytes_cols and scale:
        lines += ["", scale_table(study, scale)]
    if image:
        lines += ["", f"![{study['title']}]({image})"]
    return "\n".join(lines)


def scale_table(study: dict[str, Any], scale: dict[str, Any]) -> str:
    """Theoretical download per client per round, (K+1) x n_ctx x width x 4 bytes, at another text width."""
    width, experts = int(scale.get("width", 512)), [int(k) for k in scale.get("experts", [1, 3, 9])]
    axis = study["axes"][0]
    values = [row["values"][axis] for row in study["rows"]]
    lines = [
        f"Theoretical download per client per round at text width {width} (the paper's CLIP towers), fp32, "
        f"(K+1) x {axis} x {width} x 4 bytes; upload is one prompt, {axis} x {width} x 4:",
        "",
        f"| K \\ {axis} | " + " | ".join(str(v) for v in values) + " |",
        "|---|" + "---|" * len(values),
    ]
    for k in experts:
        lines.append(f"| {k} | " + " | ".join(format_bytes((k + 1) * v * width * 4) for v in values) + " |")
    return "\n".join(lines)


def write_report(result: dict[str, Any], out: Path, image_dir: str | None = "plots") -> str:
    """``ablations.md`` and ``ablations.json`` under ``out``; returns the markdown."""
    seeds = result["seeds"]
    parts = [
        f"Suite `{result['suite']}`: {result['description']}. Final-round mean client accuracy, mean ± std over "
        f"seeds {seeds}.",
    ]
    for name, study in result["studies"].items():
        image = f"{image_dir}/{name}.png" if image_dir and study.get("image") else None
        parts.append(study_markdown(name, study, seeds, image))
    text = "\n\n".join(parts) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['suite']}.md").write_text(text)
    (out / f"{result['suite']}.json").write_text(json.dumps(result, indent=2) + "\n")
    return text


def write_plots(result: dict[str, Any], folder: Path) -> list[Path]:
    """One PNG per study that names a plot, ``folder/<study>.png``; marks each study's ``image``."""
    from . import plots

    written = []
    for name, original in result["studies"].items():
        kind, path = original["plot"], folder / f"{name}.png"
        study = {**original, "rows": [r for r in original["rows"] if r["seeds_done"]]}
        if kind is None or not study["rows"]:
            continue
        if kind == "line":
            plots.metric_vs_value(study, path)
        elif kind == "bar":
            plots.case_bars(study, path)
        elif kind == "bytes":
            plots.bytes_vs_value(study, path)
        elif kind == "heatmap":
            plots.accuracy_heatmap(study, path)
        original["image"] = path.name
        written.append(path)
    return written


def splice_readme(readme: Path, markdown: str, images: list[Path], image_dir: Path) -> None:
    """Replace the text between the README's ablation markers by ``markdown`` and copy the plots to
    ``image_dir`` (relative links from the README's folder)."""
    if not readme.is_file():
        raise UserError(f"readme={str(readme)!r}: no such file")
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise UserError(f"readme={str(readme)!r} has no '{README_BEGIN}' ... '{README_END}' markers to fill")
    image_dir.mkdir(parents=True, exist_ok=True)
    for path in images:
        shutil.copyfile(path, image_dir / path.name)
    rel = image_dir.resolve().relative_to(readme.parent.resolve()).as_posix()
    body = markdown.replace("](plots/", f"]({rel}/")
    new = text[: begin + len(README_BEGIN)] + "\n" + body + text[end:]
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(readme)


def main_suite(
    spec: str,
    out: Path,
    overrides: dict[str, Any],
    seeds: list[int] | None,
    plots: bool,
    readme: Path | None = None,
    log: Callable[[str], None] = print,
    report_only: bool = False,
) -> int:
    """``python -m pfedmoap.experiments --suite ...``: load, run (unless ``report_only``: report the finished
    runs, marking the rest), report (and fill the README)."""
    suite = load_suite(spec, overrides, seeds)
    if report_only:
        for case, seed in suite.runs():
            check_folder(case.config.replace(seed=seed), out / "runs" / run_folder(case) / f"seed{seed}")
        result = summarise(suite, out)
    else:
        result = run_suite(suite, out, log=lambda line: print(line, file=sys.stderr, flush=True))
    images: list[Path] = []
    if plots:
        try:
            images = write_plots(result, out / "plots")
        except UserError as exc:  # matplotlib missing: the tables are still written
            print(f"pfedmoap.experiments: no plots: {exc}", file=sys.stderr)
    text = write_report(result, out)
    print(
        f"wrote {out / (suite.name + '.md')}, {out / (suite.name + '.json')} and {len(images)} plots", file=sys.stderr
    )
    if readme is not None:
        splice_readme(readme, text, images, readme.parent / "docs" / "img" / suite.name)
        print(f"filled the {suite.name} section of {readme}", file=sys.stderr)
    log(text)
    return 0


__all__ = ["Case", "Study", "Suite", "list_suites", "load_suite", "run_suite", "summarise", "write_report"]
