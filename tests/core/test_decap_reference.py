"""The DeCap authors' decoder (dhg-wei/DeCap): a checkpoint in their layout imports with ``clipcap import-reference
--decap`` and our captioning paths give their inference's captions; CLIP's BPE tokenizer matches open_clip's;
our label-smoothed loss is theirs; the ``decap-reference`` preset carries their recipe.

The fixture holds our own re-implementation of their code: the ``DeCap`` module layout, their ``Decoding``
(greedy, no KV cache, stop at 49407, CLIP ``SimpleTokenizer.decode`` with the special tokens removed) and their
memory projection (``softmax(100 * sim) @ memory``, normalised before and after)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap_core.artifacts import load_model
from clipcap_core.captioner import Captioner
from clipcap_core.decoding import decode_config, generate
from clipcap_core.encoders import EncoderConfig
from clipcap_core.model import caption_loss
from clipcap_core.presets import PRESETS, RECIPES
from clipcap_core.reference import import_decap_checkpoint
from clipcap_core.tokenizer import CLIP_BPE, encode_caption, load_tokenizer
from clipcap_core.training import TrainConfig, collate, make_optimizer_and_scheduler, train_step
from pipelines.caption.stages import Decoder
from pipelines.cli import main as clipcap

D, E, SOT, EOT, CLIP_VOCAB = 128, 32, 49406, 49407, 49408
TINY = EncoderConfig(model_name="tiny")
CAPTIONS = ["A man riding a horse on a beach.", "two dogs, playing with a ball", "it's a cat's toy ...",
            "café naïve 東京 😀", "  a   red\tbus on the street  ", "a very long caption " + "with many words " * 8]


# ---- their code, re-implemented ---------------------------------------------------------------------------------
class _Project(nn.Module):
    """Their ``MLP((D, E))``: one Linear under ``model.0``."""

    def __init__(self, d: int, e: int):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(d, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class AuthorsDeCap(nn.Module):
    """Their ``DeCap``: ``clip_project`` (B, D) -> one prefix vector, then ``decoder`` (a GPT-2 LM)."""

    def __init__(self, config: GPT2Config, d: int):
        super().__init__()
        self.decoder = GPT2LMHeadModel(config)
        self.embedding_size = self.decoder.transformer.wte.weight.shape[1]
        self.clip_project = _Project(d, self.embedding_size)

    def forward(self, clip_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:  # -> logits (B, 1+T, V)
        text = self.decoder.transformer.wte(tokens)
        prefix = self.clip_project(clip_features).reshape(-1, 1, self.embedding_size)
        return self.decoder(inputs_embeds=torch.cat([prefix, text], dim=1)).logits


@torch.no_grad()
def authors_decoding(model: AuthorsDeCap, clip_features: torch.Tensor, bpe: SimpleTokenizer) -> str:
    """Their ``Decoding`` for one (1, D) input: greedy over the whole sequence each step, at most 30 tokens."""
    embeds = model.clip_project(clip_features).reshape(1, 1, -1)
    tokens: list[int] = []
    for _ in range(30):
        nxt = int(model.decoder(inputs_embeds=embeds).logits[0, -1].argmax())
        tokens.append(nxt)
        if nxt == EOT:
            break
        embeds = torch.cat((embeds, model.decoder.transformer.wte(torch.tensor([[nxt]]))), dim=1)
    try:
        text = bpe.decode(tokens)
    except KeyError:  # an id past CLIP's vocabulary: their bare except returns 'None'
        return "None"
    return text.replace("<start_of_text>", "").replace("<end_of_text>", "")  # open_clip's names of the specials


def authors_projection(image: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Their notebook: unit image features, softmax(100 * sim) over unit text features, weighted sum, unit."""
    text = memory / memory.norm(dim=-1, keepdim=True)
    image = image / image.norm(dim=-1, keepdim=True)
    prefix = (100 * image @ text.T).softmax(dim=-1) @ text
    return prefix / prefix.norm(dim=-1, keepdim=True)


