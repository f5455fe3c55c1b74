"""Released-checkpoint compatibility: a state dict in the authors' layout (clip_project.*, gpt.*, legacy
attention buffers) imports into our artifact with identical logits, and our greedy (stop '.') / reference-beam
give the authors' generate2 / generate_beam captions; bad checkpoints fail clearly; nothing is unpickled."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from transformers import GPT2LMHeadModel

from benchmarks.authors_clipcap import AuthorsClipCap, export_reference_state_dict, generate2, generate_beam
from clipcap_core.artifacts import LM, load_model
from clipcap_core.decoding import generate
from clipcap_core.model import LMConfig, MappingConfig, ModelConfig, build_model
from clipcap_core.reference import LEGACY_BUFFERS, import_reference_checkpoint
from clipcap_core.tokenizer import build_word_tokenizer
from pipelines.cli import main as clipcap
from tests.core.core_helpers import sharp_model


def _write_reference(model, tmp_path, tok):
    """The checkpoint file, a config-only LM directory and a tokenizer directory, as a user would have them."""
    ckpt = tmp_path / "reference.pt"
    torch.save(export_reference_state_dict(model, legacy_buffers=True), ckpt)
    model.lm.config.save_pretrained(tmp_path / "lm-config")  # config.json only: weights come from the ckpt
    tok.save_pretrained(tmp_path / "tokenizer")
    return ckpt


def _authors_model(model, ckpt):
    """Their model layout, loaded strictly from the checkpoint (as their code would, minus the ``attn.bias`` /
    ``attn.masked_bias`` buffers, which current transformers does not register)."""
    with torch.device("meta"):  # every weight comes from the checkpoint: skip the random init
        gpt = GPT2LMHeadModel(model.lm.config)
    theirs = AuthorsClipCap(gpt, model.config.mapping, model.config.clip_dim)
    state = torch.load(ckpt, weights_only=True)
    assert any(LEGACY_BUFFERS.match(k) for k in state)
    theirs.load_state_dict({k: v for k, v in state.items() if not LEGACY_BUFFERS.match(k)}, strict=True, assign=True)
    theirs.gpt.tie_weights()
    assert not any(p.is_meta for p in theirs.parameters())
    return theirs.eval()


def _check_compatible(model, tok, tmp_path, x, max_length, flags, stop_token):
    ckpt = _write_reference(model, tmp_path, tok)
    out = tmp_path / "artifact"
    assert clipcap(["import-reference", str(ckpt), "--output", str(out), *flags, "--lm", str(tmp_path / "lm-config"),
                    "--tokenizer", str(tmp_path / "tokenizer")]) == 0
    assert (out / LM).exists()  # the checkpoint carried the LM and no base weights were given: saved
    imported = load_model(str(out)).model
    theirs = _authors_model(model, ckpt)
    # the authors normalise CLIP embeddings in their data pipeline, not in the model
    x_theirs = torch.nn.functional.normalize(x, dim=-1) if model.config.mapping.normalize_prefix else x
    tokens = torch.randint(0, len(tok), (x.shape[0], 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits = imported(x, tokens).logits
        torch.testing.assert_close(ours_logits, model(x, tokens).logits, rtol=0, atol=0)  # same weights
        k = model.config.mapping.prefix_length
        torch.testing.assert_close(ours_logits, theirs(tokens, x_theirs)[:, k - 1: -1], rtol=1e-4, atol=1e-4)
    greedy = generate(imported, x, tok, "greedy", max_length=max_length, stop_token=stop_token, stop_at_eos=False)
    beam = generate(imported, x, tok, "reference-beam", max_length=max_length, stop_token=stop_token,
                    stop_at_eos=False)
    for i in range(x.shape[0]):
        with torch.no_grad():
            prefix = theirs.clip_project(x_theirs[i: i + 1]).reshape(1, k, -1)
        assert tok.decode(greedy.token_ids[i]) == generate2(theirs, tok, embed=prefix, entry_length=max_length,
                                                             stop_token=stop_token)
        assert tok.decode(beam.token_ids[i]) == generate_beam(theirs, tok, embed=prefix, entry_length=max_length,
                                                              stop_token=stop_token)[0]
    return greedy


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_tiny_reference_checkpoint_imports_with_identical_outputs(tmp_path, kind):
    torch.set_num_threads(1)
    model, tok = sharp_model(kind)
    if kind == "transformer":  # the authors' mapper always has 8 heads
        model, tok = _with_mapping(model, tok, MappingConfig(kind="transformer", prefix_length=4, clip_length=4,
                                                             num_layers=2, num_heads=8, normalize_prefix=True))
    m = model.config.mapping
    flags = ["--mapping", kind, "--prefix-length", str(m.prefix_length), "--clip-dim", "128", "--clip", "tiny"]
    if kind == "transformer":
        flags += ["--clip-length", str(m.clip_length), "--num-layers", str(m.num_layers), "--normalize-prefix"]
    x = 3 * torch.randn(12, 128, generator=torch.Generator().manual_seed(1))
    greedy = _check_compatible(model, tok, tmp_path, x, 12, flags, ".")
    assert any(t.endswith(".") for t in greedy.texts)  # the stopping rule was exercised


def _with_mapping(model, tok, mapping):
    from clipcap_core.configs import replace

    cfg = replace(model.config, mapping=mapping)
    torch.manual_seed(4)
    return build_model(cfg, tok, lm=model.lm).eval(), tok


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_gpt2_small_sized_reference_checkpoint(tmp_path, kind):
    """Full GPT-2-small size (124M, random): MLP k=10 D=512, or transformer k=40 clip_length=40 8 layers D=640
    with a normalised prefix, as in the released checkpoints."""
    torch.set_num_threads(1)  # robust on a shared CPU; the matrices here gain little from a second thread
    tok = build_word_tokenizer(words=[f"w{i}" for i in range(50254)] + ["."])  # GPT-2-sized vocabulary
    if kind == "mlp":
        mapping, D = MappingConfig(kind="mlp", prefix_length=10), 512
        flags = ["--mapping", "mlp", "--prefix-length", "10", "--clip-dim", "512"]
    else:
        mapping, D = MappingConfig(kind="transformer", prefix_length=40, clip_length=40, num_layers=8,
                                   normalize_prefix=True), 640
        flags = ["--mapping", "transformer", "--prefix-length", "40", "--clip-length", "40", "--num-layers", "8",
                 "--clip-dim", "640", "--normalize-prefix"]
    cfg = ModelConfig(clip_dim=D, mapping=mapping, lm=LMConfig(name_or_path="gpt2-random", config={}, seed=1))
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    x = torch.randn(2 if kind == "mlp" else 1, D, generator=torch.Generator().manual_seed(2))
    # stop at a token that greedy decoding really produces mid-caption, so that stopping is exercised
    free = generate(model, x, tok, "greedy", max_length=6, stop_at_eos=False).token_ids[0]
    stop = tok.decode([next(t for j, t in enumerate(free[:5]) if j >= 1 and t not in free[:j])])
    greedy = _check_compatible(model, tok, tmp_path, x, 6, flags, stop)
    assert greedy.texts[0].endswith(stop) and len(greedy.token_ids[0]) < 6


def test_unchanged_base_lm_is_referenced_not_copied(tmp_path):
    model, tok = sharp_model("mlp")
    base = tmp_path / "base-lm"
    model.lm.save_pretrained(base)  # the base LM, with weights, equal to the checkpoint's gpt.*
    tok.save_pretrained(tmp_path / "tok")
    torch.save(export_reference_state_dict(model), tmp_path / "ckpt.pt")
    result = import_reference_checkpoint(str(tmp_path / "ckpt.pt"), str(tmp_path / "out"), model.config.mapping,
                                         128, lm=str(base), tokenizer=str(tmp_path / "tok"),
                                         encoder=model.config.encoder)
    assert not result.lm_saved and result.config.lm.freeze
    assert not (tmp_path / "out" / LM).exists()
    x = torch.randn(3, 128)
    loaded = load_model(str(tmp_path / "out"))
    assert generate(loaded.model, x, tok).texts == generate(model, x, tok).texts


def _import(tmp_path, state, **kw):
    torch.save(state, tmp_path / "bad.pt")
    model, tok = sharp_model("mlp")
    model.lm.config.save_pretrained(tmp_path / "cfg")
    tok.save_pretrained(tmp_path / "tok")
    mapping = kw.pop("mapping", model.config.mapping)
    return import_reference_checkpoint(str(tmp_path / "bad.pt"), str(tmp_path / "out"), mapping,
                                       kw.pop("clip_dim", 128), lm=str(tmp_path / "cfg"),
                                       tokenizer=str(tmp_path / "tok"), encoder=model.config.encoder)


def test_wrong_shape_missing_key_and_wrong_mapping_fail_clearly(tmp_path):
    model, _ = sharp_model("mlp")
    state = export_reference_state_dict(model)
    with pytest.raises(ValueError, match=r"--clip-dim 100.*wrong shapes.*clip_project\.model\.0\.weight"):
        _import(tmp_path, state, clip_dim=100)
    with pytest.raises(ValueError, match=r"--prefix-length 5"):
        _import(tmp_path, state, mapping=MappingConfig(kind="mlp", prefix_length=5))
    missing = {k: v for k, v in state.items() if k != "clip_project.model.2.bias"}
    with pytest.raises(ValueError, match=r"missing \['clip_project\.model\.2\.bias'\]"):
        _import(tmp_path, missing)
    no_lm_layer = {k: v for k, v in state.items() if not k.startswith("gpt.transformer.h.1.mlp")}
    with pytest.raises(ValueError, match=r"LM weights.*missing.*gpt\.transformer\.h\.1\.mlp"):
        _import(tmp_path, no_lm_layer)
    with pytest.raises(ValueError, match="wrong mapping type"):
        _import(tmp_path, state, mapping=MappingConfig(kind="transformer", prefix_length=4, clip_length=4))
    with pytest.raises(ValueError, match="unexpected keys"):
        _import(tmp_path, {**state, "optimizer.step": torch.tensor(1)})
    with pytest.raises(ValueError, match="8 heads"):
        _import(tmp_path, state, mapping=MappingConfig(kind="transformer", num_heads=4))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARK']}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_never_runs(tmp_path, monkeypatch, capsys):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"clip_project.model.0.weight": _Evil()}, f)
    code = clipcap(["import-reference", str(tmp_path / "evil.pt"), "--output", str(tmp_path / "out"), "--mapping", "mlp",
                    "--prefix-length", "4", "--clip-dim", "128"])
    assert code == 2 and "weights-only" in capsys.readouterr().err
    assert not mark.exists()
