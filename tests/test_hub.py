"""Hub sharing: save_pretrained / push_to_hub / load_pretrained / validate_config / render_model_card.

Offline throughout: the Hub is a hand-built huggingface_hub cache (HF_HUB_OFFLINE=1), uploads stop at
huggingface_hub's HfApi boundary (monkeypatched). Outputs of reloaded models are compared bit for bit.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import HfApi, RepoUrl, constants, file_download

import timm_stream  # noqa: F401 - registers stream_<arch>
from timm_stream import load_pretrained, push_to_hub, render_model_card, save_pretrained, validate_config
from timm_stream.testing import assert_several_tiles, randomize_

ROOT = Path(__file__).resolve().parents[1]
ARCH = "stream_test_resnet"
TILE = (96, 128)
STAGES = 3  # not the default (4): a reload that ignored model_args would stream differently
LABELS = ["tumor", "stroma", "fat"]
CARD = {"license": "cc-by-4.0", "datasets": ["camelyon16"], "training_data": "CAMELYON16 training slides",
        "metrics": {"auc": 0.91234, "accuracy": 0.875}, "base_pretrained": "timm/test_resnet.r160_in1k"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PICKLES = (".bin", ".pth", ".pt", ".pkl", ".ckpt")


def _model(**kwargs):
    """A stream_test_resnet with every parameter and BatchNorm statistic random (timm zero-initializes
    the last BN gamma of each block, which would switch residual branches off in a reload check)."""
    model = timm.create_model(ARCH, tile_size=TILE, stream_stages=STAGES, num_classes=3, **kwargs)
    return randomize_(model).eval()


def _forward(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 192, 224, generator=torch.Generator().manual_seed(0))  # several tiles


@pytest.fixture(scope="module")
def saved(tmp_path_factory, image):
    """(directory, reference output) of one saved model."""
    torch.manual_seed(0)
    model = _model()
    assert_several_tiles(model, image.shape[-2:])
    directory = tmp_path_factory.mktemp("saved") / "model"
    save_pretrained(model, directory, label_names=LABELS, card=CARD)
    return directory, _forward(model, image)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache, offline. huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into
    `constants` when imported, so the constants are patched along with the environment."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # huggingface_hub < 0.25 copies the constant into file_download at import
    monkeypatch.setattr(file_download, "HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _publish(cache: Path, repo_id: str, files: dict[str, Path | bytes]) -> Path:
    """Lay out a repository the way huggingface_hub caches it: models--<user>--<repo>/snapshots/<commit>/
    with refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (snapshot / name).write_bytes(content)
        else:
            shutil.copyfile(content, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fails a test that reaches torch.load (the only way timm reads a pickle checkpoint)."""
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail(f"torch.load{a}"))
    return calls


# ---------------------------------------------------------------------------------------------- save


def test_save_writes_config_safetensors_and_card_only(saved):
    directory, _ = saved
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == ARCH
    assert config["num_classes"] == 3
    assert config["label_names"] == LABELS
    args = config["model_args"]
    assert args["tile_size"] == list(TILE) and args["stream_stages"] == STAGES
    assert args["normalize_input"] is False and args["train_tail_norms"] is False and args["num_classes"] == 3
    cfg = config["pretrained_cfg"]
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5]  # test_resnet's cfg
    assert cfg["hf_hub_filename"] == "model.safetensors"  # a plain hf-hub load never looks for a pickle
    assert validate_config(config) is config


def test_streaming_args_saved_without_the_factory_record(tmp_path):
    """timm < 1.0.2x records no factory kwargs (model._model_args): the streaming arguments must still
    reach model_args."""
    model = _model()
    model.__dict__.pop("_model_args", None)  # absent on such timm versions
    save_pretrained(model, tmp_path)
    args = json.loads((tmp_path / "config.json").read_text())["model_args"]
    assert args["tile_size"] == list(TILE) and args["stream_stages"] == STAGES and args["num_classes"] == 3


def test_save_stays_inside_the_directory(tmp_path):
    before = sorted(os.listdir(tmp_path))
    save_pretrained(_model(), tmp_path / "a" / "b")  # parents are created, inside the given path
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["a"])
    assert os.listdir(tmp_path / "a") == ["b"]
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["README.md", "config.json", "model.safetensors"]


def test_save_refuses_to_write_through_a_symlink(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        save_pretrained(_model(), directory)
    assert outside.read_text() == "precious"
    assert sorted(os.listdir(directory)) == ["config.json"]  # nothing half-written either


def test_save_records_normalize_input_and_drops_runtime_options(tmp_path, image):
    model = _model(normalize_input=True, progress=False)
    save_pretrained(model, tmp_path)
    args = json.loads((tmp_path / "config.json").read_text())["model_args"]
    assert args["normalize_input"] is True and "progress" not in args
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    pixels = (image * 60 + 128).clamp(0, 255).to(torch.uint8)
    assert torch.equal(_forward(reloaded, pixels), _forward(model, pixels))


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="streaming model"):
        save_pretrained(timm.create_model("test_resnet"), tmp_path)
    with pytest.raises(ValueError, match="2 label_names for 3 classes"):
        save_pretrained(_model(), tmp_path, label_names=["a", "b"])
    with pytest.raises(ValueError, match="unknown model card fields \\['licence'\\]"):
        save_pretrained(_model(), tmp_path, card={"licence": "mit"})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- reload


def test_local_dir_reload_is_bitwise_identical(saved, image):
    directory, expected = saved
    model = timm.create_model(f"local-dir:{directory}", pretrained=True)
    assert type(model).__name__ == "StreamingResNet"
    assert model.tile_size == TILE and model.stream_stages == STAGES and model.num_classes == 3
    assert model.pretrained_cfg["label_names"] == LABELS
    assert torch.equal(_forward(model, image), expected)


def test_override_tile_size_keeps_outputs(saved, image):
    directory, expected = saved
    model = load_pretrained(directory, tile_size=160)  # a plain path means local-dir
    assert model.tile_size == (160, 160) and model.stream_stages == STAGES
    assert_several_tiles(model, image.shape[-2:])
    assert torch.equal(_forward(model, image), expected)  # streaming is exact, whatever the tiles


def test_hf_hub_reload_from_offline_cache(saved, image, hub_cache, no_unpickling):
    directory, expected = saved
    _publish(hub_cache, "someone/stream-test", {n: directory / n for n in os.listdir(directory)})
    model = timm.create_model("hf-hub:someone/stream-test", pretrained=True)
    assert model.tile_size == TILE and model.stream_stages == STAGES
    assert torch.equal(_forward(model, image), expected)
    model = load_pretrained(f"hf-hub:someone/stream-test@{COMMIT}", tile_size=(128, 160))
    assert model.tile_size == (128, 160)
    assert_several_tiles(model, image.shape[-2:])
    assert torch.equal(_forward(model, image), expected)
    assert no_unpickling == []


def test_hub_reload_never_falls_back_to_pickle(saved, hub_cache, no_unpickling):
    """Without model.safetensors timm would fall back to pytorch_model.bin (torch.load): the pinned
    hf_hub_filename (saved configs) and load_pretrained's overlay (any config) prevent it."""
    directory, _ = saved
    pickled = directory.parent / "pytorch_model.bin"
    torch.save({}, pickled)  # written with the real torch.save; never read back
    _publish(hub_cache, "someone/pickled", {"config.json": directory / "config.json", "pytorch_model.bin": pickled})
    with pytest.raises(FileNotFoundError):  # LocalEntryNotFoundError: model.safetensors is not cached
        timm.create_model("hf-hub:someone/pickled", pretrained=True)

    config = json.loads((directory / "config.json").read_text())
    del config["pretrained_cfg"]["hf_hub_filename"]  # as timm's own export writes it
    _publish(hub_cache, "someone/timm-export",
             {"config.json": json.dumps(config).encode(), "pytorch_model.bin": pickled})
    with pytest.raises(FileNotFoundError):
        load_pretrained("hf-hub:someone/timm-export")
    assert no_unpickling == []


def test_local_dir_without_safetensors_is_refused(saved, tmp_path, no_unpickling):
    directory, _ = saved
    shutil.copyfile(directory / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(f"local-dir:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):  # timm alone would torch.load the .bin
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert no_unpickling == []


def test_load_pretrained_rejects_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="hf-hub:<user>/<repo>"):
        load_pretrained("someone/repo")  # timm would also refuse an unprefixed repo id
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)


def test_unimported_registry_error_is_timms(saved):
    """Without `import timm_stream`, timm itself answers 'Unknown model (stream_...)'; the card's usage
    snippet says to import timm_stream first (checked in the card test)."""
    import subprocess

    directory, _ = saved
    code = f"import timm; timm.create_model('local-dir:{directory}', pretrained=True)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and f"Unknown model ({ARCH})" in result.stderr


# ---------------------------------------------------------------------------------------------- validation


def _valid_config():
    return {"architecture": ARCH, "num_classes": 3, "label_names": LABELS,
            "model_args": {"tile_size": [96, 128], "stream_stages": 3, "normalize_input": False, "num_classes": 3},
            "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "hf_hub_filename": "model.safetensors"}}


def _with(path: str, value):
    config = _valid_config()
    *parents, key = path.split(".")
    target = config
    for p in parents:
        target = target[p]
    if value is _DELETE:
        del target[key]
    else:
        target[key] = value
    return config


_DELETE = object()

MALFORMED = [
    (_with("architecture", _DELETE), "no 'architecture'"),
    (_with("architecture", "resnet18"), "'resnet18' is not a streaming model"),
    (_with("architecture", "stream_no_such_net"), "unknown streaming architecture 'stream_no_such_net'"),
    (_with("architecture", 7), "no 'architecture'"),
    (_with("model_args.tile_size", 0), "model_args: tile_size must be a positive int or a pair"),
    (_with("model_args.tile_size", -96), "tile_size must be a positive int"),
    (_with("model_args.tile_size", "96"), "tile_size must be a positive int"),
    (_with("model_args.tile_size", [96]), "tile_size must be a positive int"),
    (_with("model_args.tile_size", [96, 0]), "tile_size must be a positive int"),
    (_with("model_args.tile_size", [96, 128, 3]), "tile_size must be a positive int"),
    (_with("model_args.tile_size", 96.0), "tile_size must be a positive int"),
    (_with("model_args.tile_size", True), "tile_size must be a positive int"),
    (_with("model_args.stream_stages", 5), "model_args: stream_stages must be an int from 0 to 4, got 5"),
    (_with("model_args.stream_stages", -1), "stream_stages must be an int from 0 to 4, got -1"),
    (_with("model_args.stream_stages", "2"), "stream_stages must be an int from 0 to 4"),
    (_with("model_args.stream_stages", True), "stream_stages must be an int from 0 to 4"),
    (_with("model_args.normalize_input", "yes"), "normalize_input must be true or false"),
    (_with("model_args.num_classes", -1), "model_args: num_classes must be a non-negative int"),
    (_with("model_args.num_classes", 4), "model_args.num_classes=4 disagrees with num_classes=3"),
    (_with("model_args.pretrained_cfg", {}), "must not contain \\['pretrained_cfg'\\]"),
    (_with("model_args.cache_dir", "/tmp"), "must not contain \\['cache_dir'\\]"),
    (_with("model_args", [96, 128]), "model_args must be a JSON object"),
    (_with("num_classes", "3"), "num_classes must be a non-negative int"),
    (_with("label_names", ["a", "b"]), "2 label_names for 3 classes"),
    (_with("label_names", "abc"), "label_names must be a list of strings"),
    (_with("pretrained_cfg", "x"), "pretrained_cfg must be a JSON object"),
    (_with("pretrained_cfg.foo", 1), "pretrained_cfg has unknown fields \\['foo'\\]"),
    (_with("pretrained_cfg.custom_load", True), "custom_load is set"),
    (_with("pretrained_cfg.hf_hub_filename", "pytorch_model.bin"), "only .safetensors weights are loaded"),
    (_with("pretrained_cfg.mean", ["a", 1, 2]), "pretrained_cfg.mean must be a list of numbers"),
    (_with("pretrained_cfg.std", [0.5, 0, 0.5]), "pretrained_cfg.std must be positive"),
    ([ARCH], "config must be a JSON object"),
]


def test_valid_config_passes():
    config = _valid_config()
    assert validate_config(config) is config
    del config["model_args"], config["pretrained_cfg"], config["label_names"]  # all optional
    validate_config(config)


@pytest.mark.parametrize("config, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_config_is_rejected(config, message):
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def _cases(*needles):
    return [case for case in MALFORMED if any(n in case[1] for n in needles)][:len(needles)]


@pytest.mark.parametrize("config, message", _cases("'resnet18'", "got 5", "model_args: tile_size", ".safetensors"))
def test_load_pretrained_validates_before_building(tmp_path, config, message, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("built from an invalid config"))
    with pytest.raises(ValueError, match=message):
        load_pretrained(f"local-dir:{tmp_path}")


def test_load_pretrained_validates_overrides(saved, monkeypatch):
    directory, _ = saved
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("built from invalid overrides"))
    with pytest.raises(ValueError, match="keyword argument: tile_size must be a positive int"):
        load_pretrained(directory, tile_size=0)
    with pytest.raises(ValueError, match="keyword argument: stream_stages must be an int from 0 to 4"):
        load_pretrained(directory, stream_stages=9)
    (directory.parent / "broken").mkdir()
    (directory.parent / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_pretrained(directory.parent / "broken")


# ---------------------------------------------------------------------------------------------- card


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_model_card_fields(saved):
    directory, _ = saved
    front, body = _front_matter((directory / "README.md").read_text(encoding="utf-8"))
    assert front["library_name"] == "timm"
    assert {"streaming", "timm"} <= set(front["tags"])
    assert front["license"] == "cc-by-4.0"
    assert front["datasets"] == ["camelyon16"]
    assert front["base_model"] == "timm/test_resnet.r160_in1k"

    model = _model()
    g = model.streamer.geometry
    (top, bottom), (left, right) = g.halo
    assert f"| Architecture | `{ARCH}` (streaming `test_resnet`) |" in body
    assert "| Pretrained origin | [`timm/test_resnet.r160_in1k`]" in body
    assert f"| Tile size | {TILE[0]} × {TILE[1]} pixels" in body
    assert f"| Streamed stages | stem + {STAGES} of 4 stages |" in body
    assert f"| Total stride (streamed part) | {g.stride[0]} × {g.stride[1]} |" in body
    assert f"| Receptive field (streamed part) | {g.receptive_field[0]} × {g.receptive_field[1]} pixels |" in body
    assert f"top {top}, bottom {bottom}, left {left}, right {right} pixels" in body
    assert "| Classes | 3: tumor, stroma, fat |" in body
    assert "## Training data\n\nCAMELYON16 training slides\n" in body
    assert "| auc | 0.9123 |" in body and "| accuracy | 0.875 |" in body
    usage = body.split("## Usage\n\n```python\n", 1)[1].split("```", 1)[0]
    assert usage.startswith("import timm_stream")
    assert 'timm.create_model("hf-hub:<user>/<repo>", pretrained=True)' in usage  # no repo known when saving
    assert "Pinckaers, Hans and van Ginneken, Bram and Litjens, Geert" in body
    assert "doi     = {10.1109/TPAMI.2020.3019563}" in body
    assert "$" not in body  # every template field was filled


def test_model_card_defaults_and_optional_sections():
    model = timm.create_model("stream_test_convnext", tile_size=128)
    front, body = _front_matter(render_model_card(model))
    # the base weights' license (older timm cfgs carry none: then "unknown")
    assert front["license"] == (model.pretrained_cfg.get("license") or "unknown")
    assert "datasets" not in front and "base_model" not in front  # nothing claimed that was not given
    assert "## Training data" not in body and "## Metrics" not in body
    assert "| Streamed stages | stem + 4 of 4 stages |" in body
    assert "# stream_test_convnext" in body
    with pytest.raises(ValueError, match="card\\['metrics'\\] must be a dict"):
        render_model_card(model, card={"metrics": [0.9]})


# ---------------------------------------------------------------------------------------------- push


def test_push_to_hub_uploads_safetensors_config_and_card(monkeypatch):
    seen = {}

    def create_repo(self, repo_id, **kwargs):
        seen["create_repo"] = (repo_id, kwargs, self.token)
        return RepoUrl("https://huggingface.co/someone/stream-test")  # the namespace is filled in by the Hub

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        seen["upload"] = dict(repo_id=repo_id, kwargs=kwargs, files=sorted(os.listdir(folder)),
                              readme=(folder / "README.md").read_text(encoding="utf-8"),
                              config=json.loads((folder / "config.json").read_text()))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    result = push_to_hub(_model(), "stream-test", label_names=LABELS, card=CARD, private=True,
                         token="hf_test_token", commit_message="v1")

    assert result == "commit-info"
    repo_id, kwargs, token = seen["create_repo"]
    assert repo_id == "stream-test" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert token == "hf_test_token"  # handed to huggingface_hub, which owns token handling
    upload = seen["upload"]
    assert upload["repo_id"] == "someone/stream-test"
    assert upload["files"] == ["README.md", "config.json", "model.safetensors"]
    assert not any(name.endswith(PICKLES) for name in upload["files"])
    assert upload["kwargs"]["commit_message"] == "v1"
    assert upload["kwargs"]["delete_patterns"] == ["pytorch_model.bin"]
    assert upload["config"]["architecture"] == ARCH and upload["config"]["model_args"]["tile_size"] == list(TILE)
    front, body = _front_matter(upload["readme"])
    assert "streaming" in front["tags"] and front["license"] == "cc-by-4.0"
    assert 'timm.create_model("hf-hub:someone/stream-test", pretrained=True)' in body
    assert "# stream-test" in body


# ---------------------------------------------------------------------------------------------- packaging


def test_card_template_is_package_data():
    from importlib import resources

    template = resources.files("timm_stream.model_cards").joinpath("stream_model.md")
    assert template.is_file() and "$front_matter" in template.read_text(encoding="utf-8")


def test_pyproject_lists_every_package():
    """[tool.setuptools] lists packages (find cannot see the out-of-tree timm_stream.model_cards): a new
    subpackage missing from the list would be missing from wheels."""
    import tomllib

    from setuptools import find_packages

    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    assert set(find_packages(str(ROOT), include=["timm_stream", "timm_stream.*"])) <= listed
    assert setuptools_cfg["package-dir"]["timm_stream.model_cards"] == "model_cards"
    assert "timm_stream.model_cards" in listed



# ---------------------------------------------------------------------------------------------- every load path


def _saved_with(directory: Path, target: Path, path: str, value) -> Path:
    """A copy of the saved model at `target` whose config.json has `path` (dotted) set to `value`."""
    target.mkdir(parents=True, exist_ok=True)
    if target != directory:
        for name in os.listdir(directory):
            shutil.copyfile(directory / name, target / name)
    config = json.loads((directory / "config.json").read_text())
    *parents, key = path.split(".")
    node = config
    for p in parents:
        node = node.setdefault(p, {})
    node[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


# (config field, value, message): each would build a wrong model (or crash obscurely) through timm's path
BAD_ON_EVERY_PATH = [
    ("model_args.num_classes", 7, "model_args.num_classes=7 disagrees with num_classes=3"),  # a random head
    ("num_classes", 7, "model_args.num_classes=3 disagrees with num_classes=7"),
    ("model_args.local_stages", 2, "local_stages"),  # was "got multiple values for keyword argument"
    ("model_args.features_only", True, "features_only"),
    ("model_args.tile_size", [96, 0], "tile_size must be a positive int"),
    ("model_args.stream_stages", 9, "stream_stages must be an int from 0 to 4"),
    ("model_args.normalize_input", "yes", "normalize_input must be true or false"),
    ("pretrained_cfg.hf_hub_filename", "pytorch_model.bin", "only .safetensors weights are loaded"),
    ("pretrained_cfg.hf_hub_filename", "weights.pth", "only .safetensors weights are loaded"),
    ("label_names", {"0": "a", "5": "b"}, "label_names has index 5, outside the class range 0..2"),
]
LOAD_PATHS = ["load_pretrained", "timm local-dir", "timm local-dir, pretrained=False", "timm hf-hub",
              "load_pretrained hf-hub"]


@pytest.mark.parametrize("path", LOAD_PATHS)
@pytest.mark.parametrize("field, value, message", BAD_ON_EVERY_PATH, ids=[f"{f}={v}" for f, v, _ in BAD_ON_EVERY_PATH])
def test_every_load_path_validates(saved, tmp_path, hub_cache, no_unpickling, path, field, value, message):
    directory, _ = saved
    bad = _saved_with(directory, tmp_path / "bad", field, value)
    _publish(hub_cache, "someone/bad", {n: bad / n for n in os.listdir(bad)})
    load = {"load_pretrained": lambda: load_pretrained(bad),
            "timm local-dir": lambda: timm.create_model(f"local-dir:{bad}", pretrained=True),
            "timm local-dir, pretrained=False": lambda: timm.create_model(f"local-dir:{bad}"),
            "timm hf-hub": lambda: timm.create_model("hf-hub:someone/bad", pretrained=True),
            "load_pretrained hf-hub": lambda: load_pretrained("hf-hub:someone/bad")}[path]
    with pytest.raises(ValueError, match=message):
        load()
    assert no_unpickling == []


def test_valid_config_loads_on_every_path(saved, hub_cache, image):
    directory, expected = saved
    _publish(hub_cache, "someone/good", {n: directory / n for n in os.listdir(directory)})
    for model in (timm.create_model(f"local-dir:{directory}", pretrained=True),
                  timm.create_model("hf-hub:someone/good", pretrained=True), load_pretrained(directory)):
        assert model.num_classes == 3
        assert torch.equal(_forward(model, image), expected)


def test_local_stages_is_not_an_argument():
    with pytest.raises(ValueError, match="local_stages is not an argument.*stream_stages"):
        timm.create_model(ARCH, local_stages=2)
    with pytest.raises(ValueError, match="tile_size must be a positive int"):
        timm.create_model(ARCH, tile_size=(96, -1))


def test_timm_hub_load_without_filename_never_unpickles(saved, hub_cache, no_unpickling):
    """A config without hf_hub_filename (as timm's own export writes it) next to a pickle: timm alone
    would torch.load pytorch_model.bin; through the stream entrypoint only model.safetensors is fetched."""
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    del config["pretrained_cfg"]["hf_hub_filename"]
    pickled = directory.parent / "pytorch_model.bin"
    torch.save({}, pickled)
    _publish(hub_cache, "someone/plain-timm", {"config.json": json.dumps(config).encode(),
                                                "pytorch_model.bin": pickled})
    with pytest.raises(FileNotFoundError):  # model.safetensors is not in the cache: refused, not unpickled
        timm.create_model("hf-hub:someone/plain-timm", pretrained=True)
    assert no_unpickling == []


@pytest.mark.parametrize("tile, input_size, warns", [
    ((96, 128), None, False),
    ((20000, 20000), None, True),  # streams nothing on any real image
    ((4096, 4096), [3, 4096, 4096], True),  # the config's own (large) input size runs as one tile
    ((2048, 2048), [3, 4096, 4096], False),
    ((4096, 4096), [3, 224, 224], False),  # an ImageNet cfg says nothing about the images streamed
])
def test_tile_too_large_to_stream_warns(saved, tmp_path, recwarn, tile, input_size, warns):
    from timm_stream.models import LargeTileWarning

    directory, _ = saved
    target = _saved_with(directory, tmp_path / "m", "model_args.tile_size", list(tile))
    if input_size:
        _saved_with(target, target, "pretrained_cfg.input_size", input_size)
    model = timm.create_model(f"local-dir:{target}", pretrained=True)
    assert model.tile_size == tile
    assert any(issubclass(w.category, LargeTileWarning) for w in recwarn.list) == warns


def test_hub_config_and_weights_come_from_one_commit(saved, hub_cache, image, monkeypatch):
    """The branch moves (a new push with another config and other weights) between timm's config
    download and its weights download: never the old config with the new weights."""
    import timm.models._hub as timm_hub
    from safetensors.torch import save_file

    directory, expected = saved
    _publish(hub_cache, "someone/moving", {n: directory / n for n in os.listdir(directory)})
    repo = hub_cache / "models--someone--moving"
    new_commit = "f" * 40
    (repo / "snapshots" / new_commit).mkdir()
    _saved_with(directory, repo / "snapshots" / new_commit, "model_args.tile_size", [64, 64])
    save_file({k: torch.zeros_like(v) for k, v in _model().state_dict().items()},
              repo / "snapshots" / new_commit / "model.safetensors")
    real = timm_hub.hf_hub_download

    def download_then_push(*args, **kwargs):
        path = real(*args, **kwargs)
        if path.endswith("config.json"):
            (repo / "refs" / "main").write_text(new_commit)  # someone pushes right after the config download
        return path

    monkeypatch.setattr(timm_hub, "hf_hub_download", download_then_push)
    with pytest.raises(RuntimeError, match="changed while it was loading.*@<commit>"):
        timm.create_model("hf-hub:someone/moving", pretrained=True)

    (repo / "refs" / "main").write_text(COMMIT)
    model = load_pretrained("hf-hub:someone/moving")  # resolves the commit once, before timm downloads
    assert model.pretrained_cfg["hf_hub_id"] == f"someone/moving@{COMMIT}"
    assert model.tile_size == TILE and torch.equal(_forward(model, image), expected)

    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(timm_hub, "hf_hub_download", real)
    model = timm.create_model("hf-hub:someone/moving", pretrained=True)  # no push meanwhile: pinned, loads
    assert model.pretrained_cfg["hf_hub_id"] == f"someone/moving@{COMMIT}"
    assert torch.equal(_forward(model, image), expected)


# ---------------------------------------------------------------------------------------------- card: names are text


HOSTILE = ["a|b", "x\n---\n# Injected heading", "<script>alert(1)</script>", "`tick` *bold* [link](http://x)"]


@pytest.mark.parametrize("name", HOSTILE)
def test_card_names_cannot_break_the_markdown(name):
    model = _model()
    text = render_model_card(model, label_names=[name, "b", "c"], card={"metrics": {name: 0.5, "ok": 1.0},
                                                                         "title": name, "base_pretrained": name})
    front, body = _front_matter(text)
    assert front["library_name"] == "timm"
    lines = body.splitlines()
    assert not any(line.startswith("# Injected") for line in lines)  # no heading injected
    assert "<script>" not in body
    metric_rows = [line for line in lines if line.startswith("| ") and line.endswith(" 0.5 |")]
    assert len(metric_rows) == 1
    cells = [c for c in re.split(r"(?<!\\)\|", metric_rows[0])[1:-1]]  # unescaped pipes separate cells
    assert len(cells) == 2
    for row in ("| Classes", "| Pretrained origin"):
        line = next(line for line in lines if line.startswith(row))
        assert len(re.split(r"(?<!\\)\|", line)) == 4, line  # the row keeps its two cells


@pytest.mark.parametrize("license_", ["Apache 2.0", "mit\nfoo: bar", "", 3])
def test_card_license_must_be_a_hub_id(license_):
    with pytest.raises(ValueError, match="not a Hub license id"):
        render_model_card(_model(), card={"license": license_})
    render_model_card(_model(), card={"license": "cc-by-nc-sa-4.0"})


def test_label_names_keys_in_range(tmp_path):
    with pytest.raises(ValueError, match="index 5, outside the class range 0..2"):
        render_model_card(_model(), label_names={0: "a", 5: "b"})
    with pytest.raises(ValueError, match="index -1"):
        save_pretrained(_model(), tmp_path, label_names={-1: "a"})
    assert "a, b" in render_model_card(_model(), label_names={"0": "a", "1": "b"})
