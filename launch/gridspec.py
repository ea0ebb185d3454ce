"""A grid file and what it expands to: one resolved config, run dir and identity per run.

A grid YAML names a base config (or a `config:` axis of config files), axes (dotted config keys ->
lists, crossed), fixed overrides, rules (overrides for the runs matching some values, e.g. lambda=3
on fine-grained sets), seeds, Slurm resources and, optionally, the paper table(s) it reproduces
(`paper: {paper: cskd2020, table: "1"}`, or a list of such mappings, e.g. PS-KD's Table 1 and its
ensembles' Table 3: `paper: [{paper: pskd2021, table: "1"}, {paper: pskd2021, table: "3"}]`), recorded
in the grid's manifest for `collect`.

Everything is checked here, before anything is written or submitted: unknown keys, empty axes,
rules on unknown config keys, every run dir a distinct directory under the output root (two runs
that would share one are refused, naming both), and no name that ends up in a path or an sbatch
script holding a control character.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cskd.config import INT64, Config, identity_dict, nest, read_yaml, resolve, to_dict, unprintable
from cskd.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
GRID_KEYS = {"name", "base", "axes", "overrides", "rules", "seeds", "resources", "paper"}
CONFIG_AXIS = "config"  # the axis of config files: each value replaces `base` for its runs
PAPER_KEYS = {"paper", "table"}
# Already in the run dir's path (<data.path folder>/<model>/<label>/seed<k>), so not in the label; a
# config file shows through the dataset and model it sets.
NAMING_KEYS = ("method", "model", "data.path", "seed", CONFIG_AXIS)
LAYOUT_KEYS = {"seed", "out_dir", "label"}  # set by the grid itself


@dataclass
class Run:
    config: Config
    run_id: str

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)


def _label(method: str, combo: dict) -> str:
    """`cskd`, or `cskd-lam3-temperature1` when the grid varies hyperparameters."""
    return "".join([method, *(f"-{k.split('.')[-1]}{v}" for k, v in combo.items() if k not in NAMING_KEYS)])


def _flat(cfg: Config) -> dict:
    flat = {}
    for key, value in to_dict(cfg).items():
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return flat


def _matching_rules(rules: list, cfg: Config, where: str) -> list[tuple[dict, str]]:
    """The `set` layers of every rule whose `if` matches the config (a list value = any of)."""
    flat = _flat(cfg)
    result = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or set(rule) != {"if", "set"} or not all(
                isinstance(rule[k], dict) for k in ("if", "set")):
            raise ConfigError(f"{where}: rules[{i}] must have exactly the keys 'if' and 'set', each a mapping")
        for key in rule["if"]:
            if key not in flat:
                raise ConfigError(f"{where}: rules[{i}] tests unknown config key '{key}'")
        _check_layout_keys(rule["set"], f"{where}: rules[{i}].set")
        if all(flat[k] in (v if isinstance(v, list) else [v]) for k, v in rule["if"].items()):
            result.append((nest(rule["set"]), f"{where} rules[{i}].set"))
    return result


def _check_layout_keys(keys, where: str) -> None:
    """Seeds, out_dir and label come from the grid's own structure, never from its overrides."""
    taken = sorted(set(keys) & LAYOUT_KEYS)
    if taken:
        raise ConfigError(f"{where} sets {', '.join(taken)}: seeds come from the grid's 'seeds' list, out_dir and "
                          f"label from its layout (use --out for the root)")


def load_grid(grid_path: Path) -> dict:
    """The grid file's mapping, its structure checked (config values are checked by `expand`)."""
    grid = read_yaml(grid_path, "grid")
    where = f"grid {grid_path}"
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; valid: "
                          f"{', '.join(sorted(GRID_KEYS))}")
    for key in ("axes", "overrides"):
        if not isinstance(grid.get(key) if grid.get(key) is not None else {}, dict):
            raise ConfigError(f"{where}: '{key}' must map dotted config keys to values, e.g. {key}: {{lr: ...}}, "
                              f"not a {type(grid[key]).__name__}")
        _check_layout_keys(grid.get(key) or {}, f"{where}: '{key}'")
    for key, values in (grid.get("axes") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: axis '{key}' must be a non-empty list, got {values!r}")
        _check_distinct(values, f"{where}: axis '{key}'")
    for value in (grid.get("axes") or {}).get(CONFIG_AXIS, []):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: axis '{CONFIG_AXIS}' lists config files; {value!r} is not a path "
                              f"(e.g. config: [configs/cifar100_preact_resnet18.yaml])")
    _check_seeds(grid.get("seeds", [0]), where)
    if not isinstance(grid.get("rules") or [], list):
        raise ConfigError(f"{where}: 'rules' must be a list of {{if: {{...}}, set: {{...}}}}")
    if not isinstance(grid.get("resources") or {}, dict):
        raise ConfigError(f"{where}: 'resources' must map resource names to values, e.g. resources: {{nodes: 1}}")
    if not isinstance(grid.get("base", ""), str):
        raise ConfigError(f"{where}: 'base' must be the path of a config YAML, got {grid['base']!r}")
    _check_paper(grid.get("paper"), where)
    _grid_name(grid, grid_path)
    return grid


