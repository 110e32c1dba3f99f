"""Resolve a `Config` from recipe files and `key=value` overrides (OmegaConf does the parsing).

Grammar, as in Hydra's config groups:
  recipe=NAME      picks raysnet/recipes/NAME.yaml (default: imagenet-paper for ImageNet depths, else digits)
  data=NAME        picks raysnet/recipes/data/NAME.yaml, or a YAML file of your own (data=path/to/mine.yaml)
  data.root=DIR    sets a field of the selected dataset recipe; likewise every other dotted key
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from raysnet.config.schema import Config, DataConfig, ModelConfig, OptimConfig, RunConfig, TrackingConfig
from raysnet.models import get_arch, list_models

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig",
           "TrackingConfig", "load_config", "to_dict", "from_dict", "flatten", "recipes", "data_root"]

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
GROUPS = ("recipe", "data")


class ConfigError(ValueError):
    """A configuration mistake, worded for the person who made it."""


def recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def datasets() -> list[str]:
    return sorted(p.stem for p in (RECIPES / "data").glob("*.yaml"))


def _valid_keys(node: Any = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += _valid_keys(f.default_factory, key + ".")
    return keys


def _text_keys(node: Any = Config, prefix: str = "") -> set[str]:
    """Dotted keys whose type is plain `str` (annotations are strings under `from __future__`)."""
    keys = set()
    for f in dataclasses.fields(node):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            keys |= _text_keys(f.default_factory, f"{prefix}{f.name}.")
        elif f.type in ("str", str):
            keys.add(prefix + f.name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    valid = _valid_keys()
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    # List the keys of the section the mistake is in (or the top level), not all of them.
    section = key.rpartition(".")[0]
    siblings = [k for k in valid if k.rpartition(".")[0] == section] if section in valid else \
        [k for k in valid if "." not in k]
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys{f' in {section}' if section in valid else ''}: "
                       f"{', '.join(siblings)}. Print every key and its value with --print-config.")


def _load_yaml(path: Path, what: str) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} file '{path}' does not exist.") from None
    except Exception as e:  # a YAML syntax error: name the file, keep the parser's words
        raise ConfigError(f"{what} file '{path}' is not valid YAML: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{what} file '{path}' must hold a mapping of keys to values.")
    return node


def _recipe(name: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """A recipe with its `base:` chain merged underneath it (child wins)."""
    if name not in recipes():
        raise ConfigError(f"unknown recipe '{name}'; valid recipes are: {', '.join(recipes())} "
                          f"(files in {RECIPES}).")
    if name in seen:
        raise ConfigError(f"recipe '{name}' inherits from itself through 'base:' ({' -> '.join(seen + (name,))}).")
    node = _load_yaml(RECIPES / f"{name}.yaml", "recipe")
    base = node.pop("base", None)
    return OmegaConf.merge(_recipe(base, seen + (name,)), node) if base else node


def _data_recipe(name: str) -> DictConfig:
    path = Path(name).expanduser()
    if name.endswith((".yaml", ".yml")) or path.is_file():
        node = _load_yaml(path, "dataset recipe")
        node.setdefault("name", path.stem)
        return node
    if name not in datasets():
        raise ConfigError(f"unknown dataset '{name}' for key 'data'; valid datasets are: {', '.join(datasets())}, "
                          "or the path of a YAML dataset recipe of your own.")
    return _load_yaml(RECIPES / "data" / f"{name}.yaml", "dataset recipe")


def data_root(data: DataConfig) -> str:
    """Where a dataset lives when `data.root` is not given."""
    base = os.environ.get("RAYSNET_DATA") or Path.home() / ".cache" / "raysnet" / "data"
    return str(Path(base) / data.name)


def _split(args: list[str]) -> tuple[dict[str, str], list[str]]:
    groups, overrides = {}, []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise ConfigError(f"cannot read argument '{arg}': arguments are key=value, e.g. arch=resnet56 "
                              "or optim.lr=0.05.")
        if key in GROUPS:
            groups[key] = value
        else:
            overrides.append(arg)
    return groups, overrides


def _merge(base: DictConfig, update: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        raise _unknown_key(e.full_key) from None
    except ValidationError as e:
        choices = f" Valid architectures: {', '.join(list_models())}." if e.full_key == "arch" else ""
        # A value given for a whole section (model=3) fails in OmegaConf with neither msg nor full_key.
        key = e.full_key or next((k for k, v in update.items() if isinstance(base.get(k), DictConfig)
                                  and not isinstance(v, (dict, DictConfig))), "?")
        msg = (e.msg or str(e)).splitlines()[0]
        raise ConfigError(f"bad value for '{key}' ({where}): {msg}.{choices}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad configuration ({where}): {e.msg}") from None


def load_config(args: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- recipe (and its bases) <- dataset recipe <- key=value overrides."""
    groups, overrides = _split(list(args))
    # Text keys take the value as typed: YAML would read run.name=007 as the number 7.
    text = _text_keys()
    try:
        cli = OmegaConf.from_dotlist([a for a in overrides if a.partition("=")[0] not in text])
        for arg in overrides:
            key, _, value = arg.partition("=")
            if key in text:
                OmegaConf.update(cli, key, value, force_add=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read overrides {overrides}: {e.msg}") from None

    # The recipe follows the architecture unless named: the paper trains ImageNet depths on
    # ImageNet, and everything else starts from the embedded digits quickstart.
    arch = str(cli.get("arch", ""))
    name = groups.get("recipe") or ("imagenet-paper" if arch in list_models()
                                    and get_arch(arch).family == "imagenet" else "digits")
    cfg = OmegaConf.structured(Config)
    recipe = _recipe(name)
    data = groups.get("data") or recipe.pop("data", None) or "digits"
    if not isinstance(data, str):
        raise ConfigError(f"recipe '{name}': 'data' must name a dataset recipe, not a mapping.")
    recipe.pop("data", None)
    cfg = _merge(cfg, recipe, f"recipe {name}")
    cfg = _merge(cfg, {"recipe": name, "data": _data_recipe(data)}, f"dataset recipe {data}")
    cfg = _merge(cfg, cli, "command line")
    # The default location, or the user's path with ~ expanded, so workers read the same place.
    root = str(Path(cfg.data.root).expanduser()) if cfg.data.root else data_root(cfg.data)
    cfg = _merge(cfg, {"data": {"root": root}}, "data.root")
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # a required value left missing
        raise ConfigError(f"incomplete configuration: {e.msg} (full key: {getattr(e, 'full_key', '?')}).") from None
    validate(config)
    return config


def validate(cfg: Config) -> None:
    if cfg.arch not in list_models():
        close = difflib.get_close_matches(cfg.arch, list_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown architecture '{cfg.arch}' for key 'arch'.{hint} "
                          f"Valid architectures: {', '.join(list_models())}.")
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "run.workers": cfg.run.workers,
                "run.cpus_per_worker": cfg.run.cpus_per_worker, "data.crop": cfg.data.crop,
                "optim.ref_batch_size": cfg.optim.ref_batch_size, "run.eval_every": cfg.run.eval_every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"bad value for '{key}': {value}. Expected an integer of at least 1.")
    if cfg.batch_size % cfg.run.workers:
        raise ConfigError(f"bad value for 'batch_size': {cfg.batch_size} is the global batch and must divide "
                          f"evenly across run.workers={cfg.run.workers} workers.")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"bad value for 'optim.lr': {cfg.optim.lr}. Expected a positive number.")
    if not all(0 < m < 1 for m in cfg.optim.milestones) or list(cfg.optim.milestones) != sorted(cfg.optim.milestones):
        raise ConfigError(f"bad value for 'optim.milestones': {list(cfg.optim.milestones)}. Expected increasing "
                          "fractions of the run between 0 and 1, e.g. [0.5,0.75] for the paper's CIFAR steps.")
    if cfg.data.scale_range[0] > cfg.data.scale_range[1]:
        raise ConfigError(f"bad value for 'data.scale_range': {list(cfg.data.scale_range)}. Expected [min, max].")
    if cfg.run.gpus_per_worker is not None and cfg.run.gpus_per_worker < 0:
        raise ConfigError(f"bad value for 'run.gpus_per_worker': {cfg.run.gpus_per_worker}. Expected 0 or more.")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict: what travels to Ray workers and into checkpoints."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def from_dict(d: dict[str, Any]) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Config) -> dict[str, Any]:
    """{"optim.lr": 0.1, ...}: MLflow params and Tune's keys."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg), "")
    return out
