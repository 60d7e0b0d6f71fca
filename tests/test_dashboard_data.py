"""Dashboard data layer on a results database written through ``vlmguard.bench`` (runner + db write API).

Also home of :func:`build_fixture_db`, the populated fixture database the page and browser tests share:
POPE runs come from the real benchmark runner (``run_benchmark``) driven by a deterministic fake engine on
the ``synth_mini`` SynthCOCO fixture; CHAIR runs are written with ``db.ensure_run`` / ``db.add_samples`` and
records from ``chair_score.score_caption`` (with a word-list extractor instead of the WordNet one, which
takes ~30 s to load on this machine).
"""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vlmguard.bench import db as dbm
from vlmguard.bench.chair_extract import Extraction
from vlmguard.bench.chair_score import score_caption
from vlmguard.bench.datasets import synth_dataset
from vlmguard.bench.runner import run_benchmark, spec_knobs
from vlmguard.dashboard import data
from vlmguard.spec import GenerationSpec

FIX = Path(__file__).resolve().parent / "fixtures" / "bench" / "synth_mini"
QUESTION = re.compile(r"Is there an? (.+?) in the im")
VISUAL_TOKENS = 144


def _scenes() -> dict[str, set[str]]:
    inst = json.loads((FIX / "annotations" / "instances_test.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    names = {im["id"]: im["file_name"] for im in inst["images"]}
    out: dict[str, set[str]] = {}
    for a in inst["annotations"]:
        out.setdefault(names[a["image_id"]], set()).add(cats[a["category_id"]])
    return out


SCENES = _scenes()
CATEGORIES = sorted({c for objs in SCENES.values() for c in objs} | {"dog", "cat", "car", "bottle"})


@dataclass
class _Timings:
    vision_s: float
    prefill_s: float
    decode_s: float
    ttft_s: float
    total_s: float


@dataclass
class _Result:
    text: str
    token_ids: list[int]
    visual_tokens_kept: list[int]
    timings: _Timings
    kept_indices: list[int] | None = None
    finish_reason: str = "stop"
    prompt_tokens: int = 40
    visual_tokens: int = VISUAL_TOKENS
    steps: list = field(default_factory=list)


class FakeEngine:
    """Answers POPE from the fixture's annotations; each answer is flipped with a probability that grows as
    the budget shrinks (fewer tokens, more mistakes), and VCD halves it. Timings shrink with the budget."""

    model_name = "tiny-fake"
    family = "llava"
    context_length = 2048

    def __init__(self, images: dict[int, str]):
        self.images = images  # id(pixel data) -> file name, filled by the caller

    def generate(self, requests, spec):
        kept = spec.budget or VISUAL_TOKENS
        error_rate = 0.05 + 0.5 * (1 - kept / VISUAL_TOKENS) * (0.5 if spec.decoding == "vcd" else 1.0)
        out = []
        for req in requests:
            name = self.images[req.images[0].getpixel((0, 0))[0]]
            obj = QUESTION.search(req.prompt).group(1)
            truth = obj in SCENES[name]
            h = zlib.crc32(f"{name}|{obj}|{spec.pruning}".encode()) / 2**32
            answer = truth if h >= error_rate else not truth
            layers = [VISUAL_TOKENS] * 2 + [kept] * 30 if spec.pruning == "fastv" else [kept] * 32
            prefill = 0.010 + 0.0004 * kept
            out.append(_Result("Yes" if answer else "No", [1], layers,
                               _Timings(0.002, prefill, 0.004, prefill + 0.003, prefill + 0.008)))
        return out


def _red_index() -> dict[int, str]:
    from PIL import Image

    out = {}
    for p in sorted((FIX / "images" / "test").glob("*.png")):
        with Image.open(p) as im:
            out[im.convert("RGB").getpixel((0, 0))[0]] = p.name
    return out


class WordListExtractor:
    """A ChairExtractor stand-in: object words are the fixture's category names (plural -s stripped)."""

    def extract(self, caption: str) -> Extraction:
        tokens = re.findall(r"[a-z]+|[.,;]", caption.lower())
        lemmas = [t[:-1] if t.endswith("s") and t[:-1] in CATEGORIES else t for t in tokens]
        hits = [(i, w) for i, w in enumerate(lemmas) if w in CATEGORIES]
        return Extraction(words=[w for _, w in hits], categories=[w for _, w in hits], idxs=[i for i, _ in hits],
                          tokens=lemmas)


CAPTIONS = {  # decoder -> caption template per image: greedy hallucinates a dog everywhere, vcd only once
    "greedy": "There are {objs} and two dogs near a bottle.",
    "vcd": "There are {objs}.",
}

POPE_POINTS = [("none", None, "greedy"), ("fastv", 72, "greedy"), ("fastv", 36, "greedy"), ("fastv", 18, "greedy"),
               ("random", 36, "greedy"), ("fastv", 36, "vcd"), ("none", None, "vcd")]
CHAIR_POINTS = [("none", None, "greedy"), ("none", None, "vcd"), ("fastv", 36, "vcd")]


def build_fixture_db(path: Path) -> Path:
    """A populated results database: 7 POPE runs (random split) and 3 CHAIR runs on ``synth_mini``."""
    dataset = synth_dataset(FIX)
    engine = FakeEngine(_red_index())
    conn = dbm.connect(path)
    try:
        for pruning, budget, decoding in POPE_POINTS:
            spec = GenerationSpec.build(pruning=pruning, budget=budget, decoding=decoding, max_new_tokens=8)
            run_benchmark(engine, "pope", dataset, spec, conn, split="random", batch_size=8, progress=False)
        ids, desc = dataset.chair_image_ids()
        gt = dataset.chair_ground_truth(ids)
        for pruning, budget, decoding in CHAIR_POINTS:
            spec = GenerationSpec.build(pruning=pruning, budget=budget, decoding=decoding, max_new_tokens=64)
            knobs = {"model": engine.model_name, "model_family": engine.family, "dataset": dataset.name,
                     "dataset_version": dataset.version, "benchmark": "chair", "split": dataset.image_split,
                     "variant": "chair512", "prompt_preset": "chair512", "prompt": "Describe this image in detail.",
                     "image_list": desc, "drop_incomplete": False, **spec_knobs(spec)}
            run_id = dbm.ensure_run(conn, knobs, n_expected=len(ids), package_version="test")
            rows = []
            kept = budget or VISUAL_TOKENS
            for i in ids:
                objs = sorted(gt[i])
                caption = CAPTIONS[decoding].format(objs=", ".join(f"a {o}" for o in objs))
                if decoding == "vcd" and i != ids[0]:
                    caption = caption.replace(" and two dogs near a bottle", "")
                rows.append({
                    "sample_key": f"img:{i}", "item_id": str(i), "image": dataset.chair_image_path(i).name,
                    "prompt": knobs["prompt"], "output_text": caption, "finish_reason": "stop", "prompt_tokens": 40,
                    "generated_tokens": 20, "visual_tokens": VISUAL_TOKENS, "visual_tokens_kept": float(kept),
                    "visual_tokens_kept_layers": [kept] * 32, "prefill_s": 0.01 + 0.0004 * kept,
                    "ttft_s": 0.012 + 0.0004 * kept, "total_s": 0.05 + 0.0004 * kept,
                    "timings": {"prefill_s": 0.01 + 0.0004 * kept, "total_s": 0.05 + 0.0004 * kept},
                    "record": score_caption(i, caption, gt[i], WordListExtractor()),
                })
            dbm.add_samples(conn, run_id, rows)
            dbm.finish_run(conn, run_id, dbm.run_metrics(conn, run_id))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return path


def shared_fixture_db(tmp_path_factory) -> Path:
    """The fixture database, built once per test session (the page and browser tests reuse it)."""
    path = tmp_path_factory.getbasetemp() / "dashboard-fixture" / "results.sqlite"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("building.sqlite")
        build_fixture_db(tmp)
        for suffix in ("-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        tmp.rename(path)
    return path


@pytest.fixture(scope="module")
def fixture_db(tmp_path_factory) -> Path:
    return shared_fixture_db(tmp_path_factory)


# ---- tests ------------------------------------------------------------------------------------------


def test_load_runs_reads_every_run_with_metrics(fixture_db):
    runs = data.load_runs(fixture_db)
    assert len(runs) == len(POPE_POINTS) + len(CHAIR_POINTS)
    assert set(runs["benchmark"]) == {"pope", "chair"}
    pope = runs[runs["benchmark"] == "pope"]
    assert pope["accuracy"].between(0, 100).all() and pope["f1"].notna().all()
    assert (pope["n_samples"] == 24).all() and (pope["status"] == "finished").all()
    base = pope[(pope["pruning"] == "none") & (pope["decoding"] == "greedy")].iloc[0]
    tight = pope[(pope["pruning"] == "fastv") & (pope["budget"] == 18)].iloc[0]
    assert base["visual_tokens_kept"] == VISUAL_TOKENS and tight["visual_tokens_kept"] < 30
    assert tight["prefill_ms"] < base["prefill_ms"]
    chair = runs[runs["benchmark"] == "chair"].set_index("decoding")
    # greedy adds "two dogs" and "a bottle" to every caption: every caption hallucinates.
    assert chair.loc["greedy", "chair_s"] == 100.0
    assert runs.loc[runs["decoding"] == "vcd", "decoding_params"].eq("").all()
    assert data.db_state(fixture_db) == "ready"


def test_db_state_and_cache_follow_the_file(tmp_path):
    p = tmp_path / "r.sqlite"
    assert data.db_state(p) == "missing" and data.load_runs(p).empty
    dbm.connect(p).close()
    assert data.db_state(p) == "empty"
    conn = dbm.connect(p)
    knobs = {"benchmark": "pope", "model": "m", "dataset": "d", "split": "random", "pruning": "none",
             "decoding": "greedy"}
    run_id = dbm.ensure_run(conn, knobs, n_expected=2, package_version="t")
    assert data.db_state(p) == "ready"
    assert data.load_runs(p).iloc[0]["n_samples"] == 0
    dbm.add_samples(conn, run_id, [{"sample_key": "q:1", "label": "yes", "prediction": "yes", "correct": True}])
    conn.close()
    runs = data.load_runs(p)  # a write changes the cache key: the new sample is seen
    assert runs.iloc[0]["n_samples"] == 1 and runs.iloc[0]["accuracy"] == 100.0


def test_filters_narrow_the_table(fixture_db):
    runs = data.load_runs(fixture_db)
    opts = data.filter_options(runs)
    assert opts["pruning"] == ["fastv", "none", "random"] and opts["benchmark"] == ["chair", "pope"]
    fastv = data.filter_runs(runs, data.RunFilter(values={"pruning": ["fastv"]}))
    assert len(fastv) == 5 and set(fastv["pruning"]) == {"fastv"}
    both = data.filter_runs(runs, data.RunFilter(values={"pruning": ["fastv"], "benchmark": ["pope"]}))
    assert len(both) == 4
    budget = data.filter_runs(runs, data.RunFilter(budget_range=(30, 40)))
    assert set(budget["budget"].dropna()) == {36}
    assert len(data.filter_runs(runs, data.RunFilter(search="RANDOM@36"))) == 1
    cols = data.visible_columns(both)
    assert "accuracy" in cols and "chair_s" not in cols


def test_tokens_curve_chair_and_pareto(fixture_db):
    runs = data.load_runs(fixture_db)
    curve = data.tokens_curve(runs, "accuracy")
    fastv = curve[curve["series"] == "fastv / greedy"]
    assert list(fastv["visual_tokens_kept"]) == sorted(fastv["visual_tokens_kept"]) and len(fastv) == 3
    assert set(curve["pruner"]) == {"none", "fastv", "random"}
    chair = data.chair_by_decoder(runs)
    assert set(chair["metric"]) == {"CHAIR_s", "CHAIR_i"} and set(chair["decoder"]) == {"greedy", "vcd"}
    greedy_s = chair[(chair["decoder"] == "greedy") & (chair["metric"] == "CHAIR_s")]["value"].iloc[0]
    vcd_s = chair[(chair["decoder"] == "vcd") & (chair["metric"] == "CHAIR_s")]["value"]
    assert (vcd_s < greedy_s).all()
    par = data.pareto_frame(runs)
    combos = set(par["combo"])
    assert {"none + greedy", "fastv@36 + vcd", "fastv@18 + greedy"} <= combos
    row = par[par["combo"] == "fastv@36 + vcd"].iloc[0]
    assert row["accuracy"] > 0 and row["chair_i"] is not None and row["latency_ms"] > 0
    assert par["pareto"].any() and not par["pareto"].all()
    # the fastest combination can never be dominated on latency
    assert par.loc[par["latency_ms"].idxmin(), "pareto"]


def test_pareto_compares_one_pope_split_at_a_time():
    import pandas as pd

    """A combination run on every split was averaged over them and compared with one run on 'random' only
    (base looked dominated by a method that only saw the easy split)."""
    rows = [dict(benchmark="pope", model="m", pruning=None, budget=None, decoding=None, decoding_params=None,
                 status="finished", run_id=f"b{s}", split=s, accuracy=acc, total_ms=10.0, chair_i=None, chair_s=None)
            for s, acc in (("random", 95.0), ("popular", 85.0), ("adversarial", 75.0))]
    rows.append(dict(rows[0], pruning="fastv", budget=36, run_id="f", accuracy=94.0, total_ms=8.0))
    df = pd.DataFrame(rows)
    assert data.pope_splits(df) == ["random", "adversarial", "popular"]
    rnd = data.pareto_frame(df, split="random").set_index("combo")
    assert rnd.loc["none + greedy", "accuracy"] == 95.0 and rnd.loc["fastv@36 + greedy", "accuracy"] == 94.0
    assert rnd["pareto"].all()  # base is more accurate, fastv faster: neither dominates
    adv = data.pareto_frame(df, split="adversarial").set_index("combo")
    assert adv.loc["none + greedy", "accuracy"] == 75.0 and "fastv@36 + greedy" not in adv.index


def test_pareto_chart_draws_combinations_without_chair(fixture_db):
    """Vega-Lite drops a row whose colour field is null: the POPE-only combinations (no CHAIR_i) get a point layer
    of their own in a fixed colour, else only their text labels showed."""
    from vlmguard.dashboard import charts

    frame = data.pareto_frame(data.load_runs(fixture_db))
    assert frame["chair_i"].notna().any() and frame["chair_i"].isna().any()
    spec = charts.pareto_chart(frame).to_dict()

    def layers(s):
        for lay in s.get("layer", []):
            yield from layers(lay) if "layer" in lay else [lay]

    points = [lay for lay in layers(spec) if lay["mark"]["type"] == "point"]
    colours = {json.dumps(lay.get("transform", [])): lay["encoding"]["color"] for lay in points}
    assert len(points) == 2
    assert any(c.get("field") == "chair_i" for c in colours.values())
    assert any(c.get("value") == charts.NO_CHAIR_COLOR and f.count("!") == 1 for f, c in colours.items())


def test_pareto_mask():
    pts = [(80, 10, 5), (70, 20, 6), (90, 30, 5), (85, 10, None), (None, None, None)]
    assert data.pareto_mask(pts, (+1, -1, -1)) == [False, False, True, True, False]
    assert data.pareto_mask([(1, 1), (1, 1)], (+1, +1)) == [True, True]


def test_drilldown_samples_and_caption_highlight(fixture_db):
    runs = data.load_runs(fixture_db)
    chair_id = runs[(runs["benchmark"] == "chair") & (runs["decoding"] == "greedy")]["run_id"].iloc[0]
    samples = data.load_samples(fixture_db, chair_id)
    frame = data.samples_frame(samples, "chair")
    assert len(frame) == 4 and (frame["hallucinated"] != "").all()
    rec = next(s for s in samples if s["sample_key"] == "img:2")["record"]  # a car, a bicycle and a person
    assert sorted(c for _, c in rec["mscoco_hallucinated_words"]) == ["bottle", "dog"]
    marked, found = data.highlight_caption(rec)
    assert found == ["dogs", "bottle"]
    assert marked.count("<mark") == len(found) and "<mark" in marked
    assert data.highlight_caption({"caption": "a <b>cat</b>", "mscoco_hallucinated_words": [["cat", "cat"]]})[0] == \
        'a &lt;b&gt;<mark class="hallucinated" style="background:#ffb3b3;padding:0 2px">cat</mark>&lt;/b&gt;'
    pope_id = runs[runs["benchmark"] == "pope"]["run_id"].iloc[0]
    pf = data.samples_frame(data.load_samples(fixture_db, pope_id), "pope")
    assert {"label", "prediction", "correct"} <= set(pf.columns) and len(pf) == 24
    run = data.load_run(fixture_db, pope_id)
    img = pf["image"].iloc[0]
    assert data.find_image(run, img) is None  # the fixture dataset is not a known dataset location
    assert data.find_image(run, img, [FIX / "images"]) == FIX / "images" / "test" / img


def test_highlight_irregular_plurals():
    rec = {"caption": "Two men and some knives on a table.",
           "mscoco_hallucinated_words": [["man", "person"], ["knife", "knife"]]}
    _, found = data.highlight_caption(rec)
    assert found == ["men", "knives"]
