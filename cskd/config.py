"""Typed run configuration: dataclass defaults <- YAML file <- dotted `key=value` overrides.

Every key is checked before any work starts: an unknown key names the closest valid ones, a value
of the wrong type names the key, the expected type and where the value came from. The resolved
config (the chosen method's hyperparameters included) is what gets saved into the run dir.

Every YAML text the package reads (config files, grid files, saved run dirs, the values of
overrides) goes through `parse_yaml` / `read_yaml`: safe types only, and a mapping that gives a key
twice is refused (PyYAML alone keeps the last value without a word).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cskd.errors import ConfigError

# Keys that change how a run executes but not what it computes: a run dir may be resumed with
# different values of these.
# The engine, ZeRO, compilation and checkpoint cadence compute the same run (within float rounding),
# so a checkpoint written under one of them resumes under another.
RUNTIME_KEYS = ("out_dir", "label", "data.num_workers", "data.loader", "threads", "log_every", "engine",
                "optimizer.zero", "compile", "cuda_graphs", "checkpoint_every", "async_checkpoint", "log_per_sample")
# Keys added after runs already existed, with the value that keeps those runs' behaviour: at that
# value a key is left out of a run's identity, so earlier runs keep their identities (and run ids).
ADDED_KEYS = {"lr_milestones": [], "batch.micro_per_rank": 0, "batch.grad_accum": 0, "lr_scaling": "none",
              "warmup_epochs": 0, "eval_every": 1}
# Renamed keys, still read from older configs (a run dir's saved config.yaml): old -> new.
RENAMED_KEYS = {"data.augment": "data.pipeline", "batch_size": "batch.global"}
# Config keys that are Python keywords: the dataclass field carries a trailing underscore.
KEYWORD_FIELDS = {"global": "global_"}
LIST_SEP = ", "
INT64 = (-2**63, 2**63)  # ints end up in torch (seeds, sizes): they must fit its int64
NON_EMPTY_KEYS = ("out_dir", "data.path")  # an empty path is the current directory: never what was meant
# Counts that size a thread pool or an allocation of their own: beyond these torch overflows its C
# int or allocates terabytes, after the run dir was written. Far above any real use.
AT_MOST = {"threads": 1024, "data.num_workers": 1024, "ece_bins": 10_000}
# engine=deepspeed is an optional extra: refused, before any work, where DeepSpeed is not installed.
DEEPSPEED_MISSING = ("engine=deepspeed needs DeepSpeed, which is not installed: pip install '.[deepspeed]' "
                     "(or pip install deepspeed), or set engine=ddp")


@dataclass
class DataConfig:
    path: str = "data/mnist5k"  # directory with train.beton, test.beton, meta.json (datasets_prep)
    # The paper's transforms and normalisation for a dataset family (cskd/augment.py): cifar,
    # tinyimagenet32, tinyimagenet64, imagenet224 (fine-grained and ImageNet); crop / none (MNIST demo).
    pipeline: str = "cifar"
    color_jitter: float = 0.0  # ColorJitter(b=c=s=x) after the flip; PS-KD's ImageNet recipe uses 0.4
    lighting: float = 0.0  # PCA lighting noise std; PS-KD's ImageNet recipe uses 0.1
    # auto: device where the splits fit (fixed image size, memory budget), else ffcv. ffcv: FFCV decode
    # threads. device: the whole (fixed-size) split held on the device. jpeg: JPEGs decoded batched on
    # the run's device, nvJPEG on a GPU (cskd/jpeg_loader.py).
    loader: str = "auto"
    num_workers: int = 0  # FFCV decoding threads per process; 0: the cores Slurm or the machine gives each rank
    eval_batch_size: int = 500  # per rank
    os_cache: bool = True  # share the page cache between ranks of a node (FFCV os_cache)


@dataclass
class BatchConfig:
    """DeepSpeed's batch triple: global = micro_per_rank x grad_accum x world size.

    `global` (alias `batch_size`) is the recipe's batch: anchors per optimizer step, what the LR
    schedule and the paper speak of. The other two say how a step is computed; 0 lets the others
    decide (`resolve_batch`). BatchNorm normalises each micro-batch on its own."""

    global_: int = 128  # config key `batch.global`; CS-KD adds as many partners
    micro_per_rank: int = 0  # anchors per rank per forward; 0: global / (world size x grad_accum)
    grad_accum: int = 0  # micro-steps per optimizer step; 0: global / (world size x micro_per_rank), else 1


@dataclass
class OptimizerConfig:
    # ZeRO stage. 1: optimizer state sharded over ranks (engine ddp: ZeroRedundancyOptimizer; engine
    # deepspeed: DeepSpeed's ZeRO-1). 2: gradients sharded as well, engine deepspeed only.
    zero: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "preact_resnet18"
    method: str = "ce"
    epochs: int = 200
    batch: BatchConfig = field(default_factory=BatchConfig)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    # step_reference: /10 after epochs ceil(E/2) and ceil(3E/4), one epoch *later* than written, as
    # the reference code's adjust_learning_rate does (E=200: lr 0.1 for epochs 0-100). step: exactly
    # at ceil(E/2) and ceil(3E/4), as the paper's text reads. milestones: at `lr_milestones`.
    lr_schedule: str = "step_reference"
    # lr_schedule milestones: /10 from each of these epoch indices on, the LR set at the epoch's start
    # (PS-KD's recipe: [150, 225] of 300, lgcnsai/PS-KD-Pytorch main.py adjust_learning_rate).
    lr_milestones: list[int] = field(default_factory=list)
    # none: lr as given (the papers' recipes). linear: lr x batch.global / 256 (Goyal et al. 2017,
    # arXiv 1706.02677), for large-batch runs; pair it with warmup_epochs.
    lr_scaling: str = "none"
    warmup_epochs: int = 0  # the LR rises linearly, step by step, over these first epochs (Goyal et al.: 5)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # ddp: DistributedDataParallel (one process: none). fsdp: FSDP2 fully_shard (parameters, gradients
    # and optimizer state sharded), for the largest models or memory-bound runs. deepspeed: the
    # DeepSpeed engine, ZeRO stage optimizer.zero (optional extra: pip install '.[deepspeed]').
    engine: str = "ddp"
    compile: bool = False  # torch.compile the model (training and no-grad forwards)
    cuda_graphs: bool = False  # with compile on one GPU: mode reduce-overhead (CUDA graphs)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    async_checkpoint: bool = True  # the state is copied to the CPU, then written by a thread (still atomic)
    eval_every: int = 1  # epochs between test evaluations (the last epoch is always evaluated)
    seed: int = 0
    out_dir: str = "runs/default"
    # How tables name this run's row (summary.json `label`); empty: the method's name. Grids set
    # e.g. `cskd-lam3` when they vary a hyperparameter.
    label: str = ""
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    amp: bool = True  # bf16 autocast; CUDA only, ignored on CPU
    channels_last: bool = True  # CUDA only, ignored on CPU
    sync_bn: bool = False  # SyncBatchNorm across ranks; CUDA only
    deterministic: bool = False  # torch deterministic algorithms (needed for bit-exact resume)
    threads: int = 0  # torch intra-op threads per process; 0 keeps torch's default
    ece_bins: int = 20  # the CS-KD paper uses 20 equal-width bins
    log_every: int = 50  # steps between plain log lines (and loss checks)
    # Also keep every training sample's target and maximum probability per epoch (train_probs.f16,
    # cskd.sample_log; PS-KD's Fig. 2). Off: only the correctness bitmap is kept.
    log_per_sample: bool = False
    # Hyperparameters of the chosen method (its Params dataclass), stored under the method's name.
    method_params: typing.Any = None


def _key_name(field_name: str) -> str:
    """The config key of a dataclass field (`global_` -> `global`)."""
    return next((k for k, f in KEYWORD_FIELDS.items() if f == field_name), field_name)


def _fields(cls) -> dict[str, dataclasses.Field]:
    """Config key -> field of a config dataclass."""
    return {_key_name(f.name): f for f in dataclasses.fields(cls) if f.name != "method_params"}


def _check_value(key: str, value, expected: type, source: str):
    """Coerce `value` to `expected` where lossless (int -> float, '1e-4' -> float), else raise.

    Floats must be finite (a NaN learning rate trains nothing and compares unequal to itself) and
    ints must fit torch's int64."""
    if typing.get_origin(expected) is list:
        return _check_list(key, value, typing.get_args(expected)[0], source)
    value = _coerce(value, expected)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{key}' expects {expected.__name__}, got {value!r} ({type(value).__name__}) from {source}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r} from {source}")
    if expected is int and not INT64[0] <= value < INT64[1]:
        raise ConfigError(f"config key '{key}' must fit a 64-bit integer (|value| < 2**63), got {value} from {source}")
    return value


