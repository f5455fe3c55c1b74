"""clipcap_core.encoders: tiny preset, loading by file / object-store URI, validation, informativeness."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from clipcap_core import encoders, synthetic
from clipcap_core.encoders import (
    EncoderConfig,
    embedding_dim,
    encoder_tag,
    load_encoder,
    preprocess_spec,
    resolve_precision,
    validate_config,
)


@pytest.fixture(scope="module")
def tiny():
    return load_encoder(EncoderConfig())


@pytest.fixture(scope="module")
def images():
    return [s.image for s in synthetic.generate(8, seed=3)]


def _weights_digest(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def test_tiny_shapes_and_dim_read_from_model(tiny, images):
    assert tiny.dim == embedding_dim(EncoderConfig()) == tiny.model.visual.output_dim
    x = torch.stack([tiny.preprocess(im) for im in images])
    assert x.shape == (8, 3, 64, 64)
    e = tiny.encode_images(x)
    t = tiny.encode_text([synthetic.caption_for(s.attributes) for s in synthetic.generate(3)])
    assert e.dtype == np.float32 and e.shape == (8, tiny.dim) and np.isfinite(e).all()
    assert t.dtype == np.float32 and t.shape == (3, tiny.dim) and np.isfinite(t).all()
    assert tiny.tag == "tiny" and tiny.model_name == "tiny" and tiny.pretrained is None


def test_split_preprocessing_matches_full_transform(tiny, images):
    full = tiny.encode_images(torch.stack([tiny.preprocess(im) for im in images]))
    pixels = np.stack([tiny.resize(im) for im in images])
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 64, 64, 3)
    np.testing.assert_allclose(tiny.encode_pixels(pixels), full, rtol=1e-5, atol=1e-5)
    assert preprocess_spec(EncoderConfig()) == tiny.spec  # derived without building the model


def test_tiny_weights_identical_in_every_process(tiny):
    code = ("from clipcap_core.encoders import EncoderConfig; from clipcap_core.encoders import load_encoder; "
            "m = load_encoder(EncoderConfig()).model; "
            "print(repr(float(sum(p.double().abs().sum() for p in m.parameters()))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) == _weights_digest(tiny.model)
    torch.manual_seed(999)  # the caller's RNG state does not change the preset either
    assert _weights_digest(load_encoder(EncoderConfig()).model) == _weights_digest(tiny.model)


def _save_perturbed(tiny, path) -> None:
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in tiny.model.state_dict().items()}
    torch.save(state, path)


def test_load_from_local_file_and_s3_uri(tiny, images, tmp_path, s3_uri):
    import fsspec

    ckpt = tmp_path / "tiny-tuned.pt"
    torch.manual_seed(0)
    _save_perturbed(tiny, ckpt)
    x = torch.stack([tiny.preprocess(im) for im in images])
    local = load_encoder(EncoderConfig(model_name="tiny", pretrained=str(ckpt)))
    assert local.tag == "tiny-tiny-tuned"
    e_local = local.encode_images(x)
    assert not np.allclose(e_local, tiny.encode_images(x))  # the checkpoint was loaded, not the seeded init
    uri = f"{s3_uri}/weights/tiny-tuned.pt"
    with fsspec.open(uri, "wb") as f:
        f.write(ckpt.read_bytes())
    remote = load_encoder(EncoderConfig(model_name="tiny", pretrained=uri))
    np.testing.assert_allclose(remote.encode_images(x), e_local, rtol=1e-6, atol=1e-6)


def test_validation_fails_before_work(s3_uri, tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP model name 'ViT-Q-99'"):
        load_encoder(EncoderConfig(model_name="ViT-Q-99"))
    with pytest.raises(ValueError, match="neither a known tag"):
        validate_config(EncoderConfig(model_name="ViT-B-32", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="not found"):
        validate_config(EncoderConfig(model_name="tiny", pretrained=f"{s3_uri}/nope.pt"))
    validate_config(EncoderConfig(model_name="ViT-B-32", pretrained="openai"))  # a known tag: fine, no download


def test_tags_and_precision():
    assert encoder_tag(EncoderConfig(model_name="ViT-B-32", pretrained="openai")) == "ViT-B-32-openai"
    assert encoder_tag(EncoderConfig(model_name="ViT-B-32", pretrained="s3://b/w/my.ckpt.pt")) == "ViT-B-32-my"
    assert encoder_tag(EncoderConfig(model_name="ViT-B-32")) == "ViT-B-32"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_bf16_autocast_on_cpu(tiny, images):
    bf16 = load_encoder(EncoderConfig(), precision="bf16")
    x = torch.stack([tiny.preprocess(im) for im in images])
    e32, e16 = tiny.encode_images(x), bf16.encode_images(x)
    assert e16.dtype == np.float32
    cos = (e32 * e16).sum(1) / np.linalg.norm(e32, axis=1) / np.linalg.norm(e16, axis=1)
    assert cos.min() > 0.98


def _ridge_accuracy(x: np.ndarray, labels: list, n_train: int, lam: float = 1.0) -> float:
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    x = np.hstack([x, np.ones((len(x), 1))])
    classes = sorted(set(labels))
    y = np.eye(len(classes))[[classes.index(v) for v in labels]]
    w = np.linalg.solve(x[:n_train].T @ x[:n_train] + lam * np.eye(x.shape[1]), x[:n_train].T @ y[:n_train])
    return float((np.argmax(x[n_train:] @ w, 1) == np.argmax(y[n_train:], 1)).mean())


def test_tiny_embeddings_are_informative(tiny):
    """A linear probe reads every caption attribute off embeddings of the shipped, trained tiny CLIP."""
    samples = list(synthetic.generate(450, seed=11))
    pixels = np.stack([tiny.resize(s.image) for s in samples])
    emb = np.concatenate([tiny.encode_pixels(pixels[i:i + 100]) for i in range(0, len(pixels), 100)])
    # measured (300 train / 150 test): count .73, size .98, colour .97, shape .55, position .97; chance .5-.17
    floor = {"count": 0.6, "size": 0.9, "color": 0.85, "shape": 0.45, "position": 0.85}
    acc = {a: _ridge_accuracy(emb, [getattr(s.attributes, a) for s in samples], 300) for a in floor}
    assert all(acc[a] >= floor[a] for a in floor), acc


def test_loaded_weights_are_exactly_the_checkpoint_and_init_is_restored(tmp_path):
    """Loading with a checkpoint skips the random init (start-up): every tensor must still be the file's, a
    checkpoint missing a parameter must fail, and torch.nn.init must work again afterwards."""
    import open_clip

    torch.manual_seed(5)
    ref = open_clip.create_model("ViT-B-32")
    ckpt = tmp_path / "vitb32.pt"
    torch.save(ref.state_dict(), ckpt)
    enc = load_encoder(EncoderConfig(model_name="ViT-B-32", pretrained=str(ckpt)))
    got, want = enc.model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    w = torch.empty(64, 64)
    torch.nn.init.normal_(w)
    assert float(w.std()) > 0.5  # the real init again, not the no-op
    partial = dict(want)
    partial.pop("visual.proj")
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="visual.proj"):
        load_encoder(EncoderConfig(model_name="ViT-B-32", pretrained=str(tmp_path / "partial.pt")))
    w = torch.empty(64, 64)
    torch.nn.init.normal_(w)  # restored after a failed load too
    assert float(w.std()) > 0.5


def test_config_side_reads_what_open_clip_reads():
    """The torch-free config side (model list, D, preprocessing) equals open_clip's own answers for every model
    it ships and ours; a drift in open_clip's defaults or config layout fails here, not in a job."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    from clipcap_core.imaging import spec_from_dict

    oc = encoders._open_clip()
    assert encoders.OPEN_CLIP_PREPROCESS == asdict(PreprocessCfg())
    assert encoders.available_models() == oc.list_models()
    for name in oc.list_models():
        cfg = EncoderConfig(model_name=name, pretrained="/weights/model.pt")
        assert embedding_dim(cfg) == int(oc.get_model_config(name)["embed_dim"]), name
        want = dict(asdict(PreprocessCfg()), size=oc.get_model_config(name)["vision_cfg"]["image_size"])
        assert preprocess_spec(cfg) == spec_from_dict(want), name
    # a hub tag's own preprocessing still comes from open_clip's registry (here: a non-default mean/std)
    tag = next((m, t) for m, t in oc.list_pretrained() if oc.get_pretrained_cfg(m, t).get("mean") not in
               (None, PreprocessCfg().mean))
    assert preprocess_spec(EncoderConfig(model_name=tag[0], pretrained=tag[1])).mean == tuple(
        oc.get_pretrained_cfg(*tag)["mean"])
