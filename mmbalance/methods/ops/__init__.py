"""Pieces that several methods share (a method file never imports another method file)."""
