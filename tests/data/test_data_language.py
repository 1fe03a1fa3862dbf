"""The `language_id` step on small labelled multilingual text: the planted languages kept or dropped,
each row's language and score recorded as columns, removals counted per language found, the mix
shown by `data stats`, and bad language codes refused before any work."""

import json
from collections import Counter

import pytest

from llmasos.data.pipeline.run import prepare
from llmasos.data.store import DatasetStore
from llmasos.data.store.stats import collect
from llmasos.errors import LLMasOSError

LABELLED = [
    (
        "en",
        "The library opens at nine in the morning and closes late on Thursdays, when the reading "
        "room is usually full of students preparing for their examinations.",
    ),
    (
        "en",
        "After the storm, the farmers walked through their fields to see how much of the harvest "
        "could still be saved before the next rain arrived.",
    ),
    (
        "en",
        "She wrote to her brother every week, telling him about the city, the people she worked "
        "with and the small garden she kept on the roof of her building.",
    ),
    (
        "fr",
        "La bibliothèque ouvre à neuf heures du matin et ferme tard le jeudi, quand la salle de "
        "lecture est souvent pleine d'étudiants qui préparent leurs examens.",
    ),
    (
        "fr",
        "Après l'orage, les agriculteurs ont parcouru leurs champs pour voir quelle partie de la "
        "récolte pouvait encore être sauvée avant la prochaine pluie.",
    ),
    (
        "de",
        "Die Bibliothek öffnet um neun Uhr morgens und schließt donnerstags spät, wenn der "
        "Lesesaal meistens voller Studenten ist, die sich auf ihre Prüfungen vorbereiten.",
    ),
    (
        "de",
        "Nach dem Sturm gingen die Bauern über ihre Felder, um zu sehen, wie viel von der Ernte "
        "vor dem nächsten Regen noch zu retten war.",
    ),
    (
        "es",
        "La biblioteca abre a las nueve de la mañana y cierra tarde los jueves, cuando la sala de "
        "lectura suele estar llena de estudiantes que preparan sus exámenes.",
    ),
    (
        "it",
        "La biblioteca apre alle nove del mattino e chiude tardi il giovedì, quando la sala di "
        "lettura è spesso piena di studenti che preparano i loro esami.",
    ),
    (
        "ru",
        "Библиотека открывается в девять утра и закрывается поздно по четвергам, когда читальный "
        "зал обычно полон студентов, готовящихся к экзаменам.",
    ),
]


@pytest.fixture
def store(tmp_path):
    store = DatasetStore(tmp_path / "home")
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, (_, t) in enumerate(LABELLED)))
    store.import_path(path, "mixed")
    return store


def recipe(tmp_path, options):
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"steps": [{"language_id": options}]}))
    return str(path)


def test_keeps_the_languages_asked_for_and_records_language_and_score(store, tmp_path):
    made = prepare(store, "mixed", recipe(tmp_path, {"languages": ["en", "fr"]}), "enfr", progress=False)
    rows = list(store.rows("enfr"))
    assert [r["id"] for r in rows] == [i for i, (lang, _) in enumerate(LABELLED) if lang in ("en", "fr")]
    assert [r["language"] for r in rows] == [LABELLED[r["id"]][0] for r in rows]
    assert all(0.65 <= r["language_score"] <= 1 for r in rows)
    assert made.schema["language"] == "string" and made.schema["language_score"] == "double"
    dropped = Counter(lang for lang, _ in LABELLED if lang not in ("en", "fr"))
    counts = made.report["steps"]["1. language_id"]
    assert counts == {"in": len(LABELLED), **{f"removed:language_{k}": v for k, v in dropped.items()}}
    assert collect(store, "enfr").languages == Counter({"en": 3, "fr": 2})


def test_every_language_labelled_and_min_score_drops_the_less_certain(store, tmp_path):
    prepare(store, "mixed", recipe(tmp_path, {"min_score": 0.01}), "all", progress=False)
    rows = list(store.rows("all"))
    assert [r["language"] for r in rows] == [lang for lang, _ in LABELLED]
    scores = sorted(r["language_score"] for r in rows)
    cut = scores[len(scores) // 2]  # a threshold that splits these rows
    made = prepare(store, "all", recipe(tmp_path, {"min_score": cut}), "sure", progress=False)
    assert [r["id"] for r in store.rows("sure")] == [r["id"] for r in rows if r["language_score"] >= cut]
    assert made.report["steps"]["1. language_id"]["removed:low_score"] == sum(s < cut for s in scores) > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"languages": ["english"]}, r"step 1 \(language_id\): field 'languages': unknown code\(s\) english"),
        ({"languages": "en"}, r"field 'languages' must be a list"),
        ({"min_score": 1.5}, r"field 'min_score' must be a number above 0 and at most 1"),
    ],
)
def test_bad_language_options_fail_before_any_work(store, tmp_path, options, message):
    with pytest.raises(LLMasOSError, match=message):
        prepare(store, "mixed", recipe(tmp_path, options), "out", progress=False)
    assert [m.name for m in store.list()] == ["mixed"]
