"""Streamed multi-scale features: ``features_only=True``, ``forward_intermediates`` and
``prune_intermediate_layers`` against timm's own (un-tiled) models, in the spirit of timm's
tests/test_models.py: one architecture per registered family, float64, randomized weights and BN
statistics (loaded into both models from one file), tiles small enough that several run."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_stream  # noqa: F401 - registers stream_<arch>
from timm_stream.engine import StreamingCNN, StreamingError
from timm_stream.models import StreamFeatureNet
from timm_stream.models._features import feature_steps, features_streamer
from timm_stream.testing import randomize_, relative_error

EXACT = 1e-9
TILE = 48  # input pixels: every family below needs several tiles on the images used here

# One architecture per registered family (models/_families.py), the smallest member. test_efficientnet
# and mobilenetv3_large_075 stream only 2 and 1 stages (their registered local prefix): their later
# features come from the un-tiled tail.
FAMILIES = ["resnet10t", "resnetv2_18", "test_convnext", "regnetx_002", "vgg11", "densenet121", "dla46_c",
            "cs3darknet_s", "legacy_xception", "test_efficientnet", "mobilenetv3_large_075"]
# xception41 (XceptionAligned) takes features 0-3 inside a strided block, where no piece can end (see
# test_feature_inside_a_streamed_block_is_refused_with_the_alternatives); its last feature is a block
# output, tested here behind a streamed stem (a streamed blocks.12 needs 862 px tiles: too slow here).
FEATURE_KWARGS = {"xception41": {"out_indices": (4,)}}
STREAM_KWARGS = {"xception41": {"stream_stages": 0}}


def _size(model, size=(157, 133)) -> tuple[int, int]:
    """A non-aligned image size (DLA only runs on multiples of 32: then 192x160)."""
    return size if model.streamer.geometry.size_multiple == (1, 1) else (192, 160)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """arch -> a safetensors file of the base model with every parameter and BN statistic random."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            path = tmp_path_factory.mktemp(arch) / "model.safetensors"
            base = timm.create_model(arch, **HEAD_KWARGS.get(arch, {}))
            randomize_(base, seed=7)
            save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
            cache[arch] = str(path)
        return cache[arch]

    return get


# VGG's 4096-wide pre_logits head (103M parameters, 0.8 GiB in float64) is not what these tests check:
# a narrow one keeps the suite's peak memory low (the streamed part is the same).
HEAD_KWARGS = {"vgg11": {"mlp_ratio": 1 / 64}}


def _create(name: str, path: str, **kwargs):
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
    return model.double().eval()


def _key(p: torch.Tensor):
    return tuple(p.shape), tuple(p.detach().flatten()[:16].tolist())


