"""Adapters that run attnc patterns inside other frameworks (diffusers, transformers)."""
