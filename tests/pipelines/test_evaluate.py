"""``clipcap evaluate``: inputs in our and COCO formats, id matching, missing ids named, CLIPScore on images,
and a COCO round trip (our caption table -> results JSON -> evaluate gives the same numbers)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core import synthetic
from pipelines.cli import main
from pipelines.evaluate.run import EvaluateConfig, match_ids, read_predictions, read_references, run_evaluate
from pipelines.io import schemas

SAMPLES = list(synthetic.generate(6, seed=3, size=64, start=500))
# predictions: 3 exact, 2 wrong, and one image the references do not know
WRONG = {2: "three large green triangles at the bottom", 4: "one small blue circle on the left"}


def _caption_table(folder, keys, captions, model="tiny@preset-x"):
    """A caption table as bulk captioning writes it: two parts, ranked rows (rank 1 must be ignored)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {schemas.META_MODEL: model}
    half = len(keys) // 2
    for n, (ks, cs) in enumerate(((keys[:half], captions[:half]), (keys[half:], captions[half:]))):
        rows = {name: [] for name in schemas.CAPTIONS_RANKED_SCHEMA.names}
        for k, c in zip(ks, cs, strict=True):
            for rank, text in enumerate((c, "a decoy caption ranked second")):
                for name, v in (("key", k), ("caption", text), ("score", -1.0), ("model", model),
                                ("created_at", None), ("rank", rank)):
                    rows[name].append(v)
        pq.write_table(pa.table(rows, schema=schemas.with_metadata(schemas.CAPTIONS_RANKED_SCHEMA, meta)),
                       folder / f"part-{n:05d}.parquet")
    return str(folder)


@pytest.fixture()
def inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for s in SAMPLES:
        s.image.save(images / f"{s.key}.png")
    keys = [f"{s.key}.png" for s in SAMPLES]
    preds = [WRONG.get(i, s.caption) for i, s in enumerate(SAMPLES)]
    captions = _caption_table(tmp_path / "captions", keys, preds)
    refs = tmp_path / "refs.jsonl"  # references keyed by the bare stem, two per image, the last image unknown
    refs.write_text("".join(json.dumps({"key": s.key, "caption": c}) + "\n" for s in SAMPLES[:5]
                            for c in (s.caption, f"a picture: {s.caption}"))
                    + json.dumps({"key": "syn-only-in-refs", "caption": "nothing"}) + "\n")
    return {"images": str(images), "captions": captions, "refs": str(refs), "root": tmp_path, "preds": preds}


def test_reading_matching_and_naming_missing_ids(inputs):
    preds = read_predictions(inputs["captions"])
    assert preds.model == "tiny" and len(preds.ids) == 6 and "a decoy caption ranked second" not in preds.captions
    refs = read_references(inputs["refs"])
    m = match_ids(preds, refs)  # keys ("syn...png") vs stems ("syn..."): auto falls back to stem matching
    assert m.mode == "stem" and m.ids == [s.key for s in SAMPLES[:5]]
    assert m.missing_references == [f"{SAMPLES[5].key}.png"] and m.missing_predictions == ["syn-only-in-refs"]
    with pytest.raises(ValueError, match="no prediction id matches"):
        match_ids(preds, refs, "key")


def test_coco_inputs_and_clear_errors(tmp_path):
    ann = {"images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg"}, {"id": 7, "file_name": "x.jpg"}],
           "annotations": [{"image_id": 391895, "id": 1, "caption": "a man on a bike"},
                           {"image_id": 391895, "id": 2, "caption": "a cyclist"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "preds.csv").write_text("key,caption\nval/COCO_val2014_000000391895.jpg,a man riding a bike\n")
    refs = read_references(str(tmp_path / "ann.json"))
    m = match_ids(read_predictions(str(tmp_path / "preds.csv")), refs)
    assert m.ids == ["391895"] and m.refs == [["a man on a bike", "a cyclist"]]
    assert m.missing_predictions == []  # image 7 has no captions: not scorable, not "missing"
    (tmp_path / "bad.csv").write_text("name,text\na,b\n")
    with pytest.raises(ValueError, match=r"no caption column 'caption'; columns are \['name', 'text'\]"):
        read_predictions(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 1, "text": "x"}]))
    with pytest.raises(ValueError, match="COCO results JSON is a list"):
        read_predictions(str(tmp_path / "bad.json"))