def _check_list(key: str, value, item_type: type, source: str) -> list:
    """A list whose items are each checked as `_check_value` checks a scalar."""
    if not isinstance(value, list):
        raise ConfigError(f"config key '{key}' expects a list of {item_type.__name__} (e.g. {key}=[150,225]), got "
                          f"{value!r} ({type(value).__name__}) from {source}")
    return [_check_value(f"{key}[{i}]", item, item_type, source) for i, item in enumerate(value)]


def _coerce(value, expected: type):
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond any float: reported as not finite
            return math.inf
    if expected is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    return value


def _unknown_key(key: str, valid: list[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=3, cutoff=0.5)
    close_full = [v for v in valid if v.split(".")[-1] in close]
    hint = f"did you mean: {LIST_SEP.join(close_full)}?" if close_full else f"valid keys: {LIST_SEP.join(valid)}"
    return ConfigError(f"unknown config key '{key}' from {source}; {hint}")


def _apply(obj, values: dict, prefix: str, source: str, method_sections: dict) -> None:
    """Set dataclass `obj`'s fields from a nested dict, checking names and types."""
    fields = _fields(type(obj))
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        full = f"{prefix}{key}"
        if full in RENAMED_KEYS:
            full = RENAMED_KEYS[full]
            if "." in full[len(prefix):]:  # moved into a section: apply it there
                _apply(obj, nest({full[len(prefix):]: value}), prefix, source, method_sections)
                continue
            key = full[len(prefix):]
        if not prefix and key in method_sections:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is the '{key}' method's section; give its keys, e.g. {key}.<key>=..., in {source}")
            method_sections[key].update(value)
            continue
        if key not in fields:
            valid = [f"{prefix}{k}" for k in fields] + ([] if prefix else sorted(method_sections))
            raise _unknown_key(full, valid, source)
        name = fields[key].name
        expected = hints[name]
        if dataclasses.is_dataclass(expected):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give its keys, e.g. {full}.<key>=..., in {source}")
            _apply(getattr(obj, name), value, f"{full}.", source, method_sections)
        else:
            setattr(obj, name, _check_value(full, value, expected, source))


def nest(flat: dict) -> dict:
    """{'a.b': 1, 'c': 2} -> {'a': {'b': 1}, 'c': 2}: dotted keys (a grid's axes, rules) as a config layer."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, last = str(key).strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' sets a key inside '{part}', which is also given a value")
        node[last] = copy.deepcopy(value)  # a copy: later layers merge into it, never into the caller's dicts
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a mapping that gives the same key twice."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode):
    """SafeConstructor.construct_yaml_map, after checking that no key is written twice."""
    first_seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden: YAML's own rule
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            mark = first_seen.setdefault(key, key_node.start_mark)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if mark is not key_node.start_mark:
            raise yaml.constructor.ConstructorError(  # no mark: the message already says where
                None, None, f"key {key!r} is given twice (lines {mark.line + 1} and {key_node.start_mark.line + 1}; "
                            f"YAML would keep only the last); give each key once")
    data: dict = {}
    yield data  # two steps, as PyYAML's own: aliases to this mapping resolve to the same dict
    data.update(loader.construct_mapping(node))


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The one line of a YAML error that says what is wrong and where."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def parse_yaml(text: str, where: str, fix: str = ""):
    """A YAML text's value (safe types only, no key given twice), or a ConfigError naming `where`
    (and ending with `fix`, what to do)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(e)}{fix}") from None


