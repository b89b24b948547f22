"""Every rendering of a run, split by what it renders: :mod:`.console` (rich tables and a terminal chart),
:mod:`.markdown` (``report.md``, ``report.json``), :mod:`.plots` (PNG figures), :mod:`.analyses` (the
paper's analyses), :mod:`.cards` (model cards of the exported folders); :mod:`.common` holds what they share.

All functions take the plain ``report`` dict that :func:`prune_attattr.pipeline.run` builds (the same
content as ``report.json``), so a notebook can re-render a saved run.
"""

from .analyses import analyses_markdown, draw_tree, plot_connections, plot_effectiveness, plot_triggers, plot_universality, write_analyses_files
from .cards import card_metadata, render_card, write_cards
from .common import by_flops, chance_warning, method_settings, report_warnings
from .console import curves_table, deployment_table, print_chance_warning, print_report, recovery_table, terminal_chart
from .markdown import deployment_markdown, recovery_markdown, write_json, write_markdown
from .plots import write_neuron_heatmaps, write_plot, write_tradeoff_plot

__all__ = [
    "curves_table",
    "terminal_chart",
    "print_report",
    "write_json",
    "write_markdown",
    "write_plot",
    "write_neuron_heatmaps",
    "by_flops",
    "recovery_markdown",
    "recovery_table",
    "write_tradeoff_plot",
    "chance_warning",
    "report_warnings",
    "render_card",
    "card_metadata",
    "write_cards",
    "print_chance_warning",
    "method_settings",
    "analyses_markdown",
    "write_analyses_files",
    "draw_tree",
    "plot_effectiveness",
    "plot_connections",
    "plot_universality",
    "plot_triggers",
    "deployment_table",
    "deployment_markdown",
]
