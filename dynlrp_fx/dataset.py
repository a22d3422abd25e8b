"""Dataset runs: explain every batch of a data loader, writing results in resumable shards (safetensors).

:func:`attribute_dataset` groups the loader's batches into *shards* of ``shard_size`` consecutive batches. Each
finished shard is written atomically (a temporary file, then ``os.replace``) as
``shard-{rank:03d}-{shard:06d}.safetensors``, so a shard file on disk is always complete. Rerunning after an
interruption skips every shard whose file exists (no explainer call) and recomputes only the rest: at most the
shard in progress is lost. The loader must yield its batches in the same order each time (no shuffling).

Each shard holds, for its samples in loader order:

* ``index``: the sample's position in the loader (0, 1, ... over all batches), ``int64``;
* ``relevance.<input>``: relevance of each explained input;
* ``output``, ``target`` (the explained index, argmax resolved), ``seed``, ``absorbed``;
* ``captured.<module path>`` with ``compile(..., capture=...)``; ``params.<name>`` with ``compile(..., params=...)``
  (summed over the shard's samples; :func:`merge_shards` sums them over shards);
* ``input.<name>`` with ``save_inputs=True``.

Beyond one machine: run the same script under ``torchrun``. When ``torch.distributed`` is initialised (or the
``RANK``/``WORLD_SIZE`` environment of ``torchrun`` is set, in which case a process group is created here: gloo on
CPU, nccl when ``device`` is a CUDA device) shard ``k`` belongs to rank ``k % world_size``; every rank writes its
own shard files (and ``manifest-{rank:03d}.json``), then all ranks meet at a barrier. :func:`merge_shards` reads
the shards of all ranks and returns the samples ordered by index. Every rank iterates the whole loader to keep
sample indices global, but only explains its own shards (loading is repeated, the explanation is not).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["attribute_dataset", "merge_shards", "load_shards", "DatasetRun", "shard_name"]

FORMAT = "dynlrp-shards-1"
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
_SHARD_RE = re.compile(r"^shard-(\d{3,})-(\d{6,})\.safetensors$")


def shard_name(rank: int, index: int) -> str:
    """File name of shard ``index`` written by ``rank``."""
    return f"shard-{rank:03d}-{index:06d}.safetensors"


@dataclass
class DatasetRun:
    """Summary of one :func:`attribute_dataset` call (on one rank)."""

    out_dir: Path
    rank: int
    world_size: int
    computed: list[int] = field(default_factory=list)  #: shards explained by this call
    skipped: list[int] = field(default_factory=list)  #: shards of this rank found complete on disk
    num_shards: int = 0  #: shards in the whole dataset
    num_samples: int = 0  #: samples in the whole dataset
    explainer_calls: int = 0
    seconds: float = 0.0


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _unpack(batch: Any, keys: Any) -> tuple[tuple, dict, Any]:
    """Default batch -> ``(args, kwargs, labels)``; see :func:`attribute_dataset`."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        names = (
            list(keys)
            if keys is not None
            else [k for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in LABEL_KEYS]
        )
        missing = [k for k in names if k not in batch]
        if missing:
            raise KeyError(f"attribute_dataset: keys {missing} are not in the batch (it has {list(batch)})")
        return (), {k: batch[k] for k in names}, labels
    if isinstance(batch, (tuple, list)):
        if keys is not None:
            return tuple(batch[i] for i in keys), {}, (batch[-1] if len(batch) > len(list(keys)) else None)
        return (batch[0],), {}, (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        f"attribute_dataset: cannot unpack a batch of type {type(batch).__name__}; pass unpack=lambda batch: "
        "(args, kwargs, labels)"
    )


def _batch_size(args: tuple, kwargs: dict) -> int:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            return int(v.shape[0])
    raise ValueError("attribute_dataset: the batch has no tensor with a batch dimension")