def _check_paper(paper, where: str) -> None:
    """`paper:` names the paper table(s) the grid reproduces: exactly {paper: <id>, table: <id>}, both strings,
    or a non-empty list of such mappings, each table once."""
    if paper is None:
        return
    entries = paper if isinstance(paper, list) else [paper]
    if not entries or not all(isinstance(e, dict) and set(e) == PAPER_KEYS and all(
            isinstance(v, str) and v.strip() and unprintable(v) is None for v in e.values()) for e in entries):
        raise ConfigError(f"{where}: 'paper' must be a mapping of exactly the string keys 'paper' and 'table', "
                          f"e.g. paper: {{paper: cskd2020, table: \"1\"}} (quote a numeric table), or a non-empty "
                          f"list of them, e.g. paper: [{{paper: pskd2021, table: \"1\"}}, {{paper: pskd2021, "
                          f"table: \"3\"}}], got {paper!r}")
    twice = next((e for i, e in enumerate(entries) if e in entries[:i]), None)
    if twice is not None:
        raise ConfigError(f"{where}: 'paper' lists {twice!r} twice; remove the duplicate")


def _check_seeds(seeds, where: str) -> None:
    """Seeds are distinct ints in 0 .. 2**63 - 1 (YAML's `true` is not a seed, nor is a value torch cannot take)."""
    if not isinstance(seeds, list) or not seeds or not all(
            type(s) is int and 0 <= s < INT64[1] for s in seeds):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of integers from 0 to 2**63 - 1, "
                          f"got {seeds!r}")
    _check_distinct(seeds, f"{where}: 'seeds'")


def _check_distinct(values: list, what: str) -> None:
    """A value listed twice would give two runs of one config, in one run dir."""
    for i, value in enumerate(values):
        if any(v == value and isinstance(v, bool) == isinstance(value, bool) for v in values[:i]):  # 1 is not true
            raise ConfigError(f"{what} lists {value!r} twice; each value is one run: remove the duplicate")


def _grid_name(grid: dict, grid_path: Path) -> str:
    """The grid's name (default: the file's stem), which names the default output root and the Slurm jobs."""
    name = grid.get("name", grid_path.stem)
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise ConfigError(f"grid {grid_path}: 'name' must be a plain name, got {name!r}")
    return _plain_name(str(name), f"grid {grid_path}: 'name'", "e.g. name: cifar_lambda_sweep")


def _plain_name(text: str, what: str, example: str) -> str:
    """`text` as one path component: not empty, '.' or '..', no '/' and no control character."""
    bad = unprintable(text)
    if bad is not None:
        raise ConfigError(f"{what} {text!r} holds the control character {bad!r}; remove it ({example})")
    if text.strip() in ("", ".", "..") or "/" in text:
        raise ConfigError(f"{what} {text!r} is not a plain name (it must not be empty, '.' or '..', nor hold a "
                          f"'/'): it names a directory under the output root ({example})")
    return text


def grid_name(grid_path: Path) -> str:
    return _grid_name(load_grid(grid_path), grid_path)


def grid_paper(grid_path: Path) -> dict | list[dict] | None:
    """The paper table(s) the grid declares ({paper, table}, or a list of them), or None."""
    return load_grid(grid_path).get("paper")


def _config_path(grid_path: Path, path: str) -> Path:
    """A config file named by the grid: relative to the grid file, else to the repository root."""
    resolved = Path(path) if Path(path).is_absolute() else grid_path.parent / path
    return REPO / path if not resolved.exists() and (REPO / path).exists() else resolved