def test_a_reference_without_a_caption_is_not_scored_and_is_named(tmp_path):
    (tmp_path / "refs.csv").write_text("key,caption\n1,a red circle\n1,\n2,\n3,a blue square\n")
    (tmp_path / "preds.csv").write_text("key,caption\n1,a red circle\n2,a green triangle\n3,a blue square\n")
    refs = read_references(str(tmp_path / "refs.csv"))
    m = match_ids(read_predictions(str(tmp_path / "preds.csv")), refs)
    assert m.ids == ["1", "3"] and m.refs == [["a red circle"], ["a blue square"]]
    assert m.empty_references == ["2"] and refs.blank == 2 and m.missing_references == []
    summary = run_evaluate(EvaluateConfig(predictions=str(tmp_path / "preds.csv"), output=str(tmp_path / "e"),
                                          references=str(tmp_path / "refs.csv"), tokenize="simple", metrics=("bleu",)))
    assert summary["evaluated"] == 2 and summary["metrics"]["exact_match"] == 1.0
    assert summary["empty_references"] == {"count": 1, "first": ["2"]} and summary["blank_reference_captions"] == 2


def test_ids_that_collide_under_stem_matching_are_a_clear_error(tmp_path):
    (tmp_path / "refs.csv").write_text("key,caption\n9,a red circle\n10,a dot\n")
    (tmp_path / "preds.csv").write_text("key,caption\na/9.png,a red circle\nb/9.png,a blue square\n"
                                        "a/10.png,a dot\n")
    preds = read_predictions(str(tmp_path / "preds.csv"))
    with pytest.raises(ValueError, match=r"id match stem: prediction\(s\) \['a/9.png', 'b/9.png'\] and "
                                         r"reference\(s\) \['9'\] all match as '9'"):
        match_ids(preds, read_references(str(tmp_path / "refs.csv")))
    (tmp_path / "refs2.csv").write_text("key,caption\na/9.png,a red circle\nb/9.png,a blue square\n")
    (tmp_path / "preds2.csv").write_text("key,caption\nx/9.jpg,a red circle\n")
    with pytest.raises(ValueError, match=r"reference\(s\) \['a/9.png', 'b/9.png'\] all match as '9'"):
        match_ids(read_predictions(str(tmp_path / "preds2.csv")), read_references(str(tmp_path / "refs2.csv")))


def test_evaluate_with_images_scores_each_image_with_its_own_caption(inputs):
    from clipcap_core.encoders import EncoderConfig, load_encoder

    out = inputs["root"] / "eval"
    summary = run_evaluate(EvaluateConfig(predictions=inputs["captions"], references=inputs["refs"],
                                          images=inputs["images"], output=str(out), tokenize="simple",
                                          metrics=("bleu", "cider")))
    assert summary["evaluated"] == 5 and summary["clip"]["model_name"] == "tiny"
    assert summary["missing_references"] == {"count": 1, "first": [f"{SAMPLES[5].key}.png"]}
    assert summary["missing_predictions"]["first"] == ["syn-only-in-refs"]
    assert summary["metrics"]["exact_match"] == pytest.approx(3 / 5)
    table = pq.read_table(out / "per_image.parquet")
    assert table.schema == schemas.evaluation_schema(["bleu1", "bleu2", "bleu3", "bleu4", "cider", "exact_match",
                                                      "clip_score", "ref_clip_score"])
    rows = {r["image_id"]: r for r in table.to_pylist()}
    enc = load_encoder(EncoderConfig(model_name="tiny"))
    for i, s in enumerate(SAMPLES[:5]):
        img = enc.encode_pixels(enc.resize(s.image)[None])[0]
        txt = enc.encode_text([inputs["preds"][i]])[0]
        cos = float(img @ txt / np.linalg.norm(img) / np.linalg.norm(txt))
        assert rows[s.key]["clip_score"] == pytest.approx(2.5 * max(cos, 0.0), abs=1e-4), s.key
        assert rows[s.key]["exact_match"] == (0.0 if i in WRONG else 1.0)
        assert rows[s.key]["references"] == [s.caption, f"a picture: {s.caption}"]
    assert summary["metrics"]["clip_score"] == pytest.approx(np.mean([r["clip_score"] for r in rows.values()]))
    assert json.loads((out / "summary.json").read_text())["metrics"] == summary["metrics"]


