"""Reading tar shards with the `webdataset` library: shard URLs, make-shards' per-shard indexes, grouping tar
members into samples (also for plain `tar` archives), counting, and the rank / worker split."""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import webdataset as wds

from .errors import DataPathError
from .images import IMAGE_EXTS

log = logging.getLogger(__name__)


def expand_shard_urls(path: str) -> list[str]:
    local = Path(path)
    if "::" not in path and not path.startswith("pipe:") and "{" not in path and local.is_dir():
        urls = sorted(str(p) for p in local.glob("*.tar"))
        if not urls:
            raise DataPathError(f"data.path: no .tar shards in the directory {local} (write them with dopsd "
                                f"make-shards; for a folder of images set data.type=folder)")
        return urls
    urls = list(wds.shardlists.expand_urls(path))
    if not urls:
        raise DataPathError(f"data.path: {path!r} names no shards")
    return urls


def local_path(url: str) -> Path | None:
    """The file of a local shard URL (a path or file://); None for pipe: and remote URLs."""
    if url.startswith("pipe:") or "://" in url.replace("file://", "", 1):
        return None
    return Path(url.replace("file://", "", 1))


def index_path(url: str) -> Path | None:
    """The index make-shards writes beside a local shard (`NAME.tar.json`); None for pipe: and remote URLs."""
    path = local_path(url)
    return None if path is None else path.with_name(path.name + ".json")


def read_index(url: str) -> dict | None:
    path = index_path(url)
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None


def first_line(exn: Exception) -> str:
    """A readable reason: webdataset appends streams and URLs to exception args; keep the original message."""
    if isinstance(exn, OSError) and exn.strerror:
        return f"{exn.strerror}: {exn.filename}" if exn.filename else exn.strerror
    first = exn.args[0] if exn.args else exn
    return str(first).splitlines()[0] if str(first) else type(exn).__name__


def _complete(sample: dict) -> bool:
    return any(e in sample for e in IMAGE_EXTS) and ("txt" in sample or "json" in sample)


def group_members(files, handler=wds.handlers.reraise_exception):
    """Tar members (from webdataset's tar_file_expander) -> samples, one per key within a shard.

    WebDataset's own grouping needs the members of a key to be adjacent, which `make-shards` and
    `webdataset.TarWriter` guarantee but an ordinary `tar cf x.tar *.jpg *.txt` (or `tar -C dir .`, in directory
    order) does not. Here a sample is emitted when the next key starts and it holds an image and a caption, and
    whatever is still open when the shard ends: adjacent layouts stream, scattered ones are held up to a shard."""
    open_: dict[str, dict] = {}
    last = None
    for member in files:
        try:
            if member == {}:  # end of a shard
                yield from (s for s in open_.values())
                open_.clear()
                last = None
                continue
            key, ext = wds.tariterators.base_plus_ext(member["fname"])
            if key is None:
                continue
            ext = ext.lower()
            if last is not None and key != last and last in open_ and _complete(open_[last]):
                yield open_.pop(last)
            sample = open_.setdefault(key, {"__key__": key, "__url__": member["__url__"]})
            last = key
            if ext in sample:
                raise ValueError(f"{member['fname']}: duplicate member in {member['__url__']}")
            sample[ext] = member["data"]
        except Exception as exn:
            if not handler(exn):
                return
    yield from open_.values()


def tar_samples(source, handler):
    """Samples from an iterator of {"url": ...}: webdataset opens (gopen: files, pipe:) and parses the tars."""
    streams = wds.tariterators.url_opener(source, handler=handler)
    return group_members(wds.tariterators.tar_file_expander(streams, handler=handler), handler)


def count_samples(urls: list[str]) -> dict[str, int]:
    """Samples per shard by reading the shards (plain shards without index); unreadable shards count 0."""
    counts = {u: 0 for u in urls}

    def handler(exn: Exception) -> bool:
        log.warning("data: while counting samples: %s: %s", type(exn).__name__, first_line(exn))
        return True

    for sample in tar_samples(iter({"url": u} for u in urls), handler):
        counts[sample["__url__"]] = counts.get(sample["__url__"], 0) + 1
    return counts


@contextmanager
def _worker_env(rank: int, world: int, worker: int, workers: int):
    """`split_by_node` / `split_by_worker` read rank and worker from these variables: set them to the ones asked
    for while the split runs (in this process only), then restore them."""
    names = ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), WORKER=str(worker), NUM_WORKERS=str(workers))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def split_shards(urls: list[str], rank: int, world: int, worker: int, workers: int) -> list[str]:
    with _worker_env(rank, world, worker, workers):
        return list(wds.split_by_worker(wds.split_by_node(iter(urls))))
