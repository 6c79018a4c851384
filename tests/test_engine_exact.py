"""Exactness: streamed output, input gradient and every parameter gradient equal the un-tiled run.

The core is a property test over random local conv stacks (float64, every parameter and BN statistic
randomized, random image and tile sizes, both stitching modes). Then a float32 timm ResNet-18 trunk,
and a check that the randomization the suite relies on is effective.
"""
from __future__ import annotations

import torch
from conftest import EXAMPLES, assert_exact, build_stack, local_stacks, timm_trunk
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st

from timm_stream.engine import StreamingCNN
from timm_stream.testing import randomize_, relative_error


def check_random_stack(stack, data):
    cin, specs = stack
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    module = randomize_(build_stack(specs, cin), seed).double()
    batch = data.draw(st.integers(1, 3), label="batch")
    height = data.draw(st.integers(12, 100), label="height")
    width = data.draw(st.integers(12, 100), label="width")
    stitch = data.draw(st.sampled_from(["auto", "none"]), label="stitch")
    keep_last = data.draw(st.booleans(), label="keep_last_tile")

    probe = StreamingCNN(module, 10**6, stitch=stitch, in_channels=cin)  # any tile works: read the minimum
    try:
        plan = probe.plan((height, width), torch.float64)
    except Exception:  # the image is too small for the network: un-tiled fails as well
        with torch.no_grad():
            try:
                module(torch.zeros(1, cin, height, width, dtype=torch.float64))
            except RuntimeError:
                assume(False)
        raise
    min_h, min_w = plan.pieces[0].min_tile_size
    drawn = (min_h + data.draw(st.integers(0, 40), label="extra_h"),
             min_w + data.draw(st.integers(0, 40), label="extra_w"))
    # Keep the run time bounded: tiny tiles on a 100 px image make thousands of tiles (and a cheap
    # first piece gives later pieces tiny tiles too), so fall back to larger first tiles.
    for tile in (drawn, (min_h + height // 3, min_w + width // 3), (min_h + height, min_w + width)):
        s = StreamingCNN(module, tile, stitch=stitch, keep_last_tile=keep_last, in_channels=cin)
        num_tiles = s.plan((height, width), torch.float64).num_tiles
        if num_tiles <= 40:
            break
    assume(num_tiles <= 40)
    event(f"tiles: {'1' if num_tiles == 1 else '2-9' if num_tiles < 10 else '10+'}")
    x = torch.randn(batch, cin, height, width, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    note(str(s.plan((height, width), torch.float64)))
    assert_exact(s, x)


@settings(max_examples=EXAMPLES(220))
@given(local_stacks(), st.data())
def test_random_local_stacks_are_exact(stack, data):
    check_random_stack(stack, data)


# ---------------------------------------------------------------------------------------------
# A real timm trunk in float32


def test_timm_resnet18_trunk_float32():
    trunk = randomize_(timm_trunk("resnet18"), seed=3)
    s = StreamingCNN(trunk, 240)
    x = torch.randn(1, 3, 300, 260, generator=torch.Generator().manual_seed(0))
    plan = s.plan((300, 260))
    assert plan.pieces[0].num_tiles > 1, str(plan)
    c = assert_exact(s, x, tol=1e-4)
    assert len(c.param_grads) == sum(1 for p in trunk.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# The suite's randomization is effective


def _halves(block, x):
    """A deliberately wrong tiling: each half of the width with no halo at all."""
    w = x.shape[-1] // 2
    return torch.cat([block(x[..., :w]), block(x[..., w:])], dim=-1)


def test_randomization_reveals_a_missing_halo():
    trunk = timm_trunk("resnet18").eval()
    blocks = [b for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4) for b in layer]
    # timm zero-initializes the last BN gamma of every block: the residual branch contributes nothing
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    block = trunk.layer1[0]
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))  # identity shortcut only
        default_error = relative_error(_halves(block, x), block(x))
    assert default_error == 0.0  # a halo-less tiling looks exact with default initialization

    randomize_(trunk, seed=0)
    assert all(bool((b.bn2.weight != 0).all()) for b in blocks)
    with torch.no_grad():
        assert not torch.allclose(block(x), torch.relu(x))
        assert relative_error(_halves(block, x), block(x)) > 1e-3  # ...and is caught once randomized
    for name, buf in trunk.named_buffers():  # running statistics are randomized too
        if name.endswith("running_mean"):
            assert torch.count_nonzero(buf) > 0, name
        if name.endswith("running_var"):
            assert not torch.equal(buf, torch.ones_like(buf)), name
