"""Peer tools for the benchmarks: rom1504's ``clip-retrieval inference`` in its own virtualenv.

    python benchmarks/peers.py --images 64          # synthetic shards + seeded ViT-B-32 checkpoint, then run it
    python benchmarks/peers.py --images 256 --check 8

clip-retrieval cannot share our virtualenv (it wants ``numpy<2``, ``open-clip-torch<3``, ``sentence-transformers<3``
where we run Ray 2.60 / transformers 5 / open_clip 3), so ``ensure_clip_retrieval_venv`` builds one once under
``$CLIPCAP_BENCH_CACHE`` (default ``~/.cache/clipcap-bench``)``/clip-retrieval`` from ``CLIP_RETRIEVAL_PINS``.
The same torch as ours (2.14.1) goes in, so both sides run the same kernels; pip takes it from the local wheel
(``find-links``) when there is one, else from PyPI (a CUDA build, ~5.5 GB in the venv).

How clip-retrieval is driven (read from clip-retrieval 2.45.0 / all_clip 1.3.0):
- ``--clip_model open_clip:ViT-B-32/<absolute path>``: all_clip strips ``open_clip:``, splits the rest on ``/``,
  takes the first part as the open_clip model name and re-joins the rest as ``pretrained`` (so an absolute path
  gives ``ViT-B-32//abs/...`` and comes back whole). open_clip 2.32 ``load_checkpoint`` reads a plain
  ``state_dict`` saved with ``torch.save`` (``.safetensors`` too); ``write_checkpoint`` writes the former.
- ``--input_format webdataset --input_dataset '<dir>/{a.tar,b.tar}'`` (braceexpand); the torch DataLoader runs
  ``--num_prepro_workers`` processes and webdataset splits *shards* between them, so more workers than shards
  leave workers idle (clamped here). Images: open_clip's eval transform (resize shortest side bicubic, centre
  crop, normalise) on PIL images decoded in those workers, the same as ours.
- device: ``cuda`` when ``torch.cuda.is_available()``, with bf16/fp16 autocast there, fp32 on the CPU;
  ``cuda=False`` hides the GPUs (``CUDA_VISIBLE_DEVICES=``). Warm-up: two forward passes of image *and* text
  at the batch size, before any data (part of its start-up, counted in ``wall_s``).
- output: ``img_emb/img_emb_<n>.npy`` (L2-normalised, float16) and ``metadata/metadata_<n>.parquet``
  (``image_path`` = the webdataset ``__key__``, in the order of the rows); ``--enable_text False`` and
  ``--enable_metadata False`` skip the text tower and the json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Exact versions that installed and ran `clip-retrieval inference` here (CPython 3.11, Linux x86_64, pip 23.2).
# Transitive dependencies are left to pip; these are the ones whose ranges matter.
CLIP_RETRIEVAL_PINS = [
    "setuptools==80.10.2",  # < 81: clip-anytorch (clip/clip.py) imports pkg_resources
    "torch==2.14.1",  # ours, so both sides run the same kernels
    "torchvision==0.29.1",
    "clip-retrieval==2.45.0",
    "all-clip==1.3.0",
    "open-clip-torch==2.32.0",  # clip-retrieval wants < 3 (we run 3.3); same ViT-B-32 state_dict keys
    "clip-anytorch==2.6.0",
    "webdataset==0.2.111",
    "numpy==1.26.4",  # clip-retrieval wants < 2
    "transformers==4.57.6",  # sentence-transformers 2.x wants < 5
    "sentence-transformers==2.7.0",
    "huggingface-hub==0.36.2",
    "timm==1.0.31",
    "pillow==13.0.0",  # ours: the same JPEG decoder on both sides
    "pyarrow==15.0.2",
    "pandas==2.3.3",
    "img2dataset==1.47.0",
    "albumentations==1.4.24",
    "opencv-python-headless==4.11.0.86",  # newer ones need numpy 2: unpinned, pip backtracks through ~4 x 55 MB
    "scikit-learn==1.9.1",
    "faiss-cpu==1.15.1",
    "autofaiss==2.18.0",
    "fire==0.5.0",
    "wandb==0.31.0",
]
_MARKER = ".clipcap-complete.json"


def cache_root() -> Path:
    return Path(os.environ.get("CLIPCAP_BENCH_CACHE") or Path.home() / ".cache" / "clipcap-bench")


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _pip_error(log: str, tail: int = 25) -> str:
    lines = [ln for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lstrip().startswith("ERROR")]
    return "\n".join(errors[-10:] or lines[-tail:])


def _run_logged(cmd: list[str], log: Path, what: str, env: dict | None = None) -> None:
    print(f"[peers] {what}: {' '.join(cmd)}  (log: {log})", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); pip said:\n{_pip_error(log.read_text())}\n"
                           f"full log: {log}")


def ensure_clip_retrieval_venv(path: Path | None = None) -> Path:
    """The python of a virtualenv with clip-retrieval (``CLIP_RETRIEVAL_PINS``), built once and then reused.

    ``path``: the venv folder (default ``$CLIPCAP_BENCH_CACHE/clip-retrieval``, ``~/.cache/clipcap-bench/...``).
    A marker file written after a successful install *and* import check says the venv is complete; a venv
    without it (an interrupted install) or with other pins is rebuilt from scratch.

    Versions that worked (CPython 3.11, Linux x86_64, pip 23.2; ``CLIP_RETRIEVAL_PINS``): clip-retrieval 2.45.0,
    all-clip 1.3.0, open-clip-torch 2.32.0, clip-anytorch 2.6.0, webdataset 0.2.111, torch 2.14.1 (+cu130 wheel,
    runs on CPU), torchvision 0.29.1, numpy 1.26.4, transformers 4.57.6, sentence-transformers 2.7.0,
    huggingface-hub 0.36.2, timm 1.0.31, pillow 13.0.0, pyarrow 15.0.2, pandas 2.3.3, img2dataset 1.47.0,
    albumentations 1.4.24, opencv-python-headless 4.11.0.86, scikit-learn 1.9.1, faiss-cpu 1.15.1,
    autofaiss 2.18.0, fire 0.5.0, wandb 0.31.0, setuptools 80.10.2. The full ``pip freeze`` is kept in the
    marker file.
    """
    venv = Path(path) if path else cache_root() / "clip-retrieval"
    marker = venv / _MARKER
    python = _venv_python(venv)
    if marker.exists() and python.exists():
        try:
            if json.loads(marker.read_text()).get("pins") == CLIP_RETRIEVAL_PINS:
                print(f"[peers] reusing clip-retrieval venv {venv}", flush=True)
                return python
        except (OSError, ValueError):
            pass
    if venv.exists():
        print(f"[peers] {venv} is incomplete or has other pins: rebuilding it", flush=True)
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}-install.log"
    log.write_text("")
    t = time.perf_counter()
    print(f"[peers] creating the clip-retrieval venv {venv} (torch alone is ~5.5 GB with its CUDA libs)", flush=True)
    _run_logged([sys.executable, "-m", "venv", str(venv)], log, "python -m venv")
    _run_logged([str(python), "-m", "pip", "install", "--disable-pip-version-check", *CLIP_RETRIEVAL_PINS],
                log, "pip install clip-retrieval")
    # Import what `clip-retrieval inference` imports (its CLI imports every subcommand), in a process of its own.
    _run_logged([str(python), "-c", "import clip_retrieval.cli, all_clip, open_clip, webdataset; print('ok')"],
                log, "import check of clip-retrieval")
    versions = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    marker.write_text(json.dumps({"pins": CLIP_RETRIEVAL_PINS, "freeze": versions.splitlines()}, indent=1))
    print(f"[peers] clip-retrieval venv ready in {time.perf_counter() - t:.0f}s", flush=True)
    return python


def write_checkpoint(path: Path, model: str = "ViT-B-32", seed: int | None = None) -> Path:
    """A seeded random-init open_clip ``model`` saved as a plain ``state_dict`` (``torch.save``).

    The default seed is ``encoders.TINY_SEED``, the one ``load_encoder`` uses without ``pretrained``: the file
    then holds the very weights our embed job builds for ``model`` with no checkpoint given.
    """
    import open_clip
    import torch

    from clipcap_core import encoders

    with torch.random.fork_rng(devices=[]), encoders._quiet_random_init():  # random on purpose
        torch.manual_seed(encoders.TINY_SEED if seed is None else seed)
        net = open_clip.create_model(model, pretrained=None, device="cpu", pretrained_text=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _count_rows(img_emb: Path) -> tuple[int, int]:
    """(rows, dim) over ``img_emb/*.npy`` (headers only)."""
    import numpy as np

    rows, dim = 0, 0
    for f in sorted(img_emb.glob("*.npy")):
        arr = np.load(f, mmap_mode="r")
        rows += arr.shape[0]
        dim = arr.shape[1]
    return rows, dim


def run_clip_retrieval(shards_dir: Path, checkpoint: Path, out_dir: Path, *, batch_size: int,
                       num_prepro_workers: int, model: str = "ViT-B-32", cuda: bool = False,
                       expected_images: int | None = None, python: Path | None = None) -> dict:
    """Run ``clip-retrieval inference`` on the ``*.tar`` shards of ``shards_dir``, image embeddings only.

    Timed wall-clock from process start to exit (imports, model load, warm-up, decode, encode, writes).
    Checks that its ``img_emb/*.npy`` hold one row per image (``expected_images``, default: the samples
    with a ``.jpg`` in the shards). Returns {wall_s, images, images_per_s, command, ...}.
    ``cuda=False`` hides the GPUs from it; ``cuda=True`` lets it take one (bf16/fp16 autocast there).
    """
    shards = sorted(Path(shards_dir).resolve().glob("*.tar"))
    if not shards:
        raise ValueError(f"no .tar shards in {shards_dir}")
    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty: clip-retrieval would mix old embeddings into the count")
    out_dir.mkdir(parents=True, exist_ok=True)
    if num_prepro_workers > len(shards):  # webdataset splits shards between DataLoader workers
        print(f"[peers] {num_prepro_workers} prepro workers for {len(shards)} shards: using {len(shards)}")
        num_prepro_workers = len(shards)
    if expected_images is None:
        expected_images = _count_samples(shards)
    python = Path(python) if python else ensure_clip_retrieval_venv()
    exe = python.parent / "clip-retrieval"
    dataset = str(shards[0]) if len(shards) == 1 else f"{shards[0].parent}/{{{','.join(s.name for s in shards)}}}"
    cmd = [str(exe), "inference", "--input_dataset", dataset, "--output_folder", str(out_dir / "emb"),
           "--input_format", "webdataset", "--enable_text", "False", "--enable_metadata", "False",
           "--batch_size", str(batch_size), "--num_prepro_workers", str(num_prepro_workers),
           "--clip_model", f"open_clip:{model}/{checkpoint}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # nothing of our venv / repo may leak into theirs
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    stdout, stderr = out_dir / "clip-retrieval.stdout", out_dir / "clip-retrieval.stderr"
    print(f"[peers] {' '.join(cmd)}", flush=True)
    with open(stdout, "w") as so, open(stderr, "w") as se:
        t = time.perf_counter()
        # A session of its own: its helper processes (the stats logger, DataLoader workers) go with it.
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, cwd=out_dir, start_new_session=True)
        try:
            rc = proc.wait()
        finally:
            wall = time.perf_counter() - t
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # leftovers only: a clean exit has none
    if rc != 0:
        raise RuntimeError(f"clip-retrieval inference exited {rc}; last stderr lines:\n{_tail(stderr)}\n"
                           f"(stdout tail:\n{_tail(stdout, 10)})")
    rows, dim = _count_rows(out_dir / "emb" / "img_emb")
    if rows != expected_images:
        raise RuntimeError(f"clip-retrieval wrote {rows} image embeddings for {expected_images} images; "
                           f"stderr tail:\n{_tail(stderr)}")
    return {"tool": "clip-retrieval inference", "wall_s": round(wall, 2), "images": rows,
            "images_per_s": round(rows / wall, 2), "dim": dim, "batch_size": batch_size,
            "num_prepro_workers": num_prepro_workers, "device": "cuda" if cuda else "cpu",
            "command": " ".join(cmd), "output": str(out_dir / "emb")}


def _count_samples(shards: list[Path], image_ext: str = "jpg") -> int:
    import tarfile

    n = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            n += sum(1 for m in tar.getmembers() if m.name.endswith(f".{image_ext}"))
    return n


def _read_jpegs(shards_dir: Path, keys: list[str]) -> dict[str, bytes]:
    import tarfile

    want, found = set(keys), {}
    for shard in sorted(Path(shards_dir).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.rpartition(".")
                if ext == "jpg" and key in want:
                    found[key] = tar.extractfile(m).read()
    return found


def check_embeddings(shards_dir: Path, checkpoint: Path, output: Path, *, n: int = 8,
                     model: str = "ViT-B-32") -> dict:
    """clip-retrieval's embeddings of ``n`` images against our encoder on the same checkpoint and JPEGs.

    Ours: ``load_encoder(pretrained=checkpoint)``, ``resize`` + ``encode_pixels`` (what the embed job runs),
    L2-normalised. Random weights map different images to close embeddings, so the figure that shows the
    weights really loaded is the *matched* cosine against two controls: the same image through another
    seed's weights, and other images through the same weights.
    """
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from clipcap_core.encoders import EncoderConfig, load_encoder

    output = Path(output)
    emb = np.concatenate([np.load(f) for f in sorted((output / "img_emb").glob("*.npy"))]).astype(np.float32)
    keys = [k for f in sorted((output / "metadata").glob("*.parquet"))
            for k in pq.read_table(f).column("image_path").to_pylist()]
    take = list(range(min(n, len(keys))))
    jpegs = _read_jpegs(shards_dir, [keys[i] for i in take])
    images = [Image.open(io.BytesIO(jpegs[keys[i]])) for i in take]

    def ours(weights: Path) -> np.ndarray:
        enc = load_encoder(EncoderConfig(model_name=model, pretrained=str(weights)))
        e = enc.encode_pixels(np.stack([enc.resize(im) for im in images]))
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    theirs = emb[take]
    mine = ours(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        other = ours(write_checkpoint(Path(tmp, "other.pt"), model, seed=987654321))
    sim = theirs @ mine.T  # (n, n): diagonal = same image, same weights
    matched = np.diag(sim)
    off = sim[~np.eye(len(take), dtype=bool)] if len(take) > 1 else np.array([np.nan])
    return {"images_checked": len(take), "cos_matched_min": round(float(matched.min()), 5),
            "cos_matched_mean": round(float(matched.mean()), 5),
            "cos_other_images_max": round(float(off.max()), 5),
            "cos_other_seed_max": round(float(np.max(np.sum(theirs * other, axis=1))), 5),
            "ok": bool(matched.min() > 0.99 and matched.min() > off.max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=64, help="images per shard (default 64)")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=256, help="clip-retrieval's default: 256")
    p.add_argument("--num-prepro-workers", type=int, default=4,
                   help="clip-retrieval's default: 4 (clamped to the number of shards)")
    p.add_argument("--cuda", action="store_true", help="let clip-retrieval use a GPU (default: CPU only)")
    p.add_argument("--check", type=int, default=8, metavar="N",
                   help="compare N of its embeddings with our encoder's (0: skip)")
    p.add_argument("--venv", type=Path, help="clip-retrieval venv (default: $CLIPCAP_BENCH_CACHE/clip-retrieval)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    from embed import write_shards  # benchmarks/ is on sys.path when run as a script

    python = ensure_clip_retrieval_venv(args.venv)
    with tempfile.TemporaryDirectory(prefix="clipcap-peer-") as tmp:
        shards = Path(tmp, "shards")
        shards.mkdir()
        write_shards(shards, args.images, args.per_shard)
        ckpt = write_checkpoint(Path(tmp, f"{args.model}-seeded.pt"), args.model)
        res = run_clip_retrieval(shards, ckpt, Path(tmp, "out"), batch_size=args.batch_size,
                                 num_prepro_workers=args.num_prepro_workers, model=args.model, cuda=args.cuda,
                                 expected_images=args.images, python=python)
        res["shards"] = math.ceil(args.images / args.per_shard)
        res["cpu_cores"] = os.cpu_count()
        if args.check:
            res["check"] = check_embeddings(shards, ckpt, Path(res["output"]), n=args.check, model=args.model)
    del res["output"]
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res.get("check", {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
