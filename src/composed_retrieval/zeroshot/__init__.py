"""Zero-shot CIR: tower pre-training on pairs, textual inversion evaluation commands."""
