"""Dataset runs: explain every batch of a data loader, writing results in resumable shards (safetensors).

:func:`attribute_dataset` groups the loader's batches into *shards* of ``shard_size`` consecutive batches. Each
finished shard is written as ``shard-{rank:03d}-{shard:06d}.safetensors`` and recorded in the rank's manifest
``manifest-{rank:03d}.json``. Rerunning with the same ``out_dir`` resumes: shards already finished are not explained
again, at most the shards in progress are lost. The loader must yield the same batches in the same order each time
(no shuffling); this is checked (below).

Crash safety. Every file (shard, manifest, ``config.json``, ``done-*.json``) is written to a temporary file in
``out_dir``, flushed, ``fsync``-ed and renamed over its name (``os.replace``; the directory is ``fsync``-ed too), so a
name on disk always holds a complete file, old or new. A shard is written before its manifest entry; the manifest is
the record of what is finished. An entry holds the shard's file name, ``sha256`` and size (``bytes``) of the file,
its samples ``[first, stop)`` (first index and one past the last), ``num_samples``, ``batches`` and ``fingerprint``:
a sha256 over the inputs (and labels) of each of its batches, their names, dtypes, shapes and bytes.

* Resume: a shard counts as finished only when it has a manifest entry and its file's size and checksum match;
  otherwise (missing, truncated, corrupted file; a file without an entry) it is recomputed with a warning naming
  the file. The loader's batches of every shard with an entry are fingerprinted again and compared with the entry
  (sample range, batch count, fingerprint), and ``len(dataloader)`` (when it has one) with the recorded one; a
  mismatch (other values or labels, other order, other length) raises :class:`~dynlrp_fx.DynlrpDatasetError` and
  nothing computed by that call is kept: a new shard is committed (renamed into place, then recorded) only once
  every shard of the rank's record has been checked against the loader (at once when resuming an interrupted run,
  whose finished shards come first; after the last recorded shard when a damaged one before it is
  recomputed).
* :func:`load_shards` / :func:`merge_shards` read only the shards in the manifests and check each file's size and
  checksum first: a missing, truncated or corrupted shard raises :class:`~dynlrp_fx.DynlrpDatasetError` naming the
  file (with ``strict=False`` too), never a safetensors error.
* Shards of an older dynlrp-fx (manifest entries without checksum or fingerprint) are *unverified*: a resumed run
  recomputes them (it cannot check the dataset against them); :func:`merge_shards` reads them with a warning, and a
  file it cannot parse raises :class:`~dynlrp_fx.DynlrpDatasetError` naming it.
* Shard files that no manifest lists (a run killed between renaming and recording one) are not read by
  :func:`merge_shards` (warning) and are recomputed on resume. Temporary files of killed processes are removed.
* The fingerprint covers the loader's inputs and labels, not the explainer, its rules or ``target``: resume with
  the same ones. Fingerprinting costs one sha256 pass over the inputs (it runs in a thread, overlapping the
  explanation); resuming also reads every finished shard of the rank once to check its checksum.

Each shard holds, for its samples in loader order:

* ``index``: the sample's position in the loader (0, 1, ... over all batches), ``int64``;
* ``relevance.<input>``: relevance of each explained input;
* ``output``, ``target`` (the explained index, argmax resolved), ``seed``, ``absorbed``;
* ``captured.<module path>`` with ``compile(..., capture=...)``; ``params.<name>`` with ``compile(..., params=...)``
  (summed over the shard's samples; :func:`merge_shards` sums them over shards);
* ``input.<name>`` with ``save_inputs=True``;
* ``concept.<module path>`` with ``concepts=``: the relevance that reached each feature of the module's output
  ``(N, C)`` (see :func:`top_samples`).

Beyond one machine: run the same script under ``torchrun``. When ``torch.distributed`` is initialised (or the
``RANK``/``WORLD_SIZE`` environment of ``torchrun`` is set, in which case a process group is created here: gloo on
CPU, nccl when ``device`` is a CUDA device) shard ``k`` belongs to rank ``k % world_size``; every rank writes its
own shard files and its own ``manifest-{rank:03d}.json`` (it reads the others' to find shards written by an earlier
run with another world size), then all ranks meet at a barrier. :func:`merge_shards` reads the shards of all ranks
and returns the samples ordered by index. Every rank iterates the whole loader to keep sample indices global, but
only fingerprints and explains its own shards (loading is repeated, the explanation is not).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import DynlrpDatasetError

__all__ = ["attribute_dataset", "merge_shards", "load_shards", "DatasetRun", "shard_name", "top_samples"]

FORMAT = "dynlrp-shards-1"
MANIFEST_VERSION = 2  # 1 (no "version" key): entries without sha256 / fingerprint
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
_SHARD_RE = re.compile(r"^shard-(\d{3,})-(\d{6,})\.safetensors$")
_MANIFEST_RE = re.compile(r"^manifest-(\d{3,})\.json$")
_TMP_RE = re.compile(r"^\.(?:shard|manifest|done)-(\d{3,})[-.].*\.tmp-(\d+)$")
_CHUNK = 1 << 24


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


# -- durable files -----------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync, rename over ``path``, fsync the directory: ``path`` holds the old or the new bytes, whole."""
    tmp = _tmp_path(path)
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _clean_stale_tmp(out: Path, rank: int) -> None:
    """Remove this rank's temporary files left by killed processes (their pid no longer runs)."""
    if os.name != "posix":
        return
    for p in out.iterdir():
        m = _TMP_RE.match(p.name)
        if not m or int(m.group(1)) != rank:
            continue
        pid = int(m.group(2))
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except OSError:  # exists, owned by someone else
            alive = True
        if not alive:
            p.unlink(missing_ok=True)


