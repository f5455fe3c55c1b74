"""Mapping networks: shapes for any D / k / E, the paper's MLP sizes, normalisation, config validation."""

from __future__ import annotations

import pytest
import torch

from clipcap_core.configs import ConfigError, from_dict
from clipcap_core.model import Mapping, MappingConfig
from tests.core.core_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["mlp", "linear", "transformer"])
@pytest.mark.parametrize("clip_dim,k,E", [(512, 10, 64), (640, 3, 32), (7, 1, 16)])
def test_output_shape_for_any_dimensions(kind, clip_dim, k, E):
    torch.manual_seed(0)
    m = Mapping(MappingConfig(kind=kind, prefix_length=k, clip_length=2, num_layers=2, num_heads=4), clip_dim, E)
    x = torch.randn(5, clip_dim)
    out = m(x)
    assert out.shape == (5, k, E)
    # every image gets its own prefix
    assert not torch.allclose(out[0], out[1])


def test_mlp_has_the_papers_layer_sizes():
    m = Mapping(MappingConfig(kind="mlp", prefix_length=10), 512, 768)
    shapes = [tuple(p.shape) for p in m.parameters()]
    assert shapes == [(3840, 512), (3840,), (7680, 3840), (7680,)]  # D -> kE/2 -> kE
    assert isinstance(m.net.net[1], torch.nn.Tanh)


def test_linear_is_one_affine_map_of_the_embedding():
    m = Mapping(MappingConfig(kind="linear", prefix_length=1), 512, 768)
    assert [tuple(p.shape) for p in m.parameters()] == [(768, 512), (768,)]  # the DeCap authors' clip_project
    x = torch.randn(3, 512)
    torch.testing.assert_close(m(x)[:, 0], m.net.linear(x))


def test_transformer_layers_heads_and_constant_tokens():
    cfg = MappingConfig(kind="transformer", prefix_length=6, clip_length=3, num_layers=3, num_heads=4)
    m = Mapping(cfg, 20, 32)
    assert len(m.net.blocks) == 3
    assert m.net.prefix_const.shape == (6, 32)
    assert m.net.linear.weight.shape == (3 * 32, 20)
    x = torch.randn(2, 20)
    before = m(x)
    with torch.no_grad():
        m.net.prefix_const.add_(1.0)  # the prefix is read at the constant positions
    assert not torch.allclose(before, m(x))


@pytest.mark.parametrize("kind", ["mlp", "linear", "transformer"])
def test_normalize_prefix_makes_the_scale_irrelevant(kind):
    x = torch.randn(3, 16)
    torch.manual_seed(0)
    norm = Mapping(MappingConfig(kind=kind, prefix_length=2, clip_length=2, num_layers=1, num_heads=2,
                                 normalize_prefix=True), 16, 8)
    torch.testing.assert_close(norm(x), norm(7.5 * x))
    torch.manual_seed(0)
    raw = Mapping(MappingConfig(kind=kind, prefix_length=2, clip_length=2, num_layers=1, num_heads=2), 16, 8)
    assert not torch.allclose(raw(x), raw(7.5 * x))


def test_bad_configs_fail_clearly():
    with pytest.raises(ConfigError, match="kind"):
        from_dict(MappingConfig, {"kind": "rnn"})
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(MappingConfig, {"kind": "mlp", "prefix_len": 3})
    with pytest.raises(ConfigError, match="prefix_length"):
        from_dict(MappingConfig, {"prefix_length": 0})
    with pytest.raises(ValueError, match="divisible"):
        Mapping(MappingConfig(kind="transformer", num_heads=3), 8, 16)
    m = Mapping(MappingConfig(), 8, 16)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        m(torch.randn(2, 9))
