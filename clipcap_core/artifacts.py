"""Model artifacts: a directory at any fsspec URI that fully describes a model. ``config.json`` is written
last (a half-uploaded artifact fails to load clearly); weights are safetensors (a frozen pretrained LM is
referenced, never re-saved); loading never unpickles, and config.json is as untrusted as the rest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

import clipcap_core
from clipcap_core.configs import from_dict, strict_json, to_dict
from clipcap_core.decap import DecapMemory
from clipcap_core.encoders import describe_weights
from clipcap_core.model import ClipCapModel, Mapping, ModelConfig, build_model, load_pretrained_lm
from clipcap_core.presets import PRESETS, preset_config
from clipcap_core.tokenizer import load_tokenizer
from clipcap_core.uris import exists, local_copy, safe_join, upload_dir

SCHEMA_VERSION = 1
CONFIG, MAPPING, LM, TOKENIZER, METRICS, CARD = ("config.json", "mapping.safetensors", "lm.safetensors",
                                                  "tokenizer", "metrics.json", "README.md")
DECAP = "decap.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: ClipCapModel
    tokenizer: PreTrainedTokenizerBase
    config: ModelConfig
    metadata: dict[str, Any] = field(default_factory=dict)  # config.json minus the model config
    decap: DecapMemory | None = None


def save_model(model: ClipCapModel, tokenizer: PreTrainedTokenizerBase, uri: str,
               metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
               decap: DecapMemory | None = None) -> None:
    """Write the artifact of ``model`` to ``uri``; ``extra``: more config.json entries."""
    cfg = model.config
    check_finite(model.state_dict(), "model")
    if decap is not None:
        check_finite(decap.state()[0], "DeCap memory")
    with tempfile.TemporaryDirectory(prefix="clipcap-artifact-") as tmp:
        root = Path(tmp)
        save_file(_cpu_state(model.mapping), str(root / MAPPING), metadata={"format": "pt"})
        lm_config = None
        if not cfg.lm.freeze or cfg.lm.config is not None:  # a frozen pretrained LM is referenced, not saved
            save_file(_cpu_state(model.lm), str(root / LM), metadata={"format": "pt"})
            lm_config = model.lm.config.to_dict()
        tokenizer.save_pretrained(str(root / TOKENIZER))
        if decap is not None:
            tensors, info = decap.state()
            save_file(tensors, str(root / DECAP), metadata=info)
        (root / METRICS).write_text(strict_json(metrics or {}))
        meta = {
            "schema_version": SCHEMA_VERSION,
            "code_version": clipcap_core.__version__,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": to_dict(cfg),
            "weights": {"mapping": MAPPING, "lm": LM if lm_config else None, "tokenizer": TOKENIZER,
                        "decap": DECAP if decap is not None else None},
            "lm_config": lm_config,
            **(extra or {}),
        }
        (root / CARD).write_text(_model_card(meta, metrics or {}))
        upload_dir(root, uri)  # config.json is not there yet: it goes last
        with fsspec.open(f"{uri.rstrip('/')}/{CONFIG}", "w") as f:
            f.write(strict_json(meta))


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to save weights with a NaN or infinite value: such a model captions nothing and looks fine."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"refusing to save a {what} with non-finite weights: {bad[:5]}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


def _distinct_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s tensors by name, a tensor listed under several names (a tied weight) under its first only."""
    seen: set[int] = set()
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in _distinct_state(module).items()}


def _model_card(meta: dict[str, Any], metrics: dict[str, Any]) -> str:
    m = meta["model"]
    train = (meta.get("training") or {}).get("train") or {}
    lines = [
        "# ClipCap model", "",
        f"- created: {meta['created_at']} with clipcap-pipeline {meta['code_version']} (schema {meta['schema_version']})",
        f"- CLIP encoder: {describe_weights(m['encoder']['model_name'], m['encoder']['pretrained'])} "
        f"(D = {m['clip_dim']})",
        f"- mapping: {m['mapping']['kind']}, prefix length {m['mapping']['prefix_length']}",
        f"- language model: {m['lm']['name_or_path']} ({'frozen' if m['lm']['freeze'] else 'fine-tuned'}; "
        f"weights {'in lm.safetensors' if meta['weights']['lm'] else 'from the base model'})",
        "", "## Metrics", "",
        *(f"- {k}: {v}" for k, v in sorted(metrics.items())),
        *([] if metrics else ["- none recorded (no held-out evaluation ran); `clipcap evaluate` scores a caption run"]),
        *(["", "## Training recipe", "", *(f"- {k}: {v}" for k, v in sorted(train.items()))] if train else []),
        "", "## Use", "", "```python", "from clipcap_core.captioner import Captioner",
        "captioner = Captioner.from_pretrained('<this directory or URI>')",
        "captioner.caption(images=['photo.jpg'])", "```", "",
    ]
    return "\n".join(lines)


