#!/usr/bin/env python
"""Turn a training result into a Hugging Face Hub model (or, with --dry-run, a local folder).

SOURCE is either
  * a Lightning checkpoint written by ``timm-stream fit`` (``timm_stream.lightning.StreamingClassifier``):
    the model is rebuilt from the checkpoint's ``timm_stream`` entry (model name, model kwargs, label
    names) and the model card is filled with the run's validation/test metrics stored in it; or
  * a folder written by ``timm_stream.save_pretrained`` (config.json + model.safetensors): it is
    reloaded (``timm_stream.load_pretrained``) and pushed with a fresh card.

Checkpoints are read with ``torch.load(weights_only=True)`` only; only safetensors are ever written.

Examples:
    python scripts/push_to_hub.py lightning_logs/version_0/checkpoints/best.ckpt --repo-id me/camelyon-r50 \\
        --license apache-2.0 --datasets camelyon16 --training-data "CAMELYON16 train slides, level 5"
    python scripts/push_to_hub.py best.ckpt --dry-run --output-dir exported/   # writes the folder only

The token is huggingface_hub's (``huggingface-cli login`` or ``HF_TOKEN``), or --token.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("source", help="Lightning checkpoint (.ckpt) or save_pretrained folder")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", help="Hub repository, e.g. user/model-name")
    target.add_argument("--dry-run", action="store_true", help="write the Hub files to --output-dir, upload nothing")
    parser.add_argument("--output-dir", default=None, help="folder for --dry-run (default: <source>_hub)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository private")
    parser.add_argument("--token", default=None, help="Hub token (default: huggingface_hub's login / HF_TOKEN)")
    parser.add_argument("--commit-message", default="Add streaming model")
    parser.add_argument("--license", default=None, help="Hub license id, e.g. apache-2.0")
    parser.add_argument("--datasets", nargs="*", default=None, help="Hub dataset ids")
    parser.add_argument("--training-data", default=None, help="free text for the card's Training data section")
    parser.add_argument("--base-pretrained", default=None, help="initial weights (default: from the checkpoint)")
    parser.add_argument("--label-names", nargs="*", default=None, help="override the class names")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME=VALUE",
                        help="extra card metric (repeatable)")
    return parser.parse_args(argv)


def _card(args: argparse.Namespace, base: dict) -> dict:
    card = dict(base)
    for key in ("license", "datasets", "training_data", "base_pretrained"):
        value = getattr(args, key)
        if value:
            card[key] = value
    for item in args.metric:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--metric expects NAME=VALUE, got {item!r}")
        try:
            parsed: object = float(value)
        except ValueError:
            parsed = value
        card.setdefault("metrics", {})[name] = parsed
    return card


def load_source(source: str):
    """(model, label_names, card fields) from a checkpoint or a saved folder."""
    import timm_stream
    from timm_stream.lightning.export import card_from_info, model_from_checkpoint

    path = Path(source)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text(encoding="utf-8")) if (path / "config.json").is_file() else {}
        model = timm_stream.load_pretrained(str(path))
        return model, config.get("label_names"), {}
    if not path.is_file():
        raise SystemExit(f"{source}: no such checkpoint or folder")
    model, info = model_from_checkpoint(path)
    return model, info.get("label_names"), card_from_info(info)


def main(argv=None) -> int:
    args = parse_args(argv)
    import timm_stream

    try:
        model, label_names, card = load_source(args.source)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label_names = args.label_names or label_names
    card = _card(args, card)
    if args.dry_run:
        out = Path(args.output_dir or f"{os.path.splitext(args.source.rstrip('/'))[0]}_hub")
        timm_stream.save_pretrained(model, out, label_names=label_names, card=card)
        print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out} (dry run: nothing uploaded)")
        return 0
    info = timm_stream.push_to_hub(model, args.repo_id, label_names=label_names, card=card, private=args.private,
                                   token=args.token, commit_message=args.commit_message)
    print(f"pushed to {getattr(info, 'repo_url', args.repo_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