# -- input fingerprints ------------------------------------------------------------------------------------------------
def _hash_value(h: Any, v: Any) -> None:
    if isinstance(v, torch.Tensor):
        t = v.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().resolve_conj().resolve_neg().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(v).__name__}:{v!r}\0".encode())
    elif isinstance(v, (tuple, list)):
        h.update(f"L{len(v)}\0".encode())
        for x in v:
            _hash_value(h, x)
    elif isinstance(v, Mapping):
        h.update(f"D{len(v)}\0".encode())
        for k, x in v.items():
            h.update(f"{k!r}\0".encode())
            _hash_value(h, x)
    else:
        h.update(f"O{type(v).__qualname__}\0".encode())


def _batch_digest(args: tuple, kwargs: dict, labels: Any) -> str:
    """sha256 over a batch's inputs and labels (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    h.update(f"A{len(args)}\0".encode())
    for a in args:
        _hash_value(h, a)
    h.update(f"K{len(kwargs)}\0".encode())
    for k, v in kwargs.items():
        h.update(f"{k}\0".encode())
        _hash_value(h, v)
    h.update(b"labels\0")
    _hash_value(h, labels)
    return h.hexdigest()


def _shard_fingerprint(digests: list[str]) -> str:
    return hashlib.sha256(("dynlrp-fingerprint-1\0" + "\0".join(digests)).encode()).hexdigest()


# -- manifests and shard checks ----------------------------------------------------------------------------------------
def _read_manifests(out: Path, *, where: str) -> dict[int, dict]:
    """``{rank: manifest}`` of every ``manifest-*.json``; an unreadable one raises (merge) or warns (resume)."""
    manifests = {}
    for p in sorted(out.iterdir()):
        m = _MANIFEST_RE.match(p.name)
        if not m:
            continue
        try:
            obj = json.loads(p.read_text())
            if not isinstance(obj, dict) or not isinstance(obj.get("shards", {}), dict):
                raise ValueError("not a manifest object")
        except (OSError, ValueError) as e:
            msg = f"{where}: the manifest {p} is unreadable ({e})"
            if where != "attribute_dataset":
                raise DynlrpDatasetError(
                    f"{msg}; rerun attribute_dataset with the same arguments to recompute the shards it listed"
                ) from e
            warnings.warn(f"{msg}; the shards it listed are recomputed", stacklevel=3)
            continue
        manifests[int(m.group(1))] = obj
    return manifests


def _candidates(manifests: dict[int, dict]) -> dict[int, list[dict]]:
    """``{shard: [entries]}`` over all manifests, the entry of the lowest rank first."""
    out: dict[int, list[dict]] = {}
    for r in sorted(manifests):
        for k, e in manifests[r].get("shards", {}).items():
            if isinstance(e, dict) and "file" in e:
                out.setdefault(int(k), []).append(e)
    return out


def _verified(entry: dict) -> bool:
    return "sha256" in entry and "bytes" in entry and "fingerprint" in entry


def _check_file(out: Path, entry: dict, *, keep: bool) -> tuple[str | None, bytes | None]:
    """``(problem, data)``: ``problem`` is None when the file matches its entry (``"unverified"`` for entries of an
    older version), otherwise why not; ``data`` are the file's bytes when ``keep``."""
    path = out / entry["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing", None
    if not _verified(entry):
        return "unverified", (path.read_bytes() if keep else None)
    if size != entry["bytes"]:
        what = "is truncated" if size < entry["bytes"] else "is corrupted"
        return f"{what} ({size} bytes, the manifest records {entry['bytes']})", None
    h = hashlib.sha256()
    data = None
    if keep:
        data = path.read_bytes()
        h.update(data)
    else:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    if h.hexdigest() != entry["sha256"]:
        return (
            f"is corrupted (its sha256 {h.hexdigest()[:16]}... is not the manifest's {entry['sha256'][:16]}...)",
            None,
        )
    return None, data


def _samples(entry: dict) -> str:
    s = entry.get("samples")
    return f"samples {s[0]}..{s[1] - 1}" if isinstance(s, list) and len(s) == 2 else "samples ?"


def _changed_error(out: Path, why: str) -> DynlrpDatasetError:
    return DynlrpDatasetError(
        f"attribute_dataset: the dataset changed since {out} was written: {why}. Resuming would mix "
        f"results of two datasets, so nothing was written. The loader must yield the same batches in the same order "
        f"(no shuffling) when resuming; to explain this dataset use a new out_dir, or delete {out}."
    )


# -- batches -----------------------------------------------------------------------------------------------------------
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


def _check_config(out: Path, rank: int, shard_size: int) -> None:
    """``out``'s ``config.json`` must record ``shard_size``; rank 0 writes it in a new ``out``."""
    config = {"format": FORMAT, "shard_size": shard_size}
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("shard_size") != shard_size:
            raise DynlrpDatasetError(
                f"attribute_dataset: {out} holds shards of shard_size={old.get('shard_size')} batches, but "
                f"shard_size={shard_size} was given; rerun with the same shard_size or use a new out_dir"
            )
    elif rank == 0:
        _atomic_json(cfg_path, config)


def _loader_len(dataloader: Any) -> int | None:
    try:
        return len(dataloader)
    except TypeError:
        return None


def _check_num_batches(out: Path, manifests: dict[int, dict], n_loader: int | None) -> None:
    """``len(dataloader)`` (when it has one) must be the one recorded by every manifest that lists shards."""
    for r, m in sorted(manifests.items()):
        if n_loader is not None and isinstance(m.get("num_batches"), int) and m.get("shards"):
            if m["num_batches"] != n_loader:
                raise _changed_error(
                    out,
                    f"the loader has {n_loader} batches, but the shards of manifest-{r:03d}.json were computed from "
                    f"a loader of {m['num_batches']} batches",
                )


class _ShardWriter:
    """The state of one :func:`attribute_dataset` call on one rank: its manifest, the shards of its record (kept or
    recomputed, the fingerprints they expect), the shard in progress, the shards written but not yet committed, the
    fingerprinting thread and the progress bar.

    The driver calls :meth:`check_existing`, :meth:`start`, :meth:`add_batch` for every batch of the loader and
    :meth:`finish`; on an exception :meth:`discard_pending`; in every case (once started) :meth:`close`.
    """

    def __init__(
        self,
        explainer: Callable[..., Any],
        out: Path,
        rank: int,
        world: int,
        created: bool,
        manifests: dict[int, dict],
        n_loader: int | None,
        *,
        save: Callable[..., bytes],
        target: Any,
        shard_size: int,
        keys: Any,
        unpack: Callable[[Any], tuple[tuple, dict, Any]] | None,
        device: Any,
        save_inputs: bool,
        concepts: dict | None = None,
    ) -> None:
        self.explainer = explainer
        self.out = out
        self.rank = rank
        self.world = world
        self.created = created  # the process group was created by attribute_dataset (destroyed by close)
        self.n_loader = n_loader
        self.save = save  # safetensors.torch.save
        self.target = target
        self.shard_size = shard_size
        self.keys = keys
        self.unpack = unpack
        self.device = device
        self.save_inputs = save_inputs
        self.concepts = concepts
        self.run = DatasetRun(out, rank, world)
        self.manifest_path = out / f"manifest-{rank:03d}.json"
        self.manifest = {
            "version": MANIFEST_VERSION,
            "format": FORMAT,
            "rank": rank,
            "shard_size": shard_size,
            "num_batches": n_loader,  # len(dataloader) when it has one, checked on resume
            "shards": dict(manifests.get(rank, {}).get("shards", {})),
        }
        # this rank's shards on disk: kept (file matches a verified entry) or to be recomputed; expected fingerprints
        self.candidates = {k: es for k, es in _candidates(manifests).items() if k % world == rank}
        self.kept: dict[int, dict] = {}
        self.expected: dict[int, list[dict]] = {}
        self.records: list[dict[str, torch.Tensor]] = []  # the shard in progress: one record per explained batch
        self.digests: list[str] = []  # and the input digest of each of its batches
        self.pending: list[tuple[int, Path, Path, dict]] = []  # written, not yet renamed nor recorded
        self.checked: set[int] = set()  # shards with manifest entries that the loader has reached (and matched)
        self.hasher: ThreadPoolExecutor | None = None
        self.bar: Any = None
        self.shard_start = 0  # first sample of the shard in progress
        self.offset = 0  # samples of the batches seen so far

    def check_existing(self) -> None:
        """Check the files of this rank's recorded shards: a shard whose file matches a verified entry is kept, the
        others are recomputed (warning); warn about this rank's shard files that no manifest lists. Called by
        :func:`attribute_dataset` itself: the warnings point at its caller."""
        out = self.out
        for k, entries in sorted(self.candidates.items()):
            problems = []
            for e in entries:
                problem, _ = _check_file(out, e, keep=False)
                if problem is None:
                    self.kept[k] = e
                    break
                problems.append(
                    f"{out / e['file']} was written by an older dynlrp-fx without a checksum"
                    if problem == "unverified"
                    else f"{out / e['file']} {problem}"
                )
            else:
                warnings.warn(f"attribute_dataset: recomputing shard {k}: {'; '.join(problems)}", stacklevel=3)
        self.expected = {k: [e for e in es if _verified(e)] for k, es in self.candidates.items()}
        listed = {e["file"] for es in self.candidates.values() for e in es}
        for p in sorted(out.iterdir()):
            m = _SHARD_RE.match(p.name)
            if not m:
                continue
            k = int(m.group(2))
            if k % self.world == self.rank and k not in self.kept and p.name not in listed:
                warnings.warn(
                    f"attribute_dataset: recomputing shard {k}: {p} is not recorded in any manifest (a run killed "
                    "between writing and recording it?)",
                    stacklevel=3,
                )

    def start(self, progress: bool) -> None:
        """Open the progress bar (with ``progress``) and the fingerprinting thread."""
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.n_loader,
                desc=f"explaining (rank {self.rank}/{self.world})" if self.world > 1 else "explaining",
                unit="batch",
                position=self.rank if self.world > 1 else None,
                leave=True,
            )
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynlrp-fingerprint")

    def add_batch(self, b: int, batch: Any) -> None:
        """Batch ``b`` of the loader: when its shard is this rank's, fingerprint it and (unless the shard is kept)
        explain it; its shard ends with it when it is the shard's last batch."""
        k = b // self.shard_size
        if b % self.shard_size == 0:
            self.shard_start = self.offset
        args, kwargs, labels = self.unpack(batch) if self.unpack else _unpack(batch, self.keys)
        n = _batch_size(args, kwargs)
        if k % self.world == self.rank:
            assert self.hasher is not None  # start() was called
            digest = self.hasher.submit(_batch_digest, args, kwargs, labels)  # overlaps the explanation
            if k not in self.kept:
                self._explain(batch, args, kwargs, labels, n)
            self.digests.append(digest.result())  # before the next batch: the loader may reuse its buffers
            if (b + 1) % self.shard_size == 0:
                self.end_shard(k, self.shard_start, self.offset + n, self.shard_size)
        self.offset += n
        if self.bar is not None:
            self.bar.update(1)

    def _explain(self, batch: Any, args: tuple, kwargs: dict, labels: Any, n: int) -> None:
        """Explain one batch of ``n`` samples (on ``device``) and keep its record for the shard in progress."""
        device = self.device
        if device is not None:
            args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in kwargs.items()}
        tgt = _resolve_target(self.target, batch, labels)
        if isinstance(tgt, torch.Tensor) and device is not None:
            tgt = tgt.to(device)
        with torch.no_grad():
            if self.concepts:  # an all-ones condition: the same explanation, plus each feature's relevance
                expl = self.explainer(*args, target=tgt, condition=self.concepts, **kwargs)
            else:
                expl = self.explainer(*args, target=tgt, **kwargs)
        self.run.explainer_calls += 1
        self.records.append(_record(expl, tgt, self.offset, n, args, kwargs, self.save_inputs))

    def end_shard(self, k: int, first: int, stop: int, n_batches: int) -> None:
        """Shard ``k`` (samples ``[first, stop)`` in ``n_batches`` batches) is complete: check it against its manifest
        entries, write it to its temporary file unless it is kept, and commit the pending shards once every shard of
        this rank's record has been checked."""
        fp = _shard_fingerprint(self.digests)
        self.digests.clear()
        self._check_against_record(k, first, stop, n_batches, fp)
        self.checked.add(k)
        if k in self.kept:
            self.run.skipped.append(k)
        else:
            self._write_pending(k, first, stop, n_batches, fp)
            self.run.computed.append(k)
        if self.pending and self.checked >= self.candidates.keys():
            self.commit()  # every shard this rank has on record matches the loader

    def _check_against_record(self, k: int, first: int, stop: int, n_batches: int, fp: str) -> None:
        """Raise when shard ``k``'s verified entries record other samples, batches or input fingerprint."""
        for e in self.expected.get(k, []):
            if e.get("samples") != [first, stop] or e.get("batches") != n_batches:
                raise _changed_error(
                    self.out,
                    f"shard {k} has {_samples(e)} in {e.get('batches')} batches in {e['file']}, but the loader gives "
                    f"samples {first}..{stop - 1} in {n_batches} batches",
                )
            if e["fingerprint"] != fp:
                raise _changed_error(
                    self.out,
                    f"shard {k} ({_samples(e)}, file {e['file']}) was computed from other inputs than the loader's "
                    f"batches {k * self.shard_size}..{k * self.shard_size + n_batches - 1} (input fingerprint differs)",
                )

    def _write_pending(self, k: int, first: int, stop: int, n_batches: int, fp: str) -> None:
        """Write shard ``k`` from the records of the shard in progress to its temporary file (pending commit)."""
        tensors = _shard_tensors(self.records)
        self.records.clear()
        name = shard_name(self.rank, k)
        meta = {"format": FORMAT, "shard": str(k), "rank": str(self.rank), "batches": str(n_batches)}
        data = self.save(tensors, metadata=meta)
        entry = {
            "file": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "samples": [first, stop],
            "num_samples": stop - first,
            "batches": n_batches,
            "fingerprint": fp,
        }
        tmp = _tmp_path(self.out / name)
        self.pending.append((k, tmp, self.out / name, entry))
        _write_synced(tmp, data)

    def commit(self) -> None:
        """Rename the pending shards into place, then record them in this rank's manifest."""
        for _, tmp, path, _ in self.pending:
            os.replace(tmp, path)
        _fsync_dir(self.out)
        for k, _, _, entry in self.pending:
            self.manifest["shards"][str(k)] = entry
        _atomic_json(self.manifest_path, self.manifest)
        self.pending.clear()

    def finish(self, n_batches: int) -> None:
        """After the loader's ``n_batches`` batches: end the last shard when it is partial (and this rank's), check
        that no recorded shard lies beyond the loader's end, commit, write the rank's done marker."""
        last = (n_batches - 1) // self.shard_size if n_batches else -1
        if n_batches % self.shard_size and last % self.world == self.rank:
            self.end_shard(last, self.shard_start, self.offset, n_batches - last * self.shard_size)
        beyond = sorted(self.candidates.keys() - self.checked)
        if beyond:
            e = self.candidates[beyond[0]][0]
            raise _changed_error(
                self.out,
                f"shard {beyond[0]} ({_samples(e)}, file {e['file']}) lies beyond the end of the loader, which has "
                f"{n_batches} batches ({self.offset} samples): the dataset is shorter",
            )
        if self.pending:
            self.commit()
        self.run.num_shards = last + 1
        self.run.num_samples = self.offset
        done = {
            "num_shards": self.run.num_shards,
            "num_samples": self.offset,
            "world_size": self.world,
            "rank": self.rank,
        }
        _atomic_json(self.out / f"done-{self.rank:03d}.json", done)

    def discard_pending(self) -> None:
        """Remove the temporary files of the shards not committed (the call failed: nothing it computed is kept)."""
        for _, tmp, _, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending.clear()

    def close(self) -> None:
        """Stop the fingerprinting thread, close the progress bar, meet the other ranks at the barrier (and destroy
        the process group when :func:`attribute_dataset` created it)."""
        if self.hasher is not None:
            self.hasher.shutdown(wait=True)
        if self.bar is not None:
            self.bar.close()
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                if self.created:
                    dist.destroy_process_group()


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
    concepts: Any = None,
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
    concepts: a module path or a list of them (or a dict path -> ``dynlrp.targets.Features(None, dim=)``): also
        store, per sample, the relevance that reached each feature of those modules' outputs
        (``concept.<path>``, ``(N, C)``), for ranking the most relevant samples per concept with
        :func:`top_samples` ("relevance maximisation", CRP). Needs a live explainer.

    Returns
    -------
    DatasetRun: what this rank computed and skipped.

    Warns
    -----
    UserWarning: a shard of this rank is missing, truncated, corrupted or unverified (older version) and is
        recomputed; the warning names the file.

    Raises
    ------
    DynlrpDatasetError: (a ``ValueError``) ``out_dir`` holds shards written with another ``shard_size``, or the
        loader's batches differ from those the finished shards were computed from (the dataset changed); nothing
        computed by this call is kept.
    """
    from safetensors.torch import save

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 (batches per shard), got {shard_size}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world, created = _dist_context(device)
    _check_config(out, rank, shard_size)
    _clean_stale_tmp(out, rank)
    manifests = _read_manifests(out, where="attribute_dataset")  # called from here: its warning names our caller
    n_loader = _loader_len(dataloader)
    _check_num_batches(out, manifests, n_loader)
    writer = _ShardWriter(
        explainer,
        out,
        rank,
        world,
        created,
        manifests,
        n_loader,
        save=save,
        target=target,
        shard_size=shard_size,
        keys=keys,
        unpack=unpack,
        device=device,
        save_inputs=save_inputs,
        concepts=_concept_conditions(concepts),
    )
    writer.check_existing()
    writer.start(progress)
    b = -1
    try:
        for b, batch in enumerate(dataloader):
            writer.add_batch(b, batch)
        writer.finish(n_batches=b + 1)
    except BaseException:
        writer.discard_pending()
        raise
    finally:
        writer.close()
    writer.run.seconds = time.perf_counter() - t0
    return writer.run


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
    for name, r in getattr(expl, "conditioned", {}).items():
        rec[f"concept.{name}"] = r
    if save_inputs:
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                rec[f"input.{i}"] = a
        for name, a in kwargs.items():
            if isinstance(a, torch.Tensor):
                rec[f"input.{name}"] = a
    return {k: v.detach().cpu() for k, v in rec.items()}


def _listed_shards(out: Path, where: str) -> dict[int, list[dict]]:
    """The shards of all manifests; warns about shard files no manifest lists (they are not read)."""
    candidates = _candidates(_read_manifests(out, where=where))
    listed = {e["file"] for es in candidates.values() for e in es}
    orphans = sorted(p.name for p in out.iterdir() if _SHARD_RE.match(p.name) and p.name not in listed)
    if orphans:
        warnings.warn(
            f"{where}: ignoring shard files in {out} that no manifest lists (written by a run killed before it "
            f"recorded them, or not by attribute_dataset; resuming recomputes them): {orphans[:10]}",
            stacklevel=3,
        )
    return candidates


def _load_shard(out: Path, k: int, entries: list[dict], where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    problems = []
    for e in entries:
        problem, data = _check_file(out, e, keep=True)
        if problem is None or problem == "unverified":
            if problem == "unverified":
                warnings.warn(
                    f"{where}: {out / e['file']} (shard {k}) was written by an older dynlrp-fx without a checksum "
                    "in its manifest: read unverified (resuming with attribute_dataset recomputes it)",
                    stacklevel=4,
                )
            try:
                return load(data)
            except Exception as err:  # safetensors raises its own SafetensorError
                problems.append(f"{out / e['file']} cannot be read ({type(err).__name__}: {err})")
                continue
        problems.append(f"{out / e['file']} {problem}")
    raise DynlrpDatasetError(
        f"{where}: shard {k} ({_samples(entries[0])}) is unusable: {'; '.join(problems)}. Rerun attribute_dataset "
        "with the same arguments and out_dir to recompute it (the intact shards are kept)"
    )


def load_shards(out_dir: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(shard index, tensors)`` for every shard in the manifests under ``out_dir`` (all ranks), in shard
    order, each checked against its manifest entry (size, sha256) first.

    Raises
    ------
    DynlrpDatasetError: a shard file is missing, truncated or corrupted (the message names it), or a manifest is
        unreadable.
    """
    out = Path(out_dir)
    for k, entries in sorted(_listed_shards(out, "load_shards").items()):
        yield k, _load_shard(out, k, entries, "load_shards")


