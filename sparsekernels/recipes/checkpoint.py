"""Atomic run state: record.json and model checkpoints.

A checkpoint is a fresh directory (checkpoints/<stage>-<n>) written completely before
record.json, the commit point, is replaced atomically to name it; the previous one is
deleted after. A crash at any moment leaves the last committed state whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sparsekernels.pruning.distributed import is_main_process


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.record_path = self.root / "record.json"

    def lock(self) -> int | None:
        """Hold the directory for this process (an flock on <root>/.lock, released when the
        process ends, however it ends). Returns the pid holding it when another process does,
        else None. Without fcntl (Windows) there is no lock."""
        try:
            import fcntl
        except ImportError:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            return int(holder) if holder.isdigit() else -1
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle  # kept open: closing it would release the lock
        return None

    def unlock(self) -> None:
        handle = getattr(self, "_lock", None)
        if handle is not None:
            handle.close()  # releases the flock
            self._lock = None

    def exists(self) -> bool:
        return self.record_path.exists()

    def load_record(self) -> dict:
        return json.loads(self.record_path.read_text())

    def commit(self, record: dict) -> None:
        if is_main_process():  # one writer under DDP
            self.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.record_path, record)

    @staticmethod
    def new_name(record: dict, stage: str) -> str:
        """A checkpoint directory name no earlier checkpoint of the run has used."""
        counter = record.setdefault("_checkpoint_counter", 0) + 1
        record["_checkpoint_counter"] = counter
        return f"checkpoints/{stage}-{counter:04d}"

    def write_model(self, rel: str, model, preprocessor=None) -> Path:
        """The model at root/rel, with the tokenizer or image processor when given, so the
        directory loads like any transformers model's. Rank 0 alone calls it."""
        from sparsekernels.speedup.io import save_model

        path = self.root / rel
        save_model(model, path)
        if preprocessor is not None:
            preprocessor.save_pretrained(str(path))
        return path

    def save_checkpoint(self, record: dict, key: str, stage: str, model, extra: dict | None = None,
                        objects: dict | None = None, preprocessor=None) -> None:
        """Write model (and extra tensors, `objects` such as optimizer state dicts as
        <name>.pt, and the tokenizer or image processor) to a new directory, then commit
        record[key] -> it. Under DDP every rank updates its record, rank 0 alone writes, and
        all wait for it."""
        from safetensors.torch import save_file

        from sparsekernels.recipes.parallel import barrier

        rel = self.new_name(record, stage)
        previous = record.get(key)
        record[key] = rel
        if is_main_process():
            path = self.write_model(rel, model, preprocessor)
            for name, tensors in (extra or {}).items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          str(path / f"{name}.safetensors"))
            for name, obj in (objects or {}).items():
                torch.save(obj, path / f"{name}.pt")
            self.commit(record)
            if previous and previous != rel and previous not in record.values():
                shutil.rmtree(self.root / previous, ignore_errors=True)
        barrier()  # the other ranks read this checkpoint next

    def path(self, rel: str) -> Path:
        return self.root / rel