def parse_override(text: str) -> dict:
    """'a.b=1' -> {'a': {'b': 1}}; values are parsed as YAML scalars (1, 0.1, true, name)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. lr=0.05)")
    key, raw = text.split("=", 1)
    fix = f"; fix the value, or quote it if it is a string ({key}='...')"
    return nest({key: parse_yaml(raw, f"the value of override {text!r}", fix) if raw.strip() else ""})


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML file's top-level mapping, or a ConfigError naming the file (`what`: how to call it).

    Every way a file can be wrong is one line: missing, a directory or device, unreadable, not
    UTF-8 text (a binary file), not YAML, a key given twice, not a mapping."""
    values = parse_yaml(_read_text(Path(path), what), f"{what} {path}") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys, not {type(values).__name__}")
    return values


def _read_text(path: Path, what: str) -> str:
    """The text of a UTF-8 file, or a ConfigError that says why it cannot be read."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give the path of a YAML file")
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():  # a FIFO or device: reading it could block or never end
        raise ConfigError(f"{what} {path} is not a regular file; give the path of a YAML file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror or type(e).__name__}); check its "
                          f"permissions") from None
    try:
        return data.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not content
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          f"is it a binary file? give a YAML text file") from None


def resolve(layers: list[tuple[dict, str]]) -> Config:
    """A validated Config from the defaults and nested-dict layers applied in order.

    Each layer is (values, source); the source names the layer in errors ("config file x.yaml",
    "override 'lr=0.1'", "grid g.yaml axes")."""
    from cskd.methods import METHODS

    cfg = Config()
    method_sections: dict[str, dict] = {name: {} for name in METHODS}
    for values, source in layers:
        _apply(cfg, values, "", source, method_sections)
    return validate(cfg, method_sections)


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Build a validated Config from defaults, an optional YAML file and key=value overrides."""
    layers = [(read_yaml(path), str(path))] if path is not None else []
    return resolve(layers + [(parse_override(text), f"override '{text}'") for text in overrides])


