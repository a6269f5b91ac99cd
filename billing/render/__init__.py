"""Rendering billing data for people and tools: invoice and report HTML, Prometheus text."""
