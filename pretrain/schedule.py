"""Pretraining's lr schedule: the ground floor's, which the linear probe's step schedule shares."""

from moco_transfer.schedule import lr_at_epoch  # noqa: F401 - engine.py imports it from here
