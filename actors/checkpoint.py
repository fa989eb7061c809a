"""The coordinator's checkpoint: JSON metadata plus numpy arrays, no pickle.

A checkpoint is two files in the checkpoint folder:

- ``checkpoint.json``: format version, round, model name and weight count,
  strategy name and its scalar state, the shapes of its arrays, the data
  spec key, the hospital names, a fingerprint of the training settings, the
  round records, the name of the arrays file and its SHA-256.
- ``checkpoint-rNNNNN.npz``: the global weights (``weights``) and the
  strategy's arrays (``strategy.<name>``, e.g. FedAdam's ``m`` and ``v``),
  read with ``allow_pickle=False``.

Nothing in either file can run code when read. Each file is written to a
temporary name, flushed and renamed; the arrays file first, under a name
holding the round, then the metadata that names it, so a crash at any point
leaves the previous checkpoint whole. Older arrays files are removed after
the new metadata is in place. A file that is not what this module wrote
(junk, wrong version, missing keys, an arrays file whose hash differs) is
refused with ``CheckpointError`` (a ValueError) naming the file.

Each hospital keeps its own privacy record beside it, not in the
coordinator's checkpoint: ``<state dir>/privacy.json``
(``write_privacy_state`` / ``read_privacy_state``), the state of its
DP-SGD accountant (``federation.privacy.PrivateTrainer.privacy_state``),
written the same atomic way. ``medfed run`` puts the state dirs under
``<out>/hospitals/<name>/``; on a real deployment that folder is the
hospital's own disk, which the coordinator never reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from federation.jsonvalues import json_safe

META_NAME = "checkpoint.json"
VERSION = 2
_ARRAYS_GLOB = "checkpoint-r*.npz"
_REQUIRED = {
    "version": int, "round": int, "model": str, "weight_count": int,
    "strategy_name": str, "strategy_scalars": dict, "strategy_arrays": dict,
    "data_key": str, "hospitals": list, "config_fingerprint": str,
    "settings": dict, "records": list, "arrays_file": str, "arrays_sha256": str,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a medfed checkpoint."""


def training_settings(config) -> dict:
    """The settings a resumed run should share with the run it continues.

    config: the run's ``RunConfig``. Run length,
    timeouts, folders and Ray placement are left out: changing them on
    resume is expected.
    """
    dp = config.dp
    if dp is not None:
        dp = {k: getattr(dp, k) for k in ("epsilon", "delta", "noise_multiplier",
                                          "max_grad_norm", "accountant")}
    return {
        "model": config.model, "hidden": config.hidden,
        "strategy": config.strategy, "mu": config.mu,
        "server_lr": config.server_lr, "lr": config.lr,
        "optimizer": config.optimizer, "batch_size": config.batch_size,
        "local_epochs": config.local_epochs, "seed": config.seed,
        "fraction": config.fraction, "quorum": config.quorum, "dp": dp,
        "secure_agg": config.secure_agg.mode,
    }


def fingerprint(settings: dict) -> str:
    """Hex SHA-256 (16 digits) of ``settings`` as canonical JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save(folder: str | Path, *, round: int, model: str, weights: np.ndarray,
         strategy_state: dict, data_key: str, hospitals: list[str],
         settings: dict, records: list[dict]) -> Path:
    """Writes the checkpoint of ``round`` into ``folder``; returns the JSON path.

    strategy_state: ``strategy.state_dict()``: scalars (numbers, strings,
    None) and numpy arrays. records: JSON-able round records (numpy values
    become plain numbers; non-finite floats become None).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scalars, arrays = {}, {"weights": np.asarray(weights, dtype=np.float32)}
    shapes = {}
    for key, value in strategy_state.items():
        if isinstance(value, np.ndarray):
            arrays[f"strategy.{key}"] = value
            shapes[key] = list(value.shape)
        else:
            scalars[key] = _plain(value)

    arrays_name = f"checkpoint-r{round:05d}.npz"
    arrays_path = folder / arrays_name
    _atomic_write(arrays_path, lambda fh: np.savez(fh, **arrays))
    meta = {
        "version": VERSION, "round": int(round), "model": model,
        "weight_count": int(arrays["weights"].size),
        "strategy_name": str(strategy_state.get("name")),
        "strategy_scalars": scalars, "strategy_arrays": shapes,
        "data_key": data_key, "hospitals": list(hospitals),
        "config_fingerprint": fingerprint(settings), "settings": settings,
        "records": _plain(records), "arrays_file": arrays_name,
        "arrays_sha256": _sha256(arrays_path),
    }
    text = json.dumps(meta, indent=1, allow_nan=False).encode()
    meta_path = folder / META_NAME
    _atomic_write(meta_path, lambda fh: fh.write(text))

    for old in folder.glob(_ARRAYS_GLOB):
        if old.name != arrays_name:
            old.unlink(missing_ok=True)
    return meta_path


