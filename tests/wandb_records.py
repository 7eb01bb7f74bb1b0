"""Reading what an offline W&B run recorded, for the tests: the run's ``run-<id>.wandb`` file is a LevelDB-style
log (a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header: crc32, length, type; a record
longer than a block's rest is split FIRST / MIDDLE / LAST) of ``wandb.proto.wandb_internal_pb2.Record``
messages. ``wandb sync`` uploads exactly these records, so they are what the W&B server would get."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7  # file header b":W&B" + magic + version; also the size of each record header
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[Any]:
    """Every ``Record`` of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            whole = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            whole, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(whole)
        out.append(record)
    return out


def offline_run(run_dir: str | Path) -> Path:
    """The one ``offline-run-*`` directory under ``run_dir`` (searched recursively)."""
    runs = sorted(Path(run_dir).rglob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def artifacts(run: str | Path) -> dict[str, dict[str, Any]]:
    """``{artifact name: {"type", "metadata", "files": {name: (staged local path, digest)}}}`` of an offline run."""
    wandb_file = next(Path(run).glob("run-*.wandb"))
    out = {}
    for r in records(wandb_file):
        if r.WhichOneof("record_type") == "artifact":
            a = r.artifact
            out[a.name] = {
                "type": a.type,
                "metadata": json.loads(a.metadata) if a.metadata else {},
                "files": {e.path: (e.local_path, e.digest) for e in a.manifest.contents},
            }
    return out


def history(run: str | Path) -> dict[str, Any]:
    """Every history key the run logged with its last JSON value; a logged object (a table, a chart, a
    histogram) is a dict of its fields (``{"_type": "histogram", "values": [...], "bins": [...]}``)."""
    wandb_file = next(Path(run).glob("run-*.wandb"))
    out: dict[str, Any] = {}
    for r in records(wandb_file):
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                value = json.loads(item.value_json)
                if item.key:
                    out[item.key] = value
                else:
                    *path, last = item.nested_key
                    node = out
                    for part in path:
                        node = node.setdefault(part, {})
                    node[last] = value
    return out


def charts(run: str | Path) -> dict[str, dict[str, Any]]:
    """The native W&B charts (``wandb.plot.*``) of an offline run: ``{key: panel config}``, where
    ``panelDefId`` names the chart ("wandb/bar/v0", "wandb/line/v0") and ``fieldSettings`` its columns."""
    wandb_file = next(Path(run).glob("run-*.wandb"))
    out = {}
    for r in records(wandb_file):
        if r.WhichOneof("record_type") == "config":
            for u in r.config.update:
                if list(u.nested_key[:2]) == ["_wandb", "visualize"]:
                    out[u.nested_key[2]] = json.loads(u.value_json)["panel_config"]
    return out


def table(run: str | Path, value: dict[str, Any]) -> dict[str, Any]:
    """The ``{"columns", "data"}`` of a logged ``wandb.Table`` (a history value of ``_type`` "table-file")."""
    return json.loads((Path(run) / "files" / value["path"]).read_text())
