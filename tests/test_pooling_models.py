"""stream_<arch> models with streamed (and masked, and attention) global pooling, lazy inputs, and the
Lightning module passing masks."""
from __future__ import annotations

import pytest
import timm
import torch

import timm_stream  # noqa: F401 - registers stream_<arch>
from timm_stream.models._pooling import StreamedPool
from timm_stream.testing import RecordingLazyImage, compare_streaming, randomize_, relative_error

EXACT = 1e-9
SIZE = (211, 243)  # not a multiple of the stride 32


def model_for(pool: str, **kwargs):
    # tile 200 holds test_resnet's whole receptive field (167 px): a lazy image streams as one piece
    model = timm.create_model("stream_test_resnet", tile_size=200, global_pool=pool, num_classes=3, **kwargs)
    return randomize_(model, seed=1).double()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax", "attention"])
def test_lazy_masked_model_equals_the_untiled_model(pool):
    model = model_for(pool)
    assert model.pooling_streamed
    plan = model.streamer.plan(SIZE, torch.float64, lazy=True, pooled=True)
    assert len(plan.pieces) == 1 and plan.num_tiles >= 4
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(2, 1, 9, 4, generator=torch.Generator().manual_seed(1)) > 0.5
    mask[:, :, -1, 0] = True
    out_grad = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for streaming in (False, True):
        model.streaming = streaming
        model.zero_grad(set_to_none=True)
        image = RecordingLazyImage(x) if streaming else x
        out = model(image, mask=mask)
        out.backward(out_grad)
        results.append((out.detach(), grads(model)))
    (out0, g0), (out1, g1) = results
    assert relative_error(out1, out0) <= EXACT
    assert set(g0) == set(g1) == {n for n, p in model.named_parameters()}
    errors = {n: relative_error(g1[n], g0[n]) for n in g0 if not n.endswith("reducer.w.bias")}  # true grad 0
    assert max(errors.values()) <= EXACT, max(errors.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax"])
def test_unmasked_streamed_pooling_equals_timm(pool):
    model = model_for(pool)
    base = timm.create_model("test_resnet", global_pool=pool, num_classes=3)
    base.load_state_dict(model.state_dict())  # the same keys: the reducers have no parameters
    base.double().eval()
    model.eval()
    x = torch.randn(1, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(model(RecordingLazyImage(x)), base(x)) <= EXACT
        assert relative_error(model(x), base(x)) <= EXACT
        # forward_features still returns the stitched map; forward_head pools a map as timm does
        features = model.forward_features(x)
        assert features.shape == base.forward_features(x).shape
        assert relative_error(model.forward_head(features), base(x)) <= EXACT


def test_attention_is_a_trainable_part_of_the_model():
    model = model_for("attention")
    keys = [k for k in model.state_dict() if "reducer" in k]
    assert sorted(keys) == sorted(f"global_pool.reducer.{p}.{w}" for p in "VUw" for w in ("weight", "bias"))
    assert isinstance(model.global_pool, StreamedPool)
    reducer = model.global_pool.reducer
    model.reset_classifier(5)  # a new fc; the trained attention stays
    assert model.global_pool.reducer is reducer and model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 5)


def test_masks_with_unstreamed_stages_pool_the_stitched_map():
    model = model_for("max", stream_stages=2)
    assert not model.pooling_streamed
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[:, :, 1:3, :2] = True
    c = compare_streaming(model, x, lambda v: setattr(model, "streaming", v), mask=mask)
    assert c.worst <= EXACT
    with torch.no_grad():
        assert relative_error(model(x, mask=mask), model(x)) > 1e-3


def test_a_local_tail_joins_the_streamed_part():
    model = timm.create_model("stream_efficientnet_lite0", tile_size=512, global_pool="attention")
    assert model.pooling_streamed
    streamed = [name for name, _ in model.streamer._children]
    assert streamed[-2:] == ["conv_head", "bn2"]
    assert model.global_pool.reducer.channels == model.num_features == 1280


def test_bad_masks_are_refused():
    model = model_for("avg")
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="bool tensor"):
        model(x, mask=torch.ones(1, 1, 4, 4))
    plain = timm.create_model("stream_test_resnet", tile_size=200, global_pool="", num_classes=0)
    with pytest.raises(ValueError, match="no maskable global pooling"):
        plain(x.float(), mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_lightning_module_passes_masks_and_accepts_attention():
    from timm_stream.lightning import StreamingClassifier

    module = StreamingClassifier("stream_test_resnet", num_classes=2, tile_size=200, global_pool="attention")
    images = torch.randint(0, 255, (1, 3, 160, 150), dtype=torch.uint8)
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[:, :, 0, 0] = True
    with torch.no_grad():
        masked = module(images, mask=mask)
        assert relative_error(module(images, mask=~mask), masked) > 1e-6  # the mask reaches the pooling
        batch = {"image": RecordingLazyImage(images), "label": torch.tensor([1]), "path": ["a"], "mask": mask}
        assert torch.allclose(module.predict_step(batch, 0)["probs"], masked.softmax(1))


@pytest.mark.parametrize("pool", ["max", "attention"])
def test_pooling_survives_save_and_load(tmp_path, pool):
    model = model_for(pool).float().eval()
    timm_stream.save_pretrained(model, tmp_path / "m")
    loaded = timm_stream.load_pretrained(tmp_path / "m").eval()
    assert loaded.global_pool.pool_type == pool
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("pool", ["avg", "max", "attention"])
def test_half_precision_models_pool_in_their_own_dtype(pool):
    """Reducers accumulate in float32 but hand back the map's dtype, as timm's pooling does: a bf16 model's
    head must get bf16 features (streamed and un-tiled alike)."""
    model = timm.create_model("stream_test_resnet", tile_size=96, global_pool=pool, num_classes=3,
                              stream_stages=4).to(torch.bfloat16)
    x = torch.randn(1, 3, 256, 192, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert model.pooling_streamed and model.stream_plan(x.shape[2:]).num_tiles > 1
    streamed = model(x)
    model.streaming = False
    untiled = model(x)
    assert streamed.dtype == untiled.dtype == torch.bfloat16
    assert relative_error(streamed.float(), untiled.float()) < 2e-2


def test_non_images_are_refused_naming_the_lazy_image_protocol():
    model = model_for("avg")

    class NoDtype:
        shape = (1, 3, 64, 64)

        def __getitem__(self, index):
            return torch.zeros(1, 3, 1, 1)

    with pytest.raises(TypeError, match="lazy image has `.shape`"):
        model.streamer(NoDtype())
