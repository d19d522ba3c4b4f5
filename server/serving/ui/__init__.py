"""The web UI at ``GET /ui``: playground, policies and live dashboard (docs/ui.md)."""
