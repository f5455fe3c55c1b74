"""The Python API and the ``clipcap caption-images`` command: embeddings or images (PIL, path, bytes) in, one
caption (or n) per input out."""

from __future__ import annotations

import io

import numpy as np
import pytest

from clipcap_core import synthetic
from clipcap_core.artifacts import save_model
from clipcap_core.captioner import Captioner
from clipcap_core.decap import DecapMemory
from clipcap_core.decoding import generate
from pipelines.cli import main as clipcap
from tests.core.core_helpers import one_thread, synthetic_embeddings, trained_tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, tok = trained_tiny()
    uri = str(tmp_path_factory.mktemp("art") / "tiny-trained")
    save_model(model, tok, uri)
    return uri


def test_caption_embeddings_one_or_n_per_input(artifact):
    cap = Captioner.from_pretrained(artifact)
    truth, x = synthetic_embeddings(20, start=70_000)
    out = cap.caption(embeddings=x)
    assert isinstance(out, list) and all(isinstance(t, str) for t in out)
    assert sum(o == t for o, t in zip(out, truth, strict=True)) >= 18  # the trained model is right
    beams = cap.caption(embeddings=x[:3], strategy="beam", beam_size=4, n=3)
    assert len(beams) == 3 and all(len(b) == 3 and len(set(b)) == 3 for b in beams)
    assert [b[0] for b in beams] == out[:3]  # the best beam is the greedy caption on this model
    rich = cap.generate(embeddings=x[:2], strategy="sample", n=2, seed=1)
    assert len(rich.texts) == 4 and rich.scores.shape == (4,) and len(rich.token_ids) == 4


def test_caption_images_pil_path_and_bytes(tmp_path):
    samples = list(synthetic.generate(3, seed=11))
    path = tmp_path / "img.png"
    samples[1].image.save(path)
    buf = io.BytesIO()
    samples[2].image.save(buf, format="JPEG")
    cap = Captioner.from_pretrained("tiny")  # untrained: wiring only
    out = cap.caption(images=[samples[0].image, str(path), buf.getvalue()], max_length=5)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    emb = cap.embed_images([samples[0].image])
    assert emb.shape == (1, 128) and emb.dtype == np.float32
    assert cap.caption(embeddings=emb, max_length=5) == out[:1]


def test_bad_inputs_fail_clearly(artifact):
    cap = Captioner.from_pretrained(artifact)
    with pytest.raises(ValueError, match="exactly one"):
        cap.caption()
    with pytest.raises(ValueError, match=r"\(N, 128\)"):
        cap.caption(embeddings=np.zeros((2, 64), np.float32))


def test_decap_artifact_projects_onto_its_memory(tmp_path):
    model, tok = trained_tiny()
    caps, memory = synthetic_embeddings(40, start=30_000, noise=0.0)
    save_model(model, tok, str(tmp_path / "decap"), decap=DecapMemory(memory, tau=0.001))
    cap = Captioner.from_pretrained(str(tmp_path / "decap"))
    query = memory[:5] + 0.01 * np.random.default_rng(0).normal(size=memory[:5].shape).astype(np.float32)
    projected = DecapMemory(memory, tau=0.001).project(query)
    assert cap.caption(embeddings=query) == generate(model, projected, tok).texts


def test_caption_images_command(artifact, tmp_path, capsys):
    paths = []
    for i, s in enumerate(synthetic.generate(2, seed=5)):
        paths.append(str(tmp_path / f"{i}.png"))
        s.image.save(paths[-1])
    assert clipcap(["caption-images", *paths, "--model", "tiny", "--allow-untrained", "--max-length", "4",
                    "--scores"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    assert all(len(line.split("\t")) == 3 for line in lines)
    assert clipcap(["caption-images", paths[0], "--model", str(tmp_path / "nope")]) == 2
    assert "no model artifact" in capsys.readouterr().err
