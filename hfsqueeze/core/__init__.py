"""The ground floor: errors, strict configs, the stage contract, data, Hugging Face helpers and the built-in models.

Nothing here imports any other part of hfsqueeze; everything else may import from here.
"""
