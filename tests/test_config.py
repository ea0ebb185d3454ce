import os

import pytest

from cskd.config import diff_keys, dump_yaml, from_dict, identity_dict, load_config, nest, resolve, to_dict
from cskd.errors import ConfigError


def test_defaults_are_the_reference_recipe():
    cfg = load_config()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch.global_, cfg.epochs) == (0.1, 0.9, 1e-4, 128, 200)
    cskd = load_config(None, ["method=cskd"]).method_params
    assert (cskd.temperature, cskd.lam, cskd.exclude_self) == (4.0, 1.0, False)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: small_cnn\nepochs: 5\ndata:\n  path: /x\ncskd:\n  lam: 3\n")
    cfg = load_config(str(path), ["epochs=7", "method=cskd", "lr=5e-2", "weight_decay=1e-4", "cskd.temperature=2"])
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.data.path) == ("small_cnn", 7, 0.05, "/x")
    assert (cfg.method_params.lam, cfg.method_params.temperature) == (3.0, 2.0)
    assert isinstance(cfg.weight_decay, float)  # YAML reads 1e-4 as a string; coerced


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'lrr'.*did you mean: lr"):
        load_config(None, ["lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'data.pth'.*data.path"):
        load_config(None, ["data.pth=x"])
    with pytest.raises(ConfigError, match=r"'cskd.temprature'.*cskd.temperature"):
        load_config(None, ["method=cskd", "cskd.temprature=2"])


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match=r"'epoch' from .*c.yaml.*epochs"):
        load_config(str(path))


def test_wrong_types():
    with pytest.raises(ConfigError, match=r"'epochs' expects int, got 'ten'"):
        load_config(None, ["epochs=ten"])
    with pytest.raises(ConfigError, match=r"'epochs' expects int, got 2.5"):
        load_config(None, ["epochs=2.5"])
    with pytest.raises(ConfigError, match=r"'amp' expects bool"):
        load_config(None, ["amp=maybe"])
    with pytest.raises(ConfigError, match=r"'data' is a section"):
        load_config(None, ["data=3"])


def test_names_and_ranges():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet'; valid models: densenet121, densenet121_bc_cifar, preact_resnet10, .*, small_cnn, small_cnn_gn$"):
        load_config(None, ["model=resnet"])
    with pytest.raises(ConfigError, match=r"unknown method 'fskd'; valid methods: adacos, byot, ce, cskd, .*, vsoftmax$"):
        load_config(None, ["method=fskd"])
    with pytest.raises(ConfigError, match=r"'lr_schedule' must be one of"):
        load_config(None, ["lr_schedule=cosine"])
    with pytest.raises(ConfigError, match=r"'batch.global' must be > 0"):
        load_config(None, ["batch_size=0"])
    with pytest.raises(ConfigError, match=r"'cskd.temperature' must be > 0"):
        load_config(None, ["method=cskd", "cskd.temperature=0"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["epochs"])


def test_round_trip_and_identity():
    cfg = load_config(None, ["method=cskd", "cskd.lam=2", "threads=3", "out_dir=/a"])
    again = from_dict(to_dict(cfg))
    assert dump_yaml(again) == dump_yaml(cfg)
    other = load_config(None, ["method=cskd", "cskd.lam=2", "threads=1", "out_dir=/b"])
    assert identity_dict(cfg) == identity_dict(other)  # runtime-only keys do not change a run
    assert diff_keys(identity_dict(cfg), identity_dict(load_config(None, ["method=cskd"]))) == ["cskd.lam"]
    assert "cskd" not in to_dict(load_config(None, ["cskd.lam=2"]))  # inactive method sections are dropped


def test_layers_of_nested_dicts_keep_their_values_and_name_their_source():
    axis = {"data.path": "data/a b", "cskd.lam": 3, "method": "cskd"}
    layer = nest(axis)
    assert layer == {"data": {"path": "data/a b"}, "cskd": {"lam": 3}, "method": "cskd"}
    base = {"cskd": {"temperature": 2}, "lr": "5e-2"}
    cfg = resolve([(base, "base"), (layer, "axes"), (nest({"cskd.temperature": 1.5}), "rules[0]")])
    assert (cfg.data.path, cfg.lr, cfg.method_params.lam, cfg.method_params.temperature) == ("data/a b", 0.05, 3, 1.5)
    assert base == {"cskd": {"temperature": 2}, "lr": "5e-2"}  # layers are read, never merged into
    with pytest.raises(ConfigError, match=r"'epochs' expects int, got 'x' \(str\) from grid g.yaml axes"):
        resolve([({"epochs": "x"}, "grid g.yaml axes")])
    with pytest.raises(ConfigError, match=r"config key 'data.path' sets a key inside 'data', which is also given"):
        nest({"data": "x", "data.path": "y"})


def test_label_is_a_runtime_key():
    a, b = load_config(None, ["label=cskd-lam3"]), load_config(None, [])
    assert a.label == "cskd-lam3" and identity_dict(a) == identity_dict(b)


def test_one_yaml_reader_refuses_duplicate_keys_and_bad_files(tmp_path):
    """read_yaml serves config files, grids and overrides: a key given twice at any depth is refused
    (PyYAML alone keeps the last), YAML's merge key may still be overridden, every bad file is one line."""
    from cskd.config import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 0.1, epochs: 3}\nrun:\n  <<: *b\n  lr: 0.2\n")
    assert read_yaml(path)["run"] == {"lr": 0.2, "epochs": 3}
    path.write_text("data:\n  path: a\ncskd:\n  lam: 1\n  lam: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid YAML: key 'lam' is given twice \(lines 4 and 5"):
        read_yaml(path)
    path.write_bytes("\ufeffepochs: 3\n".encode())  # a byte-order mark is not content
    assert read_yaml(path) == {"epochs": 3}
    path.write_bytes(b"epochs: 3\n\x00\xff")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xff at offset 11\)"):
        read_yaml(path)
    with pytest.raises(ConfigError, match=r"grid .* is a directory; give the path of a YAML file"):
        read_yaml(tmp_path, "grid")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(ConfigError, match=r"fifo.yaml is not a regular file"):
        read_yaml(fifo)
    with pytest.raises(ConfigError, match=r"override 'cskd=\{lam: 1, lam: 2\}' is not valid YAML: key 'lam'"):
        load_config(None, ["cskd={lam: 1, lam: 2}"])


