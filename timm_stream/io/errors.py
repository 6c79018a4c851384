"""The one error of the slide/image readers."""
from __future__ import annotations

__all__ = ["ImageReadError"]


class ImageReadError(ValueError):
    """An image file cannot be read as asked. The message names the file, the problem and the fix."""