def test_coco_round_trip_through_the_cli_gives_the_same_numbers(inputs, capsys):
    """our table -> evaluate (writes results.json) -> evaluate(results.json) against COCO annotations."""
    first = inputs["root"] / "eval1"
    ann = {"images": [{"id": i, "file_name": f"{s.key}.png"} for i, s in enumerate(SAMPLES[:5], start=1)],
           "annotations": [{"image_id": i, "id": 10 * i + j, "caption": c}
                           for i, s in enumerate(SAMPLES[:5], start=1) for j, c in enumerate((s.caption, "a shape"))]}
    (inputs["root"] / "ann.json").write_text(json.dumps(ann))
    common = ["--references", str(inputs["root"] / "ann.json"), "--tokenize", "simple", "--metrics", "bleu,rouge,cider"]
    assert main(["evaluate", "--predictions", inputs["captions"], "--output", str(first), *common]) == 0
    printed = capsys.readouterr().out
    results = json.loads((first / "results.json").read_text())
    assert sorted(r["image_id"] for r in results) == [1, 2, 3, 4, 5]  # COCO integer ids, via the file names
    second = inputs["root"] / "eval2"
    assert main(["evaluate", "--predictions", str(first / "results.json"), "--output", str(second), *common]) == 0
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (first, second))
    assert s2["metrics"] == s1["metrics"] and s2["id_match"] == "key" and s2["missing_references"]["count"] == 0
    assert "CIDEr" in printed and "missing references: 1" in printed
    assert not math.isnan(s1["metrics"]["cider"]) and s1["metrics"]["cider"] > 0


def test_job_level_problems_fail_before_any_work(inputs, capsys):
    out = inputs["root"] / "never"
    args = ["evaluate", "--predictions", inputs["captions"], "--references", inputs["refs"], "--output", str(out)]
    assert main([*args, "--images", inputs["images"], "--model", str(inputs["root"] / "no-model")]) == 2
    assert "cannot read the CLIP of model" in capsys.readouterr().err
    assert main([*args, "--metrics", "bleu,wer"]) == 2
    assert "unknown metric(s) ['wer']" in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_image_embeddings_from_an_embedding_table_and_clip_checks(inputs):
    from clipcap_core.encoders import EncoderConfig, load_encoder

    enc = load_encoder(EncoderConfig(model_name="tiny"))
    emb = enc.encode_pixels(np.stack([enc.resize(s.image) for s in SAMPLES]))

    def table(path, dim, clip_model, rows):
        meta = schemas.embedding_metadata(clip_model=clip_model, clip_pretrained=None, dim=dim, dtype="float32",
                                          preprocess="test")
        flat = pa.array(rows.reshape(-1).astype(np.float32))
        pq.write_table(pa.table({"key": [s.key for s in SAMPLES], "caption": [s.caption for s in SAMPLES],
                                 "url": [None] * len(SAMPLES),
                                 "image_embedding": pa.FixedSizeListArray.from_arrays(flat, dim)},
                                schema=schemas.with_metadata(schemas.embedding_schema(dim), meta)), path)
        return str(path)

    good = table(inputs["root"] / "emb.parquet", enc.dim, "tiny", emb)
    cfg = dict(predictions=inputs["captions"], references=inputs["refs"], tokenize="simple", metrics=("bleu",))
    summary = run_evaluate(EvaluateConfig(images=good, output=str(inputs["root"] / "e1"), **cfg))
    rows = {r["image_id"]: r for r in pq.read_table(inputs["root"] / "e1" / "per_image.parquet").to_pylist()}
    txt = enc.encode_text(inputs["preds"][:5])
    for i, s in enumerate(SAMPLES[:5]):
        cos = float(emb[i] @ txt[i] / np.linalg.norm(emb[i]) / np.linalg.norm(txt[i]))
        assert rows[s.key]["clip_score"] == pytest.approx(2.5 * max(cos, 0.0), abs=1e-4)
    assert summary["missing_images"]["count"] == 0
    wrong_dim = table(inputs["root"] / "emb64.parquet", 64, "tiny", np.ones((len(SAMPLES), 64)))
    with pytest.raises(ValueError, match=f"have D=64 but CLIP 'tiny' gives D={enc.dim}"):
        run_evaluate(EvaluateConfig(images=wrong_dim, output=str(inputs["root"] / "e2"), **cfg))
    other = table(inputs["root"] / "emb_other.parquet", enc.dim, "ViT-B-32", emb)
    with pytest.raises(ValueError, match="made with CLIP 'ViT-B-32', not 'tiny'"):
        run_evaluate(EvaluateConfig(images=other, output=str(inputs["root"] / "e3"), **cfg))
    assert not (inputs["root"] / "e2" / "summary.json").exists()