def _run(model, x, seed=0):
    """Outputs, input gradient and parameter gradients (keyed by value: the two models name their
    parameters differently) for a random gradient on every output map."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out)
    loss.backward()
    grads = {_key(p): p.grad for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)  # the returned grads are the only copies: keeps the suite's peak RSS low
    return [o.detach() for o in out], x.grad.clone(), grads


def _assert_same(ours, reference):
    (out1, gx1, gp1), (out0, gx0, gp0) = ours, reference
    assert len(out1) == len(out0)
    for i, (a, b) in enumerate(zip(out1, out0)):
        assert a.shape == b.shape, f"feature {i}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert relative_error(a, b) <= EXACT, f"feature {i}: rel err {relative_error(a, b):.3g}"
    assert relative_error(gx1, gx0) <= EXACT, f"input grad rel err {relative_error(gx1, gx0):.3g}"
    assert set(gp1) == set(gp0), "parameters with a gradient in only one model"
    worst = max(relative_error(gp1[k], gp0[k]) for k in gp0)
    assert worst <= EXACT, f"parameter gradient rel err {worst:.3g}"


@pytest.mark.parametrize("arch", FAMILIES + ["xception41"])
def test_features_only_equals_timms_features_only(arch, weights):
    kwargs = FEATURE_KWARGS.get(arch, {})
    path = weights(arch)
    kwargs = {**kwargs, **HEAD_KWARGS.get(arch, {})}
    ours = _create(f"stream_{arch}", path, features_only=True, tile_size=TILE, **kwargs, **STREAM_KWARGS.get(arch, {}))
    theirs = _create(arch, path, features_only=True, **kwargs)
    assert isinstance(ours, StreamFeatureNet)
    # feature_info: timm's channels, reductions, module names and default out_indices
    assert ours.feature_info.out_indices == theirs.feature_info.out_indices
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    assert ours.feature_info.module_name() == theirs.feature_info.module_name()
    size = _size(ours.model)
    plan = ours.stream_plan(size)
    assert plan.pieces[0].num_tiles > 1 and plan.num_tiles > len(plan.pieces), str(plan)
    x = torch.randn(1, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _assert_same(_run(ours, x), _run(theirs, x))
    # the plan lists each streamed feature's stitched map at its size (float64: 8 bytes an element)
    _, wanted = features_streamer(ours.model, list(ours.out_indices))
    assert wanted or arch == "xception41"  # its only feature comes from the un-tiled tail
    ends = [p.names[-1] for p in ours.streamer._pieces]
    with torch.no_grad():
        shapes = [tuple(o.shape[1:]) for o in ours(x)]
    for index, step in wanted.items():
        piece = ends.index(step)
        assert plan.maps[piece] == shapes[list(ours.out_indices).index(index)]
    for shape, nbytes in zip(plan.maps, plan.map_bytes):
        assert nbytes == 8 * shape[0] * shape[1] * shape[2]


# options as timm's test_model_forward_intermediates exercises them, plus stop_early and norm
OPTIONS = [dict(), dict(indices=2, intermediates_only=True), dict(indices=[0, -2], stop_early=True),
           dict(indices=1, norm=True)]


@pytest.mark.parametrize("arch", ["resnet10t", "test_convnext", "resnetv2_18", "test_efficientnet",
                                  "legacy_xception"])
def test_forward_intermediates_equals_the_base(arch, weights):
    path = weights(arch)
    # the extractor's inner model: a stream model cut at every feature (so TILE is allowed), norm kept
    ours = _create(f"stream_{arch}", path, features_only=True, tile_size=TILE, norm=True).model
    base = _create(arch, path)
    base.prune_intermediate_layers(list(range(len(base.feature_info))), prune_norm=False)  # as the getter did
    size = _size(ours, (101, 87))
    assert ours.stream_plan(size).pieces[0].num_tiles > 1
    x = torch.randn(1, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def run(model, options):
        model.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        result = model.forward_intermediates(inp, **options)
        final, inter = (None, result) if options.get("intermediates_only") else result
        outs = ([] if final is None else [final]) + list(inter)
        g = torch.Generator().manual_seed(3)
        sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs).backward()
        grads = {_key(p): p.grad for p in model.parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)  # the returned grads are the only copies (peak RSS)
        return [o.detach() for o in outs], inp.grad, grads

    # legacy_xception (22M parameters) is slow in float64: its relu taps with two options only
    for options in OPTIONS[1:3] if arch == "legacy_xception" else OPTIONS:
        _assert_same(run(ours, options), run(base, options))


def test_forward_intermediates_of_a_classifier_stream_model_and_an_untiled_tail(weights):
    """A plain stream model (not features_only), streaming only 2 stages: stages 3-4 run un-tiled."""
    path = weights("resnet10t")
    ours = _create("stream_resnet10t", path, tile_size=96, stream_stages=2)
    base = _create("resnet10t", path)
    x = torch.randn(1, 3, 203, 181, dtype=torch.float64)
    for options in (dict(), dict(indices=(1, 3)), dict(indices=3, intermediates_only=True, stop_early=True)):
        final1, inter1 = (None, ours.forward_intermediates(x, **options)) if options.get(
            "intermediates_only") else ours.forward_intermediates(x, **options)
        final0, inter0 = (None, base.forward_intermediates(x, **options)) if options.get(
            "intermediates_only") else base.forward_intermediates(x, **options)
        assert len(inter1) == len(inter0)
        for a, b in zip(inter1, inter0):
            assert relative_error(a, b) <= EXACT
        if final0 is not None:
            assert relative_error(final1, final0) <= EXACT
    assert ours.stream_plan((203, 181)).num_tiles > 2
    # the classifier path is unchanged by the feature cuts
    assert relative_error(ours(x), base(x)) <= EXACT


@pytest.mark.parametrize("arch, indices", [("resnet10t", (1, 2)), ("test_convnext", 2), ("resnetv2_18", (0,))])
def test_prune_intermediate_layers_as_the_base(arch, indices, weights):
    path = weights(arch)
    ours = _create(f"stream_{arch}", path, tile_size=128)
    base = _create(arch, path)
    assert ours.prune_intermediate_layers(indices) == base.prune_intermediate_layers(indices)
    assert list(ours.state_dict()) == list(base.state_dict())
    x = torch.randn(1, 3, 231, 205, dtype=torch.float64)
    inter1 = ours.forward_intermediates(x, indices=indices, intermediates_only=True)
    inter0 = base.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert [tuple(t.shape) for t in inter1] == [tuple(t.shape) for t in inter0]
    assert all(relative_error(a, b) <= EXACT for a, b in zip(inter1, inter0))
    assert relative_error(ours.forward_features(x), base.forward_features(x)) <= EXACT
    assert ours.stream_plan((231, 205)).num_tiles > 1


@pytest.mark.parametrize("arch, out_indices, requested", [
    ("resnet10t", (2,), {"layer2"}), ("resnet10t", (1, 3), {"layer1", "layer3"}),
    ("cs3darknet_s", (0, 2), {"stem.conv2", "stages.1"}),
])
def test_a_feature_that_is_not_requested_is_never_stitched(arch, out_indices, requested, weights):
    net = timm.create_model(f"stream_{arch}", features_only=True, out_indices=out_indices, tile_size=64)
    steps = feature_steps(net.model)
    names = [n for n, _ in steps]
    plain = StreamingCNN(steps, 4096)  # the same steps, cut only where stitch="auto" would cut
    ends = {p.names[-1] for p in net.streamer._pieces}
    auto = {p.names[-1] for p in plain._pieces}
    assert requested <= ends
    assert ends <= auto | requested | {names[-1]}, f"stitched without being requested: {ends - auto - requested}"
    text = str(net.stream_plan((300, 260)))
    assert "stitched map" in text and "MiB" in text


def test_output_stride_where_the_base_supports_it(weights):
    path = weights("resnet10t")
    ours = _create("stream_resnet10t", path, features_only=True, output_stride=16, tile_size=64)
    theirs = _create("resnet10t", path, features_only=True, output_stride=16)
    assert ours.feature_info.reduction() == theirs.feature_info.reduction() == [2, 4, 8, 16, 16]
    x = torch.randn(1, 3, 141, 119, dtype=torch.float64)
    assert ours.stream_plan((141, 119)).num_tiles > 2
    _assert_same(_run(ours, x), _run(theirs, x))
    with pytest.raises(ValueError, match="does not support output_stride=16"):
        timm.create_model("stream_vgg11", features_only=True, output_stride=16)


@pytest.mark.parametrize("feature_cls", ["hook", "fx", "list", "dict"])
def test_timm_wrappers_that_would_run_untiled_are_refused(feature_cls):
    with pytest.raises(ValueError, match="getter"):
        timm.create_model("stream_test_resnet", features_only=True, feature_cls=feature_cls, tile_size=64)


def test_feature_inside_a_streamed_block_is_refused_with_the_alternatives():
    with pytest.raises(StreamingError, match=r"blocks\.0.*Request only features \[4\]"):
        timm.create_model("stream_xception41", features_only=True, tile_size=64)
    with pytest.raises(StreamingError, match=r"blocks\.1"):
        timm.create_model("stream_xception41", features_only=True, out_indices=(1, 4), tile_size=64)
    with pytest.raises(TypeError, match="out_indices"):  # without features_only: the base's error, as in timm
        timm.create_model("stream_test_resnet", out_indices=(1, 2), tile_size=64)


def test_feature_net_timm_api(weights):
    """Default cfgs, data config, pickling-free module tree, streaming switch, uint8 input."""
    net = timm.create_model("stream_test_resnet", features_only=True, out_indices=(1, 2, 3), tile_size=64,
                            normalize_input=True)
    base = timm.create_model("test_resnet", features_only=True, out_indices=(1, 2, 3))
    assert "num_classes" not in net.pretrained_cfg and net.pretrained_cfg["mean"] == base.pretrained_cfg["mean"]
    assert timm.data.resolve_model_data_config(net) == timm.data.resolve_model_data_config(base)
    assert net.in_chans == 3
    assert not any("fc" in n for n, _ in net.named_parameters())
    img = torch.randint(0, 256, (1, 3, 150, 170), dtype=torch.uint8)
    net.eval()
    with torch.no_grad():
        streamed = net(img)
        net.streaming = False
        untiled = net(img)
    assert [t.shape[1] for t in streamed] == net.feature_info.channels()
    assert net.stream_plan((150, 170)).num_tiles > 2
    assert all(relative_error(a, b) < 1e-5 for a, b in zip(streamed, untiled))


# ------------------------------------------------------------------------------------------- engine level


def test_engine_forward_pieces_yields_exact_stitched_maps_and_their_gradients():
    """StreamingCNN(outputs=...) cuts after the named children; forward_pieces yields their maps, exact
    in value, and a loss on all of them gives the un-tiled gradients (input and every parameter)."""
    from conftest import timm_trunk

    trunk = randomize_(timm_trunk("resnet10t"), seed=5).double().eval()
    s = StreamingCNN(trunk, 64, outputs=("act1", "layer1", "layer3"))
    ends = [p.names[-1] for p in s._pieces]
    assert {"act1", "layer1", "layer3"} <= set(ends) and "layer2" in ends  # layer2: stitch="auto" cuts there
    x = torch.randn(1, 3, 141, 127, dtype=torch.float64)
    assert s.plan((141, 127)).pieces[0].num_tiles > 1

    def run(streaming):
        s.streaming = streaming
        s.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        maps = dict(s.forward_pieces(inp))
        g = torch.Generator().manual_seed(4)
        sum((m * torch.randn(m.shape, generator=g, dtype=m.dtype)).sum() for m in maps.values()).backward()
        return maps, inp.grad, {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}

    (m1, gx1, gp1), (m0, gx0, gp0) = run(True), run(False)
    assert list(m1) == ends and set(m0) == set(m1)
    assert all(relative_error(m1[k], m0[k]) <= EXACT for k in m0)
    assert relative_error(gx1, gx0) <= EXACT
    assert set(gp1) == set(gp0) == {n for n, p in s.named_parameters() if p.requires_grad}
    assert max(relative_error(gp1[n], gp0[n]) for n in gp0) <= EXACT
    with pytest.raises(StreamingError, match="not children"):
        StreamingCNN(trunk, 64, outputs=("layer9",))
