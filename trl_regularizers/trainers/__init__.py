"""Thin subclasses of TRL trainers; each routes tensors the parent computed into trl_regularizers.core."""