@pytest.mark.parametrize("override, message", [
    ("lr=.nan", r"'lr' must be a finite number, got nan"),
    ("lr=nan", r"'lr' must be a finite number, got nan"),  # a YAML string, read as float
    ("weight_decay=-.inf", r"'weight_decay' must be a finite number, got -inf"),
    ("lr=1.0e400", r"'lr' must be a finite number, got inf"),
    (f"lr={10**400}", r"'lr' must be a finite number, got inf"),
    ("cskd.lam=.inf", r"'cskd.lam' must be a finite number, got inf from the 'cskd' section"),
    ("seed=-1", r"'seed' must be >= 0 and < 2\*\*63, got -1"),
    (f"seed={2**63}", r"'seed' must fit a 64-bit integer"),
    (f"epochs={-2**63 - 1}", r"'epochs' must fit a 64-bit integer"),
    ("threads=1025", r"'threads' must be <= 1024"),
    ("out_dir=", r"'out_dir' is empty"),
    ("data.path=''", r"'data.path' is empty"),
    ('out_dir="runs/a\\tb"', r"'out_dir' holds the control character '\\t'"),
    ('data.path="data/x\\0"', r"'data.path' holds the control character '\\x00'"),
    ('label="a\\u2028b"', r"'label' holds the control character '\\u2028'"),  # a Unicode line separator
])
def test_values_torch_or_paths_cannot_take(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method=cskd", override])


def test_edge_values_that_are_fine():
    cfg = load_config(None, [f"seed={2**63 - 1}", "threads=1024", "out_dir=runs/é x", "label=cskd-lam3"])
    assert (cfg.seed, cfg.out_dir) == (2**63 - 1, "runs/é x")


def test_errors_quoting_user_input_stay_one_line(tmp_path):
    """The command lines print `error: <message>` as one line: newlines in what a message quotes are escaped."""
    with pytest.raises(ConfigError) as error:
        load_config(None, ["epochz=|\n  x"])
    assert str(error.value).startswith("unknown config key 'epochz' from override 'epochz=|\\n  x'")
    odd = tmp_path / "a\nb.yaml"
    with pytest.raises(ConfigError, match=r"config file .*a\\nb.yaml does not exist$"):
        load_config(str(odd))
