"""The download + embed job (``jobs/embed_cc3m.py``, ``clipcap demo``): URL list -> shards -> embedding tables.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clipcap_core import encoders
from clipcap_core.encoders import EncoderConfig
from infra.local import http
from pipelines.demo.worlds import world as get_world
from pipelines.download.job import DownloadConfig, DownloadSummary, prepare_download, run_download
from pipelines.embed.job import EmbedConfig, EmbedResources, EmbedResult, run_embed
from pipelines.io import schemas, storage

log = logging.getLogger(__name__)

SWITCH_HINT = ("This used a tiny CLIP shipped with the package on synthetic images. For real embeddings pass a "
               "URL list and an open_clip model, e.g. --input cc3m/Train_GCC-training.tsv --clip ViT-B-32 "
               "--clip-pretrained openai (or --clip-pretrained /path/or/s3://uri/of/weights.pt) --output s3://bucket/clipcap.")


@dataclass(frozen=True, kw_only=True)
class SyntheticSource:
    """Write ``samples`` synthetic images + URL list under ``folder`` and serve them over local HTTP."""

    folder: str
    samples: int = 256
    seed: int = 0
    image_size: int = 64
    world: str = "synthetic"  # pipelines.demo.worlds: synthetic | scenes


@dataclass(frozen=True, kw_only=True)
class EmbedJobConfig:
    embed: EmbedConfig
    download: DownloadConfig | None = None  # None: embed the shards already at embed.input
    synthetic: SyntheticSource | None = None  # set: its URL list replaces download.url_list


@dataclass
class EmbedJobResult:
    download: DownloadSummary | None
    embed: EmbedResult
    tiny: bool

    @property
    def exit_code(self) -> int:
        """The worse of the two stages' codes (``pipelines.exitcodes``: 5 nothing > 4 partial > 0)."""
        return max(self.embed.exit_code, self.download.exit_code if self.download else 0)

    def describe(self) -> str:
        lines = [self.download.describe()] if self.download else []
        lines.append(self.embed.describe())
        if self.download is not None:
            lines.append(f"rows in table for this run's shards: {self.embed.rows}; successfully downloaded: "
                         f"{self.download.successes}")
        if self.tiny:
            lines.append(SWITCH_HINT)
        return "\n".join(lines)


def default_job_config(root: str | Path = "data", samples: int = 256, seed: int = 0,
                       world: str = "synthetic") -> EmbedJobConfig:
    """The embedded default: the synthetic (or ``scenes``) set under ``root``, its shards and tables."""
    clip = get_world(world).clip_model
    is_uri = "://" in str(root)
    root = str(root) if is_uri else str(Path(root).resolve())
    local = Path("data").resolve() if is_uri else Path(root)  # the HTTP server serves a local folder
    raw = storage.join(root, "raw", world)
    return EmbedJobConfig(
        synthetic=SyntheticSource(folder=str(local / world), samples=samples, seed=seed, world=world),
        download=DownloadConfig(url_list="", output=raw, input_format="tsv", header=False, image_size=64,
                                resize_mode="no", encode_format="png", number_sample_per_shard=128,
                                thread_count=8, allow_private_urls=True),  # our own server on 127.0.0.1
        embed=EmbedConfig(input=raw, output_root=root, dataset=world, encoder=EncoderConfig(model_name=clip),
                          resources=EmbedResources(batch_size=64)),
    )


@contextlib.contextmanager
def serve_synthetic(src: SyntheticSource) -> Iterator[str]:
    """Write the synthetic set and serve it; yields the URL list path (URLs point at the server)."""
    folder = Path(src.folder)
    folder.mkdir(parents=True, exist_ok=True)
    server = http.start(folder)
    try:
        tsv = get_world(src.world).write_url_list(folder, src.samples, server.base_url, seed=src.seed,
                                              size=src.image_size)
        log.info("serving %d synthetic images from %s at %s", src.samples, folder, server.base_url)
        yield str(tsv)
    finally:
        server.stop()


def run_embed_job(cfg: EmbedJobConfig, ray_address: str | None = None) -> EmbedJobResult:
    """Download (optional) then embed; both stages' job-level checks run before the first download."""
    encoders.validate_config(cfg.embed.encoder)
    encoders.fetch_pretrained(cfg.embed.encoder)  # before the download: an unreachable hub fails first
    schemas.embedding_type(1, cfg.embed.dtype)
    summary = None
    if cfg.download is not None:
        given = contextlib.nullcontext(cfg.download.url_list)
        with serve_synthetic(cfg.synthetic) if cfg.synthetic else given as url_list:
            dl = replace(cfg.download, url_list=url_list)
            urls = prepare_download(dl)
            storage.check_writable(cfg.embed.table_uri)
            summary = run_download(dl, ray_address=ray_address, urls=urls)
    result = run_embed(cfg.embed, ray_address=ray_address)
    return EmbedJobResult(download=summary, embed=result, tiny=encoders.shipped_weights(cfg.embed.encoder.model_name) is not None)


def result_dict(result: EmbedJobResult) -> dict[str, Any]:
    return {"download": result.download.to_dict() if result.download else None, "embed": result.embed.to_dict()}