def _dist_context(device: Any) -> tuple[int, int, bool]:
    """``(rank, world_size, created)``: the process group's, initialising one under torchrun if needed."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "RANK" in os.environ:
        cuda = device is not None and torch.device(device).type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _completed(out: Path) -> dict[int, Path]:
    done = {}
    for p in out.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            done[int(m.group(2))] = p
    return done


def _resolve_target(target: Any, batch: Any, labels: Any) -> Any:
    if target is None or isinstance(target, int):
        return target
    if isinstance(target, str):
        if target != "label":
            raise ValueError(f"attribute_dataset: target={target!r}; use None, an int, 'label' or a callable")
        if labels is None:
            raise ValueError(
                "attribute_dataset: target='label' but the batch has no labels (second element or "
                f"one of the keys {LABEL_KEYS})"
            )
        return labels
    if callable(target):
        return target(batch)
    return target


def _shard_tensors(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for k in records[0]:
        vals = [r[k] for r in records]
        out[k] = torch.stack(vals).sum(0) if k.startswith("params.") else torch.cat(vals, 0)
        out[k] = out[k].contiguous()
    return out


def attribute_dataset(
    explainer: Callable[..., Any],
    dataloader: Any,
    out_dir: str | os.PathLike[str],
    *,
    target: Any = None,
    shard_size: int = 8,
    progress: bool = True,
    keys: Any = None,
    unpack: Callable[[Any], tuple[tuple, dict, Any]] | None = None,
    device: Any = None,
    save_inputs: bool = False,
) -> DatasetRun:
    """Explain every batch of ``dataloader`` and write the results in shards under ``out_dir`` (see module doc).

    Parameters
    ----------
    explainer: an :class:`~dynlrp_fx.Explainer` (any callable ``(*args, target=, **kwargs) -> Explanation``).
    dataloader: an iterable of batches in a fixed order (``torch.utils.data.DataLoader`` without shuffling). A
        batch is a tensor (the input), a tuple/list ``(input, label, ...)``, or a dict (tensors other than
        ``label``/``labels``/``target`` are keyword inputs).
    out_dir: directory of the shards (created); rerunning with the same directory resumes.
    target: ``None`` (argmax), an int, ``"label"`` (the batch's labels) or ``callable(batch) -> targets``.
    shard_size: batches per shard (must stay the same when resuming).
    progress: show a ``tqdm`` progress bar (one per rank).
    keys: which batch entries are inputs: dict keys (keyword inputs) or tuple positions (positional inputs).
    unpack: ``batch -> (args, kwargs, labels)`` overriding the default unpacking.
    device: move the batch's tensors there before explaining (results are stored on the CPU).
    save_inputs: also store the inputs (``input.<name>``).

    Returns
    -------
    DatasetRun: what this rank computed and skipped.

    Raises
    ------
    ValueError: ``out_dir`` holds shards written with another ``shard_size``.
    """
    from safetensors.torch import save

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 (batches per shard), got {shard_size}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world, created = _dist_context(device)
    config = {"format": FORMAT, "shard_size": shard_size}
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("shard_size") != shard_size:
            raise ValueError(
                f"attribute_dataset: {out} holds shards of shard_size={old.get('shard_size')} batches, but "
                f"shard_size={shard_size} was given; rerun with the same shard_size or use a new out_dir"
            )
    elif rank == 0:
        _atomic_json(cfg_path, config)
    done = _completed(out)
    run = DatasetRun(out, rank, world)
    manifest_path = out / f"manifest-{rank:03d}.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"shards": {}}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        bar = tqdm(
            total=total,
            desc=f"explaining (rank {rank}/{world})" if world > 1 else "explaining",
            unit="batch",
            position=rank if world > 1 else None,
            leave=True,
        )

    records: list[dict[str, torch.Tensor]] = []
    shard_start = 0
    offset = 0
    b = -1

    def flush(k: int, first_sample: int, last_sample: int, n_batches: int) -> None:
        tensors = _shard_tensors(records)
        name = shard_name(rank, k)
        meta = {"format": FORMAT, "shard": str(k), "rank": str(rank), "batches": str(n_batches)}
        _atomic_write_bytes(out / name, save(tensors, metadata=meta))
        manifest["shards"][str(k)] = {"file": name, "samples": [first_sample, last_sample], "batches": n_batches}
        _atomic_json(manifest_path, manifest)
        run.computed.append(k)
        records.clear()

    try:
        for b, batch in enumerate(dataloader):
            k = b // shard_size
            if b % shard_size == 0:
                shard_start = offset
            args, kwargs, labels = (unpack or (lambda x: _unpack(x, keys)))(batch)
            n = _batch_size(args, kwargs)
            mine = k % world == rank
            last_of_shard = (b + 1) % shard_size == 0
            if mine and k not in done:
                if device is not None:
                    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
                    kwargs = {n_: v.to(device) if isinstance(v, torch.Tensor) else v for n_, v in kwargs.items()}
                tgt = _resolve_target(target, batch, labels)
                if isinstance(tgt, torch.Tensor) and device is not None:
                    tgt = tgt.to(device)
                with torch.no_grad():
                    expl = explainer(*args, target=tgt, **kwargs)
                run.explainer_calls += 1
                records.append(_record(expl, tgt, offset, n, args, kwargs, save_inputs))
                if last_of_shard:
                    flush(k, shard_start, offset + n, shard_size)
            elif mine and last_of_shard and k not in run.skipped:
                run.skipped.append(k)
            offset += n
            if bar is not None:
                bar.update(1)
        n_batches = b + 1
        last = (n_batches - 1) // shard_size if n_batches else -1
        if n_batches % shard_size and last % world == rank:
            if records:
                flush(last, shard_start, offset, n_batches - last * shard_size)
            elif last in done:
                run.skipped.append(last)
        run.num_shards = last + 1
        run.num_samples = offset
        _atomic_json(
            out / f"done-{rank:03d}.json",
            {"num_shards": run.num_shards, "num_samples": offset, "world_size": world, "rank": rank},
        )
    finally:
        if bar is not None:
            bar.close()
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                if created:
                    dist.destroy_process_group()
    run.seconds = time.perf_counter() - t0
    return run


def _record(expl: Any, tgt: Any, offset: int, n: int, args: tuple, kwargs: dict, save_inputs: bool) -> dict:
    y = expl.output.detach()
    flat = y.reshape(y.shape[0], -1)
    if tgt is None:
        t = flat.argmax(1)
    elif isinstance(tgt, int):
        t = torch.full((n,), tgt, dtype=torch.long)
    else:
        t = torch.as_tensor(tgt).reshape(-1).long()
    rec = {
        "index": torch.arange(offset, offset + n, dtype=torch.long),
        "output": y,
        "target": t,
        "seed": expl.conservation.seed,
        "absorbed": expl.absorbed,
    }
    for name, r in expl.inputs.items():
        rec[f"relevance.{name}"] = r
    for name, r in getattr(expl, "captured", {}).items():
        rec[f"captured.{name}"] = r
    for name, r in getattr(expl, "params", {}).items():
        rec[f"params.{name}"] = r
    if save_inputs:
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                rec[f"input.{i}"] = a
        for name, a in kwargs.items():
            if isinstance(a, torch.Tensor):
                rec[f"input.{name}"] = a
    return {k: v.detach().cpu() for k, v in rec.items()}


def load_shards(out_dir: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(shard index, tensors)`` for every shard file under ``out_dir`` (all ranks), in shard order."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    for k, path in sorted(_completed(out).items()):
        yield k, load_file(path)


def merge_shards(out_dir: str | os.PathLike[str], *, strict: bool = True) -> dict[str, torch.Tensor]:
    """Read all shards under ``out_dir`` and return every key concatenated over samples, ordered by ``index``.

    ``params.*`` entries are summed over shards (they are batch sums). With ``strict=True`` (default) the run must be
    complete: every shard from 0 to the count recorded by the ranks' ``done-*.json`` files is present and the
    indices are ``0 .. N-1``.

    Raises
    ------
    FileNotFoundError: no shards under ``out_dir``.
    ValueError: (strict) shards are missing or the run did not finish; rerun :func:`attribute_dataset` to resume.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"merge_shards: {out} is not a directory")
    shards = list(load_shards(out))
    if not shards:
        raise FileNotFoundError(f"merge_shards: no shard files (shard-*.safetensors) in {out}")
    if strict:
        dones = [json.loads(p.read_text()) for p in out.glob("done-*.json")]
        if not dones:
            raise ValueError(
                f"merge_shards: the run in {out} did not finish (no done-*.json); rerun "
                "attribute_dataset with the same arguments to resume, or pass strict=False"
            )
        n_shards = max(d["num_shards"] for d in dones)
        have = {k for k, _ in shards}
        missing = sorted(set(range(n_shards)) - have)
        if missing:
            raise ValueError(
                f"merge_shards: shards {missing[:20]} of {n_shards} are missing in {out}; rerun "
                "attribute_dataset to compute them (finished shards are kept)"
            )
    merged: dict[str, torch.Tensor] = {}
    keys = shards[0][1].keys()
    for key in keys:
        vals = [t[key] for _, t in shards]
        merged[key] = torch.stack(vals).sum(0) if key.startswith("params.") else torch.cat(vals, 0)
    order = merged["index"].argsort()
    for key in keys:
        if not key.startswith("params."):
            merged[key] = merged[key][order]
    if strict and not torch.equal(merged["index"], torch.arange(len(order))):
        raise ValueError(
            f"merge_shards: sample indices in {out} are not 0..{len(order) - 1} (duplicated or missing "
            "samples: were the shards written by runs over different loaders?)"
        )
    return merged
