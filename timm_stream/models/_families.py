"""Where each timm model family's ``forward_features`` can be cut into a streamed prefix and a tail.

A family is described by the steps its ``forward_features`` runs, in order (``"stages.*"`` expands a
container into its children). Stages are timm's own feature points (``model.feature_info``) at
reductions 4, 8, 16 and 32: the same four stages for every family. The stem is every step before the
first stage; steps after the last feature point (``norm_pre``, ``conv_head``...) belong to the tail.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["TrunkSplit", "FAMILY_STEPS", "family_of", "split_trunk"]

# Class name -> steps of its forward_features, in execution order.
FAMILY_STEPS: dict[str, tuple[str, ...]] = {
    "ResNet": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    "ResNetV2": ("stem", "stages.*", "norm"),
    "ConvNeXt": ("stem", "stages.*", "norm_pre"),
    "RegNet": ("stem", "s1", "s2", "s3", "s4", "final_conv"),
    "VGG": ("features.*",),
    "DenseNet": ("features.*",),
    "DLA": ("base_layer", "level0", "level1", "level2", "level3", "level4", "level5"),
    "CspNet": ("stem", "stages.*"),
    "XceptionAligned": ("stem", "blocks.*", "act"),
    "Xception": ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "block1", "block2", "block3", "block4",
                 "block5", "block6", "block7", "block8", "block9", "block10", "block11", "block12",
                 "conv3", "bn3", "act3", "conv4", "bn4", "act4"),
    "EfficientNet": ("conv_stem", "bn1", "blocks.*", "conv_head", "bn2"),
    "MobileNetV3": ("conv_stem", "bn1", "blocks.*"),
}

STAGE_REDUCTIONS = (4, 8, 16, 32)


def family_of(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILY_STEPS:
            return cls.__name__
    raise ValueError(f"{type(model).__name__} is not a model family timm_stream knows how to split; "
                     f"known: {sorted(FAMILY_STEPS)}")


def _steps(model: nn.Module, family: str) -> list[tuple[str, nn.Module]]:
    steps = []
    for name in FAMILY_STEPS[family]:
        if name.endswith(".*"):
            container = model.get_submodule(name[:-2])
            steps += [(f"{name[:-2]}.{child}", module) for child, module in container.named_children()]
        else:
            steps.append((name, model.get_submodule(name)))
    return steps


@dataclass
class TrunkSplit:
    family: str
    stem: list[tuple[str, nn.Module]]
    stages: list[list[tuple[str, nn.Module]]]  # the four stages at reductions 4, 8, 16, 32
    tail: list[tuple[str, nn.Module]]  # forward_features steps after the last stage

    def streamed(self, stream_stages: int) -> list[tuple[str, nn.Module]]:
        return self.stem + [step for stage in self.stages[:stream_stages] for step in stage]

    def unstreamed(self, stream_stages: int) -> list[tuple[str, nn.Module]]:
        return [step for stage in self.stages[stream_stages:] for step in stage] + self.tail


def split_trunk(model: nn.Module) -> TrunkSplit:
    """Cut ``model.forward_features`` into stem, four stages and tail, using timm's feature_info."""
    family = family_of(model)
    steps = _steps(model, family)
    names = [name for name, _ in steps]

    def step_index(module_path: str) -> int:
        for i, name in enumerate(names):
            if module_path == name or module_path.startswith(name + "."):
                return i
        raise ValueError(f"feature point '{module_path}' is not inside any forward_features step of {family}")

    ends = {}
    for info in model.feature_info:
        if info["reduction"] in STAGE_REDUCTIONS:
            ends[info["reduction"]] = max(ends.get(info["reduction"], -1), step_index(info["module"]))
    staged = [i for i in model.feature_info if i["reduction"] >= STAGE_REDUCTIONS[0]]
    if len(staged) == len(STAGE_REDUCTIONS) and sorted(ends) != list(STAGE_REDUCTIONS):
        # output_stride < 32 (dilated last stages): reductions repeat (4, 8, 16, 16); the four stage
        # points are still the last four feature points, in order
        ends = {r: step_index(i["module"]) for r, i in zip(STAGE_REDUCTIONS, staged)}
    if sorted(ends) != list(STAGE_REDUCTIONS):
        raise ValueError(f"{family} has feature points at reductions {sorted(ends)}, expected {STAGE_REDUCTIONS}")
    bounds = [ends[r] for r in STAGE_REDUCTIONS]
    # The stem ends after timm's stem feature point (resnet 'act1', efficientnet 'blocks.0'); families
    # without one (convnext) have a stem of every step before the first stage's step.
    stem_points = [step_index(i["module"]) for i in model.feature_info if i["reduction"] < STAGE_REDUCTIONS[0]]
    stem_end = max(stem_points) + 1 if stem_points else bounds[0]
    stages, start = [], stem_end
    for end in bounds:
        stages.append(steps[start:end + 1])
        start = end + 1
    return TrunkSplit(family, steps[:stem_end], stages, steps[start:])
