"""Thin Bitrix24 REST client: transport, envelope, errors, shared limits."""
