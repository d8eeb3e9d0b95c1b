"""External test sets: a probe trained on one dataset and tested on another.

The manifest's top-level `evaluations:` list names them:

    evaluations:
      - name: c16-to-c17
        train: camelyon16      # train and val come from this dataset's splits
        test: camelyon17       # scored on its `test` split ...
        split: all             # ... or on every item
        classes: {tumor: metastasis}   # train class -> test class, where names differ

Both datasets must have the same task and dimensionality, and one label space: their
`classes:` are matched by name (after `classes:` renames them), so that test label
ids can be carried to the train dataset's ids (`label_map`). Checked once, when the
manifest is parsed (`check_evaluations`); a mismatch names both datasets and the
classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from featstore.data.settings import Frozen

if TYPE_CHECKING:
    from featstore.data.manifest import Dataset


class ExternalTest(Frozen):
    """One external evaluation: fit on `train`'s train split (val for its
    hyper-parameters), score `test`'s `split` ("test", or "all" its items)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    train: str
    test: str
    split: Literal["test", "all"] = "test"
    # train class name -> test class name, for classes named differently
    classes: dict[str, str] = Field(default_factory=dict)


def _where(i: int, ev: ExternalTest, field: str) -> str:
    return f"evaluations[{i}] '{ev.name}', field '{field}'"


def check_evaluations(datasets: Sequence[Dataset], evaluations: Sequence[ExternalTest]) -> None:
    """A `ValueError` (the manifest's validation turns it into a `ManifestError`) naming
    the evaluation and its field for: an unknown dataset, one dataset as both train and
    test, a repeated name or (train, test) pair, datasets of another task,
    dimensionality or kind, or label spaces that do not match (`label_map`)."""
    by_name = {d.name: d for d in datasets}
    names = [e.name for e in evaluations]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"evaluations: names must be unique; repeated: {dup}")
    pairs: dict[tuple[str, str], str] = {}
    for i, ev in enumerate(evaluations):
        for field in ("train", "test"):
            if getattr(ev, field) not in by_name:
                raise ValueError(
                    f"{_where(i, ev, field)}: no dataset named '{getattr(ev, field)}'; "
                    f"known: {', '.join(by_name)}"
                )
        if ev.train == ev.test:
            raise ValueError(
                f"{_where(i, ev, 'test')}: '{ev.test}' is also the train dataset; its own "
                "test split is scored already (internal rows): name another dataset"
            )
        if (ev.train, ev.test) in pairs:
            raise ValueError(
                f"{_where(i, ev, 'test')}: {ev.train} -> {ev.test} is evaluated already by "
                f"'{pairs[ev.train, ev.test]}'; their rows would share one key, keep one"
            )
        pairs[ev.train, ev.test] = ev.name
        a, b = by_name[ev.train], by_name[ev.test]
        if a.task != b.task or a.dims != b.dims or a.slides != b.slides:
            raise ValueError(
                f"{_where(i, ev, 'test')}: '{a.name}' is {_kind(a)} but '{b.name}' is "
                f"{_kind(b)}; a probe is tested only on a dataset of its own kind"
            )
        try:
            label_map(a, b, ev)
        except ValueError as exc:
            raise ValueError(f"{_where(i, ev, 'classes')}: {exc}") from None


def _kind(d: Dataset) -> str:
    return f"{d.task}, {d.dims}D" + (", slides" if d.slides else "")


def label_map(train: Dataset, test: Dataset, ev: ExternalTest) -> tuple[int, ...] | None:
    """The train dataset's class id of each of the test dataset's class ids (index:
    the test id), or None where neither names its classes (ids are taken as they are).

    Classes are matched by name, `ev.classes` renaming train classes to the test's.
    A `ValueError` names both datasets and the classes that do not match.
    """
    if train.classes is None and test.classes is None:
        if ev.classes:
            raise ValueError(
                f"`classes` maps class names, but neither '{train.name}' nor '{test.name}' "
                "names its classes; give both datasets a `classes:` list"
            )
        return None
    if train.classes is None or test.classes is None:
        named, bare = (train, test) if train.classes is not None else (test, train)
        raise ValueError(
            f"'{named.name}' names its classes {list(named.classes or ())} but "
            f"'{bare.name}' does not; give '{bare.name}' a `classes:` list so that the "
            "classes can be matched by name"
        )
    stray = sorted(set(ev.classes) - set(train.classes))
    if stray:
        raise ValueError(
            f"maps {stray}, which are not classes of '{train.name}' {list(train.classes)}; "
            "its keys are the train dataset's class names"
        )
    renamed = [ev.classes.get(c, c) for c in train.classes]
    at = {c: i for i, c in enumerate(renamed)}
    if len(at) != len(renamed) or set(renamed) != set(test.classes):
        only_train = [c for c in renamed if c not in test.classes]
        only_test = [c for c in test.classes if c not in at]
        raise ValueError(
            f"the classes of '{train.name}' {list(train.classes)} (as mapped: {renamed}) "
            f"and of '{test.name}' {list(test.classes)} do not match (only in "
            f"'{train.name}': {only_train}, only in '{test.name}': {only_test}); rename "
            "them with `classes: {train_name: test_name}` so that each class has one "
            "counterpart"
        )
    return tuple(at[c] for c in test.classes)
