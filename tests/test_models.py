"""stream_<arch> models: exactness per family, the timm model API, frozen norms, pretrained weights
from an offline Hugging Face cache, uint8 input and bad input."""
from __future__ import annotations

import pytest
import timm
import torch
from huggingface_hub import constants, file_download
from safetensors.torch import save_file
from torch import nn

import timm_stream  # noqa: F401 - registers stream_<arch>
from timm_stream import NonLocalModuleError, TileTooSmallError
from timm_stream.engine import is_norm_layer
from timm_stream.models import architectures, split_trunk
from timm_stream.testing import assert_several_tiles, compare_streaming, randomize_, relative_error

EXACT = 1e-9


def stream_model(name: str, tile_margin: tuple[int, int] = (24, 40), **kwargs) -> nn.Module:
    """A stream model whose tile is a little above its minimum (read from the error that a 1 px tile
    raises; at least 64 px), so that small images already need several tiles."""
    with pytest.raises(TileTooSmallError) as info:
        timm.create_model(name, tile_size=1, **kwargs)
    minimum = info.value.min_tile_size
    tile = (max(minimum[0] + tile_margin[0], 64), max(minimum[1] + tile_margin[1], 80))
    return timm.create_model(name, tile_size=tile, **kwargs)


# One architecture per family; heavy ones stream fewer stages to keep images small.
FAMILIES = [
    ("test_resnet", None),
    ("resnet10t", None),
    ("test_convnext", None),
    ("regnetx_002", 2),
    ("resnetv2_18", 2),
    ("vgg11", 2),
    ("densenet121", 1),
    ("dla46_c", 2),
    ("cs3darknet_s", 2),
    ("res2net50_14w_8s", 1),
    ("xception41", 1),
    ("efficientnet_lite0", 2),
    ("mobilenetv3_large_100", None),
    ("mobilenetv4_conv_small", 2),
]
# Arguments of the un-streamed head only, the same for both models: VGG's 7x7 pre-logits conv (103 M
# parameters, 0.8 GB in float64, several copies in a backward comparison) made this the suite's memory
# peak; a narrow hidden layer leaves the streamed part, which is what is compared, as it is.
HEAD_KWARGS = {"vgg11": {"mlp_ratio": 1 / 64}}