# ---- fixtures ---------------------------------------------------------------------------------------------------
def _authors_model(seed: int = 0) -> AuthorsDeCap:
    """A tiny decoder of their layout (GPT-2's 50,257 rows, as theirs), wide init so greedy paths vary. The rows
    past CLIP's vocabulary are zero (never a training target, so never their argmax); end-of-text is made
    likelier so captions stop at different lengths."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=E, n_layer=2, n_head=4, initializer_range=0.3)
    model = AuthorsDeCap(config, D).eval()
    with torch.no_grad():
        wte = model.decoder.transformer.wte.weight
        wte[CLIP_VOCAB:] = 0.0
        wte[EOT] *= 1.6
        model.clip_project.model[0].weight *= 40.0  # unit inputs: a prefix as strong as the token embeddings
    return model


@pytest.fixture(scope="module")
def bpe() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def decap(tmp_path_factory):
    """(their model, image embeddings, memory, artifact dir): their checkpoint imported with the CLI."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("decap")
    theirs = _authors_model()
    state = dict(theirs.state_dict())
    for i in range(2):  # what transformers < 4.31 saved too
        state[f"decoder.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"decoder.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, root / "coco_prefix-009.pt")
    gen = torch.Generator().manual_seed(1)
    memory, images = torch.randn(40, D, generator=gen), torch.randn(16, D, generator=gen)
    _write_memory(root / "memory.parquet", memory.numpy())
    out = root / "artifact"
    assert clipcap(["import-reference", "--decap", str(root / "coco_prefix-009.pt"), "--output", str(out),
                    "--memory", str(root / "memory.parquet"), "--clip", "tiny"]) == 0
    return theirs, images, memory, out


