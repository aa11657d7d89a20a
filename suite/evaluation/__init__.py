"""Evaluators: each turns a model into metric rows carrying a protocol id, unit and direction.

Evaluators know nothing about quantization: they see a model and token windows.
"""
