"""How an adapter travels from the learner to the proposer: the folder lm.Policy.save writes (the LoRA
adapter and the value head, one folder per policy version) as one uncompressed tar in the JetStream object
store, named by PolicyUpdated.adapter_name and checked against its adapter_sha256 (the tar's sha256).

    data = pack_adapter(folder)                          # the learner: sha256 = await bus.put_object(name, data)
    unpack_adapter(data, data_dir / "policy" / version)  # the proposer: then lm.load_policy(..., adapter=that folder)

The tar is deterministic (files in name order, no timestamps, owners or modes), so one folder always packs
to the same bytes and the same sha256. Unpacking takes regular files only, inside the folder (tarfile's
"data" filter), and is atomic as Policy.save is: the complete folder appears at once or not at all, and a
version already unpacked with other contents raises FileExistsError, since a version never changes.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from pathlib import Path


def pack_adapter(directory: Path) -> bytes:
    """The folder's files as a tar, in name order, with nothing in it but their names and contents."""
    directory = Path(directory)
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    if not files:
        raise FileNotFoundError(f"{directory} holds no adapter files")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(path.relative_to(directory).as_posix())
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def unpack_adapter(data: bytes, directory: Path) -> Path:
    """The tar's files in `directory` (created whole, or found already there with the same contents)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.unpacking-", dir=directory.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            strange = [member.name for member in members if not (member.isfile() or member.isdir())]
            if strange:
                raise ValueError(f"an adapter holds regular files only, not {', '.join(strange)}")
            tar.extractall(staging, members=members, filter="data")
        if not directory.exists():
            staging.rename(directory)
        elif pack_adapter(directory) != pack_adapter(staging):
            raise FileExistsError(f"{directory} already holds a different adapter")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