def expand(grid_path: Path, out: Path | None) -> tuple[Path, list[Run]]:
    """The output root and the runs of a grid YAML, each with a resolved config and its run dir set.

    A run's config is built from nested dicts, defaults <- base YAML (or its `config` axis value)
    <- overrides <- axes <- rules <- seed; rules are matched against the config the other layers
    give. Every run dir is a distinct directory under the root, or the grid is refused."""
    grid = load_grid(grid_path)
    where = f"grid {grid_path}"
    files: dict[str, list] = {}  # config file -> its layer, read once

    def config_layer(path: str | None) -> list:
        if path is not None and path not in files:
            resolved = _config_path(grid_path, path)
            files[path] = [(read_yaml(resolved), f"config file {resolved}")]
        return files.get(path, [])

    fixed = [(nest(grid.get("overrides") or {}), f"{where} overrides")]
    axes = grid.get("axes") or {}
    out = _output_root(Path(out or REPO / "runs" / _grid_name(grid, grid_path)))
    result, values_of = [], {}
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values))
        keys = {k: v for k, v in combo.items() if k != CONFIG_AXIS}
        base = config_layer(combo.get(CONFIG_AXIS, grid.get("base")))
        layers = base + fixed + [(nest(keys), f"{where} axes")]
        for seed in grid.get("seeds", [0]):
            seeded = [({"seed": seed}, f"{where} seeds")]
            cfg = resolve(layers + seeded)
            ruled = _matching_rules(grid.get("rules") or [], cfg, where)
            cfg = resolve(layers + ruled + seeded) if ruled else cfg  # no rule: the same layers, resolved
            cfg.label = _label(cfg.method, combo)
            cfg.out_dir = str(_run_dir(out, cfg, seed, where))
            digest = hashlib.sha1(json.dumps(identity_dict(cfg), sort_keys=True).encode()).hexdigest()[:10]
            run = Run(cfg, digest)
            _check_own_dir(run, {**combo, "data.path": cfg.data.path, "seed": seed}, values_of, where)
            result.append(run)
    return out, result


def _output_root(out: Path) -> Path:
    out = out.absolute()  # jobs may start in another directory
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory (it is created if missing)")
    bad = unprintable(str(out))
    if bad is not None:
        raise ConfigError(f"--out {str(out)!r} holds the control character {bad!r}; remove it")
    return out


def _run_dir(out: Path, cfg: Config, seed: int, where: str) -> Path:
    """<out>/<dataset folder>/<model>/<label>/seed<k>, each a plain name: a run dir never leaves `out`."""
    dataset = _plain_name(Path(cfg.data.path).name, f"{where}: the folder name of data.path {cfg.data.path!r},",
                          "give the dataset's own directory, e.g. data/mnist5k")
    label = _plain_name(cfg.label, f"{where}: the run label built from its axes' values,",
                        "use axis values without '/', e.g. numbers")
    run_dir = out / dataset / cfg.model / label / f"seed{seed}"
    if os.path.commonpath([out, os.path.normpath(run_dir)]) != str(out):  # the names above already ensure it
        raise ConfigError(f"{where}: the run dir {run_dir} would lie outside the output root {out}")
    return run_dir


def _check_own_dir(run: Run, values: dict, values_of: dict, where: str) -> None:
    """Refuse a run whose run dir an earlier run of the grid already has; name both and the dir."""
    other = values_of.setdefault(run.out_dir, values)
    if other is values:
        return
    differ = [k for k in dict.fromkeys([*other, *values]) if other.get(k) != values.get(k)]
    if not differ:
        raise ConfigError(f"{where}: the run {_show(values)} is listed twice (run dir {run.out_dir}); remove the "
                          f"duplicate value")
    raise ConfigError(f"{where}: the runs {_show(other, differ)} and {_show(values, differ)} would share the run dir "
                      f"{run.out_dir} (named <data.path folder>/<model>/<label>/seed<k>); give the datasets "
                      f"distinct folder names or the values distinct spellings, or run them as separate grids "
                      f"with their own --out")


def _show(values: dict, keys=None) -> str:
    return "{" + ", ".join(f"{k}={values[k]!r}" for k in (keys or values) if k in values) + "}"
