"""Puzzle architecture search and FFN Fusion (block library, BLD, scoring, cost model, MIP, GKD, fusion)."""
