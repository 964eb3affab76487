"""Sub-commands of this package (placeholder until implemented)."""
import argparse


def register(sub: argparse._SubParsersAction) -> None:
    return None
