"""Paper-style reports read from result files: tables (Markdown, LaTeX, CSV), plots (PNG) and a
self-contained HTML page."""

from benchmarks.reports.tables import build_tables, leaderboard

__all__ = ["build_tables", "leaderboard"]
