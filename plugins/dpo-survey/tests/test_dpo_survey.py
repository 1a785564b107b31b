"""The survey taxonomy's meta-tests: every method of the core and of this repository's plugins carries its own tags,
from the vocabulary, with every dimension; survey placements agree with the survey's README (the card's examples)
and reproduce the card's grouping example for the slugs that are registered; ``trl-plus survey groups``."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from trl_plus_dpo_survey import SECTIONS, problems, survey_groups, values

from trl_plus import TAXONOMY, get_registry
from trl_plus.testing import cli

ROOT = Path(__file__).resolve().parents[3]

# The card's worked example (shared/methods/dpo-survey.md): the 17 seed methods the survey's README lists, by leaf.
SEED_GROUPING = {
    "online": {"xpo", "selm", "ofs-dpo"},
    "self-play": {"dno", "srpo"},
    "multi-objective": {"modpo"},
    "token": {"r-to-q", "tgdpo", "rto"},
    "length-bias": {"simpo", "ld-dpo", "ln-dpo"},
    "likelihood-collapse": {"r-to-q", "did", "three-d-properties"},
    "distribution-shift": {"selm", "srpo", "dpo-rm-generalization"},
    "reference-free": {"simpo"},
    "dynamic-reference": {"curry-dpo"},
    "distinguishability": {"curry-dpo", "ofs-dpo"},
    "heterogeneity": {"ofs-dpo"},
    "offline": {"curry-dpo"},
    "alignment-tax": {"ranking-accuracy"},
}
SEEDS = set().union(*SEED_GROUPING.values())


def repository_methods() -> dict:
    """The methods of the core and of this repository's plugins (``plugins/<entry point>``), not of plugins installed
    from elsewhere: name -> class."""
    registry = get_registry()
    out = {}
    for name, cls in registry.methods.items():
        source = registry.sources[name]
        plugin = source[source.rfind("(") + 1 : -1]
        if source.endswith("(built-in)") or (ROOT / "plugins" / plugin).is_dir():
            out[name] = cls
    return out


def test_the_card_counts_17_seed_slugs_and_25_memberships():
    assert len(SEEDS) == 17 and sum(len(v) for v in SEED_GROUPING.values()) == 25
    assert set(SEED_GROUPING) <= set(SECTIONS) and set(SECTIONS) == set(TAXONOMY["survey"])


def test_every_method_carries_its_own_tags_from_the_vocabulary():
    methods = repository_methods()
    assert {"dpo", "sft", "diffusion-dpo", "diffusion-sft", "simpo", "sft-fdiv"} <= set(methods)
    wrong = {name: problems(cls.__dict__.get("taxonomy", {})) for name, cls in methods.items()}
    assert not {name: p for name, p in wrong.items() if p}
    for name, cls in methods.items():  # the tagged module is this checkout's (PYTHONPATH: every plugins/<name>)
        assert Path(inspect.getfile(cls)).resolve().is_relative_to(ROOT), f"{name} is imported from outside {ROOT}"


def test_the_reference_tag_agrees_with_what_the_method_needs():
    for name, cls in repository_methods().items():
        reference = values(cls.taxonomy, "constraint.reference")
        assert len(reference) == 1, name
        if cls.needs.reference != "no":
            assert reference[0] in ("fixed", "dynamic-reference"), name
        elif not cls.needs.teachers:  # no reference and no frozen anchor (aligndistil, tvkd: a frozen teacher)
            assert reference[0] == "reference-free", name


def test_the_cards_survey_placed_examples():
    methods = repository_methods()
    simpo, curry = methods["simpo"].taxonomy, methods["curry-dpo"].taxonomy
    assert values(simpo, "constraint.reference") == ("reference-free",) and values(simpo, "property") == ("length-bias",)
    assert {"reference-free", "length-bias"} == set(values(simpo, "survey"))
    assert values(curry, "data.quality") == ("distinguishability",) and values(curry, "learning.paradigm") == ("offline",)
    assert values(curry, "constraint.reference") == ("dynamic-reference",)
    assert methods["dpo"].taxonomy["survey"] == ("basic",) and methods["dpo"].taxonomy["source"] == "survey"
    assert methods["dno"].taxonomy["survey"] == ("self-play",)  # the card's third example (dno ⇒ self-play)


def test_the_cards_grouping_reproduces_from_the_registered_methods_tags():
    methods = repository_methods()
    registered = SEEDS & set(methods)
    # not registered as methods: four metric
    # plugins, which carry no method tags: did, r-to-q, ranking-accuracy, dporm-generalization (dpo-rm-generalization)
    assert {"srpo", "modpo", "tgdpo", "simpo", "ld-dpo", "ln-dpo", "three-d-properties", "curry-dpo",
            "ofs-dpo", "xpo", "selm", "dno"} <= registered
    groups = {leaf: set(names) for leaf, names in survey_groups(methods).items()}
    expected = {leaf: names & registered for leaf, names in SEED_GROUPING.items() if names & registered}
    seed_groups = {leaf: names & SEEDS for leaf, names in groups.items() if leaf != "basic" and names & SEEDS}
    assert seed_groups == expected
    assert groups["basic"] == {"dpo"}  # the survey's Basic list (dpo is in the core, not a seed slug)
    # placed by the survey but not among the README's 17 seeds (the card's table): online-dpo (OAIF), Online Learning
    assert {leaf: names - SEEDS for leaf, names in groups.items() if names - SEEDS - {"dpo"}} == {"online": {"online-dpo"}}
    assert sum(len(v) for v in expected.values()) == 20  # of the 25 memberships, those of the 13 registered slugs


def test_problems_name_what_is_wrong():
    good = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed", "property": (),
            "scope": "text", "source": "inferred"}  # fmt: skip
    assert problems(good) == []
    assert problems({**good, "data.colour": "red"}) == ["unknown key 'data.colour'"]
    assert problems({**good, "property": ("length bias",)}) == ["property: unknown value 'length bias'"]
    assert problems({k: v for k, v in good.items() if k != "property"}) == [
        "no tag of the model property (property; () for none)"]
    assert problems({**good, "survey": ("length-bias",)}) == [
        "survey places it in 'Length Bias' but property lacks 'length-bias'",
        "source: 'survey' when, and only when, survey names the sections the survey places it in"]
    assert problems({**good, "property": "length-bias", "survey": ("length-bias",), "source": "survey"}) == []


def test_survey_groups_command(capsys):
    assert cli("survey", "groups", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    expected = survey_groups(get_registry().methods)
    assert shown == {SECTIONS[leaf]: names for leaf, names in expected.items()}
    assert cli("survey", "groups", "--inferred") == 0
    lines = capsys.readouterr().out.splitlines()
    offline = next(line for line in lines if line.startswith("Offline Learning"))
    assert "curry-dpo," in offline and "simpo*" in offline  # placed by the survey vs our inferred tag
    assert "curry-dpo*" not in offline
    # one section as trl-plus compare's --methods: a key or its listed name; an unknown one is one line
    assert cli("survey", "groups", "--section", "Length Bias") == 0
    assert capsys.readouterr().out.strip() == ",".join(expected["length-bias"])
    assert cli("survey", "groups", "--section", "length-bais") == 2
    assert "no survey section 'length-bais' (did you mean length-bias?)" in capsys.readouterr().err