def _instantiate_params(params_cls, values: dict, method: str):
    params = params_cls()
    hints = typing.get_type_hints(params_cls)
    names = [f.name for f in dataclasses.fields(params_cls)]
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(f"{method}.{key}", [f"{method}.{n}" for n in names], f"the '{method}' section")
        setattr(params, key, _check_value(f"{method}.{key}", value, hints[key], f"the '{method}' section"))
    return params


def validate(cfg: Config, method_sections: dict[str, dict] | None = None) -> Config:
    """Check names and ranges; fill `cfg.method_params` from the chosen method's section."""
    from cskd.augment import PIPELINES
    from cskd.methods import METHODS
    from cskd.models import MODELS

    if cfg.model not in MODELS:
        raise ConfigError(f"unknown model '{cfg.model}'; valid models: {LIST_SEP.join(sorted(MODELS))}")
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method '{cfg.method}'; valid methods: {LIST_SEP.join(sorted(METHODS))}")
    sections = method_sections or {}
    for name, values in sections.items():  # inactive sections are checked too, then dropped
        params = _instantiate_params(METHODS[name].Params, values, name)
        if name == cfg.method:
            cfg.method_params = params
    if cfg.method_params is None or not isinstance(cfg.method_params, METHODS[cfg.method].Params):
        cfg.method_params = METHODS[cfg.method].Params()
    METHODS[cfg.method].check_params(cfg.method_params)
    choices = {
        "lr_schedule": ("step_reference", "step", "milestones"),
        "device": ("auto", "cpu", "cuda"),
        "data.pipeline": tuple(PIPELINES),
        "data.loader": ("auto", "ffcv", "device", "jpeg"),
        "lr_scaling": ("none", "linear"),
        "engine": ("ddp", "fsdp", "deepspeed"),
        "optimizer.zero": (0, 1, 2),
    }
    for key, allowed in choices.items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {LIST_SEP.join(map(str, allowed))}, got {value!r}")
    positive = ("epochs", "batch.global", "lr", "ece_bins", "log_every", "data.eval_batch_size",
                "checkpoint_every", "eval_every")
    for key in positive:
        if not get_key(cfg, key) > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get_key(cfg, key)!r}")
    for key in ("momentum", "weight_decay", "threads", "data.color_jitter", "data.lighting", "data.num_workers",
                "batch.micro_per_rank", "batch.grad_accum", "warmup_epochs"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {get_key(cfg, key)!r}")
    for key, limit in AT_MOST.items():
        if get_key(cfg, key) > limit:
            raise ConfigError(f"config key '{key}' must be <= {limit}, got {get_key(cfg, key)}")
    if not 0 <= cfg.seed < INT64[1]:  # rank r seeds with seed + r: torch takes 0 .. 2**64 - 1
        raise ConfigError(f"config key 'seed' must be >= 0 and < 2**63, got {cfg.seed}")
    _check_milestones(cfg)
    _check_engine(cfg)
    _check_strings(cfg)
    return cfg


def deepspeed_installed() -> bool:
    """Whether DeepSpeed can be imported here (looked up, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("deepspeed") is not None


def check_engine_choice(engine: str, zero: int, compile: bool, cuda_graphs: bool) -> None:
    """Engine settings that cannot go together, one line naming the fix: for the config's validation
    and for `cskd.engine.build_engine`'s callers alike."""
    if engine == "deepspeed" and not deepspeed_installed():
        raise ConfigError(DEEPSPEED_MISSING)
    stages = (0, 1, 2) if engine == "deepspeed" else (0, 1)
    if zero not in stages:
        fix = ("optimizer.zero=2 (gradients sharded as well) needs engine=deepspeed" if zero == 2 else
               "for parameters sharded as well (stage 3) use engine=fsdp")
        raise ConfigError(f"config key 'optimizer.zero' must be one of {', '.join(map(str, stages))} under "
                          f"engine={engine}, got {zero!r}; {fix}")
    if zero and engine == "fsdp":
        raise ConfigError(f"optimizer.zero={zero} shards the optimizer state under engine=ddp or deepspeed; "
                          f"engine=fsdp already shards it: drop optimizer.zero")
    if compile and engine == "deepspeed":
        raise ConfigError("compile=true is not supported under engine=deepspeed (DeepSpeed compiles through its "
                          "own engine.compile()): set compile=false, or engine=ddp to compile")
    if cuda_graphs and not compile:
        raise ConfigError("cuda_graphs=true captures the compiled model (torch.compile mode reduce-overhead); "
                          "set compile=true as well")


def _check_engine(cfg: Config) -> None:
    """Combinations that cannot run, refused before any work."""
    check_engine_choice(cfg.engine, cfg.optimizer.zero, cfg.compile, cfg.cuda_graphs)
    if cfg.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"config key 'warmup_epochs' ({cfg.warmup_epochs}) must be below epochs ({cfg.epochs}); "
                          f"Goyal et al. warm up for 5 of 90")


