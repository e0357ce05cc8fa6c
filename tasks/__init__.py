"""Prefect tasks: thin wrappers that call tempflow_core and move URIs between stages."""