def merge_shards(out_dir: str | os.PathLike[str], *, strict: bool = True) -> dict[str, torch.Tensor]:
    """Read all shards under ``out_dir`` and return every key concatenated over samples, ordered by ``index``.

    ``params.*`` entries are summed over shards (they are batch sums). Every shard is checked against its manifest
    entry first (see :func:`load_shards`), with ``strict=False`` too. With ``strict=True`` (default) the run must be
    complete: every shard from 0 to the count recorded by the ranks' ``done-*.json`` files is present and the
    indices are ``0 .. N-1``.

    Raises
    ------
    FileNotFoundError: no shards under ``out_dir``.
    DynlrpDatasetError: a shard file is missing, truncated or corrupted (named in the message); (strict) shards are
        missing or the run did not finish (a ``ValueError``); rerun :func:`attribute_dataset` to resume.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"merge_shards: {out} is not a directory")
    listed = _listed_shards(out, "merge_shards")
    if not listed:
        raise FileNotFoundError(f"merge_shards: no shards (shard-*.safetensors listed in manifest-*.json) in {out}")
    if strict:
        dones = [json.loads(p.read_text()) for p in out.glob("done-*.json")]
        if not dones:
            raise DynlrpDatasetError(
                f"merge_shards: the run in {out} did not finish (no done-*.json); rerun "
                "attribute_dataset with the same arguments to resume, or pass strict=False"
            )
        n_shards = max(d["num_shards"] for d in dones)
        missing = sorted(set(range(n_shards)) - set(listed))
        if missing:
            raise DynlrpDatasetError(
                f"merge_shards: shards {missing[:20]} of {n_shards} are missing in {out}; rerun "
                "attribute_dataset to compute them (finished shards are kept)"
            )
    shards = [(k, _load_shard(out, k, es, "merge_shards")) for k, es in sorted(listed.items())]
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
        raise DynlrpDatasetError(
            f"merge_shards: sample indices in {out} are not 0..{len(order) - 1} (duplicated or missing "
            "samples: were the shards written by runs over different loaders?)"
        )
    return merged


def _concept_conditions(concepts: Any) -> dict | None:
    """``attribute_dataset(concepts=)`` as a ``condition=`` that keeps every feature (``None``: all of them)."""
    if concepts is None:
        return None
    from .targets import Features

    if isinstance(concepts, str):
        concepts = [concepts]
    if isinstance(concepts, Mapping):
        return {p: v if isinstance(v, Features) else Features(None, dim=v) for p, v in concepts.items()}
    return {p: Features(None) for p in concepts}


def top_samples(merged: Mapping[str, torch.Tensor] | str | os.PathLike[str], layer: str, n: int = 10,
                channels: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` samples whose explanations put the most relevance on each feature of ``layer`` (relevance
    maximisation, CRP): ``(indices, relevance)``, both ``(n, C)`` (column ``c``: feature ``channels[c]``, most
    relevant first; indices are dataset positions). ``merged`` is :func:`merge_shards`'s result or the run's
    directory; the run must have stored ``concepts=[layer]``."""
    data = merge_shards(merged) if not isinstance(merged, Mapping) else merged
    key = f"concept.{layer}"
    if key not in data:
        have = sorted(k[len("concept.") :] for k in data if k.startswith("concept."))
        raise KeyError(f"top_samples: the run stored no concept relevance for {layer!r} (it has {have}); run "
                       f"attribute_dataset(..., concepts=[{layer!r}])")
    rel = data[key]
    if channels is not None:
        rel = rel[:, torch.as_tensor(channels).reshape(-1).long()]
    k = min(int(n), rel.shape[0])
    values, order = rel.topk(k, dim=0)
    return data["index"][order], values