def resolve_batch(batch: BatchConfig, world_size: int) -> tuple[int, int, int]:
    """(global, micro_per_rank, grad_accum) for `world_size` ranks: two given numbers fix the third.

    A one-line ConfigError names all four numbers when they do not fit together."""
    g, micro, accum = batch.global_, batch.micro_per_rank, batch.grad_accum
    if not micro and not accum:
        accum = 1
    if not micro:
        micro, rest = divmod(g, world_size * accum)
    elif not accum:
        accum, rest = divmod(g, world_size * micro)
    else:
        rest = g - micro * accum * world_size
    if rest or micro * accum * world_size != g or micro < 1:
        raise ConfigError(
            f"batch.global={g} is not batch.micro_per_rank={batch.micro_per_rank or '?'} x batch.grad_accum="
            f"{batch.grad_accum or '?'} x world size {world_size}; give a global batch that divides by the world "
            f"size times the others (0 lets a key follow from the rest)")
    return g, micro, accum


def _check_milestones(cfg: Config) -> None:
    """`lr_milestones` is used by, and only by, `lr_schedule: milestones`: strictly increasing epochs
    inside the run (a milestone at 0 or past the last epoch would never divide the LR)."""
    m = cfg.lr_milestones
    if cfg.lr_schedule != "milestones":
        if m:
            raise ConfigError(f"config key 'lr_milestones' is {m} but lr_schedule is {cfg.lr_schedule!r}, which "
                              f"ignores it; set lr_schedule=milestones, or lr_milestones=[]")
        return
    if not m:
        raise ConfigError("lr_schedule=milestones needs lr_milestones, the epochs from which the LR is divided "
                          "by 10, e.g. lr_milestones=[150,225]")
    if any(not 0 < e < cfg.epochs for e in m) or any(a >= b for a, b in zip(m, m[1:])):
        raise ConfigError(f"config key 'lr_milestones' must be strictly increasing epochs between 1 and "
                          f"epochs-1={cfg.epochs - 1}, got {m}")


