"""Typer command-line interface: parses, calls sslctl.api, prints. Nothing imports cli."""
