"""DPO survey — the taxonomy of "A Survey of Direct Preference Optimization" (Liu et al., arXiv 2503.11701) over the
registered methods: ``trl-plus survey groups`` prints the survey's leaf sections with the methods placed in each.

The vocabulary is the core's :data:`trl_plus.TAXONOMY`; every method carries its own ``taxonomy`` tags. A method's
``survey`` entry names the leaf sections of the survey's paper list (liushunyu/awesome-direct-preference-optimization)
that list its paper — each leaf named by the tag it implies — and its ``source`` is ``survey``; every other tag, and
every tag of a method the list does not hold (``source: inferred``), is ours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from trl_plus import TAXONOMY, TrlPlusError, did_you_mean, get_registry, hookimpl

#: The survey's four dimensions and the taxonomy keys under each (each method needs at least one key per dimension,
#: possibly ``()``: the card's explicit "—"), plus ``scope`` and ``source``.
DIMENSIONS: Mapping[str, tuple[str, ...]] = {
    "data strategy": ("data.quality", "data.feedback", "data.granularity"),
    "learning framework": ("learning.paradigm", "learning.objective"),
    "constraint mechanism": ("constraint.reference", "constraint.divergence", "constraint.safety"),
    "model property": ("property",),
}
REQUIRED_KEYS = ("scope", "source")

#: The survey's leaf sections in its README's order: leaf (= the implied tag value) -> the section's title.
SECTIONS: Mapping[str, str] = {
    "basic": "Basic",
    "heterogeneity": "Data Heterogeneity", "distinguishability": "Data Distinguishability", "noise": "Data Noise",
    "point": "Point-Wise Feedback", "pair": "Pair-Wise Feedback", "list": "List-Wise Feedback",
    "token": "Token-Level Granularity", "step": "Step-Level Granularity", "sentence": "Sentence-Level Granularity",
    "turn": "Turn-Level Granularity",
    "offline": "Offline Learning", "online": "Online Learning", "active": "Active Learning",
    "multi-objective": "Multi-Objective Learning", "self-play": "Self-Play Learning",
    "reference-free": "Reference-Free DPO", "dynamic-reference": "Dynamic-Reference DPO",
    "diversity": "Divergence Constraint: Diversity", "generalization": "Divergence Constraint: Generalization",
    "safety": "Safety Constraint",
    "distribution-shift": "Distribution Shift", "length-bias": "Length Bias",
    "likelihood-collapse": "Likelihood Collapse", "alignment-tax": "Alignment Tax", "other-analysis": "Other Analysis",
}  # fmt: skip


def values(taxonomy: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """The values of ``key`` as a tuple (``()`` when absent or explicitly none)."""
    value = taxonomy.get(key, ())
    return (value,) if isinstance(value, str) else tuple(value)


def implied_key(leaf: str) -> str | None:
    """The taxonomy key whose value a survey leaf names (``None`` for ``basic``)."""
    keys = [k for k, vs in TAXONOMY.items() if k not in ("survey", "source", "scope") and leaf in vs]
    return keys[0] if keys else None


def problems(taxonomy: Mapping[str, Any]) -> list[str]:
    """What is wrong with one method's tags: keys or values outside the vocabulary, a missing dimension, a survey
    leaf without the tag it implies, a ``source`` that disagrees with ``survey``."""
    out = []
    for key in taxonomy:
        if key not in TAXONOMY:
            out.append(f"unknown key {key!r}")
        elif not isinstance(taxonomy[key], (str, tuple)):
            out.append(f"{key}: a string or a tuple of strings, not {type(taxonomy[key]).__name__}")
        else:
            out += [f"{key}: unknown value {v!r}" for v in values(taxonomy, key) if v not in TAXONOMY[key]]
    for dimension, keys in DIMENSIONS.items():
        if not any(k in taxonomy for k in keys):
            out.append(f"no tag of the {dimension} ({', '.join(keys)}; () for none)")
    for key in REQUIRED_KEYS:
        if len(values(taxonomy, key)) != 1:
            out.append(f"{key}: exactly one value")
    for leaf in values(taxonomy, "survey"):
        key = implied_key(leaf)
        if key is not None and leaf not in values(taxonomy, key):
            out.append(f"survey places it in {SECTIONS.get(leaf, leaf)!r} but {key} lacks {leaf!r}")
    placed = bool(values(taxonomy, "survey"))
    if values(taxonomy, "source") != (("survey",) if placed else ("inferred",)):
        out.append("source: 'survey' when, and only when, survey names the sections the survey places it in")
    return out


def survey_groups(methods: Mapping[str, Any], inferred: bool = False) -> dict[str, list[str]]:
    """``{leaf: [method names]}`` in the survey's order: the methods the survey places in each leaf (``inferred``:
    also those whose own tags imply it, marked ``*``). ``methods``: name -> method class."""
    groups: dict[str, list[str]] = {leaf: [] for leaf in SECTIONS}
    for name in sorted(methods):
        taxonomy = getattr(methods[name], "taxonomy", {}) or {}
        placed = values(taxonomy, "survey")
        for leaf in SECTIONS:
            key = implied_key(leaf)
            if leaf in placed:
                groups[leaf].append(name)
            elif inferred and key is not None and leaf in values(taxonomy, key):
                groups[leaf].append(name + "*")
    return {leaf: names for leaf, names in groups.items() if names}


def _add_groups_arguments(parser) -> None:
    parser.add_argument("--inferred", action="store_true",
                        help="also list methods whose inferred tags imply a section (marked *)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print {section: [methods]} as JSON")
    parser.add_argument("--section", metavar="NAME",
                        help="print one section's methods, comma-separated, for trl-plus compare RECIPE --methods "
                             "(a name as listed, e.g. 'Length Bias', or its key, e.g. length-bias)")  # fmt: skip


def section_key(name: str) -> str:
    """The leaf key of a section given by key (``length-bias``) or by its listed name (``Length Bias``, any case)."""
    by_name = {title.lower(): leaf for leaf, title in SECTIONS.items()}
    leaf = name if name in SECTIONS else by_name.get(name.strip().lower())
    if leaf is None:
        raise TrlPlusError(f"--section: no survey section {name!r}{did_you_mean(name, SECTIONS)}; the sections: "
                           f"{', '.join(SECTIONS)}")  # fmt: skip
    return leaf


def _run_groups(args) -> int:
    methods = get_registry().methods
    if args.section is not None:
        leaf = section_key(args.section)
        names = survey_groups(methods, inferred=args.inferred).get(leaf, [])
        if not names:
            raise TrlPlusError(f"--section {args.section}: no installed method is placed in {SECTIONS[leaf]!r}")
        print(",".join(name.rstrip("*") for name in names))
        return 0
    bad = {name: problems(getattr(cls, "taxonomy", {}) or {}) for name, cls in methods.items()}
    bad = {name: p for name, p in bad.items() if p}
    groups = survey_groups(methods, inferred=args.inferred)
    if args.json:
        print(json.dumps({SECTIONS[leaf]: names for leaf, names in groups.items()}, indent=2))
    else:
        width = max((len(SECTIONS[leaf]) for leaf in groups), default=0)
        for leaf, names in groups.items():
            print(f"{SECTIONS[leaf]:<{width}}  {', '.join(names)}")
        untagged = sorted(name for name, cls in methods.items() if not getattr(cls, "taxonomy", None))
        if untagged:
            print(f"untagged: {', '.join(untagged)}")
    if bad:
        name, first = next(iter(sorted(bad.items())))
        raise TrlPlusError(f"{len(bad)} method(s) with tags outside the survey vocabulary, e.g. {name}: {first[0]}")
    return 0


@hookimpl
def register_commands(register):
    """``trl-plus survey groups``."""
    register("survey groups", "the DPO survey's leaf sections and the registered methods placed in each",
             _add_groups_arguments, _run_groups)  # fmt: skip
