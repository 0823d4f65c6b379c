"""The manifest kept next to a job's output: what produced it, so a resume is refused when
the input file, the model file or the engine settings differ.

``OUTPUT.manifest.json`` holds the SHA-256 and size of the input and model files, the engine
settings that can change a result (dtype, slots, max_seq_len, chunk_steps, job seed and the
seed rule; not the device count, which does not change a result: docs/batch.md) and the
shard (process index and count). It is written (atomically) before the first output line; a
later run with the same ``--output`` compares and refuses on any difference but the paths, the
slots and the chunk steps (:data:`NOT_COMPARED`), naming each one (while the output is still
empty, it replaces the manifest instead).

Example::

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp(); out = os.path.join(d, "out.jsonl")
    >>> inp = os.path.join(d, "in.jsonl"); _ = open(inp, "w").write("{}\\n")
    >>> m = Manifest.build(inp, inp, {"slots": 8}, shard=(0, 1))
    >>> m.check_or_write(out)
    >>> _ = open(out, "w").write("{}\\n")  # a first record: the output now depends on it
    >>> Manifest.build(inp, inp, {"slots": 16}, shard=(0, 1)).check_or_write(out)  # may change
    >>> try:
    ...     Manifest.build(inp, inp, {"slots": 8}, shard=(1, 2)).check_or_write(out)
    ... except ManifestError as err:
    ...     print(str(err).splitlines()[1])
      shard.count: was 1, now 2
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from jaxsample.batch.summary import write_json_atomic

FORMAT = "jaxsample-batch/1"

#: manifest fields a resume (or a merge) may change: the paths (files move), and the slot
#: count and chunk steps, which the engine's answers do not depend on (docs/engine.md, "Exact
#: per request"; a resume on a smaller machine needs fewer slots, and a run that ran out of
#: memory with too many has often written records already), in float32 and in bfloat16 alike.
NOT_COMPARED = ("paths.", "settings.slots", "settings.chunk_steps")


class ManifestError(RuntimeError):
    """A resume over an output written from another input, model or settings."""


def file_sha256(path: str, *, block: int = 1 << 22) -> str:
    """The hex SHA-256 of a file, read in blocks (about 1 s per GB here)."""
    return file_identity(path, block=block)["sha256"]


def file_identity(path: str, *, block: int = 1 << 22) -> dict:
    """``{"sha256", "size"}`` of a file, the size being the bytes hashed (a file that grows
    while it is read is hashed and sized as the same prefix)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "size": size}


def manifest_path(output: str) -> str:
    return output + ".manifest.json"


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat


@dataclasses.dataclass
class Manifest:
    """What a job's output depends on (see the module docstring)."""

    data: dict

    @classmethod
    def build(cls, input_path: str, model_path: str, settings: dict, *, shard) -> Manifest:
        return cls(
            {
                "format": FORMAT,
                "input": file_identity(input_path),
                "model": file_identity(model_path),
                "settings": dict(settings),
                "shard": {"index": int(shard[0]), "count": int(shard[1])},
                "paths": {
                    "input": os.path.abspath(input_path),
                    "model": os.path.abspath(model_path),
                },
            }
        )

    def differences(self, old: dict) -> list[str]:
        """``"field: was X, now Y"`` for every field that differs, except those kept for
        information only (:data:`NOT_COMPARED`: paths may move, and slots and chunk steps do
        not change an answer)."""
        new_flat, old_flat = _flatten(self.data), _flatten(old)
        out = []
        for k in sorted(set(new_flat) | set(old_flat)):
            if k.startswith(NOT_COMPARED):
                continue
            a, b = old_flat.get(k, "(absent)"), new_flat.get(k, "(absent)")
            if a != b:
                out.append(f"{k}: was {json.dumps(a)}, now {json.dumps(b)}")
        return out

    def check_or_write(self, output: str) -> None:
        """Refuses (ManifestError) when ``output`` was started with anything else; writes the
        manifest when the output is new, or when it holds nothing yet (no byte written since
        the manifest: a run that failed before its first record, say on a model file that
        would not load, does not tie the output to that file)."""
        path = manifest_path(output)
        empty = not os.path.exists(output) or os.path.getsize(output) == 0
        if os.path.exists(path) and not empty:
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except ValueError as err:
                raise ManifestError(f"{path} is not JSON ({err}); remove it to start over") from err
            diff = self.differences(old)
            if diff:
                raise ManifestError(
                    f"will not resume {output}: it was started with a different input file, "
                    "model file or engine settings:\n  "
                    + "\n  ".join(diff)
                    + f"\nRun with the same input, model and settings as before ({path}), or "
                    "choose a new --output."
                )
            return
        if os.path.exists(output) and os.path.getsize(output) > 0:
            raise ManifestError(
                f"{output} exists but has no {os.path.basename(path)}: it was not started by "
                "jaxsample batch; choose a new --output or remove the file"
            )
        write_json_atomic(path, self.data)
