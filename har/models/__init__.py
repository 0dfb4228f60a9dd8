"""Backbones with early-exit heads and the registry that builds them by name."""

from har.facts import bare_layout, check_layout, parse_layout
from har.models.exits import MultiExitNet
from har.models.registry import create_model, list_models

__all__ = ["MultiExitNet", "bare_layout", "check_layout", "create_model", "list_models", "parse_layout"]
