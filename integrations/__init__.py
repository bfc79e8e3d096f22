"""attnc inside the frameworks its users already work in (transformers, diffusers).

Each module is imported on its own (``attnc.integrations.transformers``) so that
attnc itself never needs the framework installed.
"""