@pytest.mark.parametrize("base, stages", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_is_exact_against_the_base_model(base, stages):
    kwargs = {} if stages is None else {"stream_stages": stages}
    model = stream_model(f"stream_{base}", num_classes=3, **kwargs, **HEAD_KWARGS.get(base, {}))
    randomize_(model, seed=1)
    model.double()
    # networks that only run on sizes divisible by their stride (DLA) need it for the un-tiled tail too
    reduction = model.feature_info[-1]["reduction"]
    multiple = tuple(reduction if m > 1 else 1 for m in model.streamer.geometry.size_multiple)
    tile = model.tile_size
    smallest = 4 * model.streamer.geometry.stride[0]  # what the whole network needs to run
    size = tuple(-(-max(int(t * 1.45), smallest) // m) * m + (3 if m == 1 else 0) for t, m in zip(tile, multiple))
    plan = model.stream_plan(size)
    assert plan.pieces[0].grid[0] > 1 and plan.pieces[0].grid[1] > 1, plan
    x = torch.randn((2, 3) + size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    reference = timm.create_model(base, num_classes=3, **HEAD_KWARGS.get(base, {})).double().eval()
    reference.load_state_dict(model.state_dict())
    model.eval()
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) <= EXACT
    del reference  # float64 weights of a 25M-parameter base: freed before the gradient comparison (test memory)

    model.train()
    comparison = compare_streaming(model, x, lambda on: setattr(model, "streaming", on))
    assert comparison.worst <= EXACT, (comparison.output, comparison.input_grad, comparison.worst_param())
    assert len(comparison.param_grads) == sum(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------- registry


def test_registry_lists_stream_variants_with_mirrored_tags():
    names = timm.list_models("stream_*")
    assert set(names) == {f"stream_{b}" for b in architectures() if timm.is_model(b)}
    assert "stream_resnet50" in names and "stream_convnext_tiny" in names
    tagged = timm.list_models("stream_resnet50", pretrained=True)
    assert tagged == [f"stream_{n}" for n in timm.list_models("resnet50", pretrained=True)]
    assert "stream_resnet50.a1_in1k" in tagged


def test_pretrained_cfgs_point_at_the_base_weights():
    for name in timm.list_models("stream_*", pretrained=True):
        cfg = timm.models.get_pretrained_cfg(name)
        base = name[len("stream_"):]
        assert cfg.architecture == name.split(".")[0]
        if cfg.hf_hub_id:
            assert not cfg.hf_hub_id.startswith("timm/stream_"), name
            assert cfg.hf_hub_id == timm.models.get_pretrained_cfg(base).hf_hub_id, name


def test_non_local_architectures_are_not_registered():
    assert not timm.is_model("stream_seresnet18")  # squeeze-excitation in its first stage
    assert not timm.is_model("stream_resnet50_gn")  # GroupNorm
    assert architectures()["mobilenetv3_large_100"] == 1  # split before the first squeeze-excitation


# ---------------------------------------------------------------------------------------------- model API


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = timm.create_model("stream_test_resnet", tile_size=96, num_classes=4)
    randomize_(model, seed=3)
    base = timm.create_model("test_resnet", num_classes=4)
    base.load_state_dict(model.state_dict())
    return model, base


def test_state_dict_is_the_base_architectures(pair, tmp_path):
    model, base = pair
    assert list(model.state_dict()) == list(base.state_dict())
    timm.create_model("test_resnet", num_classes=4).load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(base.state_dict(), strict=True)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in base.named_modules()]
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # refuses shared tensors
    assert isinstance(model, type(base)) and type(model) is not type(base)


def test_timm_api_matches_the_base(pair):
    model, base = pair
    model.eval(), base.eval()
    x = torch.randn(2, 3, 200, 170)
    assert_several_tiles(model, x.shape[-2:])
    assert model.num_classes == base.num_classes == 4
    assert model.num_features == base.num_features
    assert model.feature_info == base.feature_info
    assert model.group_matcher() == base.group_matcher()
    assert model.pretrained_cfg["architecture"] == "stream_test_resnet"
    assert model.default_cfg is model.pretrained_cfg
    assert timm.data.resolve_model_data_config(model) == timm.data.resolve_model_data_config(base)
    with torch.no_grad():
        features = model.forward_features(x)
        assert relative_error(features, base.forward_features(x)) < 1e-5
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (2, model.num_features)
        assert relative_error(model(x), base(x)) < 1e-5


def test_reset_classifier_and_backward(pair):
    model, _ = pair
    model = timm.create_model("stream_test_resnet", tile_size=96, num_classes=4)
    model.reset_classifier(7)
    x = torch.randn(1, 3, 180, 150)
    assert_several_tiles(model, x.shape[-2:])
    out = model(x)
    assert out.shape == (1, 7)
    out.sum().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable and not missing
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)


def test_streaming_false_runs_the_same_modules_untiled(pair):
    model, _ = pair
    model.eval()
    x = torch.randn(1, 3, 190, 160)
    with torch.no_grad():
        streamed = model(x)
        model.streaming = False
        untiled = model(x)
        model.streaming = True
    assert model.stream_plan((190, 160)).num_tiles > 1
    assert relative_error(streamed, untiled) < 1e-5


def test_grad_checkpointing_applies_to_the_tail_only():
    model = timm.create_model("stream_test_convnext", tile_size=128, num_classes=2, stream_stages=2)
    randomize_(model).double()
    x = torch.randn(1, 3, 150, 140, dtype=torch.float64)
    assert_several_tiles(model, x.shape[-2:])
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.set_grad_checkpointing(True)
    streamed_stages = [m for _, m in split_trunk(model).streamed(2)]
    assert not any(getattr(m, "grad_checkpointing", False) for s in streamed_stages for m in s.modules())
    assert model.stages[3].grad_checkpointing
    model.train()
    out = model(x)
    out.sum().backward()
    assert relative_error(out.detach(), before) <= EXACT


# ---------------------------------------------------------------------------------------------- norms, drop


def _norms(modules):
    return [m for module in modules for m in module.modules() if is_norm_layer(m)]


def test_norms_frozen_in_streamed_part_and_tail_by_default():
    model = timm.create_model("stream_test_resnet", tile_size=96, stream_stages=2, num_classes=2)
    randomize_(model)
    split = split_trunk(model)
    streamed, tail = [m for _, m in split.streamed(2)], [m for _, m in split.unstreamed(2)]
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    assert model.training
    assert all(not m.training for m in _norms(streamed + tail))
    loss = model(torch.randn(2, 3, 150, 130)).sum()
    loss.backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())

    trainable = timm.create_model("stream_test_resnet", tile_size=96, stream_stages=2, train_tail_norms=True)
    trainable.train()
    split = split_trunk(trainable)
    assert all(m.training for m in _norms([m for _, m in split.unstreamed(2)]))
    assert all(not m.training for m in _norms([m for _, m in split.streamed(2)]))


def test_head_dropout_trains_while_its_norm_is_frozen():
    # ConvNeXt's head class is NormMlpClassifierHead: a container whose name contains "Norm". Only the
    # LayerNorm inside is a norm; the head's dropout must stay in train mode.
    model = timm.create_model("stream_convnext_atto", drop_rate=0.5, tile_size=256, num_classes=3)
    model.train()
    assert model.head.training and model.head.drop.training and not model.head.norm.training
    features = torch.randn(2, model.num_features, 3, 3)
    torch.manual_seed(0)
    first = model.forward_head(features)
    second = model.forward_head(features)
    assert not torch.equal(first, second)  # a fresh dropout mask per call
    model.eval()
    assert torch.equal(model.forward_head(features), model.forward_head(features))


class _StatsNorm(nn.Module):
    """A norm by structure only (running statistics, no torch norm class, no "norm" in the name)."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return (x - self.running_mean.view(1, -1, 1, 1)) / self.running_var.view(1, -1, 1, 1).sqrt()


class NormalizedDropHead(nn.Module):  # "Norm" in the name, a dropout inside
    def __init__(self):
        super().__init__()
        self.norm, self.stats, self.drop = nn.BatchNorm2d(4), _StatsNorm(4), nn.Dropout(0.5)


def test_freezing_reaches_norms_by_type_or_statistics_never_their_containers():
    from timm_stream.engine import freeze_norm_layers
    from timm.layers import BatchNormAct2d

    head = NormalizedDropHead().train()
    norm_act = BatchNormAct2d(4, drop_layer=nn.Dropout).train()
    for module in (head, norm_act):
        freeze_norm_layers(module)
    assert head.training and head.drop.training
    assert not head.norm.training and not head.stats.training
    assert not norm_act.training and norm_act.drop.training  # the norm-act's own dropout still trains
    assert not is_norm_layer(head) and is_norm_layer(head.stats) and not is_norm_layer(nn.Dropout())


def test_stochastic_depth_is_disabled_in_the_streamed_part_only():
    model = timm.create_model("stream_test_convnext", tile_size=128, stream_stages=2, drop_path_rate=0.3)
    drops = {name: m.drop_prob for name, m in model.named_modules() if hasattr(m, "drop_prob")}
    assert all(p == 0 for n, p in drops.items() if n.startswith(("stages.0", "stages.1")))
    assert any(p > 0 for n, p in drops.items() if n.startswith(("stages.2", "stages.3")))
    model.train()
    model(torch.randn(1, 3, 140, 140)).sum().backward()  # would be refused if a mask were drawn per tile


# ---------------------------------------------------------------------------------------------- input


def test_uint8_input_is_normalized_per_tile():
    model = timm.create_model("stream_test_resnet", tile_size=96, num_classes=2, normalize_input=True)
    randomize_(model).double().eval()
    base = timm.create_model("test_resnet", num_classes=2).double().eval()
    base.load_state_dict(model.state_dict())
    image = torch.randint(0, 256, (1, 3, 170, 150), dtype=torch.uint8)
    mean = torch.tensor(model.pretrained_cfg["mean"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = base((image.double() / 255 - mean) / std)
        assert model.stream_plan((170, 150)).num_tiles > 1
        assert relative_error(model(image), expected) <= EXACT


def test_stream_stages_beyond_the_local_prefix_names_the_module():
    with pytest.raises(NonLocalModuleError, match=r"blocks\.2\.0\.se"):
        timm.create_model("stream_mobilenetv3_large_100", stream_stages=2, tile_size=512)


@pytest.mark.parametrize("value", [5, -1, "2", 1.5, True])
def test_stream_stages_must_be_a_stage_count(value):
    with pytest.raises(ValueError, match="stream_stages must be an int from 0 to 4"):
        timm.create_model("stream_test_resnet", stream_stages=value, tile_size=96)


def test_too_small_tile_states_the_minimum():
    with pytest.raises(TileTooSmallError) as info:
        timm.create_model("stream_resnet18", tile_size=64)
    h, w = info.value.min_tile_size
    assert h > 64 and f"at least ({h}, {w})" in str(info.value)
    timm.create_model("stream_resnet18", tile_size=(h, w))


def test_wrong_channel_count_gives_torchs_error():
    model = timm.create_model("stream_test_resnet", tile_size=96)
    with pytest.raises(RuntimeError, match="expected input.*to have 3 channels"):
        model(torch.randn(1, 4, 150, 150))


def test_default_tile_size():
    assert timm.create_model("stream_test_resnet").tile_size == (2048, 2048)


# ---------------------------------------------------------------------------------------------- pretrained


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    for module in (constants,):
        monkeypatch.setattr(module, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    # huggingface_hub < 0.25 copies the constant into file_download at import
    monkeypatch.setattr(file_download, "HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _publish_weights(cache, repo_id: str, state_dict: dict) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, snapshot / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_pretrained_weights_come_from_the_base_hub_entry(offline_hub):
    cfg = timm.models.get_pretrained_cfg("stream_test_resnet")
    assert cfg.hf_hub_id == timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    weights = randomize_(timm.create_model("test_resnet"), seed=7).state_dict()
    _publish_weights(offline_hub, cfg.hf_hub_id, weights)

    model = timm.create_model("stream_test_resnet", pretrained=True, tile_size=96)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    tagged = timm.create_model(f"stream_test_resnet.{cfg.tag}", pretrained=True, tile_size=96)
    assert tagged.pretrained_cfg["hf_hub_id"] == cfg.hf_hub_id
    assert tagged.pretrained_cfg["architecture"] == "stream_test_resnet"

    # timm's own adaptation of in_chans and num_classes applies unchanged
    adapted = timm.create_model("stream_test_resnet", pretrained=True, tile_size=96, in_chans=1, num_classes=5)
    reference = timm.create_model("test_resnet", pretrained=True, in_chans=1, num_classes=5)
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):  # the new classifier is freshly initialized
            assert torch.equal(adapted.state_dict()[key], value), key
    assert adapted.fc.out_features == 5 and adapted.conv1[0].in_channels == 1


def test_pretrained_cfg_overlay_file(tmp_path, offline_hub):
    weights = randomize_(timm.create_model("test_resnet"), seed=9).state_dict()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, path)
    model = timm.create_model("stream_test_resnet", pretrained=True, tile_size=96,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert not any(offline_hub.iterdir())  # nothing fetched


def test_pretrained_without_cached_weights_fails_offline(offline_hub):
    with pytest.raises(FileNotFoundError):  # huggingface_hub's LocalEntryNotFoundError: nothing downloaded
        timm.create_model("stream_test_resnet", pretrained=True, tile_size=96)
    assert not any(offline_hub.iterdir())
