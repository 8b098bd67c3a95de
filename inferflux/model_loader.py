"""Loads a Hugging Face checkpoint folder into a model family's weight tree.

The module is built abstractly (`nnx.eval_shape`, no memory), split once into a graph
definition and a state of `nnx.Param`s with logical axes, and every state leaf is filled from
the safetensors files by the family's weight-name map.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from inferflux.models.registry import ModelFamily, get_family

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclass
class LoadedModel:
    family: ModelFamily
    config: Any  # the family's frozen config
    hf_config: dict[str, Any]
    dtype: Any
    graphdef: Any  # nnx.GraphDef: static structure, merged back inside the jitted step
    state: Any  # nnx.State of jax.Arrays (the weights)


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model folder {str(folder)!r}")
    with open(path, encoding="utf-8") as f:
        cfg: dict[str, Any] = json.load(f)
    return cfg


def resolve_dtype(requested: str, hf_config: dict[str, Any]) -> Any:
    if requested == "auto":
        requested = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {requested!r}")
    return DTYPES[requested]


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index.name} are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no weights in {str(folder)!r}: expected model.safetensors, or shards listed in "
            "model.safetensors.index.json"
        )
    return files


def load_model(folder: str | Path, dtype: str = "auto") -> LoadedModel:
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    family = get_family(hf_config)
    cfg = family.config_from_hf(hf_config)
    jdtype = resolve_dtype(dtype, hf_config)
    abstract = nnx.eval_shape(lambda: family.module(cfg, jdtype))
    graphdef, state = nnx.split(abstract)
    wanted = family.weight_map(cfg)
    by_path = {path: (name, transpose) for name, (path, transpose) in wanted.items()}
    loaded: dict[tuple[Any, ...], jax.Array] = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name not in wanted:
                    logger.debug("ignoring checkpoint tensor %s", name)
                    continue
                path, transpose = wanted[name]
                tensor = f.get_tensor(name)
                loaded[path] = (tensor.T if transpose else tensor).astype(jdtype)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        if path not in loaded:
            name = by_path.get(path, (str(path), False))[0]
            raise ValueError(f"checkpoint in {str(folder)!r} lacks tensor {name!r}")
        value = loaded[path]
        if tuple(value.shape) != tuple(var.shape):
            name = by_path[path][0]
            raise ValueError(
                f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(var.shape)}"
            )
        leaves.append((path, var.replace(value)))
    return LoadedModel(family, cfg, hf_config, jdtype, graphdef, nnx.from_flat_state(leaves))


def logical_axes(state: Any) -> dict[tuple[Any, ...], tuple[str | None, ...]]:
    """Each weight's logical axis names, by state path (what the sharding rules consume)."""
    return {path: var.get_metadata()["axes"] for path, var in nnx.to_flat_state(state)}