def read_meta(folder: str | Path) -> dict:
    """The checkpoint's metadata, checked for shape; CheckpointError otherwise.

    Raises FileNotFoundError naming the path when there is no checkpoint.
    """
    path = Path(folder) / META_NAME
    if not path.exists():
        if (Path(folder) / "checkpoint.pkl").exists():
            raise CheckpointError(
                f"{Path(folder) / 'checkpoint.pkl'} is an older checkpoint format "
                "that is no longer read (loading it could run code); run without "
                "--resume"
            )
        raise FileNotFoundError(
            f"no checkpoint at {path}; run without --resume to start at round 1"
        )
    try:
        meta = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not valid JSON ({exc}); it is damaged or not a "
            "medfed checkpoint: remove it or run without --resume"
        ) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} holds no JSON object")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {meta.get('version')!r}, this medfed "
            f"reads {VERSION}; run without --resume"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(
                f"checkpoint {path}: field {key!r} is missing or not a "
                f"{kind.__name__} (got {meta.get(key)!r}); the file was altered"
            )
    if "/" in meta["arrays_file"] or meta["arrays_file"].startswith("."):
        raise CheckpointError(
            f"checkpoint {path} names arrays file {meta['arrays_file']!r} outside "
            "its folder; the file was altered"
        )
    return meta


def load(folder: str | Path) -> tuple[dict, np.ndarray, dict]:
    """Returns ``(meta, weights, strategy_state)`` of the checkpoint in ``folder``.

    The arrays file must hash to what the metadata says and hold exactly
    the arrays it lists, with those shapes. Raises CheckpointError naming
    the file otherwise, FileNotFoundError when there is no checkpoint.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    path = folder / meta["arrays_file"]
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {folder / META_NAME} names {path}, which does not exist"
        )
    if _sha256(path) != meta["arrays_sha256"]:
        raise CheckpointError(
            f"checkpoint arrays {path} do not match the SHA-256 in "
            f"{folder / META_NAME}; one of the files was altered"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint arrays {path} are unreadable: {exc}") from exc

    weights = arrays.pop("weights", None)
    if weights is None or weights.ndim != 1 or weights.size != meta["weight_count"]:
        raise CheckpointError(
            f"checkpoint arrays {path} hold no weight vector of "
            f"{meta['weight_count']} values"
        )
    state = dict(meta["strategy_scalars"])
    for key, shape in meta["strategy_arrays"].items():
        value = arrays.pop(f"strategy.{key}", None)
        if value is None or list(value.shape) != list(shape):
            raise CheckpointError(
                f"checkpoint arrays {path}: strategy array {key!r} is missing or "
                f"not of shape {shape}"
            )
        state[key] = value
    if arrays:
        raise CheckpointError(
            f"checkpoint arrays {path} hold unexpected arrays {sorted(arrays)}"
        )
    return meta, weights.astype(np.float32), state


def check_matches(meta: dict, folder: str | Path, *, model: str,
                  strategy: str, data_key: str, hospitals: list[str],
                  weight_count: int | None = None) -> None:
    """Raises CheckpointError when the checkpoint belongs to another run setup.

    Names the field, the checkpoint's value and this run's value. The
    weight count is checked only when given (it needs the data's width).
    """
    path = Path(folder) / META_NAME
    # The consortium first: a different hospital count changes the data
    # spec key too, and "3 hospitals, this run has 4" says more.
    pairs = [("model", meta["model"], model),
             ("strategy", meta["strategy_name"], strategy),
             ("hospitals", meta["hospitals"], list(hospitals)),
             ("data (spec key)", meta["data_key"], data_key)]
    if weight_count is not None:
        pairs.append(("weight count", meta["weight_count"], weight_count))
    for what, saved, now in pairs:
        if saved != now:
            if what == "hospitals":
                shown = (f"{len(saved)}: {', '.join(saved)}",
                         f"{len(now)}: {', '.join(now)}")
            else:
                shown = (repr(saved), repr(now))
            raise CheckpointError(
                f"checkpoint {path} was written for {what} {shown[0]}, this run "
                f"has {shown[1]}; resume with the settings of that run, or start "
                "without --resume in another --out / --checkpoint-dir"
            )


def changed_settings(meta: dict, settings: dict) -> list[str]:
    """``"name: saved -> now"`` for each training setting that differs."""
    saved = meta.get("settings") or {}
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items()
            if _plain(saved.get(k)) != _plain(v)]


PRIVACY_FILE = "privacy.json"


def write_privacy_state(folder: str | Path, state: dict) -> Path:
    """Writes a hospital's privacy state to ``folder/privacy.json`` atomically.

    Temporary file, fsync, rename, then fsync of the folder: once this
    returns, the spend survives a crash of the process or the machine.
    Returns the path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(state, indent=1, allow_nan=False).encode()
    path = folder / PRIVACY_FILE
    _atomic_write(path, lambda fh: fh.write(text))
    _fsync_dir(folder)
    return path


def read_privacy_state(folder: str | Path) -> dict | None:
    """The privacy state in ``folder/privacy.json``; None when there is none.

    Raises CheckpointError naming the file when it is not a JSON object.
    """
    path = Path(folder) / PRIVACY_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"privacy state {path} is not valid JSON ({exc}); it is damaged. "
            "The hospital's spend cannot be restored from it: restore the file "
            "from a backup or start a new run with --overwrite"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"privacy state {path} holds no JSON object")
    return state


def _fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """``value`` as plain JSON values for a checkpoint."""
    return json_safe(value, "a checkpoint")
