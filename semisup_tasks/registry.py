"""The model registry: versioned models with their model cards, a champion pointer and its history.

Layout under the store root::

    models/<name>/versions/<v>/model.pt     the checkpoint (state dict), copied out of the run
    models/<name>/versions/<v>/card.json    the model card, written last: a version exists once it has one
    models/<name>/versions/<v>/gate.json    the promotion gate's decision for the run that registered it
    models/<name>/champion.json             the champion pointer: one small object, written whole
    models/<name>/history/<seq>.json        every move of the pointer, one object each, never rewritten

A model name is one label space (one task): the pipeline registers its student under the dataset's
name (:func:`model_name`), so datasets with other classes never compete for one champion, and new
versions of a dataset (labeled feedback) keep the same line of champions.

The pointer is written before its history entry and carries everything the entry holds (the entry is
a copy of it), so a crash between the two loses nothing: the next move, or :func:`history`, restores
the missing entry. The pointer also carries the stack of earlier champions, which is what rollback
pops: promote pushes the old champion, rollback pops one, so rolling back twice goes two back.

One writer per model name at a time: version numbers and history sequence numbers are allocated by
listing, and neither the file store nor plain S3 PUT offers compare-and-swap. The DAG runs one register
task at a time (``max_active_tis_per_dag=1``); a second writer that races anyway is detected where it can
be and refused.
"""

from __future__ import annotations

import getpass
import hashlib
import re
from datetime import UTC, datetime

from .config import ConfigError
from .store import Store, StoreError, join

CARD = "card.json"
MODEL = "model.pt"
GATE = "gate.json"
POINTER = "champion.json"
#: top-1 is a ratio of counts computed in float32 (evaluate.classification_metrics): each value is off by up
#: to 6e-8, so a difference within this is rounding, never a decision. One image of a val split of up to
#: 2 million images is still more than this.
_EPSILON = 5e-7
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")  # what a dataset name may be: a model is named after its dataset
_VERSION_RE = re.compile(r"v[1-9][0-9]*")


class RegistryError(ConfigError):
    """A registry request a user can fix (unknown model or version, nothing to roll back to)."""


# -- names and keys ----------------------------------------------------------------------------

def model_name(dataset: str) -> str:
    """The registry name a run's student goes under: its dataset's name (one label space, one champion)."""
    return _check_name(dataset)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise RegistryError(f"The model name {name!r} is not valid; use letters, digits, '.', '_' and '-' only.")
    return name


