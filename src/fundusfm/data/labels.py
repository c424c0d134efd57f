"""Label harmonisation: dataset labels -> a shared vocabulary of conditions.

`vocabulary/conditions.yaml` lists the terms (normal, dr and its grades, glaucoma and
suspect, amd, pathologic myopia, rvo/brvo/crvo, erm, cataract, hypertensive retinopathy,
...). A mapping file per dataset translates its labels into terms, either from one column's
values (`column` + `map`) or from 0/1 condition columns (`columns`, with `other_columns` for
the rest and `normal_column` saying when an image with no condition is normal).
`harmonise` adds `vocab_<term>` columns, a `terms` column, and the tasks `vocabulary`
(multilabel over the terms present) and `normal_abnormal` (binary) to a manifest, so that a
model trained on one dataset can be scored on another's overlapping terms. A label the
mapping does not name is an error (never a silent drop); images mapped to no term are left
out and counted. Shipped label maps for `fundusfm evaluate --label-map NAME` live beside
(jsiec_abnormal, jsiec_abnormal_strict, rfmid_abnormal, jsiec_to_eye_diseases).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from fundusfm.data.manifest import TaskSpec, load_manifest, save_manifest
from fundusfm.errors import ConfigError, DataError

SHIPPED = Path(__file__).parent / "vocabulary"


def vocabulary() -> dict[str, str]:
    return yaml.safe_load((SHIPPED / "conditions.yaml").read_text())


def mapping_file(name_or_path: str | Path) -> Path:
    """A mapping or label-map file: a path, or the name of one shipped with fundusfm."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED / f"{name_or_path}.yaml"
    if shipped.is_file() and str(name_or_path) != "conditions":
        return shipped
    names = sorted(p.stem for p in SHIPPED.glob("*.yaml") if p.stem != "conditions")
    raise ConfigError(f"no mapping file {name_or_path!r}; shipped: {', '.join(names)}")


def terms_of_rows(table: pd.DataFrame, spec: dict, source: str) -> list[list[str]]:
    """The vocabulary terms of every row (possibly none)."""
    known = set(vocabulary())
    named = {t for ts in [*(spec.get("map") or {}).values(), *(spec.get("columns") or {}).values()]
             for t in (ts or [])} | set(spec.get("other_columns") or [])  # fmt: skip
    unknown = sorted(named - known)
    if unknown:
        raise ConfigError(f"{source}: {unknown} are not vocabulary terms (conditions.yaml)")
    if "column" in spec:
        column, mapping = spec["column"], {str(k): v or [] for k, v in spec["map"].items()}
        if column not in table.columns:
            raise DataError(f"{source}: column {column!r} is not in the manifest")
        missing = sorted(set(table[column]) - set(mapping))
        if missing:
            raise ConfigError(f"{source}: values {missing[:5]} of {column!r} are not mapped")
        return [list(mapping[v]) for v in table[column]]
    columns = spec.get("columns") or {}
    others = [
        c for c in table.columns
        if c not in columns and c.isupper() and set(table[c]) <= {"0", "1"}
    ] if spec.get("other_columns") else []  # fmt: skip
    normal_column = spec.get("normal_column")
    rows = []
    for _, r in table.iterrows():
        terms = [t for c, ts in columns.items() if r.get(c) == "1" for t in ts]
        if any(r.get(c) == "1" for c in others):
            terms += spec["other_columns"]
        if not terms and normal_column and r.get(normal_column) == "0":
            terms = ["normal"]
        rows.append(list(dict.fromkeys(terms)))
    return rows


def harmonise(manifest_path: Path, mapping: str | Path, out: Path) -> tuple[Path, dict]:
    """Write a manifest with vocabulary columns and tasks; returns it and counts."""
    m = load_manifest(manifest_path)
    source = mapping_file(mapping)
    spec = yaml.load(source.read_text(), Loader=yaml.BaseLoader) or {}
    terms = terms_of_rows(m.table, spec, str(source))
    keep = [bool(t) for t in terms]
    table = m.table[keep].copy()
    kept = [t for t in terms if t]
    present = [t for t in vocabulary() if any(t in ts for ts in kept)]
    for t in present:
        table[f"vocab_{t}"] = ["1" if t in ts else "0" for ts in kept]
    table["terms"] = [";".join(ts) for ts in kept]
    tasks = dict(m.spec.tasks)
    tasks["vocabulary"] = TaskSpec(kind="multilabel", columns=[f"vocab_{t}" for t in present])
    if not any(ts == ["no_dr"] for ts in kept):  # "no DR" is not "normal": no binary task
        table["vocab_abnormal"] = ["0" if ts == ["normal"] else "1" for ts in kept]
        tasks["normal_abnormal"] = TaskSpec(kind="binary", columns=["vocab_abnormal"])
    path = save_manifest(table, m.spec.model_copy(update={"tasks": tasks}), out)
    counts = {"images": len(table), "left_out": len(terms) - len(table), "terms": present}
    return path, counts
