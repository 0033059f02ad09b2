"""Parity with the authors' implementation: replay of their reference outputs."""