def _check_version(name: str, version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise RegistryError(f"Model version {version!r} is not valid; write it as v1, v2, ... "
                            f"(see `semisup models list --name {name}`).")
    return version


def _prefix(name: str) -> str:
    return join("models", _check_name(name))


def _version_key(name: str, version: str, file: str) -> str:
    return join(_prefix(name), "versions", version, file)


def _history_key(name: str, seq: int) -> str:
    return join(_prefix(name), "history", f"{seq:06d}.json")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- reading -----------------------------------------------------------------------------------

def names(store: Store) -> list[str]:
    """Every model name with at least one registered version."""
    return sorted({key.split("/")[1] for key in store.list("models")
                   if key.endswith("/" + CARD) and len(key.split("/")) == 5})


def versions(store: Store, name: str) -> list[str]:
    """Registered versions of ``name``, oldest first (v2 before v10)."""
    found = [key.split("/")[-2] for key in store.list(join(_prefix(name), "versions")) if key.endswith("/" + CARD)]
    return sorted((v for v in found if _VERSION_RE.fullmatch(v)), key=lambda v: int(v[1:]))


def card(store: Store, name: str, version: str) -> dict:
    _check_version(name, version)
    key = _version_key(name, version, CARD)
    if not store.exists(key):
        have = versions(store, name)
        listing = f"it has {', '.join(have)}" if have else "it has no version yet"
        raise RegistryError(f"Model {name!r} has no version {version} in {store.uri} ({listing}); "
                            f"pick one from `semisup models list --name {name}`.")
    return store.read_json(key)


def gate_decision(store: Store, name: str, version: str) -> dict | None:
    """What the promotion gate decided for the run that registered ``version`` (None: not gated, e.g. manual)."""
    key = _version_key(name, version, GATE)
    return store.read_json(key) if store.exists(key) else None


def champion(store: Store, name: str) -> dict | None:
    """The champion pointer (``version``, ``seq``, ``action``, ``reason``, ``by``, ``at``, ``stack``), or None."""
    key = join(_prefix(name), POINTER)
    return store.read_json(key) if store.exists(key) else None


def history(store: Store, name: str) -> list[dict]:
    """Every move of the champion pointer, oldest first."""
    entries = [store.read_json(key) for key in store.list(join(_prefix(name), "history")) if key.endswith(".json")]
    pointer = champion(store, name)
    if pointer is not None and all(e["seq"] != pointer["seq"] for e in entries):
        entries.append(pointer)  # the pointer moved and the process stopped before its history entry
    return sorted(entries, key=lambda e: e["seq"])


def load_checkpoint_bytes(store: Store, name: str, version: str) -> bytes:
    """The checkpoint of one version, checked against its card (load it with ``models.load_checkpoint``)."""
    info = card(store, name, version)
    data = store.read_bytes(_version_key(name, version, MODEL))
    if _sha256(data) != info["model"]["file_sha256"]:
        raise RegistryError(f"The checkpoint of model {name!r} {version} in {store.uri} does not match its card "
                            "(changed or corrupt); promote or use another version.")
    return data


def resolve(store: Store, name: str, ref: str) -> str:
    """``champion`` or ``vN`` -> a registered version."""
    if ref == "champion":
        pointer = champion(store, name)
        if pointer is None:
            raise RegistryError(f"Model {name!r} has no champion in {store.uri} yet; train the teacher "
                                "(teacher=train) until a run promotes its student.")
        return pointer["version"]
    card(store, name, ref)  # unknown version: one sentence
    return ref


# -- registering -------------------------------------------------------------------------------

def register(store: Store, name: str, model_bytes: bytes, card: dict) -> str:
    """Store a model and its card as the next version; returns the version.

    Idempotent per run and model: a card whose ``run_id`` and weights are already registered returns that
    version, so an Airflow retry never creates a duplicate; the same run id rerun with other params (other
    weights) registers its new student as a new version. The model is written before the card, and only a
    version with a card exists, so a crash in between leaves a folder the retry reuses.
    """
    run_id = card.get("run_id")
    if not run_id:
        raise RegistryError("A model card needs the run_id of the run that produced the model.")
    weights = (card.get("model") or {}).get("weights_sha256")
    have = versions(store, name)
    for version in reversed(have):  # the newest first: a retry registers right after its first attempt
        known = store.read_json(_version_key(name, version, CARD))
        if known.get("run_id") == run_id and (known.get("model") or {}).get("weights_sha256") == weights:
            return version
    version = f"v{int(have[-1][1:]) + 1 if have else 1}"
    model_key = _version_key(name, version, MODEL)
    full = {**card, "name": name, "version": version, "created_at": _now(),
            "model": {**card.get("model", {}), "key": model_key, "file_sha256": _sha256(model_bytes),
                      "bytes": len(model_bytes)}}
    store.write_bytes(model_key, model_bytes)
    store.write_json(_version_key(name, version, CARD), full)
    # a concurrent writer that took the same number overwrote one of the two objects: refuse, never mix
    if (store.read_json(_version_key(name, version, CARD)).get("run_id") != run_id
            or _sha256(store.read_bytes(model_key)) != full["model"]["file_sha256"]):
        raise StoreError(f"Another writer registered model {name!r} {version} at the same time; run the "
                         "register step again (register one run at a time per model name).")
    return version


# -- the gate ------------------------------------------------------------------------------------

def _val(card_: dict | None) -> float | None:
    return ((card_ or {}).get("metrics", {}).get("val") or {}).get("top1")


def _split(card_: dict) -> tuple[str, str] | None:
    split = (card_.get("metrics", {}).get("val") or {}).get("split") or {}
    return (split["dataset"], split["version"]) if split.get("dataset") else None


def gate(challenger: dict, champion_card: dict | None, margin: float) -> tuple[bool, str]:
    """Promote the challenger only when its validation top-1 beats the champion's by more than ``margin``.

    Rules, simplest honest ones:
    - no champion: promote (there is nothing to beat);
    - a challenger without validation top-1 (empty val split) is never promoted automatically, nor does a
      champion without one lose automatically: the numbers would not say which is better;
    - both must predict the same classes and be measured on the same validation split (dataset name and
      version): after a new dataset version the caller re-evaluates the champion on the challenger's split
      first (see ``register_run``);
    - strictly more than ``margin`` better: equal models never churn the pointer at margin 0. Differences
      within ``_EPSILON`` count as equal, so float32 rounding never decides at the boundary.
    """
    if margin < 0:
        raise RegistryError(f"The promotion margin must be at least 0, got {margin}.")
    new = challenger.get("version", "the challenger")
    new_val, old_val = _val(challenger), _val(champion_card)
    if new_val is None:  # not even a first champion: a model nobody measured is promoted by hand only
        old = "no model" if champion_card is None else champion_card.get("version", "the champion")
        return False, (f"{new} has no validation top-1 (empty val split), so it cannot be compared; {old} stays "
                       f"champion (promote {new} by hand if it should be)")
    if champion_card is None:
        return True, f"{new} is the first champion (no champion to beat)"
    old = champion_card.get("version", "the champion")
    if old_val is None:
        return False, (f"champion {old} has no validation top-1 to compare with, so {old} stays champion; "
                       f"promote {new} by hand if it is better")
    if challenger.get("classes") != champion_card.get("classes"):
        return False, (f"{new} predicts other classes than champion {old}, so their scores say nothing about each "
                       f"other; {old} stays champion (promote {new} by hand to start from it)")
    if _split(challenger) != _split(champion_card):
        return False, (f"{new} and champion {old} were validated on different splits "
                       f"({_fmt_split(challenger)} vs {_fmt_split(champion_card)}); re-evaluate the champion "
                       f"on {_fmt_split(challenger)} first, {old} stays champion")
    gain = new_val - old_val
    if gain > margin + _EPSILON:
        return True, (f"{new} val top-1 {new_val:.4f} beats champion {old} {old_val:.4f} by {gain:+.4f}, "
                      f"more than the margin {margin}")
    return False, (f"{new} val top-1 {new_val:.4f} vs champion {old} {old_val:.4f} ({gain:+.4f}) is not more "
                   f"than the margin {margin} better; {old} stays champion")


def _fmt_split(card_: dict) -> str:
    split = _split(card_)
    return f"{split[0]} {split[1]}" if split else "an unknown split"


# -- moving the pointer ----------------------------------------------------------------------------

def _caller() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user without a passwd entry
        return "unknown user"


def _move(store: Store, name: str, version: str, action: str, reason: str, by: str, stack: list[str],
          pointer: dict | None) -> dict:
    if pointer is not None:
        _restore_entry(store, name, pointer)
    seq = pointer["seq"] + 1 if pointer else 1
    if store.exists(_history_key(name, seq)):
        raise StoreError(f"Another writer moved the champion of model {name!r} at the same time; run the "
                         "command again.")
    new = {"name": name, "seq": seq, "version": version, "previous": pointer["version"] if pointer else None,
           "action": action, "reason": reason, "by": by, "at": _now(), "stack": stack}
    store.write_json(join(_prefix(name), POINTER), new)  # one object written whole: the atomic move
    store.write_json(_history_key(name, seq), new)
    return new


def _restore_entry(store: Store, name: str, pointer: dict) -> None:
    """Write the current pointer's history entry if a crash left it out (never rewrites one)."""
    key = _history_key(name, pointer["seq"])
    if not store.exists(key):
        store.write_json(key, pointer)


def promote(store: Store, name: str, version: str, reason: str, by: str, manual: bool = False) -> dict:
    """Make ``version`` the champion; returns the new pointer. Promoting the champion again changes nothing."""
    card(store, name, version)  # the pointer only ever names a version that has its card
    pointer = champion(store, name)
    if pointer is not None and pointer["version"] == version:
        _restore_entry(store, name, pointer)
        return pointer
    stack = [*pointer["stack"], pointer["version"]] if pointer else []
    return _move(store, name, version, "promote-manual" if manual else "promote", reason, by, stack, pointer)


def rollback(store: Store, name: str, reason: str, by: str) -> dict:
    """Make the previous champion the champion again; returns the new pointer."""
    pointer = champion(store, name)
    if pointer is None:
        raise RegistryError(f"Model {name!r} has no champion in {store.uri}, so there is nothing to roll back; "
                            f"promote a version with `semisup models promote --name {name} --version vN`.")
    if not pointer["stack"]:
        raise RegistryError(f"Model {name!r} has no champion before {pointer['version']} to roll back to; "
                            f"promote another version with `semisup models promote --name {name} --version vN`.")
    return _move(store, name, pointer["stack"][-1], "rollback", reason, by, pointer["stack"][:-1], pointer)


# -- what the pipeline's register stage calls ----------------------------------------------------------

def build_card(*, run_id: str, code_version: str, metrics: dict, student: dict, teacher: dict) -> dict:
    """A model card from a finished run: the evaluate stage's ``metrics.json`` and the committed results
    of the student and teacher stages (``teacher["source"]``, when present, names the registry version
    the teacher came from; otherwise the teacher was trained in this run)."""
    test = {k: v for k, v in metrics["models"]["student"].items() if k not in ("val_top1", "arch")}
    dataset = metrics["dataset"]
    if teacher.get("source"):
        how = {"how": "registry", **teacher["source"]}
    else:
        how = {"how": "trained", "run_id": run_id}
    return {
        "run_id": run_id,
        "code_version": code_version,
        "arch": student["arch"],
        "classes": dataset["classes"],
        "metrics": {
            "val": {"top1": student["val_top1"], "split": {"dataset": dataset["name"], "version": dataset["version"]}},
            "test": test,
            # the other models of the same run, on the same test split: what the student is worth
            "test_top1_in_run": {n: m["top1"] for n, m in metrics["models"].items() if n != "student"},
        },
        "params": metrics["params"],
        "lineage": {
            "dataset": {"name": dataset["name"], "version": dataset["version"]},
            "drops": metrics["drops"],
            "teacher": {**how, "arch": teacher.get("arch"), "weights_sha256": teacher.get("weights_sha256")},
            "code_version": code_version,
            "run_id": run_id,
        },
        "model": {"weights_sha256": student["weights_sha256"]},
    }


def _reevaluated(store: Store, name: str, champion_card: dict, challenger: dict) -> dict:
    """The champion's card with its validation top-1 measured again on the challenger's split, when they
    differ and the label spaces match (a new dataset version from labeled feedback); unchanged otherwise."""
    split = _split(challenger)
    if split is None or _split(champion_card) == split or champion_card.get("classes") != challenger.get("classes"):
        return champion_card
    from . import datasets
    from .evaluate import classification_metrics, tail_classes
    from .models import load_checkpoint
    from .train import predict

    ds = datasets.load_dataset_manifest(store, split[0], split[1])
    x, y, _ = datasets.load_split(store, ds, "val")
    if not len(y):
        return champion_card
    model, _ = load_checkpoint(load_checkpoint_bytes(store, name, champion_card["version"]))
    top1 = classification_metrics(predict(model, x), y, tail_classes(ds["splits"]["train"]["class_counts"]))["top1"]
    val = {"top1": top1, "split": {"dataset": split[0], "version": split[1]}, "reevaluated": True}
    return {**champion_card, "metrics": {**champion_card.get("metrics", {}), "val": val}}


def register_run(store: Store, name: str, *, model_bytes: bytes, model_card: dict, margin: float) -> dict:
    """Register a run's student and let the gate decide; returns the stage's result document.

    Safe to retry at any point: the version is found again by run id, and a decision already taken for
    it is returned as it was (the champion may have moved since; the decision is not taken twice).
    """
    if margin < 0:  # refused before anything is written
        raise RegistryError(f"The promotion margin must be at least 0, got {margin}.")
    run_id = model_card["run_id"]
    version = register(store, name, model_bytes, model_card)
    done = gate_decision(store, name, version)
    if done is not None:
        return done
    challenger = card(store, name, version)
    pointer = champion(store, name)
    if pointer is not None and pointer["version"] == version:  # promoted by an attempt that stopped after it
        promoted, reason, old = True, pointer["reason"], None
    else:
        old = card(store, name, pointer["version"]) if pointer else None
        if old is not None:
            old = _reevaluated(store, name, old, challenger)
        promoted, reason = gate(challenger, old, margin)
        if promoted:
            promote(store, name, version, reason, by=f"run {run_id}")
    decision = {"name": name, "version": version, "run_id": run_id, "promoted": promoted, "reason": reason,
                "margin": margin, "challenger_val_top1": _val(challenger),
                "champion": old.get("version") if old else None, "champion_val_top1": _val(old),
                "champion_reevaluated": bool(old and (old["metrics"].get("val") or {}).get("reevaluated")),
                "decided_at": _now()}
    store.write_json(_version_key(name, version, GATE), decision)
    return decision


def teacher_checkpoint(store: Store, name: str, ref: str, dataset: dict) -> tuple[bytes, dict]:
    """A registered model to use as a run's teacher (``ref``: ``champion`` or ``vN``): its checkpoint bytes
    and the ``source`` to put in the teacher stage's result. Refused when it was trained for other classes
    or other images than the run's dataset (``dataset``: the dataset manifest)."""
    version = resolve(store, name, ref)
    info = card(store, name, version)
    data = load_checkpoint_bytes(store, name, version)
    if info.get("classes") != dataset["classes"]:
        raise RegistryError(f"Model {name!r} {version} was trained for other classes than dataset "
                            f"{dataset['name']!r} {dataset['version']}; use teacher=train or a version trained "
                            "on these classes.")
    from .models import load_checkpoint

    _, ckpt = load_checkpoint(data)
    if ckpt["in_channels"] != dataset["channels"] or list(ckpt["image_size"]) != list(dataset["image_size"]):
        raise RegistryError(f"Model {name!r} {version} takes {ckpt['in_channels']}-channel "
                            f"{ckpt['image_size'][0]}x{ckpt['image_size'][1]} images, not the "
                            f"{dataset['channels']}-channel {dataset['image_size'][0]}x{dataset['image_size'][1]}"
                            f" images of dataset {dataset['name']!r}; use teacher=train.")
    return data, {"model": name, "version": version, "ref": ref, "run_id": info["run_id"]}


def manual_by() -> str:
    """Who a CLI promotion or rollback is recorded as."""
    return f"cli ({_caller()})"


# -- the `semisup models` command ------------------------------------------------------------------

def _pick_name(store: Store, name: str | None) -> str:
    have = names(store)
    if name is None:
        if len(have) == 1:
            return have[0]
        if not have:
            raise RegistryError(f"The store {store.uri} has no registered model yet; a pipeline run registers "
                                "its student when it finishes.")
        raise RegistryError(f"The store {store.uri} has several models ({', '.join(have)}); pick one with --name.")
    if _check_name(name) not in have:
        listing = f"it has {', '.join(have)}" if have else "it has none yet"
        raise RegistryError(f"Model {name!r} is not in the store {store.uri} ({listing}); check --name.")
    return name


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


def models_command(store: Store, command: str, name: str | None = None, version: str | None = None,
                   reason: str | None = None) -> str:
    """What ``semisup models <command>`` prints; user errors raise :class:`RegistryError`."""
    import json

    name = _pick_name(store, name)
    pointer = champion(store, name)
    current = pointer["version"] if pointer else None
    if command == "list":
        rows = []
        for v in versions(store, name):
            c = card(store, name, v)
            decision = gate_decision(store, name, v)
            split = c.get("lineage", {}).get("dataset", {})
            rows.append(["*" if v == current else "", v, c["created_at"][:16].replace("T", " "),
                         _num(_val(c)), _num(c.get("metrics", {}).get("test", {}).get("top1")),
                         f"{split.get('name', '-')} {split.get('version', '')}".strip(),
                         "-" if decision is None else ("promoted" if decision["promoted"] else "kept out"),
                         c["run_id"]])
        return _table(["", "version", "created (UTC)", "val top-1", "test top-1", "dataset", "gate", "run"], rows)
    if command == "show":
        if version is None:
            if current is None:
                raise RegistryError(f"Model {name!r} has no champion yet; name a version with --version.")
            version = current
        return json.dumps(card(store, name, version), indent=2, sort_keys=True)
    if command == "history":
        rows = [[str(e["seq"]), e["at"][:19].replace("T", " "), e["action"], e["version"], e["previous"] or "-",
                 e["by"], e["reason"]] for e in history(store, name)]
        return _table(["seq", "at (UTC)", "action", "version", "previous", "by", "reason"], rows)
    if command == "promote":
        if version == current:
            return f"Model {name!r}: {version} is already the champion; nothing changed."
        moved = promote(store, name, version, reason or "promoted by hand", by=manual_by(), manual=True)
        return f"Model {name!r}: champion is now {moved['version']} (was {moved['previous'] or 'none'})."
    if command == "rollback":
        moved = rollback(store, name, reason or "rolled back by hand", by=manual_by())
        return f"Model {name!r}: rolled back to {moved['version']} (was {moved['previous']})."
    raise RegistryError(f"Unknown models command {command!r}; use list, show, history, promote or rollback.")
