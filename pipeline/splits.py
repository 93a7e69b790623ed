"""Fixed train/val/test splits: the source's where it gave one, else a stable rule on the id's hash.

The rule's name is recorded in reduce.json (`splits.rule`); a reduce.json without one was made by
the first rule, which ranked the hashes within each class, so that adding images moved some old
ones across the val/test boundary. Only the names of past rules are kept here, to describe the
reduced dirs they made.
"""

import hashlib

import numpy as np

from pipeline.errors import PipelineError

SPLITS = ("train", "val", "test")
SPLIT_RULE = "id-hash-threshold/2"
RULES = {
    "id-hash-rank/1": "per class, the ids ranked by their hash: the first share to test, the next to val (adding images moved old ones)",
    SPLIT_RULE: "each id by its own hash against the fractions (an image keeps its split when others come and go)",
}
FIRST_RULE = "id-hash-rank/1"  # what a reduce.json without a rule used


def id_unit(seed, row_id):
    """A stable number in [0, 1) from the split seed and an id: the top 64 bits of sha256(f"{seed}:{id}") over 2**64."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "big") / 2.0**64


def assign_splits(ids, labels, given, val_fraction, test_fraction, seed):
    """train/val/test for every row: the source's split where it gave one, else by the id's own hash (SPLIT_RULE).

    A row whose id hashes (id_unit) below `test_fraction` goes to test, below `test_fraction +
    val_fraction` to val, else to train. Each row's split depends on its id and the seed alone, so
    it stays put when other images are added or removed; each class gets its shares on average
    (exactly only in the limit), so a small class can end up without val or test rows.
    `labels` are not used by the rule; they are taken for the callers' symmetry with split_sha256.
    """
    splits = np.array(given, dtype=object)
    unknown = sorted(set(splits.tolist()) - set(SPLITS) - {""})
    if unknown:
        raise PipelineError(f"the features hold split name(s) {unknown}; only {', '.join(SPLITS)} or none are allowed")
    todo = np.flatnonzero(splits == "")
    unit = np.array([id_unit(seed, ids[r]) for r in todo], dtype=np.float64)
    splits[todo] = np.where(unit < test_fraction, "test", np.where(unit < test_fraction + val_fraction, "val", "train"))
    return splits


def split_sha256(ids, labels, splits):
    """Fingerprint of who is in which split (in the given order), so runs can refuse to compare different splits."""
    h = hashlib.sha256()
    for row_id, label, split in zip(ids, labels, splits):
        h.update(f"{row_id}\t{label}\t{split}\n".encode())
    return h.hexdigest()


def split_source(given):
    provided = sum(1 for s in given if s)
    return "source" if provided == len(given) else "hash" if provided == 0 else "source+hash"


def rule_of(record):
    """The split rule a reduce.json's (or probe.json's) `splits` record names; FIRST_RULE when it names none."""
    return record.get("rule", FIRST_RULE)


def empty_splits(labels, splits, classes, val_fraction, test_fraction):
    """Sentences naming the classes the hash left without train rows, or without val or test rows while the fraction asks for some."""
    labels = np.asarray(labels)
    wanted = [("train", True), ("val", val_fraction > 0), ("test", test_fraction > 0)]
    found = []
    for name, asked in wanted:
        missing = [classes[c] for c in np.unique(labels[labels >= 0]) if asked and not ((labels == c) & (splits == name)).any()]
        if missing:
            found.append(f"class(es) {', '.join(map(repr, missing))} have no {name} rows")
    return found
