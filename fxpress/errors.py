"""Errors fxpress raises: each names what is wrong and how to fix it."""

from __future__ import annotations


class FxpressError(Exception):
    """Base of every error fxpress raises on purpose."""


class CaptureError(FxpressError):
    """The model could not be captured into an FX graph."""


class ConfigError(FxpressError):
    """A pass or compile option has a bad value; raised before any work is done."""


class RecipeError(FxpressError):
    """A recipe names an unknown pass or field, or has the wrong shape."""


class PassOrderError(FxpressError):
    """Passes were listed in an order that cannot work (e.g. quantize before rotate)."""


class PassError(FxpressError):
    """A pass failed; the message names it and the passes that ran before it."""

    def __init__(self, pass_name: str, ran_before: list[str], reason: str):
        before = ", ".join(ran_before) if ran_before else "none"
        super().__init__(f"pass '{pass_name}' failed (passes run before it: {before}): {reason}")
        self.pass_name = pass_name
        self.ran_before = ran_before
        self.reason = reason


class LoweringError(FxpressError):
    """A program could not be lowered to the requested target."""


class ArtifactError(FxpressError):
    """An artifact on disk is missing, truncated or not an fxpress artifact."""


class ModelNotFoundError(FxpressError):
    """The model name is neither the embedded default, a local path nor a cached Hugging Face id."""
