"""Scores of predictions against captions: ExpRate (exact token sequence, as CoMER's
`ExpRateRecorder` compares them) and the share within 1, 2, 3 token edits."""
from typing import Dict, List, Sequence

TOLERANCES = (1, 2, 3)
# Caption-length bins of the breakdown (tokens, inclusive); the last is open-ended.
LENGTH_BINS = ((1, 10), (11, 20), (21, 30), (31, 50), (51, None))


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (insert, delete, substitute: 1 each)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _rates(distances: List[int]) -> Dict[str, float]:
    count = len(distances)
    rates = {"count": count, "exprate": sum(d == 0 for d in distances) / count if count else None}
    for k in TOLERANCES:
        rates[f"within_{k}"] = sum(d <= k for d in distances) / count if count else None
    return rates


def _bin_name(low: int, high) -> str:
    return f"{low}-{high}" if high is not None else f"{low}+"


def split_metrics(records: Sequence[dict]) -> dict:
    """Rates over a split's scored records (decoded, caption fully in the vocabulary), the
    breakdown by caption length, and the count of every other record by its error kind."""
    scored = [r for r in records if r["error"] is None]
    metrics = _rates([r["distance"] for r in scored])
    metrics["by_caption_length"] = {}
    for low, high in LENGTH_BINS:
        inside = [r["distance"] for r in scored if low <= len(r["truth"].split()) and (high is None or len(r["truth"].split()) <= high)]
        if inside:
            metrics["by_caption_length"][_bin_name(low, high)] = _rates(inside)
    kinds: Dict[str, int] = {}
    for r in records:
        if r["error"] is not None:
            kind = r["error"].split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    metrics["images"] = len(records)
    metrics["not_scored"] = kinds
    return metrics
