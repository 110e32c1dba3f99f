"""The typed config: recipes, key=value overrides, the errors a user sees, and the CLI around them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest
from clitools import REPO, command, one_paragraph, run_cli
from omegaconf import OmegaConf

from raysnet.config import Config, ConfigError, flatten, from_dict, load_config, to_dict
from raysnet.models import list_models

# --- recipes and groups -----------------------------------------------------------------------

def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.recipe == "digits" and cfg.arch == "resnet20"
    assert cfg.data.name == "digits" and cfg.data.root.endswith("digits")
    # The digits recipe shortens the run; the schema's 164 epochs are the paper's CIFAR run.
    assert cfg.epochs == 15 and cfg.batch_size == 64


def test_imagenet_arch_selects_the_imagenet_recipe():
    cfg = load_config(["arch=resnet101"])
    assert cfg.recipe == "imagenet-paper" and cfg.arch == "resnet101"
    assert cfg.data.name == "imagenet" and cfg.data.crop == 224
    assert cfg.batch_size == 256 and list(cfg.optim.milestones) == [0.25, 0.5, 0.75]
    # A CIFAR depth stays on the quickstart, and a named recipe wins over the guess.
    assert load_config(["arch=resnet56"]).recipe == "digits"
    assert load_config(["arch=resnet101", "recipe=cifar-paper"]).recipe == "cifar-paper"


def test_cifar_110_recipe_inherits_and_warms_up():
    base, cfg = load_config(["recipe=cifar-paper"]), load_config(["recipe=cifar-paper-110"])
    assert cfg.recipe == "cifar-paper-110" and cfg.arch == "resnet110"
    # Inherited from cifar-paper.
    assert cfg.data == base.data and cfg.data.name == "cifar10"
    assert (cfg.epochs, cfg.batch_size, cfg.optim.lr, cfg.optim.milestones) == \
        (base.epochs, base.batch_size, base.optim.lr, base.optim.milestones) == (164, 128, 0.1, (0.5, 0.75))
    # Paper §4.2: 0.01 (= 0.1 x 0.1) for about 400 iterations.
    assert cfg.optim.warmup == "constant" and cfg.optim.warmup_iters == 400
    assert cfg.optim.lr * cfg.optim.warmup_factor == pytest.approx(0.01)
    assert base.optim.warmup_iters == 0


@pytest.mark.parametrize("args", [["data=cifar10", "data.root=/x"], ["data.root=/x", "data=cifar10"]])
def test_data_root_sets_the_selected_dataset(args):
    cfg = load_config(args)
    assert cfg.data.name == "cifar10" and cfg.data.root == "/x"
    assert cfg.data.flip is True  # from cifar10.yaml, not digits.yaml (flip: false)
    assert cfg.recipe == "digits"


def test_own_dataset_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train_aug: scale\nval_aug: center\ncrop: 96\nscale_range: [100, 140]\n")
    cfg = load_config([f"data={path}", "data.crop=112"])
    assert cfg.data.name == "mine"  # the file's stem when it names none
    assert cfg.data.train_aug == "scale" and cfg.data.scale_range == (100, 140) and cfg.data.crop == 112
    named = tmp_path / "other.yaml"
    named.write_text("name: flowers\n")
    assert load_config([f"data={named}"]).data.name == "flowers"


def test_own_dataset_yaml_with_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("crop: 96\nresolution: 96\n")
    with pytest.raises(ConfigError, match=r"data\.resolution"):
        load_config([f"data={path}"])


@pytest.mark.parametrize("key, value, expected", [
    ("arch", "plain110", "plain110"),
    ("data", "imagenet", "imagenet"),  # read back as data.name
    ("data.root", "/datasets/cifar", "/datasets/cifar"),
    ("epochs", "7", 7),
    ("batch_size", "256", 256),
    ("optim.lr", "0.05", 0.05),
    ("run.workers", "4", "4"),  # N, or MIN-MAX for an elastic run: a string
    ("run.gpus_per_worker", "1", 1.0),
    ("run.gpus_per_worker", "0.2", 0.2),
    ("run.gpus_per_worker", "null", None),
    ("run.name", "my-run", "my-run"),
    ("run.name", "007", "007"),  # text keys keep the text: YAML would make this the number 7
    ("run.name", "true", "true"),
    ("tracking.uri", "http://mlflow.example:5000", "http://mlflow.example:5000"),
    ("tracking.uri", "sqlite:///outputs/mlflow.db", "sqlite:///outputs/mlflow.db"),
    ("model.shortcut", "C", "C"),
    ("model.variant", "v1.5", "v1.5"),
    ("optim.milestones", "[0.3,0.6,0.9]", (0.3, 0.6, 0.9)),
    ("run.progress_s", "5", 5.0),
    ("tracking.step_every", "20", 20),
    ("tracking.step_every", "null", None),
    ("tracking.system_metrics_s", "0", 0.0),
    ("tracking.register", "resnets", "resnets"),
])
def test_user_facing_keys_override(key, value, expected):
    cfg = load_config([f"{key}={value}"])
    got = flatten(cfg)["data.name" if key == "data" else key]
    assert got == expected and type(got) is type(expected)


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arg, wanted", [
    ("optim.lrr=0.1", ["'optim.lrr'", "Did you mean 'optim.lr'?"]),
    ("run.workrs=4", ["'run.workrs'", "Did you mean 'run.workers'?"]),
    ("epoch=5", ["'epoch'", "Did you mean 'epochs'?"]),
    ("epochs=abc", ["'epochs'", "Integer"]),
    ("optim.lr=fast", ["'optim.lr'", "Float"]),
    ("model.shortcut=D", ["'model.shortcut'", "'A'", "'B'", "'C'"]),
    ("arch=resnet19", ["'arch'", "Did you mean 'resnet18'?", *list_models()]),
    ("recipe=imagenet-papr", ["'imagenet-papr'", "cifar-paper", "cifar-paper-110", "digits", "imagenet-paper"]),
    ("data=cifar100", ["'cifar100'", "'data'", "cifar10", "digits", "imagefolder", "imagenet"]),
    ("model=3", ["'model'"]),  # a value for a whole section
    ("run.workers=0", ["'run.workers'"]),
    # Elastic ranges: MIN-MAX, 1 <= MIN <= MAX.
    ("run.workers=3-2", ["'run.workers'", "'3-2'", "MIN-MAX"]),
    ("run.workers=0-2", ["'run.workers'", "'0-2'", "at least 1"]),
    ("run.workers=a-b", ["'run.workers'", "'a-b'", "run.workers=2-8"]),
    ("run.resize_check_s=0", ["'run.resize_check_s'", "positive"]),
    ("run.gpus_per_worker=1.5", ["'run.gpus_per_worker'", "1.5", "fraction of one GPU"]),
    ("optim.lr=-1", ["'optim.lr'"]),
    ("optim.lr=nan", ["'optim.lr'", "nan", "positive number"]),  # nan and inf pass comparisons...
    ("optim.lr=inf", ["'optim.lr'", "inf", "positive number"]),
    ("optim.momentum=nan", ["'optim.momentum'", "finite number"]),  # ...so no float key may hold them
    ("data.pca_lighting=inf", ["'data.pca_lighting'", "finite number"]),
    ("optim.milestones=[0.5,nan]", ["'optim.milestones'", "[0.5, nan]", "finite number"]),
    ("optim.milestones=[0.75,0.5]", ["'optim.milestones'"]),
    ("batch_size=1", ["'batch_size'", "run.workers", "at least 2"]),  # each of 2 workers needs a sample...
    ("run.workers=1-65", ["'batch_size'", "run.workers", "at least 65"]),  # ...and each of up to 65
    ("optim.lr", ["'optim.lr'", "key=value"]),
    ("=3", ["'=3'", "key=value"]),
])
def test_errors_name_the_key(arg, wanted):
    with pytest.raises(ConfigError) as err:
        load_config([arg])
    for text in wanted:
        assert text in str(err.value)


def test_missing_own_dataset_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([f"data={tmp_path / 'absent.yaml'}"])


# --- the command line -------------------------------------------------------------------------

@pytest.mark.parametrize("arg, key", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("run.workrs=4", "run.workrs"),
    ("epochs=abc", "epochs"),
    ("model.shortcut=D", "model.shortcut"),
    ("model=3", "model"),
    ("arch=resnet19", "resnet19"),
    ("recipe=nope", "nope"),
    ("data=nope", "nope"),
    ("optim.lr", "optim.lr"),
])
def test_cli_bad_input_is_one_paragraph_and_exit_2(capsys, arg, key):
    result = run_cli(capsys, "raysnet.train", arg)
    assert f"'{key}'" in one_paragraph(result)
    assert result.out == ""


@pytest.mark.e2e  # a real process: outside the quick loop, which runs everything in-process
def test_the_train_command_line_itself():
    """`python -m raysnet.train` as typed (the other tests call its entry point in this process)."""
    proc = command("raysnet.train", "optim.lrr=0.1", timeout=120)
    assert "'optim.lrr'" in one_paragraph(proc) and proc.stdout == ""


def test_cli_print_config(capsys):
    result = run_cli(capsys, "raysnet.train", "--print-config", "arch=plain56", "optim.lr=0.05")
    assert result.code == 0, result.err
    assert "arch: plain56" in result.out.splitlines()
    printed = OmegaConf.to_container(OmegaConf.create(result.out))
    assert printed["arch"] == "plain56" and printed["recipe"] == "digits"
    assert printed["optim"]["lr"] == 0.05 and printed["run"]["workers"] == "2"
    assert printed["data"]["name"] == "digits"
    # What was printed is the whole config: it loads back into the same Config.
    assert from_dict(printed) == load_config(["arch=plain56", "optim.lr=0.05"])


# --- serialisation ----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [[], ["recipe=cifar-paper-110", "run.gpus_per_worker=1", "model.variant=v1.5"],
                                  ["arch=resnet152", "data.root=/data/imagenet", "tracking.uri=http://h:5000"]])
def test_dict_round_trip(args):
    cfg = load_config(args)
    d = to_dict(cfg)
    assert isinstance(d, dict) and isinstance(d["optim"], dict)
    back = from_dict(d)
    assert back == cfg and isinstance(back, Config)
    assert isinstance(back.optim.milestones, tuple) and isinstance(back.data.scale_range, tuple)


def test_flatten_gives_dotted_keys():
    cfg = load_config(["optim.lr=0.2", "run.workers=4"])
    flat = flatten(cfg)
    assert flat["optim.lr"] == 0.2 and flat["run.workers"] == "4" and flat["arch"] == "resnet20"
    assert flat["data.root"] == cfg.data.root and flat["tracking.uri"] == ""
    assert not any(isinstance(v, dict) for v in flat.values())
    sections = ("model", "data", "optim", "run", "tracking")
    assert not any(k in sections for k in flat)
    # Every leaf of every section, and nothing else.
    expected = {f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(cfg, s))}
    expected |= {f.name for f in dataclasses.fields(cfg) if f.name not in sections}
    assert set(flat) == expected


# Each entry point's commands that answer without doing any work: --help, and --print-config where
# the entry point has one.
ANSWERS_AT_ONCE = {
    "raysnet.train": [["--help"], ["--print-config"]],
    "raysnet.tune": [["--help"], [str(REPO / "tuning" / "lr-wd-asha.yaml"), "--print-config"]],
    "raysnet.prepare": [["--help"]],
    "raysnet.evaluate": [["--help"]],
    "raysnet.analyze": [["--help"]],
    "raysnet.report": [["--help"]],
    "raysnet.predict": [["--help"]],
}
HEAVY = ("torch", "torchvision", "ffcv", "numba", "ray", "mlflow")
# Wall clock of a fresh interpreter running one entry point's commands above: about 0.3-0.6 s on
# two idle cores (the README has the figures); 5 s when evaluate imported torch. Generous: the
# quick loop runs two test workers on two cores, and CI machines are noisy.
ANSWER_S = 6.0


@pytest.mark.parametrize("tool", list(ANSWERS_AT_ONCE))
def test_help_and_the_config_check_import_neither_torch_nor_ffcv(tool):
    """--help and --print-config answer at once: importing torch and FFCV (numba compiles for
    seconds), Ray or MLflow waits until a command does real work. One fresh interpreter per entry
    point, timed whole (its start included), running each command as `python -m` does."""
    script = ("import json, runpy, sys\n"
              "tool, commands = sys.argv[1], json.loads(sys.argv[2])\n"
              "for args in commands:\n"
              "    sys.argv = [tool, *args]\n"
              "    try:\n"
              "        runpy.run_module(tool, run_name='__main__', alter_sys=True)\n"
              "    except SystemExit as e:\n"
              "        assert not e.code, (tool, args, e.code)\n"
              f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, tool, json.dumps(ANSWERS_AT_ONCE[tool])], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], done.stdout[-500:]
    assert seconds < ANSWER_S, f"{tool} {ANSWERS_AT_ONCE[tool]} took {seconds:.1f} s"


def test_a_recipe_file_of_ones_own_reads_like_a_dataset_file(tmp_path):
    """recipe= and data= take a YAML file the same way: its syntax error named with the line, an
    unknown key named, and a good file (with a built-in base) used."""
    (tmp_path / "broken.yaml").write_text("epochs: [1\n")
    (tmp_path / "typo.yaml").write_text("epochz: 3\n")
    (tmp_path / "mine.yaml").write_text("base: cifar-paper\nepochs: 3\n")
    for key in ("recipe", "data"):
        with pytest.raises(ConfigError, match=r"(?s)broken\.yaml' is not valid YAML: .*line 1, column 9"):
            load_config([f"{key}={tmp_path / 'broken.yaml'}"])
    with pytest.raises(ConfigError, match="unknown key 'epochz'.*Did you mean 'epochs'"):
        load_config([f"recipe={tmp_path / 'typo.yaml'}"])
    cfg = load_config([f"recipe={tmp_path / 'mine.yaml'}"])
    assert cfg.epochs == 3 and cfg.optim.milestones == load_config(["recipe=cifar-paper"]).optim.milestones


@pytest.mark.parametrize("tool", ["raysnet.train", "raysnet.tune", "raysnet.prepare", "raysnet.evaluate",
                                  "raysnet.analyze", "raysnet.report"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_entry_point_answers_help(capsys, tool, flag):
    """Keys (with their defaults where the tool has them) and an example, exit status 0."""
    out = run_cli(capsys, tool, flag)
    assert out.code == 0 and out.err == "", out.err
    assert f"python -m {tool} " in out.out  # an example
    assert tool == "raysnet.tune" or "Keys and defaults" in out.out