def _check_strings(cfg: Config) -> None:
    """Paths must not be empty; no string may hold a control character (a newline in a path or label
    would break run dir names, tables and the sbatch scripts they end up in)."""
    for key in NON_EMPTY_KEYS:
        if not get_key(cfg, key).strip():
            raise ConfigError(f"config key '{key}' is empty; give a directory (an empty path would mean the "
                              f"current directory)")
    for key, value in _scalar_items(cfg):
        bad = unprintable(value) if isinstance(value, str) else None
        if bad is not None:
            raise ConfigError(f"config key '{key}' holds the control character {bad!r} in {value!r}; "
                              f"remove it")


def unprintable(text: str) -> str | None:
    """The first character of `text` that is not printable (newline, CR, tab, NUL, escape, ...), or None."""
    return next((c for c in text if not c.isprintable()), None)


def _scalar_items(obj, prefix: str = ""):
    """(dotted key, value) of every plain field of a config dataclass, the method's params included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            name = obj.method if f.name == "method_params" else f.name
            yield from _scalar_items(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{f.name}", value


def get_key(cfg, dotted: str):
    for part in RENAMED_KEYS.get(dotted, dotted).split("."):
        cfg = getattr(cfg, KEYWORD_FIELDS.get(part, part))
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of the resolved config; the method's params sit under the method's name."""
    d = dataclasses.asdict(cfg)
    params = d.pop("method_params")
    d["batch"] = {_key_name(k): v for k, v in d["batch"].items()}
    if params:
        d[cfg.method] = params
    return d


def from_dict(values: dict) -> Config:
    """Inverse of `to_dict` (used to rebuild a run's config from its saved config.yaml)."""
    return resolve([(values, "saved config")])


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def identity_dict(cfg: Config) -> dict:
    """The config without runtime-only keys (nor `ADDED_KEYS` at their old behaviour's value): two
    runs with equal identity compute the same thing."""
    d = to_dict(cfg)
    dropped = list(RUNTIME_KEYS) + [key for key, old in ADDED_KEYS.items() if get_key(cfg, key) == old]
    for dotted in dropped:
        node = d
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node.pop(last, None)
    # Runs made before the batch triple named the global batch `batch_size`: same name, same identity.
    d["batch_size"] = d["batch"].pop("global")
    for section in ("batch", "optimizer"):
        if not d[section]:
            del d[section]
    return d


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out
