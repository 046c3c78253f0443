"""Sandbox portal: a local stand-in for a Bitrix24 cloud portal, for development, tests and benchmarks.

It is a separate program (`python -m sandbox`) and imports nothing from the rest of the project.
"""
