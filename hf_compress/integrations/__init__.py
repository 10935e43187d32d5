"""Integrations with libraries built on the transformers Trainer (sentence-transformers).

Each module here imports its library only inside the functions that need it, so importing the module (e.g. from a
recipe) never requires the optional dependency.
"""