def _write_memory(path, emb: np.ndarray) -> None:
    keys = [f"m{i}" for i in range(len(emb))]
    pq.write_table(pa.table({"key": keys, "caption": keys, "text_embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(emb.astype(np.float32).ravel()), emb.shape[1])}), path)


def _reference_captions(theirs: AuthorsDeCap, inputs: torch.Tensor, bpe: SimpleTokenizer) -> list[str]:
    return [authors_decoding(theirs, inputs[i: i + 1], bpe).strip() for i in range(inputs.shape[0])]


# ---- import + captioning ----------------------------------------------------------------------------------------
def test_imported_decoder_gives_the_authors_logits(decap):
    theirs, images, _, out = decap
    ours = load_model(str(out)).model
    unit = F.normalize(images, dim=-1)  # they always feed unit vectors; our mapping normalises its input
    tokens = torch.randint(0, CLIP_VOCAB, (images.shape[0], 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(unit, tokens)[:, :-1, :CLIP_VOCAB]
        torch.testing.assert_close(ours(images, tokens).logits, expected, rtol=1e-4, atol=1e-4)
    assert ours.config.mapping.kind == "linear" and ours.prefix_length == 1


def test_captions_equal_the_authors_inference_through_every_path(decap, bpe):
    theirs, images, memory, out = decap
    expected = _reference_captions(theirs, authors_projection(images, memory), bpe)
    assert "None" not in expected
    lengths = {len(t.split()) for t in expected}
    assert len(lengths) > 2, expected  # captions stop at different lengths: the stop rule is exercised
    assert len({t.split()[0] for t in expected if t}) > 4, expected  # the prefix steers the caption
    assert Captioner.from_pretrained(str(out)).caption(embeddings=images.numpy()) == expected
    texts, _ = Decoder(str(out), decode_config("greedy"))(images.numpy())  # the bulk caption actors' decoder
    assert [t[0] for t in texts] == expected
    loaded = load_model(str(out))
    projected = loaded.decap.project(images.numpy())
    uncached = generate(loaded.model, projected, loaded.tokenizer, "greedy", use_cache=False)
    assert uncached.texts == expected


def test_without_a_stored_memory_the_table_is_given_at_caption_time(decap, bpe, tmp_path):
    from clipcap_core.decap import ProjectionConfig

    theirs, images, memory, out = decap
    bare = tmp_path / "bare"
    import_decap_checkpoint(str(out.parent / "coco_prefix-009.pt"), str(bare), encoder=TINY)
    assert load_model(str(bare)).decap is None
    projection = ProjectionConfig(mode="memory", memory=str(out.parent / "memory.parquet"))
    captioner = Captioner.from_pretrained(str(bare), projection=projection)
    expected = _reference_captions(theirs, authors_projection(images, memory), bpe)
    assert captioner.caption(embeddings=images.numpy()) == expected
    raw = Captioner.from_pretrained(str(bare)).caption(embeddings=images.numpy())  # no memory: raw embeddings
    assert raw == _reference_captions(theirs, F.normalize(images, dim=-1), bpe)


def test_bad_decap_checkpoints_and_flags_fail_clearly(decap, tmp_path):
    theirs, _, _, out = decap
    state = dict(theirs.state_dict())
    torch.save({k: v for k, v in state.items() if not k.startswith("clip_project.")}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="not a DeCap checkpoint"):
        import_decap_checkpoint(str(tmp_path / "a.pt"), str(tmp_path / "x"), encoder=TINY)
    torch.save({k: v for k, v in state.items() if ".h.1." not in k or "ln_2" not in k}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"missing \['decoder.transformer.h.1.ln_2"):
        import_decap_checkpoint(str(tmp_path / "b.pt"), str(tmp_path / "x"), encoder=TINY)
    torch.save({**state, "clip_project.model.2.weight": torch.zeros(1)}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="unexpected"):
        import_decap_checkpoint(str(tmp_path / "c.pt"), str(tmp_path / "x"), encoder=TINY)
    ckpt = str(out.parent / "coco_prefix-009.pt")
    assert clipcap(["import-reference", "--decap", ckpt, "--output", str(tmp_path / "y"), "--mapping", "mlp"]) != 0
    assert clipcap(["import-reference", ckpt, "--output", str(tmp_path / "y")]) != 0  # ClipCap needs --mapping...
    assert not (tmp_path / "y").exists()


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def test_clip_bpe_tokenizer_is_open_clips_vocabulary(bpe, tmp_path):
    tok = load_tokenizer(CLIP_BPE)
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (CLIP_VOCAB, SOT, EOT, EOT)
    for caption in CAPTIONS:
        assert tok.encode(caption, add_special_tokens=False) == bpe.encode(caption), caption
    ids = encode_caption(tok, CAPTIONS[-1], 20)  # as clip.tokenize(caption)[0][:20], end-of-text kept last
    assert ids[0] == SOT and ids[-1] == EOT and len(ids) == 20 and ids[1:-1] == bpe.encode(CAPTIONS[-1])[:18]
    assert encode_caption(tok, CAPTIONS[0], 20) == [SOT, *bpe.encode(CAPTIONS[0]), EOT]
    rng = np.random.default_rng(0)
    for _ in range(200):  # any ids, specials anywhere: the text their decode gives, stripped
        row = rng.integers(0, CLIP_VOCAB, size=int(rng.integers(1, 30))).tolist()
        theirs = bpe.decode(row).replace("<start_of_text>", "").replace("<end_of_text>", "").strip()
        assert tok.decode(row, skip_special_tokens=True).strip() == theirs
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert again.encode(CAPTIONS[1], add_special_tokens=False) == bpe.encode(CAPTIONS[1])
    assert again.decode(bpe.encode("a dog .")) == "a dog ."  # no ' .' clean-up: their text keeps the space


# ---- training -------------------------------------------------------------------------------------------------------
def test_label_smoothing_is_the_authors_loss(decap):
    """Our model's loss with label smoothing 0.1 equals their ``CrossEntropyLoss(ignore_index=0,
    label_smoothing=0.1)`` on their forward, captions as ``clip.tokenize(c)[0][:20]`` (0-padded)."""
    theirs, images, _, out = decap
    ours, tok = load_model(str(out)).model, load_tokenizer(CLIP_BPE)
    captions = CAPTIONS  # ("!" is token 0: they never learn it, we do; none here)
    batch = collate(tok, captions, images[: len(captions)].numpy(), 20)
    padded = (batch.tokens * batch.mask.long())  # their padding is 0, ignored by ignore_index=0
    with torch.no_grad():
        logits = theirs(F.normalize(batch.embeds, dim=-1), padded)[:, :-1, :CLIP_VOCAB]
        expected = F.cross_entropy(logits.flatten(0, 1), padded.flatten(), ignore_index=0, label_smoothing=0.1)
        got = ours(batch.embeds, batch.tokens, batch.mask, label_smoothing=0.1).loss
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        plain = ours(batch.embeds, batch.tokens, batch.mask).loss  # default: no smoothing
        torch.testing.assert_close(plain, F.cross_entropy(logits.flatten(0, 1), padded.flatten(), ignore_index=0),
                                   rtol=1e-5, atol=1e-5)


def test_caption_loss_smoothing_matches_torch_on_masked_tokens():
    gen = torch.Generator().manual_seed(3)
    logits, tokens = torch.randn(3, 6, 11, generator=gen), torch.randint(0, 11, (3, 6), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    targets = tokens.masked_fill(mask == 0, -100)
    for eps in (0.0, 0.1, 0.5):
        expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=eps)
        torch.testing.assert_close(caption_loss(logits, tokens, mask, eps), expected)


def test_decap_reference_preset_carries_the_authors_recipe():
    cfg, recipe = PRESETS["decap-reference"], RECIPES["decap-reference"]
    assert (cfg.mapping.kind, cfg.mapping.prefix_length, cfg.mapping.normalize_prefix) == ("linear", 1, True)
    assert cfg.tokenizer == CLIP_BPE and cfg.clip_dim == 512 and cfg.encoder.model_name == "ViT-B-32"
    assert {k: cfg.lm.config[k] for k in ("n_layer", "n_head", "n_embd")} == {"n_layer": 4, "n_head": 4, "n_embd": 768}
    assert not cfg.lm.freeze and cfg.lm.config is not None  # trained from scratch: no GPT-2 weights needed
    assert (recipe.lr, recipe.warmup_steps, recipe.batch_size, recipe.epochs) == (1e-5, 1000, 64, 10)
    assert (recipe.max_caption_tokens, recipe.label_smoothing, recipe.weight_decay) == (20, 0.1, 0.0)
    assert TrainConfig().with_recipe(recipe).label_smoothing == 0.1
    assert TrainConfig(label_smoothing=0.0).with_recipe(recipe).label_smoothing == 0.0  # a flag wins
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)


def test_train_step_uses_the_recipes_label_smoothing(decap):
    _, images, _, out = decap
    loaded = load_model(str(out))
    batch = collate(loaded.tokenizer, CAPTIONS[:3], images[:3].numpy(), 20)
    cfg = TrainConfig(lr=1e-9, warmup_steps=0, batch_size=3, epochs=1, grad_clip=None).with_recipe(
        RECIPES["decap-reference"])
    model = loaded.model.eval()
    with torch.no_grad():
        smoothed = model(batch.embeds, batch.tokens, batch.mask, label_smoothing=0.1).loss
    for m in model.modules():  # no dropout: the step's loss is the eval loss
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    optimizer, scheduler = make_optimizer_and_scheduler(model, cfg, total_steps=1)
    assert train_step(model, batch, optimizer, scheduler, cfg) == pytest.approx(float(smoothed), rel=1e-5)


def test_a_decoder_trained_on_clip_bpe_emits_start_of_text_first_and_captions_without_it():
    """Trained like the authors (start token first in every target), the decoder's first greedy token is the start
    token, as in their inference; our caption text drops it, as their ``replace`` does."""
    from clipcap_core.model import LMConfig, MappingConfig, ModelConfig, build_model
    from clipcap_core.training import train_loop

    tok = load_tokenizer(CLIP_BPE)
    lm = {"n_layer": 1, "n_head": 4, "n_embd": 32, "n_positions": 32, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
          "attn_pdrop": 0.0}
    cfg = ModelConfig(clip_dim=16, mapping=MappingConfig(kind="linear", prefix_length=1, normalize_prefix=True),
                      lm=LMConfig(name_or_path="decap-decoder", config=lm), tokenizer=CLIP_BPE, encoder=TINY)
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    captions = CAPTIONS[:4]
    embeds = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    train_cfg = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=4, epochs=150, max_caption_tokens=20,
                            label_smoothing=0.1)
    train_loop(model, lambda epoch: [collate(tok, captions, embeds, 20)], train_cfg)
    gen = generate(model, embeds, tok, "greedy")
    assert [ids[0] for ids in gen.token_ids] == [SOT] * 4
    assert gen.texts == [tok.decode(tok.encode(c, add_special_tokens=False)) for c in captions]
