"""Full fine-tuning: every backbone parameter trains with the protocol's optimiser.

The reference uses no layer-wise learning-rate decay and keeps drop-path at the protocol's value
(0), so this is the base `Method` with nothing added.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.method import FULL_FINE_TUNING, Method, register_method


@dataclass
class FullConfig:
    """Full fine-tuning has no hyperparameters of its own."""


@register_method
class Full(Method):
    name = "full"
    paper = "Full fine-tuning baseline (as reported in Rein, CVPR 2024, Table 3)"
    Config = FullConfig
    role = FULL_FINE_TUNING