def read_metadata(uri: str) -> dict[str, Any]:
    """config.json of the artifact at ``uri`` (a clear error when it is not an artifact)."""
    path = f"{str(uri).rstrip('/')}/{CONFIG}"
    try:
        with fsspec.open(path, "r") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no model artifact at {uri} ({CONFIG} missing)") from None
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"artifact {uri} has schema version {version}; this code reads {SCHEMA_VERSION}")
    return meta


_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                   "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 << 20
# float dtype -> (unsigned view, exponent mask): a value is NaN or infinite exactly when its exponent bits are all set
_ST_EXPONENT = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
                "F64": (np.uint64, 0x7FF0000000000000)}


def weight_files(meta: dict[str, Any]) -> list[str]:
    """The safetensors files an artifact's config.json says it holds."""
    return [name for key, name in sorted(meta["weights"].items()) if key != "tokenizer" and name]


def _check_safetensors(f: Any, size: int) -> dict[str, Any]:
    """The header (``__metadata__`` dropped) once it parses and every tensor's byte range fits its dtype x
    shape and the file (no tensor read)."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{size} bytes, too short for a safetensors file")
    n = int.from_bytes(head, "little")
    if not 0 < n <= min(_MAX_HEADER, size - 8):
        raise ValueError(f"header length {n} does not fit a {size}-byte file")
    try:
        header = json.loads(f.read(n))
    except ValueError as exc:
        raise ValueError(f"header is not valid JSON ({exc})") from None
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        begin, stop = info["data_offsets"]
        count = math.prod(int(d) for d in info["shape"])
        if info["dtype"] not in _ST_DTYPE_BYTES or stop - begin != count * _ST_DTYPE_BYTES[info["dtype"]]:
            raise ValueError(f"tensor {name!r}: {info['dtype']} {info['shape']} does not fit bytes {begin}..{stop}")
        end = max(end, stop)
    if 8 + n + end != size:
        raise ValueError(f"tensors need {8 + n + end} bytes, the file has {size} (truncated or padded)")
    return header


def _check_finite_tensors(f: Any, header: dict[str, Any]) -> None:
    """Every float tensor's values are finite, read one tensor at a time from the exponent bits (no torch)."""
    start = f.tell()
    bad = []
    for name, info in header.items():
        if info["dtype"] not in _ST_EXPONENT:
            continue
        view, mask = _ST_EXPONENT[info["dtype"]]
        begin, stop = info["data_offsets"]
        f.seek(start + begin)
        bits = np.frombuffer(f.read(stop - begin), dtype=view)
        if np.any((bits & view(mask)) == view(mask)):
            bad.append(name)
    if bad:
        raise ValueError(f"non-finite (NaN or infinite) weights in {bad[:5]}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


def expected_shapes(meta: dict[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per weights file, the tensors (name -> shape) the model of config.json needs, from a skeleton on the
    meta device; empty for an artifact whose LM is the unchanged base LM (its width is known once loaded)."""
    if not meta.get("lm_config") or not meta["weights"].get("lm"):
        return {}
    cfg = from_dict(ModelConfig, meta["model"])
    kwargs = dict(meta["lm_config"])
    lm_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(lm_config)
        mapping = Mapping(cfg.mapping, cfg.clip_dim, int(lm.get_input_embeddings().weight.shape[1]))
    return {meta["weights"][part]: {k: tuple(v.shape) for k, v in _distinct_state(module).items()}
            for part, module in (("mapping", mapping), ("lm", lm))}


def fit_problems(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]],
                 show: Callable[[str], str] = str) -> list[str]:
    """How tensors ``got`` (name -> shape) differ from ``expected``: missing, unexpected, wrong shapes."""
    missing = [show(k) for k in sorted(set(expected) - set(got))[:5]]
    unexpected = [show(k) for k in sorted(set(got) - set(expected))[:5]]
    wrong = [f"{show(k)}: {got[k]} but expected {v}" for k, v in expected.items() if got.get(k, v) != v][:5]
    kinds = (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong))
    return [f"{kind} {names}" for kind, names in kinds if names]


def verify_weights(uri: str, meta: dict[str, Any] | None = None) -> dict[str, str]:
    """sha256 digests of the artifact's weights files, each checked (present, well-formed, fitting the model
    of config.json, every float finite); else a ValueError naming the file, before anything is loaded."""
    meta = meta if meta is not None else read_metadata(uri)
    expected = expected_shapes(meta)
    digests = {}
    for name in weight_files(meta):
        path = f"{str(uri).rstrip('/')}/{name}"
        try:
            fs, p = fsspec.core.url_to_fs(path)
            size = int(fs.size(p))
            with fs.open(p, "rb") as f:
                header = _check_safetensors(f, size)
                shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()}
                _check_finite_tensors(f, header)
                f.seek(0)
                digest = hashlib.sha256()
                for block in iter(lambda: f.read(1 << 22), b""):  # noqa: B023 - f is the loop's own file
                    digest.update(block)
        except FileNotFoundError:
            raise ValueError(f"weights file {path} is missing") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"weights file {path} is corrupt: {exc}") from None
        problems = fit_problems(expected[name], shapes) if name in expected else []
        if problems:
            raise ValueError(f"weights file {path} does not fit the model in {CONFIG} (another model's "
                             f"weights?): {'; '.join(problems)}")
        digests[name] = digest.hexdigest()
    return digests


def is_preset(uri_or_preset: str) -> bool:
    """True for a preset name (``tiny``...) that is not also an existing path: an untrained model."""
    return uri_or_preset in PRESETS and not exists(uri_or_preset)


def read_config(uri_or_preset: str) -> ModelConfig:
    """The ModelConfig of an artifact or preset, without loading weights (for checks before work starts)."""
    if is_preset(uri_or_preset):
        return preset_config(uri_or_preset)
    return from_dict(ModelConfig, read_metadata(uri_or_preset)["model"])


def load_model(uri_or_preset: str, device: str | torch.device = "cpu", precision: str = "fp32") -> LoadedModel:
    """Load an artifact (any fsspec URI) or build an untrained preset model (``"tiny"``...)."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    if is_preset(uri_or_preset):
        cfg = preset_config(uri_or_preset)
        tokenizer = load_tokenizer(cfg.tokenizer_source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(cfg, tokenizer)
        loaded = LoadedModel(model, tokenizer, cfg, {"preset": uri_or_preset})
    else:
        meta = read_metadata(uri_or_preset)
        with local_copy(uri_or_preset) as local:
            verify_weights(local, meta)  # a corrupt file is named here, not deep inside safetensors / HF
            loaded = _load_local(Path(local), meta)
    loaded.model.to(device=device, dtype=DTYPES[precision]).eval()
    return loaded


def _load_local(root: Path, meta: dict[str, Any]) -> LoadedModel:
    cfg = from_dict(ModelConfig, meta["model"])
    tokenizer = load_tokenizer(str(_weights_path(root, meta, "tokenizer")))
    lm = _load_lm(root, meta, cfg)
    model = ClipCapModel(cfg, lm)
    load_weights_into(model.mapping, load_file(str(_weights_path(root, meta, "mapping"))), "mapping")
    decap = None
    if meta["weights"].get("decap"):
        with safe_open(str(_weights_path(root, meta, "decap")), "pt") as f:
            decap = DecapMemory.from_state({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return LoadedModel(model, tokenizer, cfg, {k: v for k, v in meta.items() if k != "model"}, decap)


def _weights_path(root: Path, meta: dict[str, Any], name: str) -> Path:
    """The file config.json names for ``name``, refused unless a plain path inside the artifact."""
    return safe_join(root, meta["weights"][name], what=f"artifact weights.{name}")


def _load_lm(root: Path, meta: dict[str, Any], cfg: ModelConfig) -> PreTrainedModel:
    if not meta["weights"]["lm"]:
        return load_pretrained_lm(cfg.lm.name_or_path)
    # Reassemble a from_pretrained directory (config + weights): HF handles tied weights and skips random init.
    with tempfile.TemporaryDirectory(prefix="clipcap-lm-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(meta["lm_config"]))
        (Path(tmp) / "model.safetensors").symlink_to(_weights_path(root, meta, "lm").resolve())
        return AutoModelForCausalLM.from_pretrained(tmp)


def load_weights_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                      show: Callable[[str], str] = str) -> None:
    """Strict ``load_state_dict`` with one clear message (``show`` renders a key, e.g. in its own naming)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = fit_problems(expected, {k: tuple(v.shape) for k, v in state.items()}, show)
    if problems:
        raise ValueError(f"{what}: weights do not fit the config: {'; '.join(problems)}")
    module.load_state_dict(state)
