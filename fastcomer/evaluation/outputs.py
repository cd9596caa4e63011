"""The files of an evaluation: `predictions.jsonl` (appended and flushed as batches finish,
rewritten in caption order at the end), `metrics.json`, `result.zip` in CoMER's format; the
final ones written atomically (a temporary file renamed over the old one)."""
import json
import os
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RESULT_ZIP = "result.zip"
RUN = "run.json"  # the settings of the run, checked by a resume
# A fixed time for every member of result.zip, so that a rerun or a resumed run writes the same bytes
# (CoMER's test_epoch_end stamps the time of writing; nothing reads it).
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def result_zip(path: Path, answers: Iterable[Tuple[str, str]]) -> None:
    """CoMER's result.zip: per image (in decoding order) `<name>.txt` holding `%<name>\\n$<latex>$`,
    stored uncompressed, written as its test_epoch_end writes each member (ZipFile.open 'w')."""
    temporary = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(temporary, "w") as archive:
        for name, latex in answers:
            with archive.open(zipfile.ZipInfo(f"{name}.txt", date_time=ZIP_TIME), "w") as member:
                member.write(f"%{name}\n${latex}$".encode())
    os.replace(temporary, path)


def json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def record_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def read_log(path: Path) -> Dict[Tuple[str, str], dict]:
    """The decoded records of an interrupted run's predictions.jsonl, by (split, name); a last
    line cut short by the interruption is dropped (and cut from the file, so appends go on cleanly)."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    done = {}
    for line in complete.decode().splitlines():
        record = json.loads(line)
        if record.get("latex") is not None:
            done[(record["split"], record["name"])] = record
    return done


def changed_predictions(records: Iterable[dict], other: Path) -> List[Tuple[str, str, Optional[str], Optional[str]]]:
    """(split, name, latex in `other`, latex here) of each image whose answer differs from the one
    in another run's predictions.jsonl (an image missing from either side counts as None there)."""
    theirs = {}
    for number, line in enumerate(Path(other).read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            theirs[(record["split"], record["name"])] = record.get("latex")
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{other}, line {number}: not a predictions.jsonl record") from None
    ours = {(r["split"], r["name"]): r["latex"] for r in records}
    keys = list(ours) + [key for key in theirs if key not in ours]
    return [(*key, theirs.get(key), ours.get(key)) for key in keys if theirs.get(key) != ours.get(key)]
